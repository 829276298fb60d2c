"""nn_commit: Triton kernel vs torch reference vs float64 truth vs FAISS; dispatch; bad input.

Without CUDA the Triton kernel runs under TRITON_INTERPRET=1 (set by tests/conftest.py), in
fp32 and fp16 (the interpreter has no faithful bf16: bf16 kernel cases run only on CUDA).
The interpreter executes each program in numpy, so the shape sweep runs the kernel with large
"interpreter tiles" (same kernel code, fewer loop trips); the tile configs that ship for GPUs
are exercised on smaller tables in `test_shipped_configs` and by the public entry point in the
other tests. V = 50257 cases are marked `slow` (run them with `pytest -m ''`).
"""
from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

import csrc_triton as ct
from csrc_triton.testing import certify_commit, entropy_truth, score_tol

nnmod = importlib.import_module("csrc_triton.nn_commit")

from conftest import CUDA, DEV, IMPLS, TRITON_OK, needs_triton  # noqa: E402  the kernel-test preamble
slow = pytest.mark.slow

# interpreter tiles (numpy does big tiles cheaply; loop trips are what cost)
FAST_CFG = {"gemv": (4, 256, 128, 4, 1), "small": (16, 256, 128, 4, 1), "large": (64, 256, 128, 4, 1)}


def fast_cfg(n):
    """Big tiles under the interpreter (quick), on the path the launcher picks for n queries."""
    if not ct.INTERPRET:
        return None  # on a GPU run the shipped configs
    return FAST_CFG["gemv" if n <= nnmod.GEMV_MAX_N else "small" if n <= 16 else "large"]


def make_table(V, d, seed=0, radius=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(V, d, generator=g)
    e = radius * e / e.norm(dim=-1, keepdim=True)
    return e.to(DEV, dtype)


def make_queries(table, N, seed=1, noise=0.5):
    """Half: noisy copies of table rows (the maturation regime); half: unrelated vectors."""
    g = torch.Generator().manual_seed(seed)
    V, d = table.shape
    rows = torch.randint(0, V, (N,), generator=g)
    base = table.float().cpu()[rows]
    scale = base.norm(dim=-1, keepdim=True)
    q = base + noise * scale * torch.randn(N, d, generator=g) / math.sqrt(d)
    rand = scale * torch.randn(N, d, generator=g) / math.sqrt(d)
    q[1::2] = rand[1::2]
    return q.to(DEV)


def run(impl, q, E, tau=None, inv=None, cfg=None, splits=None):
    """Public entry point, or the Triton launcher with an explicit tile config / split count."""
    if impl == "torch" or (cfg is None and splits is None):
        return ct.nn_commit(q, E, entropy_tau=tau, table_inv_norm=inv, impl=impl)
    idx, sc, lse, ent = nnmod.nn_commit_triton_with(q, E, inv, tau, config=cfg, splits=splits)
    return idx, sc, (lse if tau is not None else None), (ent if tau is not None else None)


def ent_tol(tau):
    return dict(atol=1e-4 * max(1.0, 1.0 / tau), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# correctness sweep
# --------------------------------------------------------------------------------------------
SWEEP = [(N, d, V) for V in (123, 4099, 50257) for d in (64, 100, 256) for N in (1, 3, 17, 64)]
# CI subset: every (N, d) at V=123, one d per N at V=4099, no V=50257; the rest is `slow`
CI_4099 = {(1, 256), (3, 100), (17, 64), (64, 100)}


def _sweep_marks(N, d, V):
    return [slow] if V == 50257 or (V == 4099 and (N, d) not in CI_4099) else []


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "N,d,V", [pytest.param(*c, marks=_sweep_marks(*c), id=f"N{c[0]}-d{c[1]}-V{c[2]}") for c in SWEEP]
)
def test_sweep_vs_reference_and_truth(impl, N, d, V):
    tau = 1.0 if (N + d) % 2 else 0.05  # the paper's probe τ=1 and the training τ=0.05
    E = make_table(V, d, seed=V + d)
    q = make_queries(E, N, seed=N)
    inv = ct.prepare_table(E)
    ref = nnmod.nn_commit_torch(q, E, tau, inv)
    idx, sc, lse, ent = run(impl, q, E, tau, inv, cfg=fast_cfg(N) if impl == "triton" else None)
    assert idx.dtype == torch.int64 and sc.dtype == lse.dtype == ent.dtype == torch.float32
    assert idx.shape == sc.shape == lse.shape == ent.shape == (N,)
    # the fp32 commit returns exactly the reference index except on certified near-ties
    ties = certify_commit(idx, sc, q, E, ref_index=ref[0])
    assert ties <= max(1, N // 16), f"{ties} near-ties out of {N} rows: suspiciously many"
    torch.testing.assert_close(sc, ref[1], atol=float(score_tol(q, E).max()), rtol=0)
    torch.testing.assert_close(lse, ref[2], **ent_tol(tau))
    torch.testing.assert_close(ent, ref[3], **ent_tol(tau))
    lse64, ent64 = entropy_truth(q, E, tau)
    torch.testing.assert_close(lse.cpu().double(), lse64, **ent_tol(tau))
    torch.testing.assert_close(ent.cpu().double(), ent64, **ent_tol(tau))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N", [1, 17])
def test_without_entropy_same_index_and_score(impl, N):
    E = make_table(1000, 100, seed=3)
    q = make_queries(E, N, seed=4)
    cfg = fast_cfg(N) if impl == "triton" else None
    idx, sc, lse, ent = run(impl, q, E, None, cfg=cfg)
    assert lse is None and ent is None
    idx2, sc2, _, _ = run(impl, q, E, 1.0, ct.prepare_table(E), cfg=cfg)
    assert torch.equal(idx, idx2) and torch.equal(sc, sc2)
    certify_commit(idx, sc, q, E, ref_index=nnmod.nn_commit_torch(q, E)[0])


# the configs the launcher picks on a GPU, run as shipped (small tables keep the interpreter quick)
SHIPPED = [  # (name: the COMMIT_CONFIGS key, N, queries, table)
    ("gemv-1", 1, torch.float32, torch.float32),
    ("gemv-2", 2, torch.float32, torch.float16),  # the engine's bf16 commit: fp32 query × 16-bit table
    ("gemv-4", 3, torch.float16, torch.float16),
    ("ieee-small_n", 5, torch.float32, torch.float32),
    ("ieee-large_n", 17, torch.float32, torch.float32),
    ("mixed-any", 5, torch.float32, torch.float16),
    ("mixed-any-many", 40, torch.float32, torch.float16),  # 16-bit tables: 16-row blocks at any N
    ("native-small_n", 6, torch.float16, torch.float16),
    ("native-large_n", 40, torch.float16, torch.float16),
]


@needs_triton
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("name,N,qdt,edt", SHIPPED, ids=[s[0] for s in SHIPPED])
def test_shipped_configs(name, N, qdt, edt, splits):
    V, d, tau = 300, 100, 1.0  # d=100: not a multiple of any BLOCK_D; V=300: ragged last tile
    E = make_table(V, d, seed=5, dtype=edt)
    q = make_queries(E, N, seed=6).to(qdt)
    inv = ct.prepare_table(E)
    cfg = nnmod.commit_config(N, qdt, edt)
    path, size = name.split("-")[:2]
    assert cfg == nnmod.COMMIT_CONFIGS[(path, int(size) if path == "gemv" else size)]
    idx, sc, lse, ent = run("triton", q, E, tau, inv, cfg=cfg, splits=splits)
    ref = nnmod.nn_commit_torch(q, E, tau, inv)  # fp32 math on the same stored inputs
    certify_commit(idx, sc, q, E, ref_index=ref[0])
    torch.testing.assert_close(lse, ref[2], **ent_tol(tau))
    torch.testing.assert_close(ent, ref[3], **ent_tol(tau))


# 16-column tiles: many tiles on a small table, so split counts > MERGE_BLOCK_S (the merge kernel's
# chunk of splits) exercise the merge's running fold across chunks
TINY_TILES = (16, 16, 64, 4, 1)


@needs_triton
@pytest.mark.parametrize("cfg_name,V,splits", [("fast", 2000, (3, 1000)), ("tiny", 600, (17, 38))])
def test_split_count_does_not_change_result(cfg_name, V, splits):
    """index/score are bitwise independent of the split count; lse/entropy up to merge rounding."""
    E = make_table(V, 64, seed=7)
    q = make_queries(E, 5, seed=8)
    inv = ct.prepare_table(E)
    cfg = TINY_TILES if cfg_name == "tiny" else (FAST_CFG["small"] if ct.INTERPRET else nnmod.commit_config(5))
    base = run("triton", q, E, 1.0, inv, cfg=cfg, splits=1)
    assert nnmod.MERGE_BLOCK_S < 38
    for s in splits:  # 1000 > number of tiles: clamped, never an empty split
        out = run("triton", q, E, 1.0, inv, cfg=cfg, splits=s)
        assert torch.equal(out[0], base[0]) and torch.equal(out[1], base[1]), f"splits={s}"
        torch.testing.assert_close(out[2], base[2], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(out[3], base[3], atol=1e-5, rtol=1e-6)


def test_split_heuristic():
    cfg = nnmod.COMMIT_CONFIGS[("ieee", "small_n")]
    for n, v in [(1, 123), (1, 50257), (16, 50257), (64, 50257), (1024, 50257)]:
        s, per = nnmod.num_splits(n, v, torch.device("cpu"), cfg)
        tiles = -(-v // cfg[1])
        assert s >= 1 and (s - 1) * per < tiles <= s * per  # every split non-empty, all tiles covered


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64])
def test_decode_grids_fill_a_132_sm_part(n):
    """GPT-2-Medium decode (V = 50257) on an H100/H200: at least 2 programs per SM at every batch."""
    for q_dt, e_dt in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)):
        cfg = nnmod.commit_config(n, q_dt, e_dt)
        s, per = nnmod.num_splits(n, 50257, torch.device("cuda"), cfg, sms=132)
        assert s * -(-n // cfg[0]) >= 2 * 132, (n, cfg, s)
        assert cfg[2] >= 64 and cfg[4] >= 3  # BLOCK_D ≥ 64 (16-bit rows: 128 B segments), 3+ stages


# --------------------------------------------------------------------------------------------
# ties
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "impl,splits",
    [("torch", None)] + [pytest.param("triton", s, marks=needs_triton) for s in (None, 1, 3, 7, 40)],
)
def test_ties_go_to_lowest_index(impl, splits):
    """Integer-valued data: every partial sum is exact, so ties are exact in any summation order."""
    V, d = 1000, 64
    g = torch.Generator().manual_seed(9)
    E = torch.randint(-2, 3, (V, d), generator=g).float()
    q = torch.randint(-2, 3, (6, d), generator=g).float()
    winners = [(5, [5, 6, 700, 999]), (130, [130, 131, 300]), (999, [999]), (64, [64, 128, 640])]
    for row, (first, copies) in enumerate(winners):
        big = q[row] * 10  # far above every random row
        for j in copies:
            E[j] = big
    q[4] = 0.0  # all scores 0: every row ties → index 0
    E, q = E.to(DEV), q.to(DEV)
    cfg = None
    if impl == "triton":  # 40 splits need the 16-column tiles (> MERGE_BLOCK_S splits: merge folds chunks)
        cfg = TINY_TILES if splits == 40 else (FAST_CFG["small"] if ct.INTERPRET else nnmod.commit_config(6))
    idx, sc, lse, ent = run(impl, q, E, 1.0, ct.prepare_table(E), cfg=cfg, splits=splits)
    expect = (q.double() @ E.double().t()).argmax(dim=-1)  # torch: first maximal index
    assert idx[:4].tolist() == [w[0] for w in winners]
    assert idx[4].item() == 0
    assert torch.equal(idx.cpu(), expect.cpu())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: the padded tile columns compute -inf·0
@pytest.mark.parametrize("impl,splits", [("torch", None)] + [pytest.param("triton", s, marks=needs_triton) for s in (1, 3)])
def test_all_scores_minus_inf_gives_first_index(impl, splits):
    """-inf is an ordinary (if degenerate) score: a row whose scores are all -inf commits row 0."""
    E = (torch.rand(300, 32) + 0.1).to(DEV)  # every entry > 0 → no inf·0 = NaN
    q = torch.ones(2, 32, device=DEV)
    q[1, 0] = float("-inf")
    cfg = (FAST_CFG["small"] if ct.INTERPRET else nnmod.commit_config(2)) if impl == "triton" else None
    idx, sc, _, _ = run(impl, q, E, None, cfg=cfg, splits=splits)
    assert idx[1].item() == 0 and sc[1].item() == float("-inf")
    assert idx[0].item() == int((q[0] @ E.t()).argmax())


# --------------------------------------------------------------------------------------------
# FAISS cross-check
# --------------------------------------------------------------------------------------------
def faiss_top1(E, q):
    faiss = pytest.importorskip("faiss")
    e = np.ascontiguousarray(E.float().cpu().numpy())
    x = np.ascontiguousarray(q.float().cpu().numpy())
    if CUDA and hasattr(faiss, "StandardGpuResources"):
        index = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), e.shape[1])
    else:
        index = faiss.IndexFlatIP(e.shape[1])
    index.add(e)
    D, I = index.search(x, 1)
    return torch.from_numpy(I[:, 0]).long(), torch.from_numpy(D[:, 0])


FAISS_CASES = [(1, 64, 123), (64, 100, 123), (3, 256, 4099), (17, 64, 1000), pytest.param(64, 256, 4099, marks=slow),
               pytest.param(16, 768, 50257, marks=slow), pytest.param(64, 1024, 50257, marks=slow)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N,d,V", FAISS_CASES)
def test_vs_faiss(impl, N, d, V):
    """Same top-1 as FAISS IndexFlatIP, or a score within tolerance of FAISS's best."""
    E = make_table(V, d, seed=11 + d)
    q = make_queries(E, N, seed=12)
    fi, fd = faiss_top1(E, q)
    idx, sc, _, _ = run(impl, q, E, None, cfg=fast_cfg(N) if impl == "triton" else None)
    tol = score_tol(q, E)
    s64 = q.double().cpu() @ E.double().cpu().t()
    ours = s64.gather(1, idx.cpu()[:, None]).squeeze(1)
    theirs = s64.gather(1, fi[:, None]).squeeze(1)
    same = idx.cpu() == fi
    assert bool((same | (ours >= theirs - tol)).all()), "a row lost to FAISS by more than the tolerance"
    assert bool(((sc.cpu().double() - fd.double()).abs() <= tol + 1e-6 * fd.double().abs()).all())
    assert int(same.sum()) >= N - max(1, N // 16)  # disagreement only on rare near-ties


# --------------------------------------------------------------------------------------------
# low-precision storage
# --------------------------------------------------------------------------------------------
LOWP = [
    ("fp16", torch.float16, torch.float16),
    ("fp32q-fp16E", torch.float32, torch.float16),
    ("bf16", torch.bfloat16, torch.bfloat16),
    ("fp32q-bf16E", torch.float32, torch.bfloat16),
]


def _lowp_params():
    out = []
    for name, qdt, edt in LOWP:
        for impl in ("torch", "triton"):
            marks = []
            if impl == "triton":
                marks.append(needs_triton)
                if torch.bfloat16 in (qdt, edt) and not CUDA:
                    marks.append(pytest.mark.skip(reason="Triton interpreter has no bf16 (it truncates); runs on CUDA"))
            out.append(pytest.param(impl, qdt, edt, marks=marks, id=f"{impl}-{name}"))
    return out


@pytest.mark.parametrize("impl,qdt,edt", _lowp_params())
def test_low_precision_storage(impl, qdt, edt):
    """Flash-attention-style bound: |kernel − ref_fp32| ≤ 2·|torch_lowprec − ref_fp32| + atol."""
    N, V, d, tau = 17, 1500, 100, 1.0
    E32 = make_table(V, d, seed=13)
    q32 = make_queries(E32, N, seed=14)
    E, q = E32.to(edt), q32.to(qdt)
    ref32 = nnmod.nn_commit_torch(q32, E32, tau)
    lowp = nnmod.nn_commit_torch(q, E, tau)  # torch, fp32 math on the rounded inputs
    out = run(impl, q, E, tau, cfg=fast_cfg(N) if impl == "triton" else None)
    atol = float(score_tol(q32, E32).max())
    err_k = (out[1].double() - ref32[1].double()).abs()
    err_t = (lowp[1].double() - ref32[1].double()).abs()
    assert bool((err_k <= 2 * err_t + atol).all()), f"score error {err_k.max():.3g} vs torch-lowp {err_t.max():.3g}"
    for k in (2, 3):
        e_k = (out[k].double() - ref32[k].double()).abs()
        e_t = (lowp[k].double() - ref32[k].double()).abs()
        assert bool((e_k <= 2 * e_t + ent_tol(tau)["atol"]).all())
    # on the stored values the commit is an exact maximiser up to fp32 summation order
    certify_commit(out[0], out[1], q, E, ref_index=lowp[0])


# --------------------------------------------------------------------------------------------
# NaN policy
# --------------------------------------------------------------------------------------------
# NaN inputs make numpy (the interpreter) warn about NaN arithmetic; the results are what is tested
nan_warnings_ok = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@nan_warnings_ok
@pytest.mark.parametrize("impl", IMPLS)
def test_nan_query_raises_by_default(impl):
    E = make_table(123, 64)
    q = make_queries(E, 3)
    q[1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"nn_commit: query rows \[1\] have NaN scores"):
        ct.nn_commit(q, E, impl=impl)


@nan_warnings_ok
@pytest.mark.parametrize("impl", IMPLS)
def test_nan_query_sentinel_without_check(impl):
    E = make_table(300, 64)
    q = make_queries(E, 4)
    clean = ct.nn_commit(q, E, entropy_tau=1.0, impl=impl)
    q[2, 0] = float("nan")
    idx, sc, lse, ent = ct.nn_commit(q, E, entropy_tau=1.0, impl=impl, check_finite=False)
    assert idx[2].item() == -1 and math.isnan(sc[2].item())
    assert math.isnan(lse[2].item()) and math.isnan(ent[2].item())
    keep = torch.tensor([0, 1, 3], device=DEV)
    assert torch.equal(idx[keep], clean[0][keep])
    torch.testing.assert_close(sc[keep], clean[1][keep])


@nan_warnings_ok
@pytest.mark.parametrize("impl", IMPLS)
def test_nan_table_row_poisons_every_query(impl):
    E = make_table(300, 64)
    q = make_queries(E, 3)
    E[77, 5] = float("nan")
    idx, sc, _, _ = ct.nn_commit(q, E, impl=impl, check_finite=False)
    assert idx.tolist() == [-1, -1, -1] and bool(torch.isnan(sc).all())
    with pytest.raises(ValueError, match="prepare_table: table contains NaN or inf"):
        ct.prepare_table(E)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def _bad_cases():
    E = torch.randn(50, 16)
    q = torch.randn(3, 16)
    meta = torch.device("meta")
    return [
        ("rank-q", dict(queries=q[0], table=E), ValueError, "queries must have rank 2"),
        ("rank-E", dict(queries=q, table=E[None]), ValueError, "table must have rank 2"),
        ("dtype-int", dict(queries=q.long(), table=E), TypeError, "queries has dtype int64"),
        ("dtype-f64", dict(queries=q, table=E.double()), TypeError, "table has dtype float64"),
        ("dtype-mix", dict(queries=q.half(), table=E), TypeError, "must be float32 or the table's dtype"),
        ("device", dict(queries=q.to(meta), table=E), ValueError, "queries is on meta"),
        ("noncontig-q", dict(queries=torch.randn(16, 3).t(), table=E), ValueError, "queries must have unit stride"),
        ("d-mismatch", dict(queries=torch.randn(3, 17), table=E), ValueError, "queries have d=17 but table has d=16"),
        ("empty-table", dict(queries=q, table=E[:0]), ValueError, "table is empty"),
        ("d-zero", dict(queries=q[:, :0], table=E[:, :0]), ValueError, "embedding dimension 0"),
        ("tau-neg", dict(queries=q, table=E, entropy_tau=-1.0), ValueError, "entropy_tau must be a positive"),
        ("tau-nan", dict(queries=q, table=E, entropy_tau=float("nan")), ValueError, "entropy_tau must be a positive"),
        ("tau-type", dict(queries=q, table=E, entropy_tau="1"), TypeError, "entropy_tau must be a positive"),
        ("inv-shape", dict(queries=q, table=E, entropy_tau=1.0, table_inv_norm=torch.ones(49)), ValueError,
         r"table_inv_norm has shape \(49,\)"),
        ("inv-dtype", dict(queries=q, table=E, entropy_tau=1.0, table_inv_norm=torch.ones(50, dtype=torch.float64)),
         TypeError, "table_inv_norm has dtype float64"),
        ("not-tensor", dict(queries=q.tolist(), table=E), TypeError, "queries must be a torch.Tensor"),
        ("impl", dict(queries=q, table=E, impl="cuda"), ValueError, "impl='cuda' is not one of"),
    ]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(case, impl):
    _, kw, exc, msg = case
    kw = {"impl": impl, **kw}
    with pytest.raises(exc, match=msg):
        ct.nn_commit(**kw)


def test_column_major_table_torch_path_only():
    """The Triton kernels need a table with unit stride in d; the torch path reads any layout
    (the engine passes a column-major copy on CPU, the fast layout for the matmul) and commits
    the same rows."""
    E = make_table(300, 64)
    q = make_queries(E, 5)
    col = E.t().contiguous().t()
    assert col.stride() == (1, 300)
    want = ct.nn_commit(q, E, impl="torch", entropy_tau=0.5)
    got = ct.nn_commit(q, col, impl="torch", entropy_tau=0.5)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[3], want[3])
    with pytest.raises(ValueError, match="table must have unit stride"):
        ct.nn_commit(q, col, impl="triton")


def test_row_strided_queries_are_accepted():
    """tail[:, 0] of a (B,K,d) tail is a row-strided view: accepted, no copy needed."""
    E = make_table(300, 64)
    tail = make_queries(E, 12).view(3, 4, 64)
    front = tail[:, 0]
    assert not front.is_contiguous()
    for impl in ("torch",) + (("triton",) if TRITON_OK else ()):
        idx, sc, _, _ = ct.nn_commit(front, E, impl=impl)
        ref = nnmod.nn_commit_torch(front.contiguous(), E)
        certify_commit(idx, sc, front, E, ref_index=ref[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_queries(impl):
    E = make_table(123, 64)
    idx, sc, lse, ent = ct.nn_commit(torch.empty(0, 64, device=DEV), E, entropy_tau=1.0, impl=impl)
    assert idx.shape == sc.shape == lse.shape == ent.shape == (0,)


def test_validation_and_torch_path_touch_no_data():
    """Meta tensors have no data: if validation or dispatch synced/read values, this would fail."""
    q = torch.empty(4, 32, device="meta")
    E = torch.empty(100, 32, device="meta")
    idx, sc, lse, ent = ct.nn_commit(q, E, entropy_tau=1.0, impl="torch", check_finite=False)
    assert idx.device.type == "meta" and idx.shape == (4,) and idx.dtype == torch.int64
    with pytest.raises(Exception):  # the documented host sync of the NaN check
        ct.nn_commit(q, E, impl="torch", check_finite=True)


def test_prepare_table():
    E = make_table(123, 64, radius=2.5)
    inv = ct.prepare_table(E)
    assert inv.dtype == torch.float32 and inv.shape == (123,)
    torch.testing.assert_close(inv, torch.full_like(inv, 1 / 2.5))
    with pytest.raises(ValueError, match="table is empty"):
        ct.prepare_table(E[:0])
    with pytest.raises(ValueError, match="must have rank 2"):
        ct.prepare_table(E[0])


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@needs_triton
def test_registered_op_opcheck():
    E = make_table(300, 64)
    q = make_queries(E, 3)
    inv = ct.prepare_table(E)
    # the interpreter cannot run on the functional tensors of the aot_dispatch checks
    utils = ("test_schema", "test_faketensor") if not CUDA else None
    for tau in (None, 1.0):
        kw = {} if utils is None else {"test_utils": utils}
        res = torch.library.opcheck(torch.ops.tmfast.nn_commit.default, (q, E, inv, tau), **kw)
        assert all(v == "SUCCESS" for v in res.values()), res
