"""Quality/diversity frontier from maturation_sweep.py output: judge PPL against Dist-2 and Loop %.

    python bench/plot_sweep.py bench/results/sweeps/frontier.jsonl --out bench/results/sweeps/frontier.png

One series per family (AR sampling by temperature, AR greedy / + penalty, each maturation checkpoint
by its settings), so a point that lies above and left of another family's curve is a better trade.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def family(row: dict) -> str:
    name = row["name"]
    if name.startswith("AR sampling"):
        return "AR sampling (temperature)"
    if name.startswith("AR"):
        return name
    s = row["settings"]
    extra = f", s={s['guidance']:g}" if s.get("guidance", 1) != 1 else ""
    return f"{Path(row['checkpoint']).name} α_max={s.get('alpha_max', 1):g}{extra} (tail noise ↑)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("jsonl", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    rows = [json.loads(line) for f in args.jsonl for line in Path(f).read_text().splitlines() if line.strip()]
    series = defaultdict(list)
    for r in rows:
        series[family(r)].append(r)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for name, rs in series.items():
        rs.sort(key=lambda r: r["metrics"]["judge_ppl"])
        x = [r["metrics"]["judge_ppl"] for r in rs]
        style = "s" if name.startswith("AR g") else "o-"
        for ax, key in zip(axes, ("dist2", "loop_pct")):
            ax.plot(x, [r["metrics"][key] for r in rs], style, label=name, ms=5)
    for ax, label in zip(axes, ("Dist-2 ↑", "Loop % ↓")):
        ax.set_xscale("log")
        ax.set_xlabel("judge PPL ↓ (log)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle("quality vs diversity: AR temperature sampling and maturation with tail noise")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
