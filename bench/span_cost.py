"""Does a step's cost follow the sequences, not the cache? Step time with a context-sized cache
vs a small cache, eager and compiled, on the same short sequences.

    python bench/span_cost.py                 # random 4 layers, d=256, context 1024, V=4096, batch 32
    python bench/span_cost.py --batch 1 8 32 --new-tokens 40 --out bench/results/span_cost

The engine attends over the cache slots in use: exactly when eager, rounded up to a span bucket
(64 · 2^i) when compiled. So a compiled step over a cache sized to the model's context should
cost about what it costs over a small cache, and no more than eager. Median step time over the
steady-state steps of one generate (after a warm-up generate that compiles), paired rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from tmfast import GenerationConfig, ModelConfig, TMModel
from tmfast.engine import Engine


def step_times(engine: Engine, prompts, g: GenerationConfig) -> list[float]:
    for p in prompts:
        engine.add_request(p, g)
    times = []
    while engine.has_work:
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times[2:]  # admission and the first step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[32])
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--small-cache", type=int, default=96, help="position slots of the small cache")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, n_positions=args.context, n_layer=4, n_head=4, n_embd=256, k_max=16,
                      table_radius=1.0)
    model = TMModel(cfg).eval()
    g = GenerationConfig(max_new_tokens=args.new_tokens, tail=16, seed=0, stop_at_eos=False)
    rows = []
    for batch in args.batch:
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(1)).tolist()
        engines = {}
        for compiled in (False, True):
            for cache, max_len in (("context", None), ("small", args.small_cache)):
                e = Engine(model, max_batch=batch, max_len=max_len, k_window=16, max_queue=batch, compile=compiled)
                step_times(e, prompts, g)  # warm (compiles)
                engines[("compiled" if compiled else "eager", cache)] = e
        samples = {k: [] for k in engines}
        for r in range(args.rounds):  # paired rounds, rotated order
            keys = list(engines)
            keys = keys[r % len(keys):] + keys[:r % len(keys)]
            for k in keys:
                samples[k] += step_times(engines[k], prompts, g)
        med = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
        for (mode, cache), ms in med.items():
            e = engines[(mode, cache)]
            rows.append({"batch": batch, "step": mode, "cache": cache, "cache_slots": getattr(e._batch, "slots", None) or e._batch.cache.slots, "step_ms": ms,
                         "vs_small": ms / med[(mode, "small")], "vs_eager": ms / med[("eager", cache)]})
    lines = [f"`python bench/span_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
             f"(random {cfg.n_layer} layers, d={cfg.n_embd}, V={cfg.vocab_size}, context {cfg.n_positions}; "
             f"prompt {args.prompt_len}, {args.new_tokens} new tokens, K=16, {args.threads} thread(s))", "",
             "| batch | step | cache | cache slots | step ms | ÷ small cache | ÷ eager |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['step']} | {r['cache']} | {r['cache_slots']} | {r['step_ms']:.2f} | "
                     f"{r['vs_small']:.2f} | {r['vs_eager']:.2f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")
        Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
