"""Training throughput: tokens/s, MFU and peak memory of the training step, per shape, objective
and compile setting (the step `python -m train` runs: forward, backward, AdamW).

    python bench/train_throughput.py --out bench/results/train_throughput        # CPU: shipped + GPT-2-Small shapes
    python bench/train_throughput.py --shapes medium --dtype bfloat16 --device cuda --steps 200
    (bench/gpu_check.py's training section calls measure() at the GPT-2-Medium shape)

MFU = model FLOPs per token × tokens/s ÷ the peak: FLOPs per token = 6 N + 12 L d T (N the model's
parameters, L layers, d width, T the block: nanoGPT's estimate, the attention included); the peak
is the matmul rate measured on this device in the step's dtype (a dense n×n mm), not the vendor's
figure, so MFU here says how close the step comes to what this device's matmuls reach. Random
weights and random token data: throughput does not depend on them. The maturation rows train from
a table at a fixed radius (frozen), as the recipe does; the AR rows train the table too.
Compiled maturation steps draw a tail length K per step; K is marked a dynamic size
(train.objectives.mark_dynamic_tail), so K = 1 and K ≥ 2 compile one graph each ("graphs" counts
them) — a median over few steps may still hold a compile.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))
from timing import sync  # noqa: E402
from tmfast.config import ModelConfig  # noqa: E402
from tmfast.model import TMModel  # noqa: E402

SHAPES = {  # name: (layers, heads, width, vocabulary, block)
    "shipped": (4, 4, 192, 4096, 128),
    "small": (12, 12, 768, 50257, 1024),
    "medium": (24, 16, 1024, 50257, 1024),
    "toy": (2, 2, 32, 257, 32),
}


def matmul_peak(dev, dtype, n: int | None = None) -> float:
    """FLOP/s of a dense n×n matmul on this device in this dtype (best of a few)."""
    n = n or (8192 if dev.type == "cuda" else 2048)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(dev)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def measure(shape: str | tuple, objective: str, compiled: bool, dev, dtype_name: str = "float32", batch: int = 8,
            block: int | None = None, steps: int = 5, warmup: int = 2, budget_s: float | None = None) -> dict:
    """One configuration's training step: median step time over `steps` after `warmup` (the first
    compiled steps compile), tokens/s, MFU against the measured matmul peak, peak device memory.
    shape: a SHAPES name or (layers, heads, width, vocabulary, block)."""
    from train.config import config_from
    from train.objectives import Objective, mark_dynamic_tail, plan_step
    L, H, d, V, T = SHAPES[shape] if isinstance(shape, str) else shape
    T = min(T, block or T)
    mc = ModelConfig(vocab_size=V, n_positions=T, n_layer=L, n_head=H, n_embd=d, k_max=min(16, T - 1),
                     table_trainable=objective == "ar", table_normalised=objective != "ar")
    tc = config_from(None, {"objective": objective, "init_from": "x" if objective == "maturation" else "scratch",
                            "block_size": T, "batch_size": batch, "k_max": mc.k_max, "n_layer": L, "n_head": H,
                            "n_embd": d})
    torch.manual_seed(0)
    model = TMModel(mc).to(dev).train()
    obj = Objective(model, tc)
    fwd = torch.compile(obj) if compiled else obj
    from torch._dynamo.utils import counters
    graphs_before = counters["stats"]["unique_graphs"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=dev.type == "cuda")
    data = np.random.default_rng(0).integers(0, V, 4 * batch * (T + 1) * (steps + warmup)).astype(np.int64)
    bf16 = dtype_name == "bfloat16"
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else torch.autocast(dev.type, enabled=False)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, t_start = [], time.perf_counter()
    for i in range(warmup + steps):
        mb = plan_step(tc, data, i, d, V, 1, batch)[0]
        if compiled:
            mark_dynamic_tail(mb)
        sync(dev)
        t0 = time.perf_counter()
        with amp:
            loss, stats = fwd(mb)
        (loss / stats["weight"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if budget_s is not None and time.perf_counter() - t_start > budget_s and len(times) >= 3:
            break
    step = statistics.median(times)
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * n_params + 12 * L * d * T
    tokens_s = batch * T / step
    peak = matmul_peak(dev, torch.bfloat16 if bf16 else torch.float32)
    return {"shape": shape, "objective": objective, "compiled": compiled, "dtype": dtype_name, "batch": batch,
            "block": T, "params_M": n_params / 1e6, "steps": len(times), "step_ms": step * 1e3,
            "tokens_s": tokens_s, "model_tflops": flops_per_token * tokens_s / 1e12, "peak_tflops": peak / 1e12,
            "mfu": flops_per_token * tokens_s / peak,
            "graphs": counters["stats"]["unique_graphs"] - graphs_before if compiled else None, "compile_s": (time.perf_counter() - t_start) - sum(times)
            if compiled else None,
            "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None}


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | params | objective | compiled (graphs) | dtype | batch × block | step ms | tokens/s | MFU | "
             "peak memory |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = f"{r['peak_mem_gb']:.1f} GiB" if r["peak_mem_gb"] is not None else "(CPU)"
        lines.append(f"| {r['shape']} | {r['params_M']:.1f} M | {r['objective']} | "
                     f"{'yes (%d)' % r['graphs'] if r['compiled'] else 'no'} "
                     f"| {r['dtype']} | {r['batch']} × {r['block']} | {r['step_ms']:.0f} | {r['tokens_s']:.0f} | "
                     f"{100 * r['mfu']:.1f} % | {mem} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["shipped", "small"], choices=list(SHAPES))
    p.add_argument("--objectives", nargs="+", default=["ar", "maturation"], choices=["ar", "maturation"])
    p.add_argument("--compile", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=128, help="tokens per sequence (at most the shape's context)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    rows = []
    for shape in args.shapes:
        for objective in args.objectives:
            for c in args.compile:
                r = measure(shape, objective, c == "yes", dev, args.dtype, args.batch, args.block, args.steps)
                rows.append(r)
                print(f"{shape} {objective} compiled={c}: {r['step_ms']:.0f} ms/step, {r['tokens_s']:.0f} tokens/s, "
                      f"MFU {100 * r['mfu']:.1f} %", flush=True)
    head = (f"`python bench/train_throughput.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
            f"({dev}, {args.threads} thread(s), torch {torch.__version__}; median of {args.steps} steps after 2 "
            f"warm-up steps; MFU against the measured {args.dtype} matmul peak "
            f"{rows[0]['peak_tflops'] * 1e3:.0f} GFLOP/s)")
    text = head + "\n\n" + markdown(rows)
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text + "\n")
        Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
