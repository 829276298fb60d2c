"""What only a GPU can check: kernels at the real shapes, engine tokens on CUDA, CUDA-graph capture,
a loop that never syncs, the Triton ops through inductor. Skipped without CUDA (pytest -m gpu).

The same measurements, with timings, are bench/gpu_check.py's (tests/test_gpu_check.py runs its
--smoke form everywhere)."""
import pytest
import torch

from csrc_triton import nn_commit
from csrc_triton.nn_commit import DTYPE_PAIRS
from csrc_triton.testing import certify_commit
from tmfast import GenerationConfig, load_checkpoint
from tmfast.checkpoint import DEFAULT_CHECKPOINT
from tmfast.engine import Engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
PROMPTS = ["And God said", "In the beginning", "And it came to pass", "The LORD is my shepherd"]


@pytest.mark.parametrize("q_dt,e_dt", DTYPE_PAIRS)
@pytest.mark.parametrize("n", [1, 8, 64])
def test_commit_kernel_matches_the_reference_on_gpt2_medium_shapes(q_dt, e_dt, n):
    g = torch.Generator().manual_seed(n)
    E = torch.randn(50257, 1024, generator=g)
    E = (E / E.norm(dim=1, keepdim=True) * 3).cuda().to(e_dt)
    q = (E[torch.randint(0, 50257, (n,), generator=g).cuda()].float() + 0.3 * torch.randn(n, 1024).cuda()).to(q_dt)
    idx, score, _, _ = nn_commit(q, E, impl="triton")
    ref, _, _, _ = nn_commit(q, E, impl="torch")
    certify_commit(idx.cpu(), score.cpu(), q.cpu(), E.cpu(), ref_index=ref.cpu())


def _tokens(model, tok, gs, **kw):
    eng = Engine(model, tok, max_batch=len(PROMPTS), k_window=16, **kw)
    ids = [eng.add_request(p, g) for p, g in zip(PROMPTS, gs)]
    out = {i: [] for i in ids}
    for ev in eng.run():
        out[ev.request_id] += ev.token_ids
    return [out[i] for i in ids], eng


def test_engine_tokens_on_cuda_are_the_cpus():
    """fp32 on CUDA vs the CPU, pipelined (one step behind) vs not: the same tokens, but for the
    rare near-tie a different summation order may flip (≥ 90 % before the first difference)."""
    gs = [GenerationConfig(max_new_tokens=32, seed=i, alpha_max=a) for i, a in enumerate((1.0, 1.0, 0.7, 0.7))]
    cpu, tok = load_checkpoint(DEFAULT_CHECKPOINT)
    cuda, _ = load_checkpoint(DEFAULT_CHECKPOINT, device="cuda")
    ref, _ = _tokens(cpu, tok, gs)
    here, eng = _tokens(cuda, tok, gs)
    assert eng.pipeline == 1
    same = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(ref, here))
    assert same >= 0.9 * sum(map(len, ref))
    again, _ = _tokens(cuda, tok, gs, pipeline=0)
    assert again == here


def test_cuda_graphs_are_captured_and_the_loop_never_syncs():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model, tok = load_checkpoint(DEFAULT_CHECKPOINT, device="cuda", dtype=torch.bfloat16)
    eng = Engine(model, tok, max_batch=4, k_window=16, compile=True)
    assert eng.compile_mode == "reduce-overhead"
    eng.warmup()
    skips = {k: v for k, v in counters["inductor"].items() if "cudagraph_skip" in k}
    assert not skips, skips
    gs = [GenerationConfig(max_new_tokens=40, seed=i) for i in range(4)]
    for p, g in zip(PROMPTS, gs):
        eng.add_request(p, g)
    for _ in range(4):
        eng.step()
    torch.cuda.set_sync_debug_mode("error")  # any syncing call in the loop raises
    try:
        for _ in range(20):
            eng.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    list(eng.run())


def test_the_triton_ops_trace_through_inductor_without_copying_the_table():
    from torch._inductor.utils import run_and_get_code
    from tmfast import ModelConfig, TMModel
    cfg = ModelConfig(vocab_size=50257, n_positions=256, n_layer=2, n_head=16, n_embd=1024, k_max=16)
    model = TMModel(cfg).eval().cuda().to(torch.bfloat16)
    torch._dynamo.reset()
    eng = Engine(model, max_batch=2, max_len=128, k_window=4, compile=True, compile_mode="default", impl="triton")
    eng.add_request(list(range(1, 9)), GenerationConfig(max_new_tokens=8, tail=4, alpha_max=0.6, seed=0))
    _, code = run_and_get_code(lambda: [eng.step() for _ in range(3)])
    src = "\n".join(code)
    assert "triton" in src and "nn_commit" in src and "maturation_update" in src
    copies = [line for line in src.splitlines() if "50257, 1024" in line and ("empty_strided" in line or "clone" in line)]
    assert not copies, f"a table-sized buffer is made every step: {copies}"
