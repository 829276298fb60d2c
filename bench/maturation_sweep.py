"""Grid of maturation settings (GenerationConfig fields) × checkpoints, scored like the quality table.

    python bench/maturation_sweep.py --maturation DIR [DIR ...] \
        --grid alpha_max=1,0.5 guidance=1,2 history_noise=0,0.2 --num-prompts 100 --max-new-tokens 64 \
        --out bench/results/sweeps/NAME

Same prompts (validation windows of the corpus), seeds, judge and scoring as `tmfast-eval`
(evals.quality), so a row here reproduces the same row there; --ar defaults to the shipped AR
model (tmfast.checkpoint.SHIPPED["ar"]). Writes OUT.jsonl (one line per row, appended as rows finish:
an interrupted sweep keeps what it measured) and OUT.md. AR greedy and greedy + penalty rows come
first unless --no-baselines; --ar-sampling adds AR temperature / nucleus rows.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from evals.judges import TmfastJudge, display_path
from evals.prompts import validation_prompts
from evals.quality import run_maturation, sample_seed, score_samples
from evals.report import machine_info
from tmfast.ar import ar_decode
from tmfast.checkpoint import SHIPPED, load_checkpoint
from tmfast.config import GenerationConfig

FIELDS = {f: type(v) for f, v in GenerationConfig().to_dict().items() if isinstance(v, (int, float))}


def parse_grid(items: list[str]) -> list[dict]:
    axes = []
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--grid entries are name=v1,v2,…; got {item!r}")
        name, vals = item.split("=", 1)
        if name not in FIELDS:
            raise SystemExit(f"unknown GenerationConfig field {name!r} (numeric fields: {', '.join(FIELDS)})")
        axes.append([(name, FIELDS[name](float(v)) if FIELDS[name] is int else float(v)) for v in vals.split(",")])
    return [dict(c) for c in itertools.product(*axes)] if axes else [{}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--maturation", nargs="+", required=True, help="maturation checkpoint dirs")
    p.add_argument("--ar", default=display_path(str(SHIPPED["ar"])),
                   help="AR checkpoint: judge and greedy baselines (default: the shipped AR model)")
    p.add_argument("--grid", nargs="*", default=[], help="name=v1,v2 … over GenerationConfig numeric fields")
    p.add_argument("--tail", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rep-penalty", type=float, default=1.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--ar-sampling", nargs="*", default=[], metavar="T:P",
                   help="also AR sampling rows at temperature T, nucleus P (seeded as evals.quality does)")
    p.add_argument("--out", required=True, help="writes OUT.jsonl and OUT.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = parse_grid(args.grid)
    ar_model, tok = load_checkpoint(args.ar)
    judge = TmfastJudge(ar_model, tok, args.ar)
    prompts = validation_prompts(args.maturation[0], tok, args.num_prompts, args.prompt_tokens, args.max_new_tokens,
                                 args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    rows = []

    def emit(row):
        rows.append(row)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        m = row["metrics"]
        print(f"{row['name']:<70} dist2 {m['dist2']:.3f} rep3 {m['rep3']:.3f} loop {m['loop_pct']:5.1f} % "
              f"ppl {m['judge_ppl']:6.1f}  ({row['seconds']:.0f} s)", flush=True)

    pid = [q.ids for q in prompts]
    if not args.no_baselines:
        for name, kw in (("AR greedy", {}), (f"AR greedy + penalty {args.rep_penalty:g}",
                                             {"repetition_penalty": args.rep_penalty})):
            t0 = time.perf_counter()
            s = ar_decode(ar_model, pid, args.max_new_tokens, stop_at_eos=False, batch_size=args.batch_size, **kw)
            emit({"name": name, "checkpoint": args.ar, "settings": kw, "metrics": score_samples(s, prompts, judge, tok),
                  "seconds": time.perf_counter() - t0})
    for spec in args.ar_sampling:
        temp, top_p = (float(x) for x in spec.split(":"))
        t0 = time.perf_counter()
        seeds = [sample_seed(args.seed, i) for i in range(len(prompts))]
        s = ar_decode(ar_model, pid, args.max_new_tokens, stop_at_eos=False, batch_size=args.batch_size,
                      temperature=temp, top_p=top_p, seeds=seeds)
        emit({"name": f"AR sampling T={temp:g} p={top_p:g}", "checkpoint": args.ar,
              "settings": {"temperature": temp, "top_p": top_p}, "metrics": score_samples(s, prompts, judge, tok),
              "seconds": time.perf_counter() - t0})
    for ckpt in args.maturation:
        model, mtok = load_checkpoint(ckpt)
        for setting in grid:
            t0 = time.perf_counter()
            samples = run_maturation(model, mtok, prompts, {"tail": args.tail, **setting},
                                     max_new_tokens=args.max_new_tokens, seed=args.seed, stop_at_eos=False,
                                     batch_size=args.batch_size)
            name = f"{Path(ckpt).name} K={args.tail} " + " ".join(f"{k}={v:g}" for k, v in setting.items())
            emit({"name": name, "checkpoint": ckpt, "settings": {"tail": args.tail, **setting},
                  "metrics": score_samples(samples, prompts, judge, tok), "seconds": time.perf_counter() - t0,
                  "example": mtok.decode(samples[0])})
    cols = ("dist1", "dist2", "rep2", "rep3", "loop_pct", "judge_ppl")
    lines = [f"{len(prompts)} validation prompts × {args.max_new_tokens} new tokens, judge {args.ar}; "
             f"machine: {machine_info()['cpu']}", "",
             "| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['metrics'][c]:.3f}" if c != "loop_pct" else
                                                      f"{r['metrics'][c]:.0f} %" for c in cols) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {jsonl} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
