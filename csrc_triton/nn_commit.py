"""Nearest-neighbour commit: index of the largest inner product against the table.

For N queries (N,d) and a table (V,d):

    index[n] = argmax_j <q_n, e_j>      (ties → lowest j)        int64 (N,)
    score[n] = max_j <q_n, e_j>                                  fp32  (N,)
  and, when ``entropy_tau`` is given, for l_nj = cos(q_n, e_j)/τ (the paper's entropy probe):
    lse[n]     = log Σ_j exp(l_nj)                               fp32  (N,)
    entropy[n] = −Σ_j p_nj log p_nj,  p = softmax_j(l_n·)        fp32  (N,)

NaN policy (both implementations, no host sync inside the op): a query row whose scores
contain a NaN anywhere (a NaN in the query, a NaN table row, inf·0 products) gets
``index = -1`` and ``score = lse = entropy = NaN``. ±inf scores without NaN are ordinary
values (a row of all -inf commits row 0, like torch.max). The public wrapper ``csrc_triton.nn_commit`` then raises
ValueError when ``check_finite=True`` (default; one host sync), or hands the sentinel back when
``check_finite=False`` (no sync; the caller tests ``index < 0`` when it next syncs anyway).
Inside a torch.compile graph the check is skipped and the sentinel is returned.

This file holds: the torch reference ``nn_commit_torch`` (materialises N×V; CPU default), the
split-V Triton kernel + deterministic merge kernel + launcher, and its registration as
``torch.ops.tmfast.nn_commit`` (``torch.library.triton_op``).

Triton design. Grid = (⌈N/BLOCK_N⌉, S). Program (i, s) streams the s-th contiguous slice of
the table in BLOCK_V×BLOCK_D tiles and keeps, per query row, a running (best score, lowest
best index) and – when the entropy probe is on – an online (max m, Σe^{l−m}, Σe^{l−m}(l−m))
triple, so the N×V matrix never exists. S > 1 is chosen when N is small, so that the decode
case (N = batch) still fills the GPU: each split writes its partials to a (S,N) scratch and a
tiny merge kernel folds them *in split order* (no atomics → bitwise deterministic). When S = 1
the main kernel writes the final outputs itself. fp32 inputs use an IEEE fp32 ``tl.dot``
(no TF32: the fp32 commit must reproduce the reference argmax); bf16/fp16 queries against a
table of the same dtype use the native tensor-core dot, whose products are exact in fp32 and
accumulate in fp32. The per-table precompute is the inverse row norm ``prepare_table(table)``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from ._common import CAN_RUN, FLOAT_DTYPES, HAS_TRITON, INTERPRET, check_tensor

OP = "nn_commit"


# --------------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------------
def table_inv_norm_torch(table):
    """(V,) fp32 1/max(‖e_j‖, 1e-12)."""
    return torch.linalg.vector_norm(table.float(), dim=-1).clamp_min(1e-12).reciprocal()


def nn_commit_torch(queries, table, entropy_tau=None, table_inv_norm=None):
    """Torch reference. Returns (index int64 (N,), score fp32 (N,), lse or None, entropy or None)."""
    scores = queries.float() @ table.float().t()  # (N, V)
    score, index = scores.max(dim=-1)  # first maximal index; NaN propagates into `score`
    bad = torch.isnan(score)
    index = torch.where(bad, torch.full_like(index, -1), index)
    if entropy_tau is None:
        return index, score, None, None
    if table_inv_norm is None:
        table_inv_norm = table_inv_norm_torch(table)
    q_inv = torch.linalg.vector_norm(queries.float(), dim=-1, keepdim=True).clamp_min(1e-12).reciprocal()
    logits = scores * q_inv * table_inv_norm / entropy_tau
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.softmax(logits, dim=-1)
    entropy = lse - (p * logits).sum(-1)
    nan = torch.full_like(lse, float("nan"))
    return index, score, torch.where(bad, nan, lse), torch.where(bad, nan, entropy)


# --------------------------------------------------------------------------------------------
# validation (shared; metadata only)
# --------------------------------------------------------------------------------------------
def validate(queries, table, entropy_tau, table_inv_norm, any_table_strides: bool = False):
    """any_table_strides: the torch path reads the table through a matmul, which takes any
    layout (a column-major table is the fast one on CPU); the Triton kernels need unit stride."""
    check_tensor(OP, "table", table, ndim=2, dtypes=FLOAT_DTYPES, unit_stride=not any_table_strides)
    check_tensor(OP, "queries", queries, ndim=2, dtypes=FLOAT_DTYPES, device=table.device)
    V, d = table.shape
    if V == 0:
        raise ValueError(f"{OP}: table is empty (shape {tuple(table.shape)})")
    if d == 0:
        raise ValueError(f"{OP}: table has embedding dimension 0")
    if queries.shape[1] != d:
        raise ValueError(f"{OP}: queries have d={queries.shape[1]} but table has d={d}")
    if queries.dtype not in (torch.float32, table.dtype):
        raise TypeError(
            f"{OP}: queries dtype {str(queries.dtype).replace('torch.', '')} must be float32 or the "
            f"table's dtype ({str(table.dtype).replace('torch.', '')})"
        )
    if V >= 2**31:
        raise ValueError(f"{OP}: table has {V} rows; at most 2**31-1 are supported")
    if entropy_tau is not None:
        if isinstance(entropy_tau, bool) or not isinstance(entropy_tau, (int, float)):
            raise TypeError(f"{OP}: entropy_tau must be a positive float or None, got {type(entropy_tau).__name__}")
        if not (math.isfinite(entropy_tau) and entropy_tau > 0):
            raise ValueError(f"{OP}: entropy_tau must be a positive finite float, got {entropy_tau}")
    if table_inv_norm is not None:
        check_tensor(OP, "table_inv_norm", table_inv_norm, ndim=1, dtypes=(torch.float32,), device=table.device)
        if table_inv_norm.shape[0] != V:
            raise ValueError(f"{OP}: table_inv_norm has shape {tuple(table_inv_norm.shape)}, expected ({V},)")


# --------------------------------------------------------------------------------------------
# Triton kernels + launcher
# --------------------------------------------------------------------------------------------
# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages), chosen by N and the dtype pair, sized for the
# decode shapes of GPT-2-Medium (V = 50257, d = 1024, N = 1 … 64) on 132-SM Hopper parts:
#   gemv    N ≤ 4 queries: no tensor-core dot (its 16-row minimum would waste ≥ 3/4 of the work);
#           a (BLOCK_N, BLOCK_D, BLOCK_V) fp32 product reduced over d, BLOCK_N × BLOCK_V = 128
#   ieee    fp32 queries against an fp32 table, N > 4: IEEE fp32 dot (no TF32: the fp32 commit
#           must reproduce the reference argmax), operand tiles in registers
#   mixed   fp32 queries against a 16-bit table (the bf16 engine's commit), N > 4: the same IEEE
#           dot on the converted tile, the register-hungry case: 16-row blocks at every N (a
#           32-row block spills), so at N > 16 the table is read once per 16 queries
#   native  bf16·bf16 / fp16·fp16, N > 4: the tensor-core dot (products exact in fp32, fp32 accumulate)
# Row segments of 128 B or more per load (BLOCK_D = 64 for 16-bit and most fp32 tiles; 32 × 4 B for
# the small fp32 tile, where BLOCK_D = 64 spills on sm_80), not the 64 B of BLOCK_D = 16; 3–4
# stages keep tiles in flight behind the one being reduced. Every entry × dtype pair × flag
# combination compiles for sm_80 and sm_90 with no spills and shared memory within the chip
# (tests/test_kernels_aot.py); the grid (num_splits) puts ≥ 2 programs on every SM even at N = 1
# (test_decode_grids_fill_a_132_sm_part). Not yet timed on a GPU: bench/gpu_check.py times them.
COMMIT_CONFIGS = {
    ("gemv", 1): (1, 128, 64, 8, 3),
    ("gemv", 2): (2, 64, 64, 8, 3),
    ("gemv", 4): (4, 32, 64, 8, 3),
    ("ieee", "small_n"): (16, 32, 32, 8, 3),     # 5 ≤ N ≤ 16
    ("ieee", "large_n"): (32, 16, 64, 8, 4),     # N > 16 (whole tails, entropy traces: N = B·K)
    ("mixed", "any"): (16, 32, 64, 8, 3),
    ("native", "small_n"): (16, 128, 64, 8, 3),
    ("native", "large_n"): (64, 32, 64, 8, 3),
}
GEMV_MAX_N = 4
MERGE_BLOCK_N, MERGE_BLOCK_S, MERGE_WARPS = 32, 16, 2
WAVES = 2  # programs per SM the split-V grid aims for (≥: a tile per split at least)
INTERPRETER_SMS = 4  # pretend SM count under TRITON_INTERPRET=1, so splits > 1 are exercised


def native_dot(q_dtype, e_dtype) -> bool:
    """bf16·bf16 / fp16·fp16 products are exact in fp32: use the tensor-core dot with fp32 accumulate."""
    return q_dtype == e_dtype and q_dtype != torch.float32


def commit_path(n: int, q_dtype=torch.float32, e_dtype=torch.float32) -> tuple:
    """The COMMIT_CONFIGS key for n queries of this dtype pair."""
    if n <= GEMV_MAX_N:
        return ("gemv", 1 if n <= 1 else 2 if n <= 2 else 4)
    if native_dot(q_dtype, e_dtype):
        return ("native", "small_n" if n <= 16 else "large_n")
    if e_dtype != torch.float32:
        return ("mixed", "any")
    return ("ieee", "small_n" if n <= 16 else "large_n")


def commit_config(n: int, q_dtype=torch.float32, e_dtype=torch.float32):
    return COMMIT_CONFIGS[commit_path(n, q_dtype, e_dtype)]


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(n: int, v: int, device: torch.device, config, sms: int | None = None):
    """(splits, tiles_per_split): at least WAVES programs per SM where the table has tiles for it
    (at N = 1, V = 50257, BLOCK_V = 128 on 132 SMs: 393 splits of one tile, ~3 per SM).
    sms: the SM count (default: the device's; INTERPRETER_SMS off a GPU)."""
    block_n, block_v = config[:2]
    q_blocks = -(-n // block_n)
    tiles = -(-v // block_v)
    if sms is not None:
        pass
    elif device.type == "cuda" and not INTERPRET:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = INTERPRETER_SMS
    want = max(1, -(-WAVES * sms // q_blocks))
    per = max(1, tiles // want)  # floor: never fewer splits than wanted
    return -(-tiles // per), per


if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _finalize(idx_ptr, score_ptr, lse_ptr, ent_ptr, rn, n_mask, best, best_idx, nan_seen,
                  m_i, s_i, t_i, ENTROPY: tl.constexpr):
        bad = nan_seen > 0
        tl.store(idx_ptr + rn, tl.where(bad, -1, best_idx).to(tl.int64), mask=n_mask)
        tl.store(score_ptr + rn, tl.where(bad, float("nan"), best), mask=n_mask)
        if ENTROPY:
            s_i = tl.where(n_mask, s_i, 1.0)  # padded rows: keep log/div finite (never stored)
            log_s = tl.log(s_i)
            tl.store(lse_ptr + rn, tl.where(bad, float("nan"), m_i + log_s), mask=n_mask)
            tl.store(ent_ptr + rn, tl.where(bad, float("nan"), log_s - t_i / s_i), mask=n_mask)

    @triton.jit
    def _nn_commit_kernel(
        q_ptr, e_ptr, einv_ptr,
        idx_ptr, score_ptr, lse_ptr, ent_ptr,          # final outputs (FINAL) ...
        pidx_ptr, pscore_ptr, pm_ptr, ps_ptr, pt_ptr,  # ... or (S, N) partials (not FINAL)
        N, V, D, stride_qn, stride_ev, tiles_per_split, inv_tau,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        ENTROPY: tl.constexpr, FINAL: tl.constexpr, NATIVE_DOT: tl.constexpr, GEMV: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        rd = tl.arange(0, BLOCK_D)
        rv0 = tl.arange(0, BLOCK_V)
        q_base = q_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_qn
        q_offs = tl.arange(0, BLOCK_N)[:, None] * stride_qn + rd[None, :]
        e_offs = rv0[None, :] * stride_ev + rd[:, None]  # (BLOCK_D, BLOCK_V): the tile transposed

        if ENTROPY:
            qsq = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                q = tl.load(q_base + d0 + q_offs, mask=n_mask[:, None] & (d0 + rd < D)[None, :], other=0.0)
                q = q.to(tl.float32)
                qsq += tl.sum(q * q, axis=1)
            row_scale = inv_tau / tl.maximum(tl.sqrt(qsq), 1e-12)

        v_begin = pid_s * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
        e_base = e_ptr + v_begin.to(tl.int64) * stride_ev  # 64-bit row offset; per-tile offsets fit int32
        # argmax is tracked per lane (elementwise, no cross-thread reduction per tile): lane c keeps
        # the best of columns v ≡ c (mod BLOCK_V), strict '>' keeps the earliest; lanes are folded
        # once after the loop, lowest index among equal maxima.
        big = 2147483647
        lane_best = tl.full([BLOCK_N, BLOCK_V], float("-inf"), dtype=tl.float32)
        lane_idx = tl.full([BLOCK_N, BLOCK_V], big, dtype=tl.int32)
        lane_nan = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.int1)
        m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        s_i = tl.zeros([BLOCK_N], dtype=tl.float32)
        t_i = tl.zeros([BLOCK_N], dtype=tl.float32)

        for v0 in range(v_begin, v_end, BLOCK_V):
            rv = v0 + rv0
            v_mask = rv < V
            acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d_mask = d0 + rd < D
                q = tl.load(q_base + d0 + q_offs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                e = tl.load(e_base + d0 + e_offs, mask=d_mask[:, None] & v_mask[None, :], other=0.0)
                if GEMV:  # few queries: fp32 products reduced over d, no tensor-core tile
                    acc += tl.sum(q.to(tl.float32)[:, :, None] * e.to(tl.float32)[None, :, :], axis=1)
                elif NATIVE_DOT:
                    acc = tl.dot(q, e, acc)
                else:
                    acc = tl.dot(q.to(tl.float32), e.to(tl.float32), acc, input_precision="ieee")
            e_base += BLOCK_V * stride_ev
            is_nan = (acc != acc) & v_mask[None, :]  # padded columns (zero rows) may hold inf·0
            lane_nan = lane_nan | is_nan  # NaN is flagged, never compared
            take = v_mask[None, :] & (acc > lane_best)
            lane_best = tl.where(take, acc, lane_best)
            lane_idx = tl.where(take, rv[None, :], lane_idx)
            if ENTROPY:
                einv = tl.load(einv_ptr + rv, mask=v_mask, other=0.0)
                lg = acc * row_scale[:, None] * einv[None, :]
                lg = tl.where(v_mask[None, :], lg, float("-inf"))
                # every tile holds ≥ 1 valid column, so m_new is finite (unless NaN) from here on
                m_new = tl.maximum(m_i, tl.max(lg, axis=1))
                rescale = tl.exp(m_i - m_new)  # 0 on the first tile (m_i = -inf, s_i = t_i = 0)
                shift = tl.where(s_i > 0, m_i - m_new, 0.0)  # re-centre Σp(l−m) on m_new
                t_i = rescale * (t_i + shift * s_i)
                s_i = s_i * rescale
                centred = tl.where(v_mask[None, :], lg - m_new[:, None], 0.0)
                p = tl.where(v_mask[None, :], tl.exp(centred), 0.0)
                s_i += tl.sum(p, axis=1)
                t_i += tl.sum(p * centred, axis=1)
                m_i = m_new

        nan_seen = tl.max(lane_nan.to(tl.int32), axis=1)
        best = tl.max(lane_best, axis=1)
        best_idx = tl.min(tl.where(lane_best == best[:, None], lane_idx, big), axis=1)
        best_idx = tl.where(best_idx == big, v_begin, best_idx)  # all scores -inf → first column
        if FINAL:
            _finalize(idx_ptr, score_ptr, lse_ptr, ent_ptr, rn, n_mask, best, best_idx, nan_seen,
                      m_i, s_i, t_i, ENTROPY)
        else:
            po = pid_s * N + rn
            tl.store(pidx_ptr + po, best_idx, mask=n_mask)
            tl.store(pscore_ptr + po, tl.where(nan_seen > 0, float("nan"), best), mask=n_mask)
            if ENTROPY:
                tl.store(pm_ptr + po, m_i, mask=n_mask)
                tl.store(ps_ptr + po, s_i, mask=n_mask)
                tl.store(pt_ptr + po, t_i, mask=n_mask)

    @triton.jit
    def _nn_commit_merge_kernel(
        pidx_ptr, pscore_ptr, pm_ptr, ps_ptr, pt_ptr,
        idx_ptr, score_ptr, lse_ptr, ent_ptr,
        N, S,
        BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, ENTROPY: tl.constexpr,
    ):
        """Fold the (S, N) split partials in split order: deterministic, no atomics."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        big = 2147483647
        best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        best_idx = tl.full([BLOCK_N], big, dtype=tl.int32)
        nan_seen = tl.zeros([BLOCK_N], dtype=tl.int32)
        m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        s_i = tl.zeros([BLOCK_N], dtype=tl.float32)
        t_i = tl.zeros([BLOCK_N], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            rs = s0 + tl.arange(0, BLOCK_S)
            msk = (rs < S)[:, None] & n_mask[None, :]
            po = rs[:, None] * N + rn[None, :]
            sc = tl.load(pscore_ptr + po, mask=msk, other=float("-inf"))
            ix = tl.load(pidx_ptr + po, mask=msk, other=big)
            is_nan = sc != sc
            nan_seen = tl.maximum(nan_seen, tl.max(is_nan.to(tl.int32), axis=0))
            sc = tl.where(is_nan, float("-inf"), sc)
            c_best = tl.max(sc, axis=0)
            c_idx = tl.min(tl.where(sc == c_best[None, :], ix, big), axis=0)
            take = (c_best > best) | ((c_best == best) & (c_idx < best_idx))
            best = tl.where(take, c_best, best)
            best_idx = tl.where(take, c_idx, best_idx)
            if ENTROPY:
                m = tl.load(pm_ptr + po, mask=msk, other=float("-inf"))
                s = tl.load(ps_ptr + po, mask=msk, other=0.0)
                t = tl.load(pt_ptr + po, mask=msk, other=0.0)
                m_new = tl.maximum(m_i, tl.max(m, axis=0))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # only padded rows stay -inf
                r = tl.exp(m_i - m_ref)
                t_i = r * (t_i + tl.where(s_i > 0, m_i - m_ref, 0.0) * s_i)
                s_i = s_i * r
                live = s > 0  # padded / empty partials contribute nothing
                shift = tl.where(live, m - m_ref[None, :], 0.0)
                w = tl.where(live, tl.exp(shift), 0.0)
                s_i += tl.sum(s * w, axis=0)
                t_i += tl.sum(w * (t + shift * s), axis=0)
                m_i = m_new
        _finalize(idx_ptr, score_ptr, lse_ptr, ent_ptr, rn, n_mask, best, best_idx, nan_seen,
                  m_i, s_i, t_i, ENTROPY)

    def _launch(queries, table, table_inv_norm, entropy_tau, index, score, lse, entropy,
                config=None, splits=None):
        N, D = queries.shape
        V = table.shape[0]
        if N == 0:
            return
        cfg = config or commit_config(N, queries.dtype, table.dtype)
        block_n, block_v, block_d, num_warps, num_stages = cfg
        if splits is None:
            n_splits, per = num_splits(N, V, queries.device, cfg)
        else:  # tests force a split count; normalise so no split is empty
            tiles = -(-V // block_v)
            per = -(-tiles // max(1, min(splits, tiles)))
            n_splits = -(-tiles // per)
        entropy_on = entropy_tau is not None
        inv_tau = 1.0 / entropy_tau if entropy_on else 1.0
        einv = table_inv_norm if entropy_on else score  # dummy pointers when unused (never read)
        if not entropy_on:
            lse, entropy = score, score  # the (0,) outputs may have no storage at all
        native = native_dot(queries.dtype, table.dtype)
        grid = (-(-N // block_n), n_splits)
        common = dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, ENTROPY=entropy_on,
                      NATIVE_DOT=native and block_n >= 16, GEMV=block_n < 16,
                      num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True)
        kernel = wrap_triton(_nn_commit_kernel)
        if n_splits == 1:
            kernel[grid](queries, table, einv, index, score, lse, entropy,
                         index, score, score, score, score,  # partial slots unused
                         N, V, D, queries.stride(0), table.stride(0), per, inv_tau,
                         FINAL=True, **common)
            return
        part = torch.empty((4, n_splits, N), dtype=torch.float32, device=queries.device)
        pidx = torch.empty((n_splits, N), dtype=torch.int32, device=queries.device)
        kernel[grid](queries, table, einv, index, score, lse, entropy,
                     pidx, part[0], part[1], part[2], part[3],
                     N, V, D, queries.stride(0), table.stride(0), per, inv_tau,
                     FINAL=False, **common)
        wrap_triton(_nn_commit_merge_kernel)[(-(-N // MERGE_BLOCK_N),)](
            pidx, part[0], part[1], part[2], part[3], index, score, lse, entropy,
            N, n_splits, BLOCK_N=MERGE_BLOCK_N, BLOCK_S=MERGE_BLOCK_S, ENTROPY=entropy_on,
            num_warps=MERGE_WARPS, enable_fp_fusion=True,
        )

    def _outputs(queries, entropy_on):
        N = queries.shape[0]
        dev = queries.device
        index = torch.empty((N,), dtype=torch.int64, device=dev)
        score = torch.empty((N,), dtype=torch.float32, device=dev)
        m = N if entropy_on else 0
        lse = torch.empty((m,), dtype=torch.float32, device=dev)
        entropy = torch.empty((m,), dtype=torch.float32, device=dev)
        return index, score, lse, entropy

    if CAN_RUN:  # see _common.CAN_RUN: registration imports torch._inductor
        @triton_op("tmfast::nn_commit", mutates_args=())
        def nn_commit_triton(
            queries: torch.Tensor,
            table: torch.Tensor,
            table_inv_norm: Optional[torch.Tensor],
            entropy_tau: Optional[float],
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            """Fused split-V Triton commit. lse/entropy are (0,) tensors when entropy_tau is None."""
            out = _outputs(queries, entropy_tau is not None)
            _launch(queries, table, table_inv_norm, entropy_tau, *out)
            return out

        @nn_commit_triton.register_fake
        def _(queries, table, table_inv_norm, entropy_tau):
            return _outputs(queries, entropy_tau is not None)

        def nn_commit_triton_with(queries, table, table_inv_norm=None, entropy_tau=None, *, config=None, splits=None):
            """Launcher with explicit tile config / split count (tests and benchmarks; not an op)."""
            if entropy_tau is not None and table_inv_norm is None:
                table_inv_norm = table_inv_norm_torch(table)
            out = _outputs(queries, entropy_tau is not None)
            _launch(queries, table, table_inv_norm, entropy_tau, *out, config=config, splits=splits)
            return out
    else:  # resolve_impl never picks Triton here
        nn_commit_triton = None
        nn_commit_triton_with = None

else:  # pragma: no cover
    nn_commit_triton = None
    nn_commit_triton_with = None


# --------------------------------------------------------------------------------------------
# every compiled variant the launcher can produce (consumed by the AOT compile test)
# --------------------------------------------------------------------------------------------
DTYPE_PAIRS = (  # (queries, table): queries are fp32 or the table's dtype
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
)


def aot_variants():
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    for (path, cfg_name), (bn, bv, bd, nw, ns) in COMMIT_CONFIGS.items():
        for q_dt, e_dt in DTYPE_PAIRS:
            if path != "gemv" and commit_path(64, q_dt, e_dt)[0] != path:
                continue  # this dtype pair never takes that path
            for entropy_on in (False, True):
                for final in (True, False):
                    q, e = name[q_dt], name[e_dt]
                    sig = {
                        "q_ptr": f"*{q}", "e_ptr": f"*{e}", "einv_ptr": "*fp32",
                        "idx_ptr": "*i64", "score_ptr": "*fp32", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
                        "pidx_ptr": "*i64" if final else "*i32", "pscore_ptr": "*fp32", "pm_ptr": "*fp32",
                        "ps_ptr": "*fp32", "pt_ptr": "*fp32",
                        "N": "i32", "V": "i32", "D": "i32", "stride_qn": "i32", "stride_ev": "i32",
                        "tiles_per_split": "i32", "inv_tau": "fp32",
                        **{c: "constexpr" for c in ("BLOCK_N", "BLOCK_V", "BLOCK_D", "ENTROPY", "FINAL", "NATIVE_DOT",
                                                    "GEMV")},
                    }
                    yield {
                        "kernel": "_nn_commit_kernel", "module": __name__,
                        # CI compiles the heaviest flag set of each config (entropy on, split
                        # partials out) for fp32/fp32, fp32/bf16 and bf16/bf16; the rest is `slow`
                        "ci": entropy_on and not final and (q_dt, e_dt) != (torch.float32, torch.float16)
                        and q_dt != torch.float16,
                        "name": f"commit[{path}_{cfg_name},q={q},E={e},entropy={int(entropy_on)},final={int(final)}]",
                        "signature": sig,
                        "constexprs": {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd, "ENTROPY": entropy_on,
                                       "FINAL": final, "NATIVE_DOT": path == "native", "GEMV": path == "gemv"},
                        "options": {"num_warps": nw, "num_stages": ns, "enable_fp_fusion": True},
                    }
    for entropy_on in (False, True):
        sig = {"pidx_ptr": "*i32", "pscore_ptr": "*fp32", "pm_ptr": "*fp32", "ps_ptr": "*fp32",
               "pt_ptr": "*fp32", "idx_ptr": "*i64", "score_ptr": "*fp32", "lse_ptr": "*fp32",
               "ent_ptr": "*fp32", "N": "i32", "S": "i32",
               "BLOCK_N": "constexpr", "BLOCK_S": "constexpr", "ENTROPY": "constexpr"}
        yield {
            "kernel": "_nn_commit_merge_kernel", "module": __name__, "ci": entropy_on,
            "name": f"commit_merge[entropy={int(entropy_on)}]",
            "signature": sig,
            "constexprs": {"BLOCK_N": MERGE_BLOCK_N, "BLOCK_S": MERGE_BLOCK_S, "ENTROPY": entropy_on},
            "options": {"num_warps": MERGE_WARPS, "enable_fp_fusion": True},
        }
