"""The dispatch seam: impl argument > $TMFAST_IMPL > auto; clear errors; torch.compile(fullgraph=True)."""
from __future__ import annotations

import importlib

import pytest
import torch

import csrc_triton as ct

common = importlib.import_module("csrc_triton._common")
from conftest import DEV, needs_triton  # noqa: E402  the kernel-test preamble
CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_auto_picks_by_device(monkeypatch):
    monkeypatch.delenv("TMFAST_IMPL", raising=False)
    assert ct.resolve_impl(None, CPU, "op") == "torch"
    assert ct.resolve_impl("auto", CPU, "op") == "torch"
    assert ct.resolve_impl(None, GPU, "op") == ("triton" if ct.HAS_TRITON else "torch")
    monkeypatch.setattr(common, "HAS_TRITON", False)
    assert ct.resolve_impl(None, GPU, "op") == "torch"  # no triton package: auto falls back quietly


def test_env_var_and_argument_precedence(monkeypatch):
    monkeypatch.setenv("TMFAST_IMPL", "torch")
    assert ct.resolve_impl(None, GPU, "op") == "torch"
    monkeypatch.setenv("TMFAST_IMPL", "triton")
    assert ct.resolve_impl("torch", CPU, "op") == "torch"  # argument beats env
    monkeypatch.setenv("TMFAST_IMPL", "bogus")
    with pytest.raises(ValueError, match=r"impl='bogus' is not one of .* \$TMFAST_IMPL"):
        ct.resolve_impl(None, CPU, "op")


def test_forced_triton_that_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(common, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="impl='triton' was requested for cpu tensors.*TRITON_INTERPRET=1"):
        ct.resolve_impl("triton", CPU, "nn_commit")
    monkeypatch.setattr(common, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="triton package is not importable"):
        ct.resolve_impl("triton", GPU, "nn_commit")
    monkeypatch.setenv("TMFAST_IMPL", "triton")  # the env var is an explicit request too
    with pytest.raises(RuntimeError, match="triton package is not importable"):
        ct.resolve_impl(None, GPU, "nn_commit")


@needs_triton
def test_forced_triton_runs_under_interpreter_and_env_routes_calls(monkeypatch):
    """With TMFAST_IMPL=triton the public ops reach the registered Triton ops (spied on)."""
    calls = []
    real_c, real_u = ct.nn_commit_triton, ct.maturation_update_triton
    monkeypatch.setattr(ct, "nn_commit_triton", lambda *a: calls.append("commit") or real_c(*a))
    monkeypatch.setattr(ct, "maturation_update_triton", lambda *a: calls.append("update") or real_u(*a))
    monkeypatch.setenv("TMFAST_IMPL", "triton")
    tail = torch.randn(1, 2, 32, device=DEV)
    ct.maturation_update(tail, torch.randn(1, 2, 32, device=DEV), torch.ones(2, device=DEV))
    ct.nn_commit(tail[:, 0], torch.randn(50, 32, device=DEV))
    assert calls == ["update", "commit"]
    monkeypatch.setenv("TMFAST_IMPL", "torch")
    ct.nn_commit(tail[:, 0], torch.randn(50, 32, device=DEV))
    assert calls == ["update", "commit"]


def _step(tail, pred_c, pred_u, alpha, guidance, noise, table, inv):
    dn, tn = ct.maturation_update(tail, pred_c, alpha, pred_uncond=pred_u, guidance=guidance, noise=noise,
                                  impl="torch")
    idx, score, lse, ent = ct.nn_commit(tail[:, 0], table, entropy_tau=1.0, table_inv_norm=inv, impl="torch")
    live, _, _, _ = ct.nn_commit(tail.reshape(-1, tail.shape[-1]), table, impl="torch")
    return dn, tn, idx, score, lse, ent, live


def _step_inputs(seed=0, B=2, K=4, d=64, V=300):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, d, generator=g)
    return [torch.randn(B, K, d, generator=g), torch.randn(B, K, d, generator=g), torch.randn(B, K, d, generator=g),
            torch.linspace(0.9, 0.1, K), torch.full((B,), 2.0), 0.01 * torch.randn(B, K, d, generator=g),
            table, ct.prepare_table(table)]


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_path_compiles_fullgraph(backend):
    """A step calling both ops (torch impl) traces with fullgraph=True and matches eager."""
    torch._dynamo.reset()
    eager_in, comp_in = _step_inputs(), _step_inputs()
    eager = _step(*eager_in)
    compiled = torch.compile(_step, fullgraph=True, backend=backend)(*comp_in)
    assert torch.equal(compiled[2], eager[2]) and torch.equal(compiled[6], eager[6])  # indices
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comp_in[0], eager_in[0], atol=1e-6, rtol=1e-6)  # in-place tail update survived


@needs_triton
def test_triton_path_traces_fullgraph_without_breaks():
    """Dynamo sees the registered Triton ops as single graph nodes (fake impls), no graph break.

    backend="eager" runs the captured graph as is; on CPU that executes the ops under the
    interpreter (AOT backends would hand the interpreter functional tensors, which it cannot run).
    """
    torch._dynamo.reset()

    def step(tail, pred, alpha, table, inv):
        dn, tn = ct.maturation_update(tail, pred, alpha, impl="triton")
        idx, score, lse, ent = ct.nn_commit(tail[:, 0], table, entropy_tau=1.0, table_inv_norm=inv, impl="triton")
        return dn, tn, idx, score, lse, ent

    args = _step_inputs(1)
    tail, pred, alpha, table, inv = args[0].to(DEV), args[1].to(DEV), args[3].to(DEV), args[6].to(DEV), args[7].to(DEV)
    ref_tail = tail.clone()
    ref = step(ref_tail, pred, alpha, table, inv)
    out = torch.compile(step, fullgraph=True, backend="eager")(tail, pred, alpha, table, inv)
    assert torch.equal(tail, ref_tail)
    for o, r in zip(out, ref):
        assert torch.equal(o, r)
