"""The two hot ops of a generation step, behind one dispatch seam.

    delta_norm, tail_norm = maturation_update(tail, pred_cond, alpha, *, pred_uncond=None,
                                              guidance=None, noise=None, impl=None)
    index, score, lse, entropy = nn_commit(queries, table, *, entropy_tau=None,
                                           table_inv_norm=None, impl=None, check_finite=True)
    inv_norm = prepare_table(table)          # once per table: (V,) fp32 1/‖e_j‖

Implementation choice: ``impl`` argument > ``$TMFAST_IMPL`` > "auto". "auto" runs the fused
Triton kernels on CUDA tensors and the torch references otherwise; "triton" or "torch" force
one; a forced "triton" that cannot run raises RuntimeError (it runs on CPU tensors only under
``TRITON_INTERPRET=1`` set before this package is imported). Inside ``torch.compile`` the choice
(and $TMFAST_IMPL) is read when the step is traced, not on every call.

Inputs are checked on metadata only (rank, shape, dtype, device, unit last-dim stride; views
with arbitrary row strides are accepted) and bad inputs raise ValueError/TypeError naming the
argument. The only host sync is nn_commit's NaN check (``check_finite=True``, see the NaN
policy in ``nn_commit.py``); pass ``check_finite=False`` on the hot path to avoid it.

torch.compile: the torch path is plain torch code (fullgraph-traceable, inductor fuses it); the
Triton path is registered with ``torch.library.triton_op`` as ``torch.ops.tmfast.nn_commit``
and ``torch.ops.tmfast.maturation_update_`` (with fake impls), so a ``fullgraph=True`` step
traces through both without graph breaks and inductor can see the kernels.
"""
from __future__ import annotations

import torch

from ._common import ENV_VAR, HAS_TRITON, IMPLS, INTERPRET, check_tensor, FLOAT_DTYPES, is_compiling, resolve_impl
from . import maturation_update as _mu
from . import nn_commit as _nn
from .maturation_update import maturation_update_torch, maturation_update_triton
from .nn_commit import nn_commit_torch, nn_commit_triton, table_inv_norm_torch

__all__ = [
    "maturation_update", "nn_commit", "prepare_table", "resolve_impl",
    "maturation_update_torch", "nn_commit_torch", "maturation_update_triton", "nn_commit_triton",
    "IMPLS", "ENV_VAR", "HAS_TRITON", "INTERPRET",
]


def maturation_update(tail, pred_cond, alpha, *, pred_uncond=None, guidance=None, noise=None, impl=None):
    """Contract the tail (B,K,d) in place towards its (guided) prediction; returns (‖Δz̃‖, ‖z̃‖) per slot.

    tail: (B,K,d) fp32/bf16/fp16, written in place. pred_cond/pred_uncond/noise: (B,K,d), fp32 or
    the tail's dtype. alpha: (K,) or (B,K) fp32. guidance: (B,) fp32, required iff pred_uncond.
    Returns two (B,K) fp32 tensors, norms of the fp32 values before storage rounding.
    """
    _mu.validate(tail, pred_cond, alpha, pred_uncond, guidance, noise)
    if resolve_impl(impl, tail.device, "maturation_update") == "triton":
        return maturation_update_triton(tail, pred_cond, alpha, pred_uncond, guidance, noise)
    return maturation_update_torch(tail, pred_cond, alpha, pred_uncond, guidance, noise)


def nn_commit(queries, table, *, entropy_tau=None, table_inv_norm=None, impl=None, check_finite=True):
    """Nearest table row by inner product for each query: (index, score, lse, entropy).

    queries (N,d) fp32 or the table's dtype; table (V,d) fp32/bf16/fp16, V ≥ 1, unit stride in d
    for the Triton kernels, any layout for the torch path (column-major — the transpose made
    contiguous — is the fast one for a CPU matmul; the engine keeps such a copy). index int64 (N,)
    (ties → lowest index), score fp32 (N,); lse/entropy of softmax(cos(q,E)/entropy_tau) fp32 (N,)
    when entropy_tau is given, else None. table_inv_norm: optional (V,) fp32 from prepare_table().
    check_finite: raise ValueError when a row's scores contain NaN (costs one host sync); with
    False, such rows come back as index -1 / NaN and nothing syncs.
    """
    _nn.validate(queries, table, entropy_tau, table_inv_norm, any_table_strides=True)
    tau = None if entropy_tau is None else float(entropy_tau)
    if resolve_impl(impl, queries.device, "nn_commit") == "triton":
        check_tensor("nn_commit", "table", table, ndim=2, dtypes=FLOAT_DTYPES)  # the kernels need unit stride
        if tau is not None and table_inv_norm is None:
            table_inv_norm = table_inv_norm_torch(table)
        index, score, lse, entropy = nn_commit_triton(queries, table, table_inv_norm, tau)
        if tau is None:
            lse = entropy = None
    else:
        index, score, lse, entropy = nn_commit_torch(queries, table, tau, table_inv_norm)
    if check_finite and not is_compiling() and index.numel() > 0:
        bad = index < 0
        if bool(bad.any()):
            rows = bad.nonzero().flatten()[:8].tolist()
            raise ValueError(
                f"nn_commit: query rows {rows} have NaN scores (NaN in the query or the table, or inf*0); "
                "pass check_finite=False to get index -1 for them instead"
            )
    return index, score, lse, entropy


def prepare_table(table, *, check_finite=True):
    """Per-table precompute for nn_commit: (V,) fp32 1/max(‖e_j‖, 1e-12).

    Call once when the table is loaded (the engine keeps the result as a buffer) and pass it as
    ``table_inv_norm=``. check_finite (one host sync, once per table) rejects NaN/inf entries,
    which would otherwise poison every commit (see the NaN policy).
    """
    check_tensor("prepare_table", "table", table, ndim=2, dtypes=FLOAT_DTYPES)
    if table.shape[0] == 0:
        raise ValueError(f"prepare_table: table is empty (shape {tuple(table.shape)})")
    if check_finite and not is_compiling() and not bool(torch.isfinite(table).all()):
        raise ValueError("prepare_table: table contains NaN or inf entries")
    return table_inv_norm_torch(table)
