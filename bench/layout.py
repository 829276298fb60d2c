"""Weight layouts on CPU: the numbers behind TMModel.cpu_weight_layout and the engine's commit table.

    python bench/layout.py                  # default-model and GPT-2-Medium shapes, rows 1 / 8 / 32

For each matmul of a decode step, x (M, in) @ Wᵀ with W stored (out, in) row-major (nn.Linear's
layout) vs the same W stored column-major (the transpose contiguous), and the commit's
queries (M, d) @ Eᵀ with the table E (V, d) row-major vs column-major. Caches are flushed before
every call (a 64 MiB buffer is rewritten): in a decode step every weight is read once, cold.
Median microseconds of --reps calls; 1 thread.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {"default (d=192, V=4096)": (192, 4096), "GPT-2-Medium (d=1024, V=50257)": (1024, 50257)}


def cold_median_us(fn, scrub: torch.Tensor, reps: int) -> float:
    ts = []
    for _ in range(reps):
        scrub.mul_(1.0)
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(ts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    scrub = torch.randn(16 * 2 ** 20)
    print("| shape | op (in → out) | rows | row-major µs | column-major µs | column ÷ row |")
    print("|---|---|---|---|---|---|")
    for name, (d, V) in SHAPES.items():
        ops = [("c_attn", d, 3 * d), ("attn c_proj", d, d), ("c_fc", d, 4 * d), ("mlp c_proj", 4 * d, d),
               ("commit (table)", d, V)]
        for op, n_in, n_out in ops:
            W = torch.randn(n_out, n_in)
            Wc = W.t().contiguous().t()
            b = torch.randn(n_out)
            for M in args.rows:
                x = torch.randn(M, n_in)
                reps = max(5, args.reps // (4 if n_out * n_in > 2 ** 24 else 1))
                if op.startswith("commit"):
                    row = cold_median_us(lambda: x @ W.t(), scrub, reps)
                    col = cold_median_us(lambda: x @ Wc.t(), scrub, reps)
                else:
                    row = cold_median_us(lambda: F.linear(x, W, b), scrub, reps)
                    col = cold_median_us(lambda: F.linear(x, Wc, b), scrub, reps)
                print(f"| {name} | {op} ({n_in} → {n_out}) | {M} | {row:.0f} | {col:.0f} | {col / row:.2f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
