"""Test helpers for the ops: the per-dtype tolerance table and the commit certification.

Kept in the package (like ``torch.testing``) so the engine's tests and the benchmarks can use
the same definitions as the kernel tests.
"""
from __future__ import annotations

import torch

# Elementwise tolerances for a result computed from inputs *stored* in `dtype` against the fp32
# math on the same stored inputs (summation order is the only difference), used as
# `torch.testing.assert_close(..., **TOL[dtype])`.
TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=8e-3, rtol=8e-3),
}

# Inner-product scores: |error| ≤ SCORE_RTOL · ‖q‖ · max_j ‖e_j‖. For fp32 this covers any
# summation order over d ≤ 4096 (≈ √d · 2⁻²⁴ · a few).
SCORE_RTOL = 1e-5


def score_tol(queries: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(N,) float64 tolerance on inner-product scores for each query row."""
    qn = torch.linalg.vector_norm(queries.double(), dim=-1)
    en = torch.linalg.vector_norm(table.double(), dim=-1).max()
    return SCORE_RTOL * qn * en + 1e-30


def certify_commit(index, score, queries, table, ref_index=None, tol=None):
    """Check a commit result against float64 truth; returns the number of certified near-ties.

    * every returned index is a maximiser up to `tol`: s64[index] ≥ max_j s64[j] − tol;
    * the returned score is the score of the returned index: |score − s64[index]| ≤ tol;
    * where ``index != ref_index`` (if given), the two candidates' exact scores differ by ≤ tol,
      i.e. the disagreement is a certified near-tie, not an error.
    Raises AssertionError with the offending rows otherwise.
    """
    q64, e64 = queries.double().cpu(), table.double().cpu()
    index, score = index.cpu(), score.cpu()
    tol = score_tol(q64, e64) if tol is None else tol
    s64 = q64 @ e64.t()
    best64 = s64.max(dim=-1).values
    assert bool((index >= 0).all() & (index < table.shape[0]).all()), f"index out of range: {index}"
    chosen = s64.gather(1, index[:, None]).squeeze(1)
    bad = (best64 - chosen) > tol
    assert not bool(bad.any()), f"rows {bad.nonzero().flatten().tolist()} chose a non-maximal row beyond tolerance"
    bad = (score.double() - chosen).abs() > tol
    assert not bool(bad.any()), f"rows {bad.nonzero().flatten().tolist()}: score differs from the chosen row's exact score"
    ties = 0
    if ref_index is not None:
        ref_index = ref_index.cpu()
        differ = index != ref_index
        gap = (chosen - s64.gather(1, ref_index[:, None]).squeeze(1)).abs()
        bad = differ & (gap > tol)
        assert not bool(bad.any()), f"rows {bad.nonzero().flatten().tolist()} disagree with the reference beyond a near-tie"
        ties = int(differ.sum())
    return ties


def entropy_truth(queries, table, tau):
    """float64 (lse, entropy) of softmax(cos(q, E)/τ), computed independently of both impls."""
    q = queries.double().cpu()
    e = table.double().cpu()
    cos = (q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ (e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)).t()
    logits = cos / tau
    logp = torch.log_softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1), -(logp.exp() * logp).sum(-1)
