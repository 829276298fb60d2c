"""A toy maturation loop driven only through the two ops: identical output with either impl (fp32).

The "model" is a fixed random map, so this isolates the ops from tmfast's engine: each step does
CFG combine + contraction + noise (maturation_update), commits the front slot (nn_commit at
N = B, with the entropy probe) and takes the live view of the whole tail (nn_commit at N = B·K),
then shifts the tail and appends an embryo — the data flow of Algorithm 1.
"""
from __future__ import annotations

import math

import pytest
import torch

import csrc_triton as ct

from conftest import CUDA, DEV, TRITON_OK  # noqa: E402  the kernel-test preamble


def toy_generate(impl, *, steps=8, B=2, K=4, d=64, V=300, radius=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(V, d, generator=g)
    E = (radius * E / E.norm(dim=-1, keepdim=True)).to(DEV)
    inv = ct.prepare_table(E)
    W_c = (torch.randn(d, d, generator=g) / math.sqrt(d)).to(DEV)
    W_u = (torch.randn(d, d, generator=g) / math.sqrt(d)).to(DEV)
    alpha = torch.linspace(0.9, 0.15, K, device=DEV)
    guidance = torch.full((B,), 2.0, device=DEV)
    embryos = (0.05 * torch.randn(steps, B, d, generator=g)).to(DEV)
    noises = (0.01 * torch.randn(steps, B, K, d, generator=g)).to(DEV)
    tail = (0.05 * torch.randn(B, K, d, generator=g)).to(DEV)
    history = torch.zeros(B, d, device=DEV)
    tokens, live, traces = [], [], []
    for t in range(steps):
        ctx = tail + history[:, None]
        pred_c = radius * torch.tanh(ctx @ W_c)
        pred_u = radius * torch.tanh(tail @ W_u)
        dn, tn = ct.maturation_update(tail, pred_c, alpha, pred_uncond=pred_u, guidance=guidance,
                                      noise=noises[t], impl=impl)
        idx, score, lse, ent = ct.nn_commit(tail[:, 0], E, entropy_tau=1.0, table_inv_norm=inv, impl=impl)
        view = ct.nn_commit(tail.reshape(B * K, d), E, entropy_tau=1.0, table_inv_norm=inv, impl=impl,
                            check_finite=False)
        tokens.append(idx)
        live.append(view[0].view(B, K))
        traces.append(torch.stack([dn, tn]).cpu())
        traces.append(torch.stack([score, lse, ent]).cpu())
        traces.append(view[3].view(B, K).cpu())
        history = 0.6 * history + 0.4 * E[idx]
        tail = torch.cat([tail[:, 1:], embryos[t][:, None]], dim=1)
    return torch.stack(tokens).cpu(), torch.stack(live).cpu(), traces, tail.cpu()


@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_identical_output_with_either_impl():
    tok_t, live_t, tr_t, tail_t = toy_generate("torch")
    tok_k, live_k, tr_k, tail_k = toy_generate("triton")
    assert torch.equal(tok_t, tok_k), "committed tokens differ between implementations"
    assert torch.equal(live_t, live_k), "live view (top-1 of every slot) differs"
    assert torch.equal(tail_t, tail_k), "final tail differs (the fp32 update is bit-exact by design)"
    for a, b in zip(tr_t, tr_k):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    assert len(set(tok_t.flatten().tolist())) > 3  # the loop really moves through the vocabulary
