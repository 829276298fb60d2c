"""Checkpoint directories and the Hugging Face GPT-2 import.

A checkpoint is a directory:
  config.json         ModelConfig
  model.safetensors   weights (no pickle)
  tokenizer.json      a `tokenizers` tokenizer (optional)

Saving survives a kill at any point (and a second kill in the next save): the name of a
directory says whether it is complete, and renames (atomic) are the only way a complete one
comes to be. For a checkpoint D in P:
  P/D           the checkpoint; complete whenever it exists
  P/.D.tmp.*    a save being written: incomplete; removed by the next save / recovery
  P/.D.new      a save written in full and fsynced, not yet in place: complete
  P/.D.old      the previous checkpoint, moved aside for the swap: complete
save_checkpoint: recover; write .D.tmp.X and fsync it; rename it to .D.new; rename D to .D.old;
rename .D.new to D; remove .D.old. recover_checkpoint (each save, `train --resume`): roll an
interrupted swap forward (.D.new → D) or back (.D.old → D when there is no .D.new), then remove
the leftovers (.tmp dirs at once; a complete copy only once another complete one is in place as D).
load_checkpoint never renames (a reader may race a writer): with D missing it reads .D.new,
else .D.old, and warns.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import tempfile
import typing
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig, one_line
from .model import TMModel
from .table import normalise_rows

CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME = "config.json", "model.safetensors", "tokenizer.json"

# the checkpoints shipped in the package (train/make_default.sh makes them)
SHIPPED_DIR = Path(__file__).parent / "assets"
SHIPPED = {"maturation": SHIPPED_DIR / "maturation", "ar": SHIPPED_DIR / "ar"}
DEFAULT_CHECKPOINT = SHIPPED["maturation"]

# The named points of a save, in order, and of a recovery: tests stop a save at each (a kill
# there leaves what the name says). $TMFAST_CKPT_KILL_AT=POINT[:N] SIGKILLs the process the
# N-th time (default 1st) it reaches POINT; `fault_hook(point)`, when set, runs at every
# point (in-process tests raise from it).
SAVE_POINTS = ("partial", "staged", "new", "aside", "swapped")
RECOVER_POINTS = ("recover_aside", "recover_restored", "recover_clean")
fault_hook: Callable[[str], None] | None = None
_hits: dict[str, int] = {}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read."""


def _point(name: str) -> None:
    if fault_hook is not None:
        fault_hook(name)
    spec = os.environ.get("TMFAST_CKPT_KILL_AT")
    if spec and spec.partition(":")[0] == name:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] == int(spec.partition(":")[2] or 1):
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


# ------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------
def sibling_paths(directory: str | os.PathLike) -> tuple[Path, Path]:
    """(.D.new, .D.old) beside checkpoint D."""
    d = Path(directory)
    return d.with_name(f".{d.name}.new"), d.with_name(f".{d.name}.old")


def _leftovers(directory: Path) -> list[Path]:
    """Temp dirs of earlier saves beside D: .D.tmp.* (and the names older versions used:
    .D.XXXXXXXX from mkdtemp, the trainer's .D.staging and ..D.staging.*)."""
    n = re.escape(directory.name)
    pat = re.compile(rf"\.{n}\.tmp\..+|\.{n}\.[a-z0-9_]{{8}}|\.{n}\.staging|\.\.{n}\.staging\..+")
    parent = directory.parent
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if pat.fullmatch(p.name))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (renames), to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover_checkpoint(directory: str | os.PathLike) -> list[str]:
    """Put the newest complete copy a killed save left in place as `directory` and remove the
    leftovers of killed saves. Only for the checkpoint's writer (it renames); returns what it did."""
    d = Path(directory)
    new, old = sibling_paths(d)
    done = []
    if new.is_dir():  # a complete save that did not reach its place: roll forward
        if d.exists():
            _remove(old)
            d.rename(old)
            _point("recover_aside")
        new.rename(d)
        _fsync(d.parent)
        done.append(f"finished an interrupted save ({new.name} → {d.name})")
    elif old.is_dir() and not d.exists():  # killed mid-swap before .new existed: roll back
        old.rename(d)
        _fsync(d.parent)
        done.append(f"restored the previous checkpoint ({old.name} → {d.name})")
        _point("recover_restored")
    # .tmp dirs are never complete; the rest (.old, older versions' temp dirs) only once D is
    if d.is_dir():
        redundant = ([old] if old.exists() else []) + _leftovers(d)
    else:
        redundant = [p for p in _leftovers(d) if p.name.startswith(f".{d.name}.tmp.")]
    for p in redundant:
        _remove(p)
        done.append(f"removed {p.name}")
        _point("recover_clean")
    return done


def _write_extra(path: Path, content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        content(path)


def save_checkpoint(model: TMModel, directory: str | os.PathLike, tokenizer=None,
                    extra_files: dict[str, str | bytes | Callable[[Path], None]] | None = None) -> Path:
    """Write the checkpoint so that a kill at any point leaves a complete one (module docstring).
    extra_files: more files to write into it, in order: text, bytes, or a function that writes
    the path it is given (e.g. training state; the trainer puts train_state.json last)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save a checkpoint over {directory}: it is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(directory)
    new, old = sibling_paths(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp.", dir=directory.parent))
    try:
        model.config.save(tmp / CONFIG_NAME)
        _point("partial")
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "library": "tmfast"})
        if tokenizer is not None:
            tokenizer.save(str(tmp / TOKENIZER_NAME))
        for name, content in (extra_files or {}).items():
            _write_extra(tmp / name, content)
        for p in tmp.iterdir():
            _fsync(p)
        _fsync(tmp)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point("staged")
    tmp.rename(new)  # complete from here on
    _fsync(directory.parent)
    _point("new")
    if directory.exists():
        directory.rename(old)  # recover_checkpoint left no .old
        _point("aside")
    new.rename(directory)
    _fsync(directory.parent)
    _point("swapped")
    for p in [old] + _leftovers(directory):  # D is complete: all else is redundant
        _remove(p)
    return directory


# ------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------
_REQUIRED = ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd")  # the shapes: no default fits


def _config_types() -> dict:
    return typing.get_type_hints(ModelConfig)


def _check_config(d, path: Path) -> None:
    """Types the engine relies on (ModelConfig validates sizes itself); a one-line error each."""
    if not isinstance(d, dict):
        raise CheckpointError(f"bad {path}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise CheckpointError(f"bad {path}: missing {', '.join(missing)}")
    hints = _config_types()
    for name, v in d.items():
        tp = hints.get(name)
        if tp is None:
            continue  # ModelConfig names unknown keys itself
        allowed = set(typing.get_args(tp)) or {tp}
        ok = ((v is None and type(None) in allowed)
              or (isinstance(v, bool) and bool in allowed)
              or (isinstance(v, int) and not isinstance(v, bool) and (int in allowed or float in allowed))
              or (isinstance(v, float) and float in allowed and math.isfinite(v))
              or (isinstance(v, str) and str in allowed))
        if not ok:
            want = " or ".join(sorted("null" if t is type(None) else t.__name__ for t in allowed))
            raise CheckpointError(f"bad {path}: {name} must be {want}, got {json.dumps(v)}")
    # value ranges: ModelConfig's own checks (a ConfigError there becomes a CheckpointError naming the file)


def _device(device, dtype) -> tuple[torch.device, torch.dtype | None]:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"bad device {device!r}: {one_line(e)}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(f"device {device!r}: CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CheckpointError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise CheckpointError(f"device {device!r}: MPS is not available here")
    dt = dtype
    if isinstance(dtype, str):  # a name: "bfloat16", "float16", ...
        dt = getattr(torch, dtype, None) if dtype.isidentifier() and not dtype.startswith("_") else None
    if dtype is not None and not (isinstance(dt, torch.dtype) and dt.is_floating_point):
        raise CheckpointError(f"bad dtype {dtype!r}: not a floating-point torch dtype")
    return dev, dt


def _readable_dir(directory: Path) -> Path:
    """directory, or (when a save was interrupted or is in progress) the complete copy beside it."""
    if directory.is_dir():
        return directory
    for sib in sibling_paths(directory):
        if sib.is_dir():
            warnings.warn(f"checkpoint {directory} is missing (a save was interrupted or is in progress); "
                          f"loading the complete copy {sib}", stacklevel=3)
            return sib
    if directory.exists():
        raise CheckpointError(f"checkpoint {directory} is not a directory")
    raise CheckpointError(f"checkpoint directory not found: {directory}")


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer.json of a checkpoint, or None when it has none."""
    from tokenizers import Tokenizer
    path = Path(directory) / TOKENIZER_NAME
    if not path.exists():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON
        raise CheckpointError(f"cannot read {path}: {one_line(e)}") from None


def load_checkpoint(directory: str | os.PathLike, device="cpu", dtype=None) -> tuple[TMModel, object]:
    """(model, tokenizer or None) from a checkpoint directory. Anything unreadable (missing,
    truncated or corrupt files, a bad config, an unknown or absent device) is a one-line
    CheckpointError naming the file."""
    dev, dtype = _device(device, dtype)
    directory = _readable_dir(Path(directory))
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).exists():
            raise CheckpointError(f"{directory} is not a tmfast checkpoint (missing {name})")
    cfg_path = directory / CONFIG_NAME
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {cfg_path}: {one_line(e)}") from None
    _check_config(raw, cfg_path)
    try:
        cfg = ModelConfig.from_dict(raw)
        with torch.device("meta"):  # shapes only: nothing is allocated until they are checked
            skeleton = TMModel(cfg)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"bad {CONFIG_NAME} in {directory}: {one_line(e)}") from None
    weights = directory / WEIGHTS_NAME
    _check_shapes(skeleton, weights, directory)
    tokenizer = load_tokenizer(directory)
    if tokenizer is not None and tokenizer.get_vocab_size() > cfg.vocab_size:
        raise CheckpointError(f"the tokenizer in {directory} has {tokenizer.get_vocab_size()} tokens, more than the "
                              f"model's vocab_size={cfg.vocab_size}: its ids would not fit the table")
    try:
        state = load_file(str(weights))
    except Exception as e:  # SafetensorError (truncated, bad header), OSError
        raise CheckpointError(f"cannot read {weights}: {one_line(e)} (truncated or corrupt?)") from None
    bad = next((name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:  # a model that can only fail: refuse it here, not request by request
        raise CheckpointError(f"weights in {directory} are not finite ({bad} holds NaN or inf)")
    model = TMModel(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches (already checked against the header)
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"weights in {directory} do not match its config: {first}") from None
    if missing or unexpected:
        raise CheckpointError(f"weights in {directory} do not match its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        model.to(device=dev, dtype=dtype)
    except (RuntimeError, AssertionError) as e:
        raise CheckpointError(f"cannot move the model to {device!r}: {one_line(e)}") from None
    return model.eval(), tokenizer


def _check_shapes(skeleton: TMModel, weights: Path, directory: Path) -> None:
    """The config against the weights file's header (read without loading any tensor): a config
    that does not describe these weights — say, a vocab_size of millions — is refused before
    anything of its size is allocated."""
    from safetensors import safe_open
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError (truncated, bad header), OSError
        raise CheckpointError(f"cannot read {weights}: {one_line(e)} (truncated or corrupt?)") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"weights in {directory} do not match its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    wrong = [k for k in expected if expected[k] != stored[k]]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"weights in {directory} do not match its config: {k} is {list(stored[k])} in "
                              f"{WEIGHTS_NAME}, {list(expected[k])} by {CONFIG_NAME}")


def from_hf_gpt2(name_or_path: str, radius: float | None = None, k_max: int = 64,
                 normalise: bool = True) -> tuple[TMModel, object]:
    """A TMModel whose backbone is a Hugging Face GPT-2 (hub name or local directory).

    The table is GPT-2's input embedding, l2-normalised to `radius` (default: the mean
    row norm of wte, so the backbone sees inputs of the size it was trained on).
    Conditioning starts at identity, so hidden states equal GPT-2's for the same inputs.
    """
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise CheckpointError("importing Hugging Face GPT-2 weights needs transformers: "
                              "pip install 'tmfast[hf]'") from None
    hf = GPT2LMHeadModel.from_pretrained(name_or_path)
    hc = hf.config
    wte = hf.transformer.wte.weight.detach().float()
    if radius is None:
        radius = float(wte.norm(dim=-1).mean())
    cfg = ModelConfig(vocab_size=hc.vocab_size, n_positions=hc.n_positions, n_layer=hc.n_layer,
                      n_head=hc.n_head, n_embd=hc.n_embd, layer_norm_epsilon=hc.layer_norm_epsilon,
                      k_max=k_max, table_radius=radius, table_normalised=normalise,
                      eos_token_id=hc.eos_token_id if (hc.eos_token_id or 0) < hc.vocab_size else None)
    model = TMModel(cfg)
    sd = hf.transformer.state_dict()
    with torch.no_grad():
        model.table.weight.copy_(normalise_rows(wte, radius) if normalise else wte)
        model.wpe.weight.copy_(sd["wpe.weight"])
        model.ln_f.weight.copy_(sd["ln_f.weight"])
        model.ln_f.bias.copy_(sd["ln_f.bias"])
        for i, block in enumerate(model.blocks):
            p = f"h.{i}."
            for ours, theirs in ((block.ln_1, "ln_1"), (block.ln_2, "ln_2")):
                ours.weight.copy_(sd[p + theirs + ".weight"])
                ours.bias.copy_(sd[p + theirs + ".bias"])
            # HF GPT-2 uses Conv1D, whose weight is (in, out): transpose into Linear
            for ours, theirs in ((block.attn.c_attn, "attn.c_attn"), (block.attn.c_proj, "attn.c_proj"),
                                 (block.mlp.c_fc, "mlp.c_fc"), (block.mlp.c_proj, "mlp.c_proj")):
                ours.weight.copy_(sd[p + theirs + ".weight"].t())
                ours.bias.copy_(sd[p + theirs + ".bias"])
    return model.eval(), _hf_tokenizer(name_or_path)


def _hf_tokenizer(name_or_path: str):
    """GPT-2's tokenizer as a `tokenizers.Tokenizer`, or None for a bare model directory."""
    path = Path(name_or_path)
    if path.is_dir():
        if (path / TOKENIZER_NAME).exists():
            return load_tokenizer(path)
        if not (path / "vocab.json").exists():
            return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(name_or_path).backend_tokenizer
