"""Step time of the cached engine vs the naive full-recompute reference, side by side.

    python bench/step_time.py                       # GPT-2-small shape, prefix 512, K=16
    python bench/step_time.py --prefix 128 512 1024 --tail 1 16 --guidance 1 2 --compile

The naive reference is the one the tests check the engine against
(tmfast/testing.py): it recomputes the whole sequence every step. Both run
in this process on the same random model; the ratio is what to read, not the
absolute times (machines are noisy).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from tmfast.testing import naive_generate  # noqa: E402

from evals.report import machine_info  # noqa: E402
from tmfast import GenerationConfig, MaturationEngine, ModelConfig, TMModel  # noqa: E402


def engine_step_times(engine, prompt, g, warmup: int) -> list[float]:
    """Seconds per step (prefill excluded), after `warmup` steps."""
    stamps = []
    engine.generate([prompt], g, on_step=lambda ev: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--prefix", type=int, nargs="+", default=[512])
    p.add_argument("--tail", type=int, nargs="+", default=[16])
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    p.add_argument("--alpha-max", type=float, nargs="+", default=[1.0],
                   help="1 = inert tails (front-only steps), < 1 = live tails (the tail window)")
    p.add_argument("--steps", type=int, default=8, help="engine steps timed")
    p.add_argument("--naive-steps", type=int, default=2, help="naive steps timed (slow)")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd step")
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    n_pos = max(args.prefix) + max(args.steps, args.naive_steps) + max(args.tail) + 8
    cfg = ModelConfig(vocab_size=args.vocab, n_positions=max(1024, n_pos), n_layer=args.n_layer,
                      n_head=args.n_head, n_embd=args.n_embd, k_max=max(64, max(args.tail)))
    model = TMModel(cfg).eval()
    info = machine_info()
    print(f"# model: {args.n_layer} layers, d={args.n_embd}, V={args.vocab} "
          f"({model.num_params() / 1e6:.0f}M params), fp32")
    print("# machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print("| prefix | K | s | α_max | naive ms/step | cached ms/step | speed-up |"
          + (" compiled ms/step | speed-up |" if args.compile else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.compile else ""))
    rows = []
    for prefix in args.prefix:
        prompt = torch.randint(0, args.vocab, (prefix,)).tolist()
        for K, s, a in ((K, s, a) for K in args.tail for s in args.guidance for a in args.alpha_max):
            g = GenerationConfig(max_new_tokens=args.steps + 2, tail=K, guidance=s, alpha_max=a, seed=0,
                                 stop_at_eos=False)
            cached = statistics.median(engine_step_times(MaturationEngine(model), prompt, g, 1))
            gn = GenerationConfig(max_new_tokens=args.naive_steps, tail=K, guidance=s, alpha_max=a, seed=0,
                                  stop_at_eos=False)
            t0 = time.perf_counter()
            naive_generate(model, prompt, gn)
            naive = (time.perf_counter() - t0) / args.naive_steps
            row = {"prefix": prefix, "K": K, "s": s, "alpha_max": a, "naive_ms": naive * 1e3, "cached_ms": cached * 1e3,
                   "speedup": naive / cached}
            line = f"| {prefix} | {K} | {s:g} | {a:g} | {naive * 1e3:.1f} | {cached * 1e3:.1f} | {naive / cached:.1f}× |"
            if args.compile:
                eng = MaturationEngine(model, compile=True)
                comp = statistics.median(engine_step_times(eng, prompt, g, 2))
                row.update(compiled_ms=comp * 1e3, compiled_speedup=naive / comp)
                line += f" {comp * 1e3:.1f} | {naive / comp:.1f}× |"
            print(line, flush=True)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "model": cfg.to_dict(), "rows": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
