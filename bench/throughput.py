"""Throughput of the engine, side by side with Hugging Face GPT-2, in one process run.

    python bench/throughput.py                       # the shipped maturation model, every section
    python bench/throughput.py --checkpoint DIR --sections gen prefix breakdown train memory
    python bench/throughput.py --random              # a random model of the default model's shape

Sections (each prints a Markdown table; --out writes them all to OUT.md and OUT.json):
  gen        committed tokens/s at batch {1, 32}, K {1, 16}, s {1, 2}, α_max {1 (inert tails,
             the default), 0.5 (live tails)}, eager and compiled, and HF `transformers` greedy
             `generate` on a random GPT-2 of the same size (eager dynamic cache; static cache
             eager; static cache + torch.compile), reported as ratios to HF eager at the same
             batch. "decode tok/s" = batch / median step time (steady state); "e2e tok/s"
             includes prefill and first steps.
  medium     the same comparison at the GPT-2-Medium shape (24 layers, d=1024, V=50257,
             random weights), batch {1, 8}, short runs
  prefix     cached step vs the naive full recompute (tmfast.testing.naive_generate) at
             prefix 128/512/1024 (a random model of the same widths with 1.2k positions)
  breakdown  one step split into model forward / maturation update / commit / rest, with
             model FLOPs and bytes touched per step, the FLOP floor (FLOPs ÷ measured
             matmul throughput) and the byte floors (bytes ÷ measured copy bandwidth of a
             cache-resident and of a DRAM-sized buffer), the
             achieved fraction of each, and achieved GB/s (bytes ÷ step time, as gpt-fast)
  train      training tokens/s of the maturation vs the AR objective on the same backbone
             (train.objectives, forward + backward + AdamW, synthetic token data)
  memory     peak memory per configuration: on CPU the peak RSS growth of a fresh
             subprocess during generate (eager), on CUDA torch.cuda.max_memory_allocated

Every table is preceded by the machine (CPU model, threads, torch/triton versions, GPU).
Absolute numbers move with machine load; read the ratios, which are measured side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evals.report import machine_info  # noqa: E402
from timing import median_time, sync  # noqa: E402
from tmfast import GenerationConfig, MaturationEngine, ModelConfig, TMModel, load_checkpoint  # noqa: E402
from tmfast.checkpoint import DEFAULT_CHECKPOINT  # noqa: E402
from tmfast.engine import Engine, step_draws, step_window  # noqa: E402
from csrc_triton import maturation_update, nn_commit  # noqa: E402

DEFAULT_CKPT = DEFAULT_CHECKPOINT
SECTIONS = ("gen", "medium", "prefix", "breakdown", "train", "memory")


def timeit(fn, dev, reps: int, warmup: int = 1, setup=None) -> float:
    """Median seconds of fn() over reps (after warmup calls): CUDA events on CUDA (no sync
    between calls), wall time on the CPU (bench/timing.py)."""
    return median_time(fn, dev, reps, warmup, setup)


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------
def load_model(args):
    dtype = getattr(torch, getattr(args, "dtype", None) or "float32")
    if args.random or not Path(args.checkpoint).is_dir():
        if not args.random:
            print(f"# {args.checkpoint} not found: using a random model of the default shape", flush=True)
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=4096, n_positions=128, n_layer=4, n_head=4, n_embd=192, k_max=16)
        return TMModel(cfg).eval().to(dtype), "random init, default-model shape"
    model, _ = load_checkpoint(args.checkpoint, dtype=dtype)
    return model.eval(), str(args.checkpoint)


def has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


def hf_twin(cfg: ModelConfig, n_positions: int | None = None):
    """A random HF GPT-2 with the same sizes (vocab, context, layers, heads, width)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    hc = GPT2Config(vocab_size=cfg.vocab_size, n_positions=n_positions or cfg.n_positions, n_embd=cfg.n_embd,
                    n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(hc).eval()


# --------------------------------------------------------------------------------------
# gen: committed tokens/s
# --------------------------------------------------------------------------------------
def tm_run(engine, prompts, g):
    """(whole generate seconds, median seconds between steps). No sync per step: on CUDA the
    engine reads results one step behind, and its loop runs at the device's pace in steady state."""
    stamps = []
    sync_dev = engine.model.table.weight.device
    sync(sync_dev)
    t0 = time.perf_counter()
    engine.generate(prompts, g, on_step=lambda ev: stamps.append(time.perf_counter()))
    sync(sync_dev)
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return total, statistics.median(steps)


def hf_run(hf, ids, new, static: bool):
    from transformers import StoppingCriteria, StoppingCriteriaList
    stamps = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            sync(ids.device)
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None,
              stopping_criteria=StoppingCriteriaList([Stamp()]), attention_mask=torch.ones_like(ids))
    if static:
        kw["cache_implementation"] = "static"
    sync(ids.device)
    t0 = time.perf_counter()
    out = hf.generate(ids, **kw)
    total = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return total, statistics.median(steps)


def section_gen(model, args, dev):
    configs = [(mode, K, s, a_max) for mode in ["eager"] + (["compiled"] if args.compile else [])
               for a_max in args.alpha_max for K in args.tail for s in args.guidance
               if not (s != 1.0 and (K == 1 or a_max == 1.0))]  # no guidance computed there: the s = 1 step
    rows = compare_gen(model, dev, args.batch, configs, args.new_tokens, args.prompt_len, args.reps, args.compile,
                       args.impl)
    return rows, gen_table(rows, f"prompt {args.prompt_len} random tokens, {args.new_tokens} new tokens", args.reps)


def section_medium(model, args, dev):
    """The paper's backbone shape (GPT-2 Medium: 24 layers, d=1024, 16 heads, V=50257), random weights."""
    cfg = ModelConfig(vocab_size=50257, n_positions=1024, n_layer=24, n_head=16, n_embd=1024, k_max=16)
    torch.manual_seed(0)
    big = TMModel(cfg).eval().to(dev, getattr(torch, args.dtype))
    configs = [("eager", 16, 1.0, 1.0)] + ([("compiled", 16, 1.0, 1.0)] if args.compile else []) + \
              [("eager", 16, 1.0, 0.5)]
    rows = compare_gen(big, dev, args.medium_batch, configs, args.medium_new_tokens, args.prompt_len,
                       args.medium_reps, args.compile, args.impl)
    what = (f"GPT-2-Medium shape ({cfg.n_layer} layers, d={cfg.n_embd}, V={cfg.vocab_size}, "
            f"{big.num_params() / 1e6:.0f}M params, random weights, {args.dtype}), prompt {args.prompt_len} random tokens, "
            f"{args.medium_new_tokens} new tokens")
    del big
    return rows, gen_table(rows, what, args.medium_reps)


def compare_gen(model, dev, batches, configs, new, plen, reps, hf_compile, impl):
    """Rows of committed tokens/s: HF greedy generate on a random GPT-2 twin (eager, static cache,
    static cache + compile) and tmfast for each (mode, K, s, α_max), at each batch.

    Paired rounds: every runner is warmed (compiled) first, then each round runs every runner
    once, in an order rotated from round to round, so machine-load drift hits all of them alike;
    a runner's figures are its medians over the rounds."""
    cfg = model.config
    rows = []
    gen = torch.Generator().manual_seed(0)
    for B in batches:
        prompts = torch.randint(0, cfg.vocab_size, (B, plen), generator=gen).tolist()
        ids = torch.tensor(prompts, device=dev)
        runners, notes = {}, {}
        dtype = model.table.weight.dtype
        hf = None
        if has_transformers():
            hf = hf_twin(cfg).to(dev, dtype)
            runners["HF eager"] = lambda hf=hf: hf_run(hf, ids, new, False)
            runners["HF static cache"] = lambda hf=hf: hf_run(hf, ids, new, True)
            if hf_compile:
                hfc = hf_twin(cfg).to(dev, dtype)
                hfc.forward = torch.compile(hfc.forward, dynamic=False)
                runners["HF static cache + compile"] = lambda hf=hfc: hf_run(hf, ids, new, True)
        else:
            for name in ("HF eager", "HF static cache", "HF static cache + compile"):
                notes[name] = "not run: transformers is not installed (pip install -e '.[hf]')"
        for mode, K, s, a_max in configs:
            g = GenerationConfig(max_new_tokens=new, tail=K, guidance=s, alpha_max=a_max, seed=0, stop_at_eos=False)
            eng = MaturationEngine(model, compile=mode == "compiled", impl=impl)
            runners[(mode, K, s, a_max)] = lambda eng=eng, g=g: tm_run(eng, prompts, g)
        warm = {}
        with torch.no_grad():
            for name, run in list(runners.items()):
                t0 = time.perf_counter()
                try:
                    run()  # warm: lazy imports, first allocations, compilation
                    if name == "HF static cache + compile":
                        run()
                except Exception as e:  # noqa: BLE001
                    notes[name] = f"failed: {type(e).__name__}: {str(e)[:80]}"
                    del runners[name]
                warm[name] = time.perf_counter() - t0
            results = {name: [] for name in runners}
            names = list(runners)
            for r in range(reps):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    results[name].append(runners[name]())
        del hf, runners
        med = {name: (statistics.median(t for t, _ in rs), statistics.median(st for _, st in rs))
               for name, rs in results.items()}
        base_total, base = med.get("HF eager", (None, None))
        for name in [n for n in ("HF eager", "HF static cache", "HF static cache + compile") if n in med or n in notes]:
            if name in notes:
                rows.append({"batch": B, "engine": name, "K": "", "s": "", "note": notes[name]})
                continue
            total, step = med[name]
            rows.append({"batch": B, "engine": name, "K": "", "s": "", "e2e_tok_s": B * new / total,
                         "decode_tok_s": B / step, "step_ms": step * 1e3, "ratio": base / step if base else None,
                         "e2e_ratio": base_total / total if base else None, "warmup_s": warm[name]})
        for mode, K, s, a_max in configs:
            name = (mode, K, s, a_max)
            if name in notes:
                rows.append({"batch": B, "engine": f"tmfast {mode}", "K": K, "s": s, "alpha_max": a_max,
                             "note": notes[name]})
                continue
            total, step = med[name]
            rows.append({"batch": B, "engine": f"tmfast {mode}", "K": K, "s": s, "alpha_max": a_max,
                         "e2e_tok_s": B * new / total, "decode_tok_s": B / step, "step_ms": step * 1e3,
                         "ratio": base / step if base else None, "e2e_ratio": base_total / total if base else None,
                         "warmup_s": warm[name]})
            print(f"#   tmfast {mode} B={B} K={K} s={s:g} α_max={a_max:g}: {B / step:.0f} tok/s, "
                  f"{(base or float('nan')) / step:.2f}× HF eager (warm-up {warm[name]:.0f} s)", flush=True)
    return rows


def gen_table(rows, what: str, reps: int) -> str:
    lines = [f"Committed tokens/s: {what}; medians over {reps} paired rounds (each round runs every row once, "
             "in rotated order); decode = batch ÷ median step time; tmfast at its defaults "
             "otherwise (tail_noise 0.4); ratio = decode tok/s ÷ HF eager decode tok/s at the same batch, "
             "e2e ratio = the same for whole generate calls (prefill included). s = 2 is listed only where "
             "guidance is computed (K > 1 and α_max < 1).", "",
             "| batch | engine | K | s | α_max | decode tok/s | step ms | e2e tok/s | ratio vs HF eager | e2e ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['batch']} | {r['engine']} | | | | {r['note']} | | | | |")
        else:
            s = "" if r["s"] == "" else f"{r['s']:g}"
            a = f"{r['alpha_max']:g}" if "alpha_max" in r else ""
            ratio = f"{r['ratio']:.2f}×" if r["ratio"] is not None else "n/a"
            e2e = f"{r['e2e_ratio']:.2f}×" if r["e2e_ratio"] is not None else "n/a"
            lines.append(f"| {r['batch']} | {r['engine']} | {r['K']} | {s} | {a} | {r['decode_tok_s']:.0f} | "
                         f"{r['step_ms']:.2f} | {r['e2e_tok_s']:.0f} | {ratio} | {e2e} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# prefix: cached step vs naive recompute
# --------------------------------------------------------------------------------------
def section_prefix(model, args, dev):
    from tmfast.testing import naive_generate
    import step_time  # bench/step_time.py (a sibling of this script): the engine's step timer
    cfg = model.config
    torch.manual_seed(0)
    big = TMModel(ModelConfig(vocab_size=cfg.vocab_size, n_positions=max(args.prefix) + 64, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, k_max=max(cfg.k_max, max(args.tail)))).eval().to(dev)
    rows = []
    for P in args.prefix:
        prompt = torch.randint(0, cfg.vocab_size, (P,)).tolist()
        for K in args.tail:
            for s in args.guidance:
                g = GenerationConfig(max_new_tokens=10, tail=K, guidance=s, seed=0, stop_at_eos=False)
                cached = statistics.median(step_time.engine_step_times(MaturationEngine(big, impl=args.impl),
                                                                       prompt, g, 1))
                gn = GenerationConfig(max_new_tokens=2, tail=K, guidance=s, seed=0, stop_at_eos=False)
                t0 = time.perf_counter()
                naive_generate(big, prompt, gn)
                naive = (time.perf_counter() - t0) / 2
                rows.append({"prefix": P, "K": K, "s": s, "naive_ms": naive * 1e3, "cached_ms": cached * 1e3,
                             "speedup": naive / cached})
    lines = [f"Cached step vs naive full recompute (random model, {cfg.n_layer} layers, d={cfg.n_embd}, "
             f"V={cfg.vocab_size}, batch 1):", "",
             "| prefix | K | s | naive ms/step | cached ms/step | speed-up |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['prefix']} | {r['K']} | {r['s']:g} | {r['naive_ms']:.1f} | {r['cached_ms']:.1f} | "
              f"{r['speedup']:.1f}× |" for r in rows]
    return rows, "\n".join(lines)


# --------------------------------------------------------------------------------------
# breakdown: forward / update / commit, FLOP and byte floors
# --------------------------------------------------------------------------------------
def measure_peaks(dev) -> dict:
    """Measured peaks: fp32 matmul, and copy bandwidth for a cache-resident and a DRAM-sized buffer.
    The buffers are written first: an unwritten torch.empty maps the kernel's shared zero page,
    and "reading" it runs at cache speed whatever its size."""
    n = 2048 if dev.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    t = timeit(lambda: a @ b, dev, reps=5)
    peaks = {"matmul_gflops": 2 * n ** 3 / t / 1e9}
    for name, mib in (("copy_l3_gbs", 4), ("copy_dram_gbs", 256 if dev.type == "cpu" else 4096)):
        x = torch.randn(mib * 2 ** 18, device=dev)
        y = torch.randn_like(x)
        tc = timeit(lambda: y.copy_(x), dev, reps=20 if mib < 64 else 5)
        peaks[name] = 2 * x.numel() * 4 / tc / 1e9  # read + write
        peaks[name.replace("_gbs", "_mib")] = mib
    return peaks


def step_costs(cfg: ModelConfig, n_params: int, B: int, K: int, guided: bool, S: int, front_only: bool,
               dtype_bytes: int = 4) -> dict:
    """Model FLOPs and bytes touched by one engine step: every weight once, S cache slots of every
    row once (the span the step attends over), the table for the commit. Positions forwarded: 1
    (front-only) or K + (K − 1 if guided)."""
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    T = 1 if front_only else K + (K - 1 if guided else 0)
    tok = B * T
    lin = L * 12 * d * d + d * d + (0 if front_only else 128 * d + d * d)  # blocks, vector head, maturity MLP
    flops = 2 * tok * lin + L * 4 * tok * S * d + 2 * B * V * d  # + attention + commit
    params = n_params
    kv = L * 2 * B * S * d
    return {"flops": flops, "bytes": (params + kv) * dtype_bytes, "kv_bytes": kv * dtype_bytes,
            "param_bytes": params * dtype_bytes}


def section_breakdown(model, args, dev, peaks):
    """One eager step of a running batch, whole and by part: the step function as the engine calls
    it (state restored before each timed call), its forward, draws, update and commit alone."""
    cfg = model.config
    rows = []
    P = args.prompt_len
    for B in args.batch:
        for K in args.tail:
            for s in args.guidance:
                for a_max in args.alpha_max:
                    front_only = a_max == 1.0  # every tail inert: the engine's front-only step
                    guided = s != 1.0 and K > 1 and not front_only
                    if s != 1.0 and not guided:
                        continue  # the same step as s = 1
                    eng = Engine(model, max_batch=B, max_len=P + args.new_tokens + K - 1, k_window=K, max_queue=B,
                                 impl=args.impl)
                    g = GenerationConfig(max_new_tokens=args.new_tokens, tail=K, guidance=s, alpha_max=a_max,
                                         seed=0, stop_at_eos=False)
                    gen = torch.Generator().manual_seed(0)
                    for _ in range(B):
                        eng.add_request(torch.randint(0, cfg.vocab_size, (P,), generator=gen).tolist(), g)
                    eng.step()  # admitted, one step run
                    b = eng._batch
                    kinds, rows_n = b.kinds(), b._bucket
                    span = b.span(front_only)
                    saved = [t.clone() for t in b.state.tensors()]

                    def restore():  # the step writes its state in place: each timed call starts from the same
                        for t, v in zip(b.state.tensors(), saved):
                            t.copy_(v)
                    state = b.state.rows(rows_n)
                    c = b.consts
                    span_ids = c.slot_ids[:span]
                    x, pos, a_in, mask, slot = step_window(model, state, front_only, guided, b.scratch, span_ids)

                    def forward():
                        return model(x, pos=pos, alpha=a_in, k=state.k, mask=mask, cache=b.cache, cache_slots=slot,
                                     maturity=c.committed_maturity if front_only else None, cache_span=span)

                    with torch.no_grad():
                        out = forward().float()
                        t_fwd = timeit(forward, dev, args.reps * 5)
                        t_draw = timeit(lambda: step_draws(state, c, front_only, kinds["history"], kinds["tail_noise"]),
                                        dev, args.reps * 20)
                        if front_only:
                            t_upd = 0.0
                            front = out[:, 0].contiguous()
                        else:
                            pred_c = out[:, :K]
                            pred_u = torch.cat([out[:, :1], out[:, K:]], 1) if guided else None
                            t_upd = timeit(lambda: maturation_update(state.tail.clone(), pred_c, state.alpha,
                                                                     pred_uncond=pred_u,
                                                                     guidance=state.guidance if guided else None,
                                                                     impl=args.impl), dev, args.reps * 20)
                            front = state.tail[:, 0].contiguous()
                        t_com = timeit(lambda: nn_commit(front, c.commit_table, impl=args.impl, check_finite=False),
                                       dev, args.reps * 20)
                        t_all = timeit(lambda: b.run_step(rows_n, span, kinds), dev, args.reps * 5, setup=restore)
                    restore()
                    c_ = step_costs(cfg, model.num_params(), rows_n, K, guided, span, front_only,
                                    model.table.weight.element_size())
                    f_floor = c_["flops"] / (peaks["matmul_gflops"] * 1e9)
                    b_l3 = c_["bytes"] / (peaks["copy_l3_gbs"] * 1e9)
                    b_dram = c_["bytes"] / (peaks["copy_dram_gbs"] * 1e9)
                    rows.append({"batch": B, "K": K, "s": s, "alpha_max": a_max, "positions": x.shape[1],
                                 "span": span, "step_ms": t_all * 1e3, "forward_ms": t_fwd * 1e3,
                                 "draws_ms": t_draw * 1e3, "update_ms": t_upd * 1e3, "commit_ms": t_com * 1e3,
                                 "rest_ms": (t_all - t_fwd - t_draw - t_upd - t_com) * 1e3, "gflop": c_["flops"] / 1e9,
                                 "mbytes": c_["bytes"] / 1e6, "flop_floor_frac": f_floor / t_all,
                                 "byte_floor_l3_frac": b_l3 / t_all, "byte_floor_dram_frac": b_dram / t_all,
                                 "achieved_gbs": c_["bytes"] / t_all / 1e9,
                                 "achieved_gflops": c_["flops"] / t_all / 1e9})
    lines = [f"One eager step of a running batch (prompt {P}, after one step; positions = forwarded per sequence, "
             f"span = cache slots attended); measured peaks: matmul {peaks['matmul_gflops']:.0f} GFLOP/s (fp32 2048² mm), copy "
             f"{peaks['copy_l3_gbs']:.1f} GB/s ({peaks['copy_l3_mib']} MiB, cache-resident) and "
             f"{peaks['copy_dram_gbs']:.1f} GB/s ({peaks['copy_dram_mib']} MiB, DRAM), read + write of written "
             "buffers; floor fraction = floor time ÷ measured step time.", "",
             "| batch | K | s | α_max | positions | span | step ms | forward | draws | update | commit | rest | GFLOP/step | "
             "MB/step | % FLOP floor | % byte floor (L3) | % byte floor (DRAM) | achieved GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['K']} | {r['s']:g} | {r['alpha_max']:g} | {r['positions']} | {r['span']} | "
              f"{r['step_ms']:.2f} | {r['forward_ms']:.2f} | {r['draws_ms']:.3f} | {r['update_ms']:.3f} | "
              f"{r['commit_ms']:.3f} | {r['rest_ms']:.2f} | "
              f"{r['gflop']:.3f} | {r['mbytes']:.1f} | {100 * r['flop_floor_frac']:.1f} % | "
              f"{100 * r['byte_floor_l3_frac']:.1f} % | {100 * r['byte_floor_dram_frac']:.1f} % | "
              f"{r['achieved_gbs']:.1f} |" for r in rows]
    return rows, "\n".join(lines)


# --------------------------------------------------------------------------------------
# train: maturation vs AR objective
# --------------------------------------------------------------------------------------
def section_train(model, args, dev):
    from train_throughput import measure  # the one training-step measurement (bench/train_throughput.py)
    cfg = model.config
    T = min(128, cfg.n_positions)
    shape = (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, T)
    rows = []
    for obj in ("ar", "maturation"):
        r = measure(shape, obj, False, dev, batch=args.train_batch, block=T, steps=args.train_steps)
        rows.append({"objective": obj, "step_ms": r["step_ms"], "tok_s": r["tokens_s"]})
    base = rows[0]["tok_s"]
    lines = [f"Training step (forward + backward + AdamW), batch {args.train_batch} × {T} tokens, same backbone "
             f"({cfg.n_layer} layers, d={cfg.n_embd}, V={cfg.vocab_size}), median of {args.train_steps} steps:", "",
             "| objective | step ms | tokens/s | vs AR |", "|---|---|---|---|"]
    lines += [f"| {r['objective']} | {r['step_ms']:.0f} | {r['tok_s']:.0f} | {r['tok_s'] / base:.2f}× |" for r in rows]
    return rows, "\n".join(lines)


# --------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(spec: dict) -> dict:
    """Run one configuration in this fresh process; peak RSS growth during generate."""
    torch.set_num_threads(spec["threads"])
    ns = argparse.Namespace(checkpoint=spec["checkpoint"], random=spec["random"])
    model, _ = load_model(ns)
    cfg = model.config
    B, new, plen = spec["batch"], spec["new"], spec["plen"]
    prompts = torch.randint(0, cfg.vocab_size, (B, plen), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        if spec["engine"] == "hf":
            hf = hf_twin(cfg)
            run = lambda: hf.generate(torch.tensor(prompts), max_new_tokens=new, min_new_tokens=new,  # noqa: E731
                                      do_sample=False, pad_token_id=0, eos_token_id=None,
                                      attention_mask=torch.ones(B, plen, dtype=torch.long))
        else:
            g = GenerationConfig(max_new_tokens=new, tail=spec["K"], guidance=spec["s"], alpha_max=spec["alpha_max"],
                                 seed=0, stop_at_eos=False)
            engine = MaturationEngine(model)
            run = lambda: engine.generate(prompts, g)  # noqa: E731
        if spec["engine"] == "hf":  # warm: lazy imports and first-call allocations are not the config's
            hf.generate(torch.tensor(prompts)[:1, :4], max_new_tokens=2, do_sample=False, pad_token_id=0,
                        eos_token_id=None, attention_mask=torch.ones(1, 4, dtype=torch.long))
        else:
            MaturationEngine(model).generate([prompts[0][:4]], GenerationConfig(max_new_tokens=2, tail=2,
                                                                                guidance=2.0, stop_at_eos=False))
        base = _status_kb("VmRSS")
        exact = _reset_peak()
        run()
    peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kv = 0.0
    if spec["engine"] != "hf":  # the static cache the engine allocated for this batch
        kv = engine.kv_cache_bytes
    return {"peak_growth_mb": (peak - base) / 1024, "base_rss_mb": base / 1024, "exact_peak": exact,
            "kv_cache_mb": kv / 2 ** 20}


def section_memory(model, args, dev):
    cfg = model.config
    rows = []
    configs = [(B, "hf", 0, 1.0, 1.0) for B in args.batch] + \
              [(B, "tmfast", K, s, a) for B in args.batch for a in args.alpha_max for K in args.tail
               for s in args.guidance if not (s != 1.0 and (K == 1 or a == 1.0))]
    for B, eng, K, s, a in configs:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len)).tolist()
            with torch.no_grad():
                if eng == "hf":
                    hf = hf_twin(cfg).to(dev)
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    hf.generate(torch.tensor(prompts, device=dev), max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
                    del hf
                else:
                    engine = MaturationEngine(model)
                    engine.generate(prompts, GenerationConfig(
                        max_new_tokens=args.new_tokens, tail=K, guidance=s, alpha_max=a, seed=0, stop_at_eos=False))
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            kv = 0.0 if eng == "hf" else engine.kv_cache_bytes
            r = {"peak_growth_mb": peak, "kv_cache_mb": kv / 2 ** 20}
        else:
            spec = {"checkpoint": str(args.checkpoint), "random": args.random, "batch": B, "engine": eng, "K": K,
                    "s": s, "alpha_max": a, "new": args.new_tokens, "plen": args.prompt_len, "threads": torch.get_num_threads()}
            out = subprocess.run([sys.executable, __file__, "--_memory-child", json.dumps(spec)],
                                 capture_output=True, text=True, cwd=str(ROOT))
            if out.returncode != 0:
                r = {"error": out.stderr.strip().splitlines()[-1][:100]}
            else:
                r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"batch": B, "engine": "HF eager" if eng == "hf" else "tmfast eager", "K": K if eng != "hf" else "",
                     "s": s if eng != "hf" else "", "alpha_max": a if eng != "hf" else "", "kv_cache_mb": 0.0, **r})
    what = "torch.cuda.max_memory_allocated growth" if dev.type == "cuda" else \
        "peak RSS growth of a fresh process during generate (VmHWM reset after loading and a 2-token warm-up, " \
        "minus the RSS then; includes allocator slack)"
    lines = [f"Peak memory per configuration: {what}; KV cache = the static cache the engine allocated (fp32; " \
             "prompt + new tokens + K − 1 position slots + K − 1 scratch slots for the unconditional stream).", "",
             "| batch | engine | K | s | α_max | peak MB | KV cache MB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = "" if r["s"] == "" else f"{r['s']:g}"
        peak = f"{r['peak_growth_mb']:.1f}" if "peak_growth_mb" in r else r.get("error", "?")
        lines.append(f"| {r['batch']} | {r['engine']} | {r['K']} | {s} | {r['alpha_max']:g} | {peak} | "
                     f"{r['kv_cache_mb']:.2f} |" if r["engine"] != "HF eager" else
                     f"| {r['batch']} | {r['engine']} | | | | {peak} | (dynamic) |")
    return rows, "\n".join(lines)


# --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--random", action="store_true", help="a random model of the default shape")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--tail", type=int, nargs="+", default=[1, 16])
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--alpha-max", type=float, nargs="+", default=[1.0, 0.5],
                   help="1 = inert tails (the default; front-only steps), < 1 = live tails")
    p.add_argument("--medium-batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--medium-new-tokens", type=int, default=16)
    p.add_argument("--medium-reps", type=int, default=3)
    p.add_argument("--prefix", type=int, nargs="+", default=[128, 512, 1024])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5, help="paired rounds (gen, medium) / timing repeats")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled rows")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weights and KV cache of both engines (the tail stays fp32)")
    p.add_argument("--impl", choices=("auto", "triton", "torch"), default=None)
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    model, what = load_model(args)
    model.to(dev)
    cfg = model.config
    info = machine_info()
    info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other jobs on the machine when the run started
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    head = [f"# model: {what} — {cfg.n_layer} layers, d={cfg.n_embd}, {cfg.n_head} heads, V={cfg.vocab_size}, "
            f"context {cfg.n_positions}, {model.num_params() / 1e6:.2f}M params, {args.dtype}, device {dev}",
            "# machine: " + ", ".join(f"{k}={v}" for k, v in info.items())]
    print("\n".join(head), flush=True)
    results, texts = {}, []
    peaks = measure_peaks(dev) if "breakdown" in args.sections else None
    t_start = time.perf_counter()
    for sec in args.sections:
        t0 = time.perf_counter()
        fn = {"gen": section_gen, "medium": section_medium, "prefix": section_prefix, "train": section_train, "memory": section_memory,
              "breakdown": lambda m, a, d: section_breakdown(m, a, d, peaks)}[sec]
        rows, text = fn(model, args, dev)
        results[sec] = rows
        text = f"### {sec}\n\n{text}\n"
        texts.append(text)
        print("\n" + text + f"\n_({sec}: {time.perf_counter() - t0:.0f} s)_", flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text("\n".join(head) + "\n\n" + "\n".join(texts))
        out.with_suffix(".json").write_text(json.dumps(
            {"model": cfg.to_dict(), "model_source": what, "machine": info, "peaks": peaks,
             "settings": {k: v for k, v in vars(args).items() if k != "memory_child"}, "results": results,
             "wall_s": round(time.perf_counter() - t_start, 1)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
