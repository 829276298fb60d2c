"""Decoding and scoring with the AR objective (the discrete baseline and judge model).

The AR head is the tied table: logits_t = E · h_t (model.table.logits of model.hidden).
    ar_generate   greedy, optionally with the CTRL repetition penalty
                  (Keskar et al. 2019: a logit of a token already in the sequence is
                  divided by p when positive, multiplied by p when negative)
    ar_nll        per-token negative log-likelihood of continuations (judge perplexity)
No cache: the whole sequence is recomputed each step (the models this serves are small).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .model import TMModel


@dataclass
class ARResult:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" | "length"


def _encode(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a string prompt needs a tokenizer")
        ids = tokenizer.encode(prompt).ids
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("prompt is empty")
    return ids


@torch.no_grad()
def ar_logits(model: TMModel, ids: torch.Tensor) -> torch.Tensor:
    """(B,T) ids → (B,T,V) next-token logits of the AR objective."""
    return model.table.logits(model.hidden(model.table(ids)))


@torch.no_grad()
def ar_generate(model: TMModel, tokenizer, prompts, max_new_tokens: int = 48,
                repetition_penalty: float = 1.0, stop_at_eos: bool = True) -> list[ARResult]:
    """Greedy (argmax) decoding, one sequence at a time; repetition_penalty > 1 penalises
    every token already present in prompt + output."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if repetition_penalty <= 0:
        raise ValueError("repetition_penalty must be > 0")
    cfg = model.config
    dev = model.table.weight.device
    out = []
    for p in prompts:
        ids = _encode(tokenizer, p)
        seq = list(ids)
        reason = "length"
        for _ in range(max_new_tokens):
            ctx = torch.tensor([seq[-cfg.n_positions:]], device=dev)
            logits = ar_logits(model, ctx)[0, -1].float()
            if repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(seq)), device=dev)
                v = logits[seen]
                logits[seen] = torch.where(v > 0, v / repetition_penalty, v * repetition_penalty)
            tok = int(logits.argmax())
            if stop_at_eos and cfg.eos_token_id is not None and tok == cfg.eos_token_id:
                reason = "eos"
                break
            seq.append(tok)
        gen = seq[len(ids):]
        text = tokenizer.decode(gen) if tokenizer is not None else ""
        out.append(ARResult(ids, gen, text, reason))
    return out


@torch.no_grad()
def ar_nll(model: TMModel, prompt_ids: Sequence[int], continuation_ids: Sequence[int]) -> tuple[float, int]:
    """(summed NLL in nats, token count) of continuation given prompt under the AR model.
    Judge perplexity of a set = exp(Σ nll / Σ count)."""
    ids = list(prompt_ids) + list(continuation_ids)
    n = len(continuation_ids)
    if n == 0:
        return 0.0, 0
    ids = ids[-(model.config.n_positions + 1):]
    x = torch.tensor([ids[:-1]], device=model.table.weight.device)
    y = torch.tensor(ids[1:], device=x.device)
    logp = F.log_softmax(ar_logits(model, x)[0].float(), dim=-1)
    nll = -logp[torch.arange(len(y)), y][-n:]
    return float(nll.sum()), n
