"""Decoding and scoring with the AR objective (the discrete baseline and judge model).

The AR head is the tied table: logits_t = E · h_t (model.table.logits of model.hidden).
    ar_generate   greedy, optionally with the CTRL repetition penalty
                  (Keskar et al. 2019: a logit of a token already in the sequence is
                  divided by p when positive, multiplied by p when negative)
    ar_nll        per-token negative log-likelihood of continuations (judge perplexity)
    ar_decode     the fast path: batched over a static KV cache, greedy / repetition
                  penalty / nucleus sampling with one generator per sample
ar_generate recomputes the whole sequence each step: the simple reference ar_decode is
tested against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .config import ConfigError
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


# --------------------------------------------------------------------------------------
# AR decoding: batched, static KV cache
# --------------------------------------------------------------------------------------
def _nucleus_pick(logits: torch.Tensor, top_p: float, temperature: float, u: torch.Tensor) -> torch.Tensor:
    """Sample one token per row from the top-p nucleus, by inverse CDF with given uniforms u (B,)."""
    probs = F.softmax(logits / temperature, dim=-1)
    sp, si = probs.sort(dim=-1, descending=True)
    cum = sp.cumsum(-1)
    keep = (cum - sp) < top_p  # the smallest prefix whose mass reaches top_p (first always kept)
    sp = sp * keep
    cdf = sp.cumsum(-1)
    r = (u.to(cdf) * cdf[:, -1]).unsqueeze(1)
    j = torch.searchsorted(cdf, r, right=True).clamp(max=sp.shape[1] - 1)
    j = torch.minimum(j, keep.sum(-1, keepdim=True) - 1)
    return si.gather(1, j).squeeze(1)


@torch.no_grad()
def ar_decode(model: TMModel, prompts: list[list[int]], max_new_tokens: int, *, repetition_penalty: float = 1.0,
              top_p: float | None = None, temperature: float = 1.0, seeds: list[int] | None = None,
              stop_at_eos: bool = False, batch_size: int = 64) -> list[list[int]]:
    """AR continuations of token-id prompts with the tied-table head, batched over a static
    KV cache. Greedy when top_p is None (optionally with the CTRL repetition penalty, as in
    tmfast.ar), else nucleus sampling whose randomness comes from one generator per sample
    (seeds[i]), so a sample does not depend on its batch. Each batch uses a KV cache of its own."""
    if repetition_penalty <= 0:
        raise ConfigError("repetition_penalty must be > 0")
    if top_p is not None and not (0 < top_p <= 1):
        raise ConfigError("top_p must be in (0, 1]")
    if top_p is not None and seeds is None:
        raise ConfigError("nucleus sampling needs one seed per prompt")
    out: list[list[int]] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo:lo + batch_size]
        sd = seeds[lo:lo + batch_size] if seeds is not None else None
        out.extend(_ar_decode_batch(model, chunk, max_new_tokens, repetition_penalty, top_p, temperature,
                                    sd, stop_at_eos))
    return out


def _ar_decode_batch(model, prompts, max_new, penalty, top_p, temperature, seeds, stop_at_eos):
    cfg = model.config
    dev = model.table.weight.device
    B = len(prompts)
    L = torch.tensor([len(p) for p in prompts], device=dev)
    n_slots = int(L.max()) + max_new
    if n_slots > cfg.n_positions:
        raise ConfigError(f"prompt ({int(L.max())} tokens) + {max_new} new tokens exceed the AR model's "
                        f"context of {cfg.n_positions}")
    cache = model.new_cache(B, n_slots)
    T_pre = int(L.max()) - 1
    if T_pre > 0:
        padded = torch.zeros(B, T_pre, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            padded[b, :len(p) - 1] = torch.tensor(p[:-1])
        model.prefill(model.table(padded), cache)
    last = torch.tensor([p[-1] for p in prompts], device=dev)
    pos = L - 1
    seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=dev)
    if penalty != 1.0:
        for b, p in enumerate(prompts):
            seen[b, p] = True
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds] if top_p is not None else None
    s_idx = torch.arange(n_slots, device=dev).view(1, 1, 1, -1)
    toks = []
    for _ in range(max_new):
        mask = s_idx <= pos.view(B, 1, 1, 1)
        h = model.hidden(model.table(last).unsqueeze(1), pos=pos.view(B, 1), mask=mask, cache=cache,
                         cache_slots=pos.view(B, 1))
        logits = model.table.logits(h[:, 0]).float()
        if penalty != 1.0:
            logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        if top_p is None:
            tok = logits.argmax(-1)
        else:
            u = torch.cat([torch.rand(1, generator=g) for g in gens])
            tok = _nucleus_pick(logits, top_p, temperature, u)
        toks.append(tok)
        if penalty != 1.0:
            seen[torch.arange(B, device=dev), tok] = True
        last, pos = tok, pos + 1
    ids = torch.stack(toks, 1).tolist()
    eos = cfg.eos_token_id
    if stop_at_eos and eos is not None:
        ids = [r[:r.index(eos)] if eos in r else r for r in ids]
    return ids
