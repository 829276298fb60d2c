"""pytest-benchmark view of the generation throughput (bench/throughput.py prints the full tables).

    python -m pytest bench/bench_throughput.py --benchmark-only -p no:cacheprovider \
        [--benchmark-json bench/results/bench_throughput.json]

Not collected by the default `python -m pytest` (testpaths = tests). One benchmark = one
generate() of 32 new tokens for a batch of random 32-token prompts; extra_info records the
committed tokens/s and the machine. Uses the shipped maturation model when present, else a
random model of the same shape; the HF rows use a random GPT-2 of the same size.
"""
import pytest
import torch
from throughput import DEFAULT_CKPT, hf_twin, load_model  # bench/throughput.py: pytest puts bench/ on sys.path

from evals.report import machine_info
from tmfast import GenerationConfig, MaturationEngine

NEW, PLEN = 32, 32


@pytest.fixture(scope="module")
def model():
    import argparse
    m, _ = load_model(argparse.Namespace(checkpoint=str(DEFAULT_CKPT), random=not DEFAULT_CKPT.is_dir()))
    return m


def prompts(model, B):
    return torch.randint(0, model.config.vocab_size, (B, PLEN), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("s", [1.0, 2.0], ids=["s1", "s2"])
@pytest.mark.parametrize("K", [1, 16], ids=["K1", "K16"])
@pytest.mark.parametrize("B", [1, 32], ids=["b1", "b32"])
def test_tmfast_generate(benchmark, model, B, K, s, compiled):
    eng = MaturationEngine(model, compile=compiled)
    g = GenerationConfig(max_new_tokens=NEW, tail=K, guidance=s, seed=0, stop_at_eos=False)
    p = prompts(model, B)
    eng.generate(p, g)  # warm-up (compiles once when compiled)
    benchmark.extra_info.update(machine_info())
    benchmark.pedantic(eng.generate, args=(p, g), rounds=3, iterations=1)
    benchmark.extra_info["committed_tok_s"] = B * NEW / benchmark.stats.stats.median


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("B", [1, 32], ids=["b1", "b32"])
def test_hf_greedy_generate(benchmark, model, B, static):
    hf = hf_twin(model.config)
    ids = torch.tensor(prompts(model, B))
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None,
              attention_mask=torch.ones_like(ids))
    if static:
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        hf.generate(ids, **kw)
        benchmark.extra_info.update(machine_info())
        benchmark.pedantic(hf.generate, args=(ids,), kwargs=kw, rounds=3, iterations=1)
    benchmark.extra_info["committed_tok_s"] = B * NEW / benchmark.stats.stats.median
