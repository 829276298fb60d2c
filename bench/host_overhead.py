"""Host work per engine step: Engine.step's wall time minus the time inside the step function.

    python bench/host_overhead.py                     # shipped model, batch 1 and 32, compiled, 1 thread
    python bench/host_overhead.py --batch 32 --eager --steps 100
    PYTHONPATH=/tmp/before python bench/host_overhead.py   # another checkout, same measurement

What the host does between steps — admission checks, building the step's inputs, reading the
results back, stopping rules, text, events — is time the device waits on a GPU (where a batch-1
step of a small model is tens of microseconds). Measured in steady state (every sequence
running, none finishing: max_new_tokens leaves room), median over --repeat runs of --steps steps; text is
tracked (track_text) as the server does. Prints one Markdown row per batch; --out writes .md/.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from tmfast import GenerationConfig, load_checkpoint
from tmfast.checkpoint import DEFAULT_CHECKPOINT
from tmfast.engine import Engine
import os
TRACK = os.environ.get("TRACK", "1") == "1"


def measure(model, tokenizer, batch: int, compiled: bool, steps: int, prompt_len: int, tail: int,
            alpha_max: float, device, seed: int = 0) -> tuple[list[float], list[float]]:
    """(wall, inside) seconds of `steps` steady-state Engine.step calls."""
    g = GenerationConfig(max_new_tokens=steps + 24, tail=tail, alpha_max=alpha_max, seed=0, stop_at_eos=False)
    engine = Engine(model, tokenizer, max_batch=batch, max_len=prompt_len + g.max_new_tokens + tail - 1,
                    k_window=tail, max_queue=batch, compile=compiled, track_text=TRACK)
    inside = []
    real = engine._batch.step_fn

    def timed(*args, **kw):  # the step function's own time (device work on CPU; launches on CUDA)
        t0 = time.perf_counter()
        out = real(*args, **kw)
        inside.append(time.perf_counter() - t0)
        return out
    engine._batch.step_fn = timed
    gen = torch.Generator().manual_seed(seed)
    for _ in range(batch):
        engine.add_request(torch.randint(0, model.config.vocab_size, (prompt_len,), generator=gen).tolist(), g)
    for _ in range(12):  # admit, compile, warm
        engine.step()
    inside.clear()
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return walls, inside


def summary(batch: int, compiled: bool, runs: list[tuple[list[float], list[float]]]) -> dict:
    walls = [w for ws, _ in runs for w in ws]
    inside = [i for _, ins in runs for i in ins]
    host = [w - i for w, i in zip(walls, inside)]
    return {"batch": batch, "compiled": compiled, "samples": len(host), "step_ms": 1e3 * statistics.median(walls),
            "inside_ms": 1e3 * statistics.median(inside), "host_ms": 1e3 * statistics.median(host),
            "host_p90_ms": 1e3 * sorted(host)[int(0.9 * len(host))]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--eager", action="store_true", help="the eager step (default: compiled)")
    p.add_argument("--steps", type=int, default=60, help="steady-state steps per run")
    p.add_argument("--repeat", type=int, default=3, help="runs per batch, interleaved; samples pooled")
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--tail", type=int, default=16)
    p.add_argument("--alpha-max", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tokenizer = load_checkpoint(args.checkpoint, device=device)
    runs = {b: [] for b in args.batch}
    for r in range(args.repeat):  # interleaved, so a slow spell of a shared machine hits every batch
        for b in args.batch:
            runs[b].append(measure(model, tokenizer, b, not args.eager, args.steps, args.prompt_len, args.tail,
                                   args.alpha_max, device, seed=r))
    rows = [summary(b, not args.eager, runs[b]) for b in args.batch]
    lines = [f"`python bench/host_overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
             f"({args.threads} thread(s), {device}, K={args.tail}, α_max={args.alpha_max:g})", "",
             "| batch | step | samples | step ms | inside the step fn ms | host ms (median) | host ms (p90) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {'compiled' if r['compiled'] else 'eager'} | {r['samples']} | {r['step_ms']:.3f} | "
                     f"{r['inside_ms']:.3f} | {r['host_ms']:.3f} | {r['host_p90_ms']:.3f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")
        Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
