"""Measure the maturation objective's open choices: short runs that differ from the
base config in one value each, scored by what the engine then generates.

    python -m evals.sweep --config train/configs/maturation_kjv.json --steps 150 \
        --variant base --variant nce_weight=0 --variant corruption=alpha ... \
        [--out train/ablations.md]

Each variant trains `steps` steps from the same init (same data, same seed), then
generates 32 tokens (K=16, s=1 and s=2) for 12 validation prompts (8-token crops of the
validation split) and scores them with the AR judge (init_from): judge NLL/token,
Dist-2, Loop %, AR-agree (evals.samples, scored by evals.metrics). Results append to a
JSONL file and are rendered as a markdown table. evals imports train here (to train the
variants); train never imports evals.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tmfast.checkpoint import load_checkpoint
from train.config import config_from
from train.data import TokenShards, data_dir_for, tokenizer_spec
from train.objectives import crop_batch, step_generator
from train.trainer import train

from .samples import run_settings


# (name, K, s, alpha_max). With alpha_max=1 the front slot is overwritten by its prediction,
# which comes from the last committed position (it never sees the tail), so s and the tail's
# training cannot change what is committed: the α_max=0.5 rows are where they can.
# Algorithm 1 as published (no noise): the settings train/ablations.md was measured at
SETTINGS = [(name, {"tail": 16, "guidance": s, "alpha_max": a, "tail_noise": 0.0})
            for name, s, a in (("K16 s1", 1.0, 1.0), ("K16 s2", 2.0, 1.0), ("K16 s1 a.5", 1.0, 0.5),
                               ("K16 s2 a.5", 2.0, 0.5))]


def val_prompts(cfg, spec_dir: Path, n: int = 12, length: int = 8) -> list[list[int]]:
    shards = TokenShards(spec_dir)
    ids = crop_batch(shards.val, n, length, step_generator(cfg.seed, 0, 777))
    eos = shards.meta["eos_token_id"]
    out = []
    for row in ids.tolist():
        row = row[:length]
        if eos in row:  # start after a document boundary
            row = row[row.index(eos) + 1:] or row[:1]
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--variant", action="append", default=[],
                    help="'base' or key=value[,key=value] overrides of the config")
    ap.add_argument("--common", default="", help="key=value[,key=value] overrides for every variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="runs/sweep")
    ap.add_argument("--jsonl", default="train/ablations.jsonl")
    ap.add_argument("--out", default="train/ablations.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    common = dict(kv.split("=", 1) for kv in a.common.split(",") if kv)
    for v in a.variant:
        over = dict(common)
        over.update({} if v == "base" else dict(kv.split("=", 1) for kv in v.split(",")))
        name = v.replace("=", "-").replace(",", "_")
        over.update({"max_steps": a.steps, "out_dir": f"{a.runs}/{name}", "eval_interval": a.steps,
                     "ckpt_interval": 0, "keep_optimizer": False, "progress": False,
                     "warmup_steps": min(50, a.steps // 4), "num_threads": a.threads})
        cfg = config_from(a.config, over)
        state = Path(cfg.out_dir, "train_state.json")
        same = lambda d: {k: v for k, v in d.items() if k not in ("num_threads", "progress")}  # noqa: E731
        done = state.is_file() and json.loads(state.read_text()).get("final") \
            and same(json.loads(Path(cfg.out_dir, "train_config.json").read_text())) == same(cfg.to_dict())
        if done:  # same settings already trained: score again only
            wall = json.loads(state.read_text())["elapsed_s"]
        else:
            t0 = time.time()
            train(cfg, False, [])
            wall = time.time() - t0
        model, tok = load_checkpoint(cfg.out_dir)
        judge, jtok = load_checkpoint(cfg.init_from)
        log = [json.loads(x) for x in Path(cfg.out_dir, "train_log.jsonl").read_text().splitlines()]
        ev = [r for r in log if r["kind"] == "eval"][-1]
        prompts = val_prompts(cfg, data_dir_for(cfg, tokenizer_spec(tok)))
        res = run_settings(model, tok, judge, jtok, prompts, max_new_tokens=32, settings=SETTINGS)
        rec = {"variant": v, "common": a.common, "steps": a.steps, "train_wall_s": round(wall, 1),
               "val_loss": ev["val_loss"], "val_mse": ev.get("val_mse"), "val_nce": ev.get("val_nce"),
               "val_front_acc": ev.get("val_front_acc"), "val_tail_acc": ev.get("val_tail_acc"),
               "gen": {k: m for k, (_, _, m) in res.items()},
               "example": {k: t[0] for k, (t, _, _) in res.items()}}
        with open(a.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec, indent=1), flush=True)
    render(a.jsonl, a.out)
    return 0


def _cell(g: dict) -> str:
    """judge NLL/token / Dist-2 / Loop % of one setting (n/a where a measure has no value)."""
    return " / ".join("n/a" if g.get(k) is None else fmt.format(g[k])
                      for k, fmt in (("judge_nll", "{:.2f}"), ("dist2", "{:.2f}"), ("loop_pct", "{:.0f}")))


def render(jsonl: str, out: str) -> None:
    recs = [json.loads(x) for x in Path(jsonl).read_text().splitlines() if x.strip()]
    names = [n for n, *_ in SETTINGS]
    lines = ["# Maturation objective: open choices, measured", "",
             "Generated by `python -m evals.sweep` (see its docstring). Each row: the base config",
             "(train/configs/maturation_kjv.json) with one change, trained the same number of steps",
             "from the same AR checkpoint; then 32-token generations for 12 validation prompts,",
             "scored by that AR checkpoint as judge. Cells: judge NLL/token (lower = more plausible",
             "to the AR model) / Dist-2 / Loop %. `K16 s2 a.5` = K=16, guidance s=2, alpha_max=0.5.",
             "val loss and front-acc (nearest row of the front-slot prediction == the true token) are",
             "under each variant's own corruption and loss: compare them only where those agree.", "",
             "| variant | steps | val loss | val front-acc | " + " | ".join(names) + " | train s |",
             "|---|---|---|---|" + "---|" * len(names) + "---|"]
    for r in recs:
        fa = r.get("val_front_acc")
        cells = []
        for n in names:
            g = r["gen"].get(n)
            cells.append("" if g is None else _cell(g))
        lines.append(f"| {r['variant']} | {r['steps']} | {r['val_loss']:.3f} | "
                     f"{'' if fa is None else f'{fa:.3f}'} | " + " | ".join(cells) + f" | {r['train_wall_s']:.0f} |")
    if recs:
        g = recs[0]["gen"]
        lines += ["", f"Reference on the same prompts: AR greedy {_cell(g['AR greedy'])}; "
                  f"AR greedy + repetition penalty 1.3 {_cell(g['AR greedy + rep. penalty 1.3'])}."]
        lines += ["", "First prompt's output per variant (K16 s1 a.5):", ""]
        for r in recs:
            lines.append(f"- {r['variant']}: {r['example'].get('K16 s1 a.5')!r}")
    Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
