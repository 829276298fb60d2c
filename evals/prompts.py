"""Prompts for the quality table: a file of lines, or windows of a checkpoint's validation split."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import EvalError


@dataclass
class Prompt:
    ids: list[int]
    text: str
    reference: list[int] | None = None  # the true continuation (prompts from the val split)


def prompts_from_file(path: str | Path, tokenizer, limit: int | None = None) -> list[Prompt]:
    """One prompt per non-blank line (the first `limit` of them)."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"prompt file not found: {p}")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise EvalError(f"prompt file has no prompts: {p}")
    lines = lines[:limit] if limit else lines
    return [Prompt(tokenizer.encode(ln).ids, ln) for ln in lines]


def checkpoint_validation_documents(checkpoint_dir: str | Path) -> list[str]:
    """The validation split of the corpus a checkpoint was trained on (its train_config.json),
    re-made by train.data.validation_documents: the same documents training held out."""
    cfg_path = Path(checkpoint_dir) / "train_config.json"
    if not cfg_path.is_file():
        raise EvalError(f"{checkpoint_dir} has no train_config.json: cannot find its validation split; "
                        "give --prompts FILE")
    from train.config import config_from
    from train.data import validation_documents
    return validation_documents(config_from(str(cfg_path)))


def prompts_from_documents(docs: list[str], tokenizer, n: int, prompt_tokens: int, ref_tokens: int,
                           seed: int) -> list[Prompt]:
    """n windows of prompt_tokens tokens (+ the next ref_tokens as the reference), drawn
    round-robin over the documents at seeded random offsets, without overlap."""
    gen = torch.Generator().manual_seed(seed)
    encoded = [tokenizer.encode(d).ids for d in docs]
    span = prompt_tokens + ref_tokens
    usable = [e for e in encoded if len(e) >= span]
    if not usable:
        raise EvalError(f"no validation document has {span} tokens")
    order = torch.randperm(len(usable), generator=gen).tolist()
    taken: dict[int, list[int]] = {}
    out: list[Prompt] = []
    tries = 0
    while len(out) < n and tries < 50 * n:
        d = order[tries % len(order)]
        tries += 1
        e = usable[d]
        start = int(torch.randint(0, len(e) - span + 1, (1,), generator=gen))
        if any(abs(start - s) < span for s in taken.get(d, [])):
            continue
        taken.setdefault(d, []).append(start)
        ids = e[start:start + prompt_tokens]
        out.append(Prompt(ids, tokenizer.decode(ids), e[start + prompt_tokens:start + span]))
    if len(out) < n:
        raise EvalError(f"the validation split only holds {len(out)} non-overlapping windows of {span} tokens")
    return out


def validation_prompts(checkpoint_dir: str | Path, tokenizer, n: int, prompt_tokens: int, ref_tokens: int,
                       seed: int) -> list[Prompt]:
    """prompts_from_documents over the validation split of checkpoint_dir's corpus."""
    return prompts_from_documents(checkpoint_validation_documents(checkpoint_dir), tokenizer, n, prompt_tokens,
                                  ref_tokens, seed)
