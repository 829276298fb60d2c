"""A deliberately naive Token Maturation generator: no cache, the whole sequence is
recomputed every step, masks built from scratch, update and commit written inline.
The correctness anchor the cached engine is checked against."""
from __future__ import annotations

import torch

from tmfast.config import GenerationConfig
from tmfast.engine import EmbryoStream
from tmfast.model import tail_only_mask


@torch.no_grad()
def naive_generate(model, prompt_ids: list[int], g: GenerationConfig) -> list[int]:
    cfg = model.config
    E = model.table.weight.float()
    K = g.tail
    alpha = torch.tensor(g.alpha_profile())
    R, d = cfg.table_radius, cfg.n_embd
    embryos = EmbryoStream.for_purpose(g.seed, "embryo", d, g.embryo_scale * R)
    history = EmbryoStream.for_purpose(g.seed, "history", d, g.history_noise * R)
    jitter = EmbryoStream.for_purpose(g.seed, "tail", d, g.tail_noise * R)
    committed = [E[t] for t in prompt_ids]
    if g.history_noise > 0:  # the model reads committed vectors with noise; commits stay table rows
        committed = list(torch.stack(committed) + history.take(len(committed)))
    tail = embryos.take(K)
    out = []
    for _ in range(g.max_new_tokens):
        P = len(committed)
        x = torch.cat([torch.stack(committed), tail]).unsqueeze(0)
        a = torch.cat([torch.ones(P), alpha]).unsqueeze(0)
        k = torch.tensor([K])
        pred_c = model(x, alpha=a, k=k)[0, P - 1:P - 1 + K]
        zhat = pred_c
        if g.guidance != 1.0:
            mask = tail_only_mask(P + K, torch.tensor([P]))
            pred_u = model(x, alpha=a, k=k, mask=mask)[0, P - 1:P - 1 + K]
            zhat = pred_u + g.guidance * (pred_c - pred_u)
        tail = tail + alpha.unsqueeze(1) * (zhat - tail)
        if g.tail_noise > 0:
            tail = tail + jitter.take(K) * alpha.sqrt().unsqueeze(1)
        tok = int(torch.argmax(E @ tail[0]))
        if g.stop_at_eos and tok == cfg.eos_token_id:
            break
        out.append(tok)
        committed.append(E[tok] + (history.take(1)[0] if g.history_noise > 0 else 0))
        tail = torch.cat([tail[1:], embryos.take(1)])
    return out
