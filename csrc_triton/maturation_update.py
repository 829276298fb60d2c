"""Maturation update: optional CFG combine + contraction of the liquid tail, in one pass.

    ẑ = ẑ_u + s_b·(ẑ_c − ẑ_u)          (only when an unconditional prediction is given)
    z̃ ← z̃ + α·(ẑ − z̃) [+ noise]        (in place; α per slot (K,) or per sequence and slot (B,K))

Returns the per-slot stability signals ‖Δz̃‖ and ‖z̃‖ (fp32, shape (B,K)), which the engine and
the evaluation traces use. Math is fp32 whatever the storage dtype; both norms are taken of the
fp32 values *before* they are rounded to the tail's storage dtype.

This file holds the three pieces of the op (Liger-Kernel style):
  * ``maturation_update_torch``  – the torch reference (CPU default, torch.compile-traceable);
  * ``_maturation_update_kernel`` + ``_launch`` – the fused Triton kernel and its launcher;
  * ``maturation_update_triton`` – the launcher registered as ``torch.ops.tmfast.maturation_update_``
    (``torch.library.triton_op``) so a ``torch.compile(fullgraph=True)`` step sees it without a
    graph break.

fp32 exactness: the Triton kernel is compiled with ``enable_fp_fusion=False`` and evaluates
exactly the same sequence of fp32 operations as the reference (sub, mul, add; no FMA
contraction), so the fp32 tail it writes is bit-identical to the torch path; only the two norms
differ, by reduction order.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import CAN_RUN, FLOAT_DTYPES, HAS_TRITON, check_rows_nonoverlapping, check_tensor

OP = "maturation_update"


# --------------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------------
def maturation_update_torch(tail, pred_cond, alpha, pred_uncond=None, guidance=None, noise=None):
    """Torch reference. tail (B,K,d) is updated in place; returns (delta_norm, tail_norm), each (B,K) fp32."""
    z = tail.float()
    zhat = pred_cond.float()
    if pred_uncond is not None:
        u = pred_uncond.float()
        zhat = u + guidance.float().view(-1, 1, 1) * (zhat - u)
    a = alpha.float()
    a = a.view(1, -1, 1) if a.dim() == 1 else a.unsqueeze(-1)
    new = z + a * (zhat - z)
    if noise is not None:
        new = new + noise.float()
    delta_norm = torch.linalg.vector_norm(new - z, dim=-1)
    tail_norm = torch.linalg.vector_norm(new, dim=-1)
    tail.copy_(new)
    return delta_norm, tail_norm


# --------------------------------------------------------------------------------------------
# validation (shared by both implementations; metadata only, no host sync)
# --------------------------------------------------------------------------------------------
def validate(tail, pred_cond, alpha, pred_uncond, guidance, noise):
    check_tensor(OP, "tail", tail, ndim=3, dtypes=FLOAT_DTYPES)
    check_rows_nonoverlapping(OP, "tail", tail)
    dev = tail.device
    B, K, d = tail.shape
    io_dtypes = (torch.float32,) if tail.dtype == torch.float32 else (torch.float32, tail.dtype)
    check_tensor(OP, "pred_cond", pred_cond, ndim=3, dtypes=io_dtypes, device=dev)
    if pred_cond.shape != tail.shape:
        raise ValueError(f"{OP}: pred_cond has shape {tuple(pred_cond.shape)}, tail has {tuple(tail.shape)}")
    if (pred_uncond is None) != (guidance is None):
        raise ValueError(f"{OP}: pred_uncond and guidance must be given together (CFG needs both)")
    if pred_uncond is not None:
        check_tensor(OP, "pred_uncond", pred_uncond, ndim=3, dtypes=(pred_cond.dtype,), device=dev)
        if pred_uncond.shape != tail.shape:
            raise ValueError(f"{OP}: pred_uncond has shape {tuple(pred_uncond.shape)}, tail has {tuple(tail.shape)}")
        check_tensor(OP, "guidance", guidance, ndim=1, dtypes=(torch.float32,), device=dev)
        if guidance.shape[0] != B:
            raise ValueError(f"{OP}: guidance must have shape ({B},), got {tuple(guidance.shape)}")
    if not isinstance(alpha, torch.Tensor):
        raise TypeError(f"{OP}: alpha must be a torch.Tensor, got {type(alpha).__name__}")
    if alpha.dim() not in (1, 2):
        raise ValueError(f"{OP}: alpha must have shape ({K},) or ({B}, {K}), got {tuple(alpha.shape)}")
    check_tensor(OP, "alpha", alpha, ndim=alpha.dim(), dtypes=(torch.float32,), device=dev)
    if tuple(alpha.shape) not in ((K,), (B, K)):
        raise ValueError(f"{OP}: alpha must have shape ({K},) or ({B}, {K}), got {tuple(alpha.shape)}")
    if noise is not None:
        check_tensor(OP, "noise", noise, ndim=3, dtypes=io_dtypes, device=dev)
        if noise.shape != tail.shape:
            raise ValueError(f"{OP}: noise has shape {tuple(noise.shape)}, tail has {tuple(tail.shape)}")


# --------------------------------------------------------------------------------------------
# Triton kernel + launcher
# --------------------------------------------------------------------------------------------
# Configs the launcher can pick: (BLOCK_D, num_warps). One program per (b, k) row; the row is
# walked in BLOCK_D chunks, so any d works. Every entry is compiled for sm_80 / sm_90 by
# tests/test_kernels_aot.py (no spills, shared memory within limits).
UPDATE_CONFIGS = ((256, 2), (1024, 4))


def update_config(d: int):
    return UPDATE_CONFIGS[0] if d <= UPDATE_CONFIGS[0][0] else UPDATE_CONFIGS[1]


if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _maturation_update_kernel(
        tail_ptr, cond_ptr, uncond_ptr, noise_ptr, alpha_ptr, guid_ptr,
        dnorm_ptr, tnorm_ptr,
        K, D,
        s_tb, s_tk, s_cb, s_ck, s_ub, s_uk, s_nb, s_nk, s_ab,
        HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)
        b = (row // K).to(tl.int64)
        k = (row % K).to(tl.int64)
        a = tl.load(alpha_ptr + b * s_ab + k).to(tl.float32)  # alpha rows have unit stride
        t_row = tail_ptr + b * s_tb + k * s_tk
        c_row = cond_ptr + b * s_cb + k * s_ck
        if HAS_UNCOND:
            g = tl.load(guid_ptr + b).to(tl.float32)
            u_row = uncond_ptr + b * s_ub + k * s_uk
        if HAS_NOISE:
            n_row = noise_ptr + b * s_nb + k * s_nk
        offs = tl.arange(0, BLOCK_D)
        dsq = tl.zeros([BLOCK_D], dtype=tl.float32)
        tsq = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o = d0 + offs
            m = o < D
            z = tl.load(t_row + o, mask=m, other=0.0).to(tl.float32)
            zhat = tl.load(c_row + o, mask=m, other=0.0).to(tl.float32)
            if HAS_UNCOND:
                zu = tl.load(u_row + o, mask=m, other=0.0).to(tl.float32)
                zhat = zu + g * (zhat - zu)
            new = z + a * (zhat - z)
            if HAS_NOISE:
                new = new + tl.load(n_row + o, mask=m, other=0.0).to(tl.float32)
            delta = new - z
            dsq += delta * delta
            tsq += new * new
            tl.store(t_row + o, new.to(tail_ptr.dtype.element_ty), mask=m)
        tl.store(dnorm_ptr + row, tl.sqrt(tl.sum(dsq, axis=0)))
        tl.store(tnorm_ptr + row, tl.sqrt(tl.sum(tsq, axis=0)))

    def _launch(tail, pred_cond, alpha, pred_uncond, guidance, noise, delta_norm, tail_norm, config=None):
        B, K, D = tail.shape
        if B * K == 0:
            return
        block_d, num_warps = config or update_config(D)
        s_ab = 0 if alpha.dim() == 1 else alpha.stride(0)
        u = pred_uncond if pred_uncond is not None else pred_cond  # dummies are never read
        n = noise if noise is not None else pred_cond
        g = guidance if guidance is not None else alpha
        wrap_triton(_maturation_update_kernel)[(B * K,)](
            tail, pred_cond, u, n, alpha, g,
            delta_norm, tail_norm,
            K, D,
            tail.stride(0), tail.stride(1), pred_cond.stride(0), pred_cond.stride(1),
            u.stride(0), u.stride(1), n.stride(0), n.stride(1), s_ab,
            HAS_UNCOND=pred_uncond is not None, HAS_NOISE=noise is not None, BLOCK_D=block_d,
            num_warps=num_warps, enable_fp_fusion=False,
        )

    if CAN_RUN:  # see _common.CAN_RUN: registration imports torch._inductor
        @triton_op("tmfast::maturation_update_", mutates_args={"tail"})
        def maturation_update_triton(
            tail: torch.Tensor,
            pred_cond: torch.Tensor,
            alpha: torch.Tensor,
            pred_uncond: Optional[torch.Tensor],
            guidance: Optional[torch.Tensor],
            noise: Optional[torch.Tensor],
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """Fused Triton update (inputs already validated by the public wrapper)."""
            B, K, _ = tail.shape
            delta_norm = torch.empty((B, K), dtype=torch.float32, device=tail.device)
            tail_norm = torch.empty((B, K), dtype=torch.float32, device=tail.device)
            _launch(tail, pred_cond, alpha, pred_uncond, guidance, noise, delta_norm, tail_norm)
            return delta_norm, tail_norm

        @maturation_update_triton.register_fake
        def _(tail, pred_cond, alpha, pred_uncond, guidance, noise):
            B, K, _ = tail.shape
            return (tail.new_empty((B, K), dtype=torch.float32), tail.new_empty((B, K), dtype=torch.float32))
    else:  # resolve_impl never picks Triton here
        maturation_update_triton = None

else:  # pragma: no cover
    maturation_update_triton = None


# --------------------------------------------------------------------------------------------
# every compiled variant the launcher can produce (consumed by the AOT compile test)
# --------------------------------------------------------------------------------------------
def aot_variants():
    """Yield dicts describing each (config × dtype × flag) specialisation `_launch` can request."""
    tl_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    for tail_dt in FLOAT_DTYPES:
        io = [torch.float32] if tail_dt == torch.float32 else [torch.float32, tail_dt]
        for pred_dt in io:
            for has_uncond in (False, True):
                for noise_dt in [None] + io:
                    for block_d, num_warps in UPDATE_CONFIGS:
                        t, p = tl_name[tail_dt], tl_name[pred_dt]
                        nz = tl_name[noise_dt] if noise_dt is not None else p
                        sig = {
                            "tail_ptr": f"*{t}", "cond_ptr": f"*{p}", "uncond_ptr": f"*{p}",
                            "noise_ptr": f"*{nz}", "alpha_ptr": "*fp32",
                            "guid_ptr": "*fp32", "dnorm_ptr": "*fp32", "tnorm_ptr": "*fp32",
                            "K": "i32", "D": "i32",
                            **{s: "i32" for s in ("s_tb", "s_tk", "s_cb", "s_ck", "s_ub", "s_uk",
                                                  "s_nb", "s_nk", "s_ab")},
                            "HAS_UNCOND": "constexpr", "HAS_NOISE": "constexpr", "BLOCK_D": "constexpr",
                        }
                        yield {
                            "kernel": "_maturation_update_kernel",
                            # CI: fp32 and bf16 tails with every input present; the rest is `slow`
                            "ci": tail_dt != torch.float16 and has_uncond and noise_dt == pred_dt,
                            "module": __name__,
                            "name": f"update[{t},pred={p},noise={nz if noise_dt else 'none'},"
                                    f"cfg={int(has_uncond)},BD={block_d},w={num_warps}]",
                            "signature": sig,
                            "constexprs": {"HAS_UNCOND": has_uncond, "HAS_NOISE": noise_dt is not None,
                                           "BLOCK_D": block_d},
                            "options": {"num_warps": num_warps, "enable_fp_fusion": False},
                        }
