"""tmfast: Token Maturation — autoregressive generation with a liquid tail of
continuous token vectors, committed by nearest-neighbour projection."""
import warnings

# torch warns at import when numpy is absent; the runtime never uses numpy (it is a training and
# evaluation extra), so the warning is noise on every command
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

from .checkpoint import DEFAULT_CHECKPOINT, CheckpointError, from_hf_gpt2, load_checkpoint, save_checkpoint  # noqa: E402
from .config import ConfigError, GenerationConfig, ModelConfig  # noqa: E402
from .engine import (Engine, GenerationError, GenerationResult, MaturationEngine, QueueFullError,
                     RequestEvent, StepEvent)
from .model import TMModel  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CHECKPOINT", "CheckpointError", "ConfigError", "Engine", "GenerationConfig", "GenerationError", "GenerationResult",
    "MaturationEngine", "QueueFullError", "RequestEvent", "ModelConfig", "StepEvent", "TMModel", "from_hf_gpt2", "load_checkpoint",
    "save_checkpoint",
]
