"""Model and generation settings: plain dataclasses that round-trip through JSON."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value a user gave is invalid; `param` names the field when known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _from_dict(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
    return cls(**d)


@dataclass
class ModelConfig:
    """Sizes of the continuous-state Transformer (GPT-2 architecture)."""

    vocab_size: int = 4096
    n_positions: int = 512  # context length, committed prefix + tail
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0
    k_max: int = 64  # largest tail length the K-conditioning knows
    film: str = "every_block"  # where K's FiLM applies: "every_block" | "input" (an open point of the paper)
    table_radius: float = 1.0  # R: every table row has this l2 norm (when normalised)
    table_normalised: bool = True  # False only for the AR baseline's free embedding
    table_trainable: bool = False  # frozen by default (the paper's setting)
    eos_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd", "k_max"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}", name)
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})", "n_embd")
        if self.film not in ("every_block", "input"):
            raise ConfigError(f"film must be 'every_block' or 'input', got {self.film!r}", "film")
        if not (self.table_radius > 0 and math.isfinite(self.table_radius)):
            raise ConfigError(f"table_radius must be positive and finite, got {self.table_radius!r}", "table_radius")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return _from_dict(cls, d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def alpha_profile(k: int, alpha_max: float, alpha_min: float | None = None) -> list[float]:
    """The α of each tail slot, front (index 0) to back: linear from alpha_max down to alpha_min
    (default alpha_max / K). The engine steps with it and training simulates it."""
    lo = alpha_max / k if alpha_min is None else alpha_min
    if k == 1:
        return [alpha_max]
    return [alpha_max + (lo - alpha_max) * i / (k - 1) for i in range(k)]


def mix_seed(seed: int, *parts: int) -> int:
    """One seed from a base seed and indices (sample i, draw j / step, stream …): the same
    value whatever batch or process asks, so derived random streams never depend on batching."""
    weights = (7919, 104_729)
    if len(parts) > len(weights):
        raise ValueError(f"mix_seed takes at most {len(weights)} indices")
    return (seed * 1_000_003 + sum(w * p for w, p in zip(weights, parts))) % (2 ** 63)


@dataclass
class GenerationConfig:
    """Settings of one generation run (per sequence where the engine allows)."""

    max_new_tokens: int = 64
    tail: int = 16  # K, liquid tail length; K=1 is projected autoregression
    guidance: float = 1.0  # s; 1 means no unconditional pass
    alpha_max: float = 1.0  # step size / maturity of the front slot
    alpha_min: float | None = None  # back slot; None → alpha_max / K
    embryo_scale: float = 0.1  # embryo norm as a fraction of the table radius
    history_noise: float = 0.0  # norm of the noise added to committed vectors as the model reads them (× R)
    # stochastic dynamics: noise of norm tail_noise·R·√α_j added to slot j per update. The default is the
    # best setting measured for the shipped model (README, "Generation quality"); 0 = Algorithm 1 as published
    tail_noise: float = 0.4
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def __post_init__(self):
        if not isinstance(self.tail, int) or self.tail < 1:
            raise ConfigError(f"tail length K must be an integer >= 1, got {self.tail!r}", "tail")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}", "max_new_tokens")
        if not math.isfinite(self.guidance):
            raise ConfigError(f"guidance must be finite, got {self.guidance!r}", "guidance")
        if not (0 < self.alpha_max <= 1):
            raise ConfigError(f"alpha_max must be in (0, 1], got {self.alpha_max!r}", "alpha_max")
        if self.alpha_min is not None and not (0 < self.alpha_min <= self.alpha_max):
            raise ConfigError(f"alpha_min must be in (0, alpha_max], got {self.alpha_min!r}", "alpha_min")
        if not (self.embryo_scale >= 0 and math.isfinite(self.embryo_scale)):
            raise ConfigError(f"embryo_scale must be >= 0 and finite, got {self.embryo_scale!r}", "embryo_scale")
        for name in ("history_noise", "tail_noise"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} must be >= 0 and finite, got {v!r}", name)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty", "stop")

    def alpha_profile(self) -> list[float]:
        """Per-slot α, front (index 0) to back: see `alpha_profile`."""
        return alpha_profile(self.tail, self.alpha_max, self.alpha_min)

    def overriding(self, **options) -> "GenerationConfig":
        """A copy with the options that are not None set (an interface's optional fields)."""
        return dataclasses.replace(self, **{k: v for k, v in options.items() if v is not None})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        return _from_dict(cls, d)
