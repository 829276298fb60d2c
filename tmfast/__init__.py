"""tmfast: Token Maturation — autoregressive generation with a liquid tail of
continuous token vectors, committed by nearest-neighbour projection."""
from .checkpoint import CheckpointError, from_hf_gpt2, load_checkpoint, save_checkpoint
from .config import ConfigError, GenerationConfig, ModelConfig
from .engine import GenerationError, GenerationResult, MaturationEngine, StepEvent
from .model import TMModel

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "GenerationConfig", "GenerationError", "GenerationResult",
    "MaturationEngine", "ModelConfig", "StepEvent", "TMModel", "from_hf_gpt2", "load_checkpoint",
    "save_checkpoint",
]
