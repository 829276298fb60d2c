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


def unicode_error(text: str) -> str | None:
    """Why a str is not text a tokenizer takes (a lone surrogate such as JSON's "\\ud800"), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"{e.reason} at character {e.start}"
    return None


def one_line(e: BaseException) -> str:
    """An exception as one line for a user: its first non-empty line, whitespace collapsed."""
    lines = [" ".join(x.split()) for x in str(e).splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


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
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}", "layer_norm_epsilon")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}", "dropout")
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < self.vocab_size:
            raise ConfigError(f"eos_token_id {self.eos_token_id} is outside the vocabulary (size {self.vocab_size})",
                              "eos_token_id")

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


def _integer(cfg, name: str, lo: int | None = None, hi: int | None = None, what: str | None = None) -> None:
    """A field that must be an int (not a bool, not a float) in [lo, hi]: one-line ConfigError."""
    v = getattr(cfg, name)
    ok = isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi)
    if not ok:
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{what or name} must be an integer {rng}, got {v!r}", name)


def _real(cfg, name: str, lo: float | None = None, hi: float | None = None) -> None:
    """A field that must be a finite real number (int or float, not a bool or a string) in [lo, hi]."""
    v = getattr(cfg, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        and (lo is None or v >= lo) and (hi is None or v <= hi)
    if not ok:
        rng = "" if lo is None and hi is None else f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None \
            else f" >= {lo:g}" if lo is not None else f" <= {hi:g}"
        raise ConfigError(f"{name} must be a finite number{rng}, got {v!r}", name)


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

    # Ranges a request must stay inside: seeds are what every random stream is seeded from
    # (mix_seed works modulo 2**63); scales are fractions of the table radius (or, for guidance,
    # of the prediction): beyond these bounds fp32 activations only overflow, never help.
    SEED_RANGE = (0, 2 ** 63 - 1)
    MAX_SCALE = 1e3
    MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 1000

    def __post_init__(self):
        _integer(self, "tail", lo=1, what="tail length K")
        _integer(self, "max_new_tokens", lo=1)
        _integer(self, "seed", lo=self.SEED_RANGE[0], hi=self.SEED_RANGE[1])
        _real(self, "guidance", lo=-self.MAX_SCALE, hi=self.MAX_SCALE)
        _real(self, "alpha_max")
        if not (0 < self.alpha_max <= 1):
            raise ConfigError(f"alpha_max must be in (0, 1], got {self.alpha_max!r}", "alpha_max")
        if self.alpha_min is not None:
            _real(self, "alpha_min")
            if not (0 < self.alpha_min <= self.alpha_max):
                raise ConfigError(f"alpha_min must be in (0, alpha_max], got {self.alpha_min!r}", "alpha_min")
        for name in ("embryo_scale", "history_noise", "tail_noise"):
            _real(self, name, lo=0.0, hi=self.MAX_SCALE)
        if not isinstance(self.stop_at_eos, bool):
            raise ConfigError(f"stop_at_eos must be true or false, got {self.stop_at_eos!r}", "stop_at_eos")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(x, str) for x in self.stop):
            raise ConfigError(f"stop must be a string or a list of strings, got {self.stop!r}", "stop")
        self.stop = tuple(self.stop)
        if any(not x for x in self.stop):
            raise ConfigError("stop strings must be non-empty", "stop")
        bad = next((e for e in map(unicode_error, self.stop) if e), None)
        if bad:
            raise ConfigError(f"stop strings must be valid Unicode ({bad})", "stop")
        if len(self.stop) > self.MAX_STOP_STRINGS or any(len(x) > self.MAX_STOP_CHARS for x in self.stop):
            raise ConfigError(f"at most {self.MAX_STOP_STRINGS} stop strings of at most {self.MAX_STOP_CHARS} "
                              "characters each", "stop")

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
