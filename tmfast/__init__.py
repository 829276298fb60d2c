"""tmfast: Token Maturation — autoregressive generation with a liquid tail of
continuous token vectors, committed by nearest-neighbour projection."""
from .checkpoint import CheckpointError, from_hf_gpt2, load_checkpoint, save_checkpoint
from .config import ConfigError, GenerationConfig, ModelConfig
from .engine import (Engine, GenerationError, GenerationResult, MaturationEngine, QueueFullError,
                     RequestEvent, StepEvent)
from .model import TMModel

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "Engine", "GenerationConfig", "GenerationError", "GenerationResult",
    "MaturationEngine", "QueueFullError", "RequestEvent", "ModelConfig", "StepEvent", "TMModel", "from_hf_gpt2", "load_checkpoint",
    "save_checkpoint",
]
