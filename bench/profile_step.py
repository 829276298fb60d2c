"""torch.profiler trace of engine steps: where a step's time goes.

    python bench/profile_step.py                           # shipped model, batch 1, defaults, compiled
    python bench/profile_step.py --batch 32 --eager --alpha-max 0.5 --trace /tmp/step.json
    python bench/profile_step.py --device cuda --dtype bfloat16    # on a GPU (CUDA kernels in the table)

Runs one warm-up generate (compiles), then profiles a second one and prints the profiler's
table (self CPU time per op, top rows) and the median wall time per step. --trace writes a
Chrome trace to open in chrome://tracing or Perfetto.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tmfast import GenerationConfig, MaturationEngine, load_checkpoint
from tmfast.checkpoint import DEFAULT_CHECKPOINT

DEFAULT_CKPT = DEFAULT_CHECKPOINT


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--tail", type=int, default=16)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--alpha-max", type=float, default=1.0)
    p.add_argument("--eager", action="store_true", help="profile the eager step (default: compiled)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--rows", type=int, default=25, help="rows of the profiler table")
    p.add_argument("--trace", default=None, help="write a Chrome trace here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    model, _ = load_checkpoint(args.checkpoint, device=dev, dtype=dtype)
    prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len),
                            generator=torch.Generator().manual_seed(0)).tolist()
    g = GenerationConfig(max_new_tokens=args.new_tokens, tail=args.tail, guidance=args.guidance,
                         alpha_max=args.alpha_max, seed=0, stop_at_eos=False)
    engine = MaturationEngine(model, compile=not args.eager)
    engine.generate(prompts, g)  # warm: compiles every step variant this run uses
    stamps = []
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
                 ) as prof:
        engine.generate(prompts, g, on_step=lambda ev: stamps.append(time.perf_counter()))
        if dev.type == "cuda":
            torch.cuda.synchronize()
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    print(f"# batch {args.batch}, K={args.tail}, s={args.guidance:g}, alpha_max={args.alpha_max:g}, "
          f"{'eager' if args.eager else 'compiled'}, {dtype}, {dev}, {args.threads} thread(s); "
          f"median step under the profiler {1e3 * statistics.median(steps):.3f} ms over {len(steps)} steps")
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
