"""maturation_update: fused Triton kernel vs torch reference; storage dtypes; views; bad input.

Without CUDA the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) in fp32 and fp16;
bf16 kernel cases need CUDA (the interpreter truncates bf16 instead of rounding).
The kernel evaluates the reference's exact fp32 operation sequence with FMA contraction off,
so the written tail must be *bit-identical* to the torch reference; the two norms differ only
by reduction order.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import csrc_triton as ct
from csrc_triton.testing import TOL

mumod = importlib.import_module("csrc_triton.maturation_update")

from conftest import CUDA, DEV, IMPLS, needs_triton  # noqa: E402  the kernel-test preamble
NORM_TOL = dict(atol=1e-5, rtol=1e-5)


def make_inputs(B, K, d, *, cfg, noise, per_seq_alpha, dtype=torch.float32, pred_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred_dtype = pred_dtype or dtype
    t = lambda: torch.randn(B, K, d, generator=g)  # noqa: E731
    inp = dict(
        tail=(0.3 * t()).to(DEV, dtype),
        pred_cond=t().to(DEV, pred_dtype),
        alpha=(torch.rand(B, K, generator=g) if per_seq_alpha else torch.linspace(0.9, 0.05, K)).to(DEV),
        pred_uncond=t().to(DEV, pred_dtype) if cfg else None,
        guidance=(1.0 + 2.0 * torch.rand(B, generator=g)).to(DEV) if cfg else None,
        noise=(0.01 * t()).to(DEV, pred_dtype) if noise else None,
    )
    return inp


def call(impl, inp):
    kw = {k: inp[k] for k in ("pred_uncond", "guidance", "noise")}
    return ct.maturation_update(inp["tail"], inp["pred_cond"], inp["alpha"], impl=impl, **kw)


def clone(inp):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


def expected(inp):
    """Plain float64 formula, written independently of both implementations."""
    z = inp["tail"].double()
    zh = inp["pred_cond"].double()
    if inp["pred_uncond"] is not None:
        u = inp["pred_uncond"].double()
        zh = u + inp["guidance"].double()[:, None, None] * (zh - u)
    a = inp["alpha"].double()
    a = a[None, :, None] if a.dim() == 1 else a[:, :, None]
    new = z + a * (zh - z)
    if inp["noise"] is not None:
        new = new + inp["noise"].double()
    return new, (new - z).norm(dim=-1), new.norm(dim=-1)


# flag sets rotate over the (K, d) grid so that every flag meets every shape class
FLAGS = [dict(cfg=False, noise=False, per_seq_alpha=False),
         dict(cfg=True, noise=False, per_seq_alpha=True),
         dict(cfg=True, noise=True, per_seq_alpha=False),
         dict(cfg=False, noise=True, per_seq_alpha=True)]
GRID = [(K, d) for K in (1, 4, 16) for d in (64, 100, 256)]
CASES = [(K, d, i) for j, (K, d) in enumerate(GRID) for i in (j % 4, (j + 2) % 4)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K,d,flags", CASES, ids=[f"K{k}-d{d}-f{i}" for k, d, i in CASES])
def test_fp32_vs_reference_and_float64(impl, K, d, flags):
    inp = make_inputs(3, K, d, **FLAGS[flags], seed=K * d + flags)
    ref_in = clone(inp)
    new64, dn64, tn64 = expected(inp)
    dn_ref, tn_ref = mumod.maturation_update_torch(ref_in["tail"], ref_in["pred_cond"], ref_in["alpha"],
                                                   ref_in["pred_uncond"], ref_in["guidance"], ref_in["noise"])
    dn, tn = call(impl, inp)
    assert dn.dtype == tn.dtype == torch.float32 and dn.shape == tn.shape == (3, K)
    assert torch.equal(inp["tail"], ref_in["tail"]), "fp32 tail must be bit-identical to the torch reference"
    torch.testing.assert_close(dn, dn_ref, **NORM_TOL)
    torch.testing.assert_close(tn, tn_ref, **NORM_TOL)
    torch.testing.assert_close(inp["tail"].double(), new64, **TOL[torch.float32])
    torch.testing.assert_close(dn.double(), dn64, **NORM_TOL)
    torch.testing.assert_close(tn.double(), tn64, **NORM_TOL)


@needs_triton
@pytest.mark.parametrize("d", [1, 255, 256, 257, 1024, 2500])
def test_block_boundaries_and_configs(d):
    """d around BLOCK_D boundaries, both shipped configs (d ≤ 256 → one, else the looping one)."""
    inp = make_inputs(2, 3, d, cfg=True, noise=True, per_seq_alpha=True, seed=d)
    ref_in = clone(inp)
    dn_ref, tn_ref = call("torch", ref_in)
    dn, tn = call("triton", inp)
    assert torch.equal(inp["tail"], ref_in["tail"])
    torch.testing.assert_close(dn, dn_ref, **NORM_TOL)
    torch.testing.assert_close(tn, tn_ref, **NORM_TOL)


def test_config_choice_is_covered_by_aot_variants():
    """Every config update_config() can return is one the AOT test compiles."""
    shipped = {(v["constexprs"]["BLOCK_D"], v["options"]["num_warps"]) for v in mumod.aot_variants()}
    picked = {mumod.update_config(d) for d in (1, 64, 100, 255, 256, 257, 768, 1024, 4096, 12288)}
    assert picked <= shipped and picked == set(mumod.UPDATE_CONFIGS)


# --------------------------------------------------------------------------------------------
# storage dtypes
# --------------------------------------------------------------------------------------------
def _lowp_params():
    out = []
    for dt in (torch.float16, torch.bfloat16):
        for pred in ("same", "fp32"):
            for impl in ("torch", "triton"):
                marks = [needs_triton] if impl == "triton" else []
                if impl == "triton" and dt == torch.bfloat16 and not CUDA:
                    marks.append(pytest.mark.skip(reason="Triton interpreter has no bf16 (it truncates); runs on CUDA"))
                out.append(pytest.param(impl, dt, pred, marks=marks, id=f"{impl}-{str(dt)[6:]}-pred_{pred}"))
    return out


@pytest.mark.parametrize("impl,dtype,pred", _lowp_params())
def test_low_precision_storage(impl, dtype, pred):
    """fp32 math, low-precision storage. Bound (flash-attention style):
    |kernel − ref_fp32| ≤ 2·|torch_lowprec − ref_fp32| + atol, and the kernel's stored tail equals
    the torch reference's stored tail (same fp32 values, same round-to-nearest-even)."""
    B, K, d = 2, 4, 100
    pred_dtype = dtype if pred == "same" else torch.float32
    inp32 = make_inputs(B, K, d, cfg=True, noise=True, per_seq_alpha=False, seed=3)
    lp = {k: (v.to(dtype if k == "tail" else pred_dtype) if (isinstance(v, torch.Tensor) and v.dim() == 3) else v)
          for k, v in inp32.items()}
    ref32 = clone(inp32)
    dn32, tn32 = call("torch", ref32)
    torch_lp = clone(lp)
    dn_t, tn_t = call("torch", torch_lp)
    out = clone(lp)
    dn_k, tn_k = call(impl, out)
    assert out["tail"].dtype == dtype
    # the low-precision torch reference itself is within the dtype's tolerance of fp32
    torch.testing.assert_close(torch_lp["tail"].float(), ref32["tail"], **TOL[dtype])
    atol = TOL[torch.float32]["atol"]
    for k_val, t_val, r_val in ((out["tail"].float(), torch_lp["tail"].float(), ref32["tail"]),
                                (dn_k, dn_t, dn32), (tn_k, tn_t, tn32)):
        err_k = (k_val - r_val).abs()
        err_t = (t_val - r_val).abs()
        assert bool((err_k <= 2 * err_t + atol + 1e-5 * r_val.abs()).all()), f"max err {err_k.max():.3g}"
    assert torch.equal(out["tail"], torch_lp["tail"])


# --------------------------------------------------------------------------------------------
# in-place on views
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_row_strided_tail_view(impl):
    """The tail may be a window of a bigger (B, T, d) buffer: updated in place, nothing else touched."""
    B, T, K, d = 2, 10, 4, 64
    buf = torch.randn(B, T, d, device=DEV)
    before = buf.clone()
    tail = buf[:, 3:3 + K]
    assert not tail.is_contiguous()
    g = torch.Generator().manual_seed(0)
    pred_full = torch.randn(B, K + 2, d, generator=g).to(DEV)
    pred = pred_full[:, 1:1 + K]  # row-strided prediction too
    alpha = torch.linspace(0.9, 0.1, K, device=DEV)
    ref = before[:, 3:3 + K].clone()
    dn_ref, tn_ref = mumod.maturation_update_torch(ref, pred.contiguous(), alpha)
    dn, tn = ct.maturation_update(tail, pred, alpha, impl=impl)
    assert torch.equal(buf[:, 3:3 + K], ref)
    assert torch.equal(buf[:, :3], before[:, :3]) and torch.equal(buf[:, 3 + K:], before[:, 3 + K:])
    torch.testing.assert_close(dn, dn_ref, **NORM_TOL)
    torch.testing.assert_close(tn, tn_ref, **NORM_TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    tail = torch.empty(0, 4, 64, device=DEV)
    dn, tn = ct.maturation_update(tail, tail.clone(), torch.ones(4, device=DEV), impl=impl)
    assert dn.shape == tn.shape == (0, 4)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_propagates_without_sync(impl):
    """NaN policy for the update: no check (no sync); NaN flows into the tail and shows in the norms."""
    inp = make_inputs(2, 3, 64, cfg=False, noise=False, per_seq_alpha=False)
    inp["pred_cond"][1, 2, 5] = float("nan")
    dn, tn = call(impl, inp)
    assert torch.isnan(dn[1, 2]) and torch.isnan(tn[1, 2])
    assert int(torch.isnan(dn).sum()) == 1
    assert torch.isnan(inp["tail"][1, 2, 5]) and int(torch.isnan(inp["tail"]).sum()) == 1


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def _bad_cases():
    B, K, d = 2, 3, 8
    tail = torch.randn(B, K, d)
    p = torch.randn(B, K, d)
    a = torch.rand(K)
    g = torch.ones(B)
    meta = torch.device("meta")
    return [
        ("rank-tail", dict(tail=tail[0], pred_cond=p[0], alpha=a), ValueError, "tail must have rank 3"),
        ("rank-pred", dict(tail=tail, pred_cond=p[0], alpha=a), ValueError, "pred_cond must have rank 3"),
        ("dtype-tail", dict(tail=tail.double(), pred_cond=p, alpha=a), TypeError, "tail has dtype float64"),
        ("dtype-pred", dict(tail=tail, pred_cond=p.half(), alpha=a), TypeError, "pred_cond has dtype float16"),
        ("dtype-alpha", dict(tail=tail, pred_cond=p, alpha=a.half()), TypeError, "alpha has dtype float16"),
        ("dtype-guid", dict(tail=tail, pred_cond=p, alpha=a, pred_uncond=p, guidance=g.double()), TypeError,
         "guidance has dtype float64"),
        ("dtype-noise", dict(tail=tail.half(), pred_cond=p, alpha=a, noise=p.bfloat16()), TypeError,
         "noise has dtype bfloat16"),
        ("dtype-uncond", dict(tail=tail.half(), pred_cond=p, alpha=a, pred_uncond=p.half(), guidance=g), TypeError,
         "pred_uncond has dtype float16"),
        ("device", dict(tail=tail, pred_cond=p.to(meta), alpha=a), ValueError, "pred_cond is on meta"),
        ("noncontig", dict(tail=tail, pred_cond=torch.randn(d, K, B).permute(2, 1, 0), alpha=a), ValueError,
         "pred_cond must have unit stride"),
        ("overlap", dict(tail=torch.randn(1, 1, d).expand(B, K, d), pred_cond=p, alpha=a), ValueError,
         "tail has overlapping rows"),
        ("shape-pred", dict(tail=tail, pred_cond=p[:, :2], alpha=a), ValueError, "pred_cond has shape"),
        ("shape-alpha", dict(tail=tail, pred_cond=p, alpha=torch.rand(K + 1)), ValueError, "alpha must have shape"),
        ("rank-alpha", dict(tail=tail, pred_cond=p, alpha=torch.rand(1, B, K)), ValueError, "alpha must have shape"),
        ("guid-alone", dict(tail=tail, pred_cond=p, alpha=a, guidance=g), ValueError, "must be given together"),
        ("uncond-alone", dict(tail=tail, pred_cond=p, alpha=a, pred_uncond=p), ValueError, "must be given together"),
        ("shape-guid", dict(tail=tail, pred_cond=p, alpha=a, pred_uncond=p, guidance=torch.ones(B + 1)), ValueError,
         "guidance must have shape"),
        ("shape-noise", dict(tail=tail, pred_cond=p, alpha=a, noise=p[:1]), ValueError, "noise has shape"),
        ("not-tensor", dict(tail=tail, pred_cond=p, alpha=0.5), TypeError, "alpha must be a torch.Tensor"),
        ("impl", dict(tail=tail, pred_cond=p, alpha=a, impl="fast"), ValueError, "impl='fast' is not one of"),
    ]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(case, impl):
    _, kw, exc, msg = case
    kw = {"impl": impl, **kw}
    tail_before = kw["tail"].clone()
    with pytest.raises(exc, match=msg):
        ct.maturation_update(**kw)
    assert torch.equal(kw["tail"], tail_before), "a rejected call must not touch the tail"


def test_validation_and_torch_path_touch_no_data():
    """Meta tensors have no data: the update's validation + dispatch + torch path never sync."""
    m = torch.device("meta")
    tail = torch.empty(2, 4, 16, device=m)
    dn, tn = ct.maturation_update(tail, torch.empty(2, 4, 16, device=m), torch.empty(2, 4, device=m),
                                  pred_uncond=torch.empty(2, 4, 16, device=m), guidance=torch.empty(2, device=m),
                                  noise=torch.empty(2, 4, 16, device=m), impl="torch")
    assert dn.device.type == "meta" and dn.shape == (2, 4)


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@needs_triton
def test_registered_op_opcheck():
    inp = make_inputs(2, 4, 64, cfg=True, noise=True, per_seq_alpha=True)
    args = (inp["tail"], inp["pred_cond"], inp["alpha"], inp["pred_uncond"], inp["guidance"], inp["noise"])
    kw = {} if CUDA else {"test_utils": ("test_schema", "test_faketensor")}  # interpreter: no functional tensors
    res = torch.library.opcheck(torch.ops.tmfast.maturation_update_.default, args, **kw)
    assert all(v == "SUCCESS" for v in res.values()), res
