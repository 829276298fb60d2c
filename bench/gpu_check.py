"""The one-shot GPU check: everything a GPU session should measure, in one process, most
important first, within a time budget.

    python bench/gpu_check.py --out DIR --budget 480      # on a GPU (about 8 minutes)
    python bench/gpu_check.py --smoke --out DIR           # toy sizes, any device (CI runs it on the CPU)

Sections, in order (each is skipped, and says so, when the budget is spent; results are written
to DIR/gpu_check.md and DIR/gpu_check.json after every section, so a run that is cut off keeps
what it measured):
  environment   device, SMs, memory, versions, the measured copy bandwidth (the byte floor's peak)
  kernels       nn_commit Triton vs the torch reference on the real shapes (V = 50257, d = 1024;
                N = 1, 8, 64; every dtype pair): index agreement (a differing index must be a
                certified near-tie), score error, CUDA-event timings, achieved GB/s;
                maturation_update Triton vs torch (bit-identical in fp32) and timings
  engine        the shipped model's tokens on this device vs the CPU (fp32), and bf16 vs fp32 here
  steps         step times at the GPT-2-Medium shape (random weights): eager / compiled /
                reduce-overhead (CUDA graphs) × bf16 / fp32 × batch 1 / 8 / 64 × front-only / live
                tail, beside Hugging Face GPT-2 with a static cache + torch.compile on the same
                device and shape; compile times; achieved fraction of the byte floor
  profile       kernels per step, GPU-busy fraction (torch.profiler) and the cudagraph-skip
                counter for the default serving configuration
  training      the training step at the GPT-2-Medium shape (maturation objective, the recipe's;
                bf16 autocast), eager and compiled: tokens/s, MFU against the measured bf16 matmul
                peak, peak memory, compile time (bench/train_throughput.py's measure(); up to
                200 steps each, within the budget) — the figures the recipe's time and cost need

--smoke runs every section at toy size on whatever device there is: on a machine without CUDA the
Triton kernels run under TRITON_INTERPRET=1 (fp32/fp16 only) and nothing is timed meaningfully;
it checks that the script and every code path it drives work.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before csrc_triton is imported: without CUDA the kernels can then run interpreted
    try:
        import torch as _t
        if not _t.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        pass

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import loop_time, median_time, sync  # noqa: E402

import csrc_triton as ct  # noqa: E402
from csrc_triton.testing import score_tol  # noqa: E402
from tmfast import GenerationConfig, ModelConfig, TMModel, load_checkpoint  # noqa: E402
from tmfast.checkpoint import DEFAULT_CHECKPOINT  # noqa: E402
from tmfast.engine import Engine  # noqa: E402

nn_mod = __import__("importlib").import_module("csrc_triton.nn_commit")
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAME = {v: k for k, v in DTYPE.items()}


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)

    def spent(self) -> float:
        return time.monotonic() - self.t0


class Skip(Exception):
    """Not run: the budget is spent, or the machine cannot (no CUDA, no transformers…)."""


class Report:
    """Sections' tables and rows, rewritten to DIR after each section."""

    def __init__(self, out: Path, argv: list[str]):
        self.out, self.argv = out, argv
        self.sections: list[tuple[str, str]] = []
        self.data: dict = {"command": "python bench/gpu_check.py " + " ".join(argv), "sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, text: str, rows) -> None:
        self.sections.append((name, text))
        self.data["sections"][name] = rows
        self.write()

    def write(self) -> None:
        md = [f"# GPU check\n\n`{self.data['command']}`\n"] + [f"## {n}\n\n{t}\n" for n, t in self.sections]
        (self.out / "gpu_check.md").write_text("\n".join(md))
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# -- environment ---------------------------------------------------------------------------------
def copy_bandwidth(dev) -> float:
    """GB/s of a large device copy (read + write): the byte floor's peak."""
    n = (256 if dev.type == "cuda" else 32) * 2 ** 20 // 4
    x = torch.randn(n, device=dev)
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), dev, reps=10, warmup=2)
    return 2 * x.numel() * 4 / t / 1e9


def section_environment(ctx) -> tuple[str, dict]:
    dev = ctx.dev
    info = {"device": str(dev), "torch": torch.__version__, "python": platform.python_version(),
            "triton": getattr(__import__("triton"), "__version__", None) if ct.HAS_TRITON else None,
            "triton_interpret": ct.INTERPRET, "smoke": ctx.smoke}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2 ** 30, 1),
                    capability=f"{p.major}.{p.minor}")
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    info["copy_gbs"] = round(copy_bandwidth(dev), 1)
    ctx.copy_gbs = info["copy_gbs"]
    return table(["what", "value"], [[k, v] for k, v in info.items()]), info


# -- kernels -------------------------------------------------------------------------------------
def _table(V, d, dtype, dev, seed):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(V, d, generator=g)
    E = E / E.norm(dim=1, keepdim=True) * 3.0
    return E.to(dev, dtype)


def section_kernels(ctx) -> tuple[str, list]:
    dev, rows = ctx.dev, []
    if not (dev.type == "cuda" or ct.INTERPRET):
        raise Skip("Triton runs neither compiled (no CUDA) nor interpreted (TRITON_INTERPRET unset)")
    V, d = (1031, 40) if ctx.smoke else (50257, 1024)
    reps = 1 if ctx.smoke else 50
    pairs = [p for p in nn_mod.DTYPE_PAIRS if dev.type == "cuda" or torch.bfloat16 not in p]  # no bf16 interpreted
    for q_dt, e_dt in pairs:
        E = _table(V, d, e_dt, dev, 0)
        for n in (1, 8, 64):
            ctx.budget_check(5)
            g = torch.Generator().manual_seed(n)
            rows_idx = torch.randint(0, V, (n,), generator=g).to(dev)
            q = (E[rows_idx].float() + 0.3 * torch.randn(n, d, generator=g).to(dev)).to(q_dt)
            t_idx, t_sc, _, _ = ct.nn_commit(q, E, impl="triton", check_finite=False)
            r_idx, r_sc, _, _ = ct.nn_commit(q, E, impl="torch", check_finite=False)
            tol = score_tol(q, E).to(dev)
            diff = (t_idx != r_idx).nonzero().flatten()
            ties = 0
            for i in diff.tolist():  # a differing index must be a near-tie in exact arithmetic
                q64, a, b = q[i].double(), E[t_idx[i]].double(), E[r_idx[i]].double()
                if abs(float(q64 @ a - q64 @ b)) > float(tol[i]) * 4:
                    raise AssertionError(f"nn_commit q={NAME[q_dt]} E={NAME[e_dt]} N={n}: row {i} commits "
                                         f"{int(t_idx[i])}, the reference {int(r_idx[i])}, not a near-tie")
                ties += 1
            score_err = float(((t_sc - r_sc).abs().double() / tol.double()).max())
            t_tri = median_time(lambda: ct.nn_commit(q, E, impl="triton", check_finite=False), dev, reps)
            t_ref = median_time(lambda: ct.nn_commit(q, E, impl="torch", check_finite=False), dev, reps)
            gb = E.numel() * E.element_size() / 1e9
            cfg = nn_mod.commit_config(n, q_dt, e_dt)
            rows.append({"op": "nn_commit", "q": NAME[q_dt], "E": NAME[e_dt], "N": n, "config": cfg,
                         "near_ties": ties, "score_err_vs_tol": round(score_err, 3), "triton_us": t_tri * 1e6,
                         "torch_us": t_ref * 1e6, "triton_gbs": gb / t_tri, "floor_frac":
                         (gb / ctx.copy_gbs * 2) / t_tri if ctx.copy_gbs else None})
    for B in (1, 8, 64):
        ctx.budget_check(5)
        K, dd = 16, d
        g = torch.Generator().manual_seed(B)
        tail = torch.randn(B, K, dd, generator=g).to(dev)
        pred, unc, noise = (torch.randn(B, K, dd, generator=g).to(dev) for _ in range(3))
        alpha = torch.rand(B, K, generator=g).to(dev)
        guid = torch.full((B,), 2.0, device=dev)
        a, b = tail.clone(), tail.clone()
        ct.maturation_update(a, pred, alpha, pred_uncond=unc, guidance=guid, noise=noise, impl="triton")
        ct.maturation_update(b, pred, alpha, pred_uncond=unc, guidance=guid, noise=noise, impl="torch")
        exact = bool(torch.equal(a, b))
        if not exact:
            raise AssertionError(f"maturation_update B={B}: the fp32 tails differ (max {float((a - b).abs().max())})")
        t_tri = median_time(lambda: ct.maturation_update(tail.clone(), pred, alpha, pred_uncond=unc, guidance=guid,
                                                         noise=noise, impl="triton"), dev, reps)
        t_ref = median_time(lambda: ct.maturation_update(tail.clone(), pred, alpha, pred_uncond=unc, guidance=guid,
                                                         noise=noise, impl="torch"), dev, reps)
        rows.append({"op": "maturation_update", "q": "fp32", "E": "", "N": f"B={B} K={K}", "config": "",
                     "near_ties": "bit-identical", "score_err_vs_tol": 0, "triton_us": t_tri * 1e6,
                     "torch_us": t_ref * 1e6, "triton_gbs": 6 * tail.numel() * 4 / 1e9 / t_tri, "floor_frac": None})
    text = (f"V={V}, d={d}; timings are medians of {reps} CUDA-event-timed calls (µs); GB/s = the table's bytes "
            "(commit) or the five (B,K,d) fp32 tensors read and the one written (update) ÷ time; "
            "score error in units of the fp32 summation tolerance.\n\n")
    text += table(["op", "queries", "table", "N", "config", "near-ties", "score err / tol", "triton µs", "torch µs",
                   "triton GB/s"],
                  [[r["op"], r["q"], r["E"], r["N"], r["config"], r["near_ties"], r["score_err_vs_tol"],
                    f"{r['triton_us']:.1f}", f"{r['torch_us']:.1f}", f"{r['triton_gbs']:.0f}"] for r in rows])
    return text, rows


# -- engine tokens -------------------------------------------------------------------------------
PROMPTS = ["And God said", "In the beginning", "And it came to pass", "The LORD is my shepherd",
           "Blessed are the meek", "And Jesus answered", "Now the serpent was", "Let there be light"]


def _generate(model, tok, settings: list[GenerationConfig], compile=False) -> list[list[int]]:
    eng = Engine(model, tok, max_batch=len(PROMPTS), k_window=max(g.tail for g in settings), compile=compile)
    ids = [eng.add_request(p, g) for p, g in zip(PROMPTS, settings)]
    out = {i: [] for i in ids}
    for ev in eng.run():
        out[ev.request_id] += ev.token_ids
    return [out[i] for i in ids]


def _agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share of sequences identical, share of tokens equal up to each pair's first difference)."""
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    prefix = 0
    for x, y in zip(a, b):
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        prefix += k
    return same, prefix / max(1, sum(len(x) for x in a))


def section_engine(ctx) -> tuple[str, list]:
    dev, rows = ctx.dev, []
    n = 8 if ctx.smoke else 48
    settings = {"defaults (α_max 1, tail noise 0.4)": [GenerationConfig(max_new_tokens=n, seed=i) for i in range(8)],
                "live tail (α_max 0.7, s=2, K=16)": [GenerationConfig(max_new_tokens=n, seed=i, alpha_max=0.7,
                                                                     guidance=2.0) for i in range(8)]}
    cpu_model, tok = load_checkpoint(DEFAULT_CHECKPOINT)
    dev_model, _ = load_checkpoint(DEFAULT_CHECKPOINT, device=dev)
    bf_model, _ = load_checkpoint(DEFAULT_CHECKPOINT, device=dev, dtype=torch.bfloat16)
    for name, gs in settings.items():
        ctx.budget_check(10)
        ref = _generate(cpu_model, tok, gs)
        here = _generate(dev_model, tok, gs)
        bf = _generate(bf_model, tok, gs)
        same, prefix = _agreement(ref, here)
        bsame, bprefix = _agreement(here, bf)
        rows.append({"settings": name, "fp32_here_vs_cpu_sequences": same, "fp32_here_vs_cpu_prefix": prefix,
                     "bf16_vs_fp32_sequences": bsame, "bf16_vs_fp32_prefix": bprefix})
    text = (f"The shipped model, {len(PROMPTS)} prompts × {n} tokens, seeds 0–7; agreement = share of sequences "
            f"identical / share of tokens before each pair's first difference (device: {dev}).\n\n")
    text += table(["settings", f"fp32 {dev.type} = CPU (sequences)", "(tokens)", "bf16 = fp32 (sequences)", "(tokens)"],
                  [[r["settings"], f"{r['fp32_here_vs_cpu_sequences']:.2f}", f"{r['fp32_here_vs_cpu_prefix']:.2f}",
                    f"{r['bf16_vs_fp32_sequences']:.2f}", f"{r['bf16_vs_fp32_prefix']:.2f}"] for r in rows])
    return text, rows


# -- step times ----------------------------------------------------------------------------------
def medium_config(smoke: bool) -> ModelConfig:
    if smoke:
        return ModelConfig(vocab_size=515, n_positions=128, n_layer=2, n_head=2, n_embd=64, k_max=16)
    return ModelConfig(vocab_size=50257, n_positions=1024, n_layer=24, n_head=16, n_embd=1024, k_max=16)


def engine_for(ctx, model, dt: str, mode: str, max_batch: int, max_len: int) -> tuple[Engine, float]:
    """One engine per (dtype, mode), sized for the largest batch: a smaller batch runs in its row
    bucket of the same engine, so every batch shares the compiled graphs (dynamic sizes)."""
    key = (dt, mode)
    if key not in ctx.engines:
        t0 = time.perf_counter()
        ctx.engines[key] = Engine(model, max_batch=max_batch, max_len=max_len, k_window=16, max_queue=max_batch,
                                  compile=mode != "eager",
                                  compile_mode={"compiled": "default", "reduce-overhead": "reduce-overhead"}.get(mode))
        ctx.engine_s[key] = time.perf_counter() - t0
    return ctx.engines[key], ctx.engine_s.pop(key, 0.0)


def engine_step_time(eng: Engine, batch: int, alpha_max: float, steps: int, prompt_len: int) -> dict:
    """Steady-state seconds per Engine.step with `batch` running (the host one step behind on
    CUDA), and the warm-up's (first steps: compiles, CUDA-graph captures)."""
    g = GenerationConfig(max_new_tokens=2 * steps + 24, tail=16, alpha_max=alpha_max, seed=0, stop_at_eos=False)
    gen = torch.Generator().manual_seed(0)
    vocab = eng.model.config.vocab_size
    rids = [eng.add_request(torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(), g) for _ in range(batch)]
    dev = eng.model.table.weight.device
    t0 = time.perf_counter()
    for _ in range(6):  # admit, compile, capture
        eng.step()
    sync(dev)
    warm = time.perf_counter() - t0
    step = loop_time(eng.step, dev, steps)
    for rid in rids:
        eng.abort(rid)
    list(eng.run())
    return {"step_s": step, "warmup_s": warm}


def hf_step_time(cfg: ModelConfig, batch: int, dtype, dev, steps: int, prompt_len: int, compile=True) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel
    hc = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hc).eval().to(dev, dtype)
    if compile:
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead" if dev.type == "cuda" else None, fullgraph=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=dev)

    def run(new):
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                        eos_token_id=None, cache_implementation="static", attention_mask=torch.ones_like(ids))
    t0 = time.perf_counter()
    run(8)
    run(8)
    warm = time.perf_counter() - t0
    short = median_time(lambda: run(8), dev, reps=3, warmup=0)
    long = median_time(lambda: run(8 + steps), dev, reps=3, warmup=0)
    return {"step_s": (long - short) / steps, "warmup_s": warm}


def section_steps(ctx) -> tuple[str, list]:
    dev, smoke = ctx.dev, ctx.smoke
    cfg = medium_config(smoke)
    steps, plen = (6, 16) if smoke else (48, 32)
    # most important first: the serving default on CUDA (bf16, CUDA graphs, front-only), then
    # what it is compared with, then the rest of the matrix
    if smoke:
        plan = [("bf16", "eager", 1, 1.0), ("bf16", "eager", 2, 0.5), ("fp32", "eager", 2, 1.0),
                ("fp32", "compiled", 2, 1.0), ("fp32", "compiled", 2, 0.5)]
        hf_plan = [("fp32", 2)]
    else:
        plan = [("bf16", "reduce-overhead", b, 1.0) for b in (1, 8, 64)] + \
               [("bf16", "eager", b, 1.0) for b in (1, 8, 64)] + \
               [("bf16", "reduce-overhead", b, 0.5) for b in (1, 8, 64)] + \
               [("bf16", "compiled", b, 1.0) for b in (1, 8, 64)] + \
               [("fp32", "reduce-overhead", b, 1.0) for b in (1, 8, 64)] + \
               [("fp32", "eager", b, 1.0) for b in (1, 8, 64)] + \
               [("bf16", "eager", b, 0.5) for b in (1, 8, 64)] + \
               [("fp32", "reduce-overhead", b, 0.5) for b in (1, 8, 64)]
        hf_plan = [("bf16", b) for b in (1, 8, 64)] + [("fp32", b) for b in (1, 8, 64)]
    models, rows = {}, []
    hf_done = set()
    for i, (dt, mode, batch, a_max) in enumerate(plan):
        try:
            ctx.budget_check(60 if mode != "eager" and (dt, mode) not in ctx.compiled_once else 15)
        except Skip as e:
            rows.append({"dtype": dt, "mode": mode, "batch": batch, "alpha_max": a_max, "skipped": str(e)})
            continue
        if dt not in models:
            torch.manual_seed(0)
            models[dt] = TMModel(cfg).eval().to(dev, DTYPE[dt])
        eng, built = engine_for(ctx, models[dt], dt, mode, max(b for _, _, b, _ in plan), plen + 2 * steps + 40)
        r = engine_step_time(eng, batch, a_max, steps, plen)
        r["warmup_s"] += built
        ctx.compiled_once.add((dt, mode))
        m = models[dt]
        weight_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
        kv_read = 2 * cfg.n_layer * batch * (plen + steps) * cfg.n_embd * m.table.weight.element_size()
        floor = (weight_bytes + kv_read) / (ctx.copy_gbs / 2 * 1e9) if ctx.copy_gbs else None  # read-only bytes
        rows.append({"dtype": dt, "mode": mode, "batch": batch, "alpha_max": a_max, "engine": "tmfast",
                     "step_ms": r["step_s"] * 1e3, "tok_s": batch / r["step_s"], "warmup_s": r["warmup_s"],
                     "floor_frac": floor / r["step_s"] if floor else None})
        # the HF baseline for this dtype and batch, once, right after tmfast's first row of them
        if (dt, batch) in hf_plan and (dt, batch) not in hf_done:
            hf_done.add((dt, batch))
            try:
                ctx.budget_check(90)
                h = hf_step_time(cfg, batch, DTYPE[dt], dev, steps, plen, compile=not smoke)
                rows.append({"dtype": dt, "mode": "HF static cache" + ("" if smoke else " + compile"),
                             "batch": batch, "alpha_max": "",
                             "engine": "HF", "step_ms": h["step_s"] * 1e3, "tok_s": batch / h["step_s"],
                             "warmup_s": h["warmup_s"], "floor_frac": None})
            except ImportError:
                rows.append({"dtype": dt, "mode": "HF static cache + compile", "batch": batch,
                             "skipped": "transformers is not installed"})
            except Skip as e:
                rows.append({"dtype": dt, "mode": "HF static cache + compile", "batch": batch, "skipped": str(e)})
    hf = {(r["dtype"], r["batch"]): r["step_ms"] for r in rows if r.get("engine") == "HF"}
    out = []
    for r in rows:
        if "skipped" in r:
            out.append([r["dtype"], r["mode"], r["batch"], r.get("alpha_max", ""), f"skipped: {r['skipped']}",
                        "", "", "", ""])
            continue
        base = hf.get((r["dtype"], r["batch"]))
        out.append([r["dtype"], r["mode"], r["batch"], r["alpha_max"], f"{r['step_ms']:.3f}", f"{r['tok_s']:.0f}",
                    f"{base / r['step_ms']:.2f}×" if base and r["engine"] == "tmfast" else "",
                    f"{100 * r['floor_frac']:.0f} %" if r.get("floor_frac") else "", f"{r['warmup_s']:.0f}"])
    shape = f"{cfg.n_layer} layers, d={cfg.n_embd}, {cfg.n_head} heads, V={cfg.vocab_size}, random weights"
    text = (f"{shape}; prompts {plen} random tokens, K = 16, tail noise 0.4; step = steady-state wall time per "
            f"Engine.step over {steps} steps (the host one step behind on CUDA); HF = GPT2LMHeadModel of the same "
            "shape, static cache, forward compiled (reduce-overhead on CUDA; not compiled with --smoke), per step = difference of two "
            "generate lengths; × HF = HF step ÷ ours, same dtype and batch; byte floor = (weights + the KV "
            "read) ÷ the copy peak's read bandwidth; warm-up s = engine construction + first steps (compiles).\n\n")
    text += table(["dtype", "mode", "batch", "α_max", "step ms", "tok/s", "× HF", "% byte floor", "warm-up s"], out)
    return text, rows


# -- profile -------------------------------------------------------------------------------------
def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters
    return int(sum(counters["inductor"].get(k, 0) for k in counters["inductor"] if "cudagraph_skip" in k))


def section_profile(ctx) -> tuple[str, list]:
    from torch.profiler import ProfilerActivity, profile
    dev, rows = ctx.dev, []
    cfg = medium_config(ctx.smoke)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    mode = "reduce-overhead" if dev.type == "cuda" else None
    model = None
    if (NAME[dt], mode or "compiled") not in ctx.engines:
        torch.manual_seed(0)
        model = TMModel(cfg).eval().to(dev, dt)
    steps, plen = (6, 16) if ctx.smoke else (48, 32)
    key = (NAME[dt], mode or "compiled")
    eng = ctx.engines.get(key)  # the steps section's engine: its graphs are compiled and captured
    if eng is None:
        ctx.budget_check(90)
        eng = Engine(model, max_batch=2 if ctx.smoke else 64, max_len=plen + 2 * steps + 40, k_window=16,
                     compile=True, compile_mode=mode)
    for batch in ((2,) if ctx.smoke else (1, 64)):
        ctx.budget_check(45)
        g = GenerationConfig(max_new_tokens=2 * steps + 24, seed=0, stop_at_eos=False)
        rids = [eng.add_request(list(range(1, plen + 1)), g) for _ in range(batch)]
        for _ in range(8):
            eng.step()
        sync(dev)
        n = min(10, steps)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(n):
                eng.step()
            sync(dev)
            wall = time.perf_counter() - t0
        for rid in rids:
            eng.abort(rid)
        list(eng.run())
        events = prof.events()
        kernels = [e for e in events if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)]
        busy = sum(e.device_time for e in kernels) / 1e6 if kernels else 0.0
        rows.append({"batch": batch, "dtype": NAME[dt], "mode": mode or "default", "kernels_per_step": len(kernels) / n,
                     "gpu_busy_frac": busy / wall if kernels else None, "step_ms": wall / n * 1e3})
    skips = _cudagraph_skips()
    text = (f"{cfg.n_layer} layers, d={cfg.n_embd}; the serving default here ({NAME[dt]}, compiled, "
            f"mode {mode or 'default'}), front-only steps; 10 steps under torch.profiler. cudagraph skips "
            f"(inductor counter, this process): {skips}.\n\n")
    text += table(["batch", "dtype", "mode", "kernels / step", "GPU busy", "step ms (profiled)"],
                  [[r["batch"], r["dtype"], r["mode"], f"{r['kernels_per_step']:.0f}",
                    f"{100 * r['gpu_busy_frac']:.0f} %" if r["gpu_busy_frac"] is not None else "(no CUDA)",
                    f"{r['step_ms']:.3f}"] for r in rows])
    return text, {"rows": rows, "cudagraph_skips": skips}


def section_training(ctx) -> tuple[str, list]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import markdown, measure
    cuda = ctx.dev.type == "cuda"
    shape, dtype = ("toy", "float32") if ctx.smoke else ("medium", "bfloat16" if cuda else "float32")
    batch, block, steps = (2, 32, 2) if ctx.smoke else (8, 1024, 200)
    rows = []
    for compiled in (False, True):
        ctx.budget_check(120 if compiled else 45)
        spend = max(20.0, min(90.0, ctx.budget.left() - 60))
        rows.append(measure(shape, "maturation", compiled, ctx.dev, dtype, batch, block, steps, budget_s=spend))
    text = (f"maturation objective, {shape} shape, {dtype}{' autocast' if dtype == 'bfloat16' else ''}, "
            f"batch {batch} × {block}; median step after 2 warm-up steps (compiled: the compile is in "
            f"compile_s); MFU = (6 N + 12 L d T) × tokens/s ÷ the measured matmul peak.\n\n") + markdown(rows)
    return text, rows


SECTIONS = {"environment": section_environment, "kernels": section_kernels, "engine": section_engine,
            "steps": section_steps, "profile": section_profile, "training": section_training}


class Context:
    def __init__(self, dev, smoke, budget):
        self.dev, self.smoke, self.budget = dev, smoke, budget
        self.copy_gbs = None
        self.compiled_once: set = set()
        self.engines: dict = {}  # (dtype, mode) → Engine, shared by the steps and profile sections
        self.engine_s: dict = {}

    def budget_check(self, need_s: float) -> None:
        if self.budget.left() < need_s:
            raise Skip(f"budget: {self.budget.left():.0f} s left, this needs ~{need_s:.0f} s")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for gpu_check.md and gpu_check.json")
    p.add_argument("--budget", type=float, default=480.0, help="seconds; sections past it are skipped")
    p.add_argument("--smoke", action="store_true", help="toy sizes on any device (CI)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    ctx = Context(dev, args.smoke, Budget(args.budget))
    report = Report(Path(args.out), argv)
    failed = 0
    for name in args.sections:
        t0 = time.monotonic()
        try:
            text, rows = SECTIONS[name](ctx)
        except Skip as e:
            text, rows = f"skipped: {e}", {"skipped": str(e)}
        except Exception as e:  # noqa: BLE001 — record it, go on with the next section
            failed += 1
            text, rows = f"FAILED: {type(e).__name__}: {e}\n\n```\n{traceback.format_exc()[-3000:]}\n```", \
                {"failed": f"{type(e).__name__}: {e}"}
        text += f"\n\n_({name}: {time.monotonic() - t0:.0f} s; {ctx.budget.spent():.0f} s of {args.budget:.0f} spent)_"
        report.add(name, text, rows)
        print(f"== {name}\n{text}\n", flush=True)
    print(f"wrote {report.out / 'gpu_check.md'} and .json; {failed} section(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
