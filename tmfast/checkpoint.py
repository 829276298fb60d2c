"""Checkpoint directories and the Hugging Face GPT-2 import.

A checkpoint is a directory:
  config.json         ModelConfig
  model.safetensors   weights (no pickle)
  tokenizer.json      a `tokenizers` tokenizer (optional)
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import TMModel
from .table import normalise_rows

CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME = "config.json", "model.safetensors", "tokenizer.json"

# the checkpoints shipped in the package (train/make_default.sh makes them)
SHIPPED_DIR = Path(__file__).parent / "assets"
SHIPPED = {"maturation": SHIPPED_DIR / "maturation", "ar": SHIPPED_DIR / "ar"}
DEFAULT_CHECKPOINT = SHIPPED["maturation"]


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read."""


def save_checkpoint(model: TMModel, directory: str | os.PathLike, tokenizer=None,
                    extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write the checkpoint atomically: into a temp dir beside it, then rename.
    extra_files: more files to write into it (text or bytes), e.g. training state."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    model.config.save(tmp / CONFIG_NAME)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "library": "tmfast"})
    if tokenizer is not None:
        tokenizer.save(str(tmp / TOKENIZER_NAME))
    for name, content in (extra_files or {}).items():
        if isinstance(content, bytes):
            (tmp / name).write_bytes(content)
        else:
            (tmp / name).write_text(content)
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        if old.exists():
            _rmtree(old)
        directory.rename(old)
        tmp.rename(directory)
        _rmtree(old)
    else:
        tmp.rename(directory)
    return directory


def _rmtree(path: Path) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def load_tokenizer(directory: str | os.PathLike):
    from tokenizers import Tokenizer
    path = Path(directory) / TOKENIZER_NAME
    return Tokenizer.from_file(str(path)) if path.exists() else None


def load_checkpoint(directory: str | os.PathLike, device="cpu", dtype=None) -> tuple[TMModel, object]:
    """(model, tokenizer or None) from a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).exists():
            raise CheckpointError(f"{directory} is not a tmfast checkpoint (missing {name})")
    try:
        cfg = ModelConfig.load(directory / CONFIG_NAME)
    except (json.JSONDecodeError, ValueError, TypeError) as e:
        raise CheckpointError(f"bad {CONFIG_NAME} in {directory}: {e}") from None
    model = TMModel(cfg)
    state = load_file(str(directory / WEIGHTS_NAME))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"weights in {directory} do not match its config: {first}") from None
    if missing or unexpected:
        raise CheckpointError(f"weights in {directory} do not match its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device=device, dtype=dtype)
    return model.eval(), load_tokenizer(directory)


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
