"""Maturation traces: what every tail slot does, step by step (the paper's figures 2 and 4).

    python -m evals.traces [--checkpoint DIR] [--prompt TEXT ...] [--tail 16] [--guidance 1 2]
                            [--tau 1 0.05] [--max-new-tokens 64] [--out bench/results/traces]

For each prompt and setting, per step and per tail slot, right after the update and before
the commit (slot 0 = the slot committed this step; MaturationEngine.stream with
entropy_tau): the entropy of softmax(cos(z̃, E)/τ), ‖Δz̃‖ of the update, the top-1 token.
A token that is committed at continuation index q sat in slot j at step q − j, after
m = K − j updates ("maturation step" m = 1 … K); positions q ≥ K − 1 have all K stages.

Writes traces.json and three PNGs:
  entropy.png        entropy vs maturation step (mean and 10–90 % band), one panel per τ
  flicker.png        top-1 candidate of each future position across its K stages
                     (green: equals what is finally committed), per guidance setting
  displacement.png   ‖Δz̃‖ vs maturation step (log scale): how fast the tail settles
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from tmfast.config import GenerationConfig


def record_traces(model, tokenizer, prompts: list[list[int]], gens: list[GenerationConfig],
                  taus: list[float]) -> dict:
    """Run the engine with the tail probe for every (setting, τ); returns a JSON-able dict."""
    from tmfast.engine import MaturationEngine
    engine = MaturationEngine(model, tokenizer)
    runs = []
    for g in gens:
        per_tau = {}
        for tau in taus:
            steps = []
            res = None
            r5 = lambda rows: [[round(v, 5) for v in row] for row in rows]  # noqa: E731
            stream = engine.stream(prompts, [g] * len(prompts), entropy_tau=tau)
            while True:
                try:
                    ev = next(stream)
                except StopIteration as stop:
                    res = stop.value
                    break
                steps.append({"committed": ev.committed, "tail_tokens": ev.tail_token_ids,
                              "entropy": r5(ev.tail_entropy), "delta_norm": r5(ev.delta_norm)})
            per_tau[tau] = (steps, res)
        first_steps, res = per_tau[taus[0]]
        for b, p in enumerate(prompts):
            K = g.tail
            tr = {"setting": {"tail": K, "guidance": g.guidance, "alpha_max": g.alpha_max, "seed": g.seed},
                  "prompt_ids": p, "prompt": tokenizer.decode(p) if tokenizer else "",
                  "committed": res[b].token_ids, "text": res[b].text,
                  "steps": [{"tail_tokens": s["tail_tokens"][b], "delta_norm": s["delta_norm"][b],
                             "entropy": {str(t): per_tau[t][0][i]["entropy"][b] for t in taus}}
                            for i, s in enumerate(first_steps) if s["tail_tokens"][b]]}
            tr["by_position"] = by_position(tr, taus)
            runs.append(tr)
    vocab = model.config.vocab_size
    used = sorted({t for r in runs for s in r["steps"] for t in s["tail_tokens"]} |
                  {t for r in runs for t in r["committed"]})
    return {"taus": taus, "vocab_size": vocab, "log_vocab": math.log(vocab), "runs": runs,
            "token_text": {str(t): tokenizer.decode([t]) if tokenizer else str(t) for t in used},
            "summary": summarize_traces(runs, taus)}


def by_position(tr: dict, taus) -> list[dict]:
    """Re-index a run by continuation position q: per stage m = 1..K, top-1, ‖Δz̃‖, entropies."""
    K = tr["setting"]["tail"]
    steps = tr["steps"]
    out = []
    for q in range(K - 1, len(steps)):
        top, dn, ent = [], [], {str(t): [] for t in taus}
        for m in range(1, K + 1):
            j = K - m
            t = q - j
            s = steps[t]
            top.append(s["tail_tokens"][j])
            dn.append(s["delta_norm"][j])
            for tau in taus:
                ent[str(tau)].append(s["entropy"][str(tau)][j])
        out.append({"q": q, "committed": steps[q]["tail_tokens"][0], "top1": top, "delta_norm": dn,
                    "entropy": ent})
    return out


def summarize_traces(runs: list[dict], taus) -> list[dict]:
    """Per setting: mean entropy / ‖Δz̃‖ / top-1 change rate per stage, flicker per token."""
    out = []
    settings = []
    for r in runs:
        if r["setting"] not in settings:
            settings.append(r["setting"])
    for st in settings:
        pos = [p for r in runs if r["setting"] == st for p in r["by_position"]]
        K = st["tail"]
        if not pos:
            continue
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        ent = {str(t): [mean([p["entropy"][str(t)][m] for p in pos]) for m in range(K)] for t in taus}
        dn = [mean([p["delta_norm"][m] for p in pos]) for m in range(K)]
        change = [mean([float(p["top1"][m] != p["top1"][m - 1]) for p in pos]) if m else None for m in range(K)]
        final = [mean([float(p["top1"][m] == p["committed"]) for p in pos]) for m in range(K)]
        flips = [sum(a != b for a, b in zip(p["top1"], p["top1"][1:])) for p in pos]
        out.append({"setting": st, "positions": len(pos), "mean_entropy": ent, "mean_delta_norm": dn,
                    "top1_change_rate": change, "top1_equals_committed": final,
                    "mean_flips_per_token": mean(flips), "share_tokens_with_flip": mean([f > 0 for f in flips])})
    return out


def _printable(text: str) -> str:
    """A token's text for a figure: newlines as ⏎, other control characters as \\xNN (the
    fonts have no glyph for them)."""
    text = text.replace("\n", "⏎")
    return "".join(c if c.isprintable() or c == " " else f"\\x{ord(c):02x}" for c in text)


def plot_traces(data: dict, out_dir: str | Path, flicker_positions: int = 16) -> list[Path]:
    """The three PNGs (and traces.json) into out_dir."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "traces.json").write_text(json.dumps(data, ensure_ascii=False) + "\n")
    runs, taus = data["runs"], data["taus"]
    settings = []
    for r in runs:
        if r["setting"] not in settings:
            settings.append(r["setting"])
    label = lambda st: f"K={st['tail']}, s={st['guidance']:g}, α_max={st['alpha_max']:g}"  # noqa: E731
    paths = []

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    # 1. entropy vs maturation step
    fig, axes = plt.subplots(1, len(taus), figsize=(5.5 * len(taus), 4), squeeze=False)
    for ax, tau in zip(axes[0], taus):
        for st in settings:
            pos = [p for r in runs if r["setting"] == st for p in r["by_position"]]
            if not pos:
                continue
            K = st["tail"]
            ms = list(range(1, K + 1))
            vals = [[p["entropy"][str(tau)][m] for p in pos] for m in range(K)]
            ax.plot(ms, [sum(v) / len(v) for v in vals], marker="o", ms=3, label=label(st))
            ax.fill_between(ms, [pct(v, 0.1) for v in vals], [pct(v, 0.9) for v in vals], alpha=0.2)
        ax.axhline(data["log_vocab"], ls="--", c="grey", lw=1, label=f"log V = {data['log_vocab']:.2f}")
        ax.set_xlabel("maturation step m (updates received; m = K is committed)")
        ax.set_ylabel("entropy of softmax(cos(z̃, E)/τ) [nats]")
        ax.set_title(f"τ = {tau:g}")
        ax.legend(fontsize=8)
    paths.append(_save(plt, fig, out_dir / "entropy.png",
                       "Entropy of a tail slot through maturation (mean, 10–90 % band)"))

    # 2. top-1 flicker of each position across its stages (first prompt)
    tt = data["token_text"]
    first = [next(r for r in runs if r["setting"] == st) for st in settings]
    fig, axes = plt.subplots(len(first), 1, figsize=(min(24, 1.1 * flicker_positions + 2), 0.42 * max(
        r["setting"]["tail"] for r in first) * len(first) + 1.5), squeeze=False)
    for ax, r in zip(axes[:, 0], first):
        pos = r["by_position"][:flicker_positions]
        K = r["setting"]["tail"]
        grid = [[1.0 if p["top1"][m] == p["committed"] else 0.0 for p in pos] for m in range(K)]
        ax.imshow(grid, aspect="auto", cmap="RdYlGn", vmin=-0.6, vmax=1.3, origin="lower")
        for x, p in enumerate(pos):
            for m in range(K):
                s = _printable(tt.get(str(p["top1"][m]), "?"))[:7]
                ax.text(x, m, s, ha="center", va="center", fontsize=7)
        ax.set_yticks(range(K), [str(m + 1) for m in range(K)], fontsize=6)
        ax.set_xticks(range(len(pos)), [str(p["q"]) for p in pos], fontsize=7)
        ax.set_ylabel("maturation step m")
        ax.set_xlabel("continuation position q (committed at m = K, top row)")
        ax.set_title(f"top-1 candidate per stage, {label(r['setting'])}; prompt: {r['prompt'][-60:]!r}", fontsize=9)
    paths.append(_save(plt, fig, out_dir / "flicker.png"))

    # 3. displacement decay: the step ‖Δz̃‖ = α_j‖ẑ − z̃‖, and the residual ‖ẑ − z̃‖ = ‖Δz̃‖/α_j
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, st in enumerate(settings):
        pos = [p for r in runs if r["setting"] == st for p in r["by_position"]]
        if not pos:
            continue
        K = st["tail"]
        prof = GenerationConfig(tail=K, alpha_max=st["alpha_max"]).alpha_profile()
        alpha_m = [prof[K - m] for m in range(1, K + 1)]  # stage m sits in slot j = K − m
        ms = list(range(1, K + 1))
        for ax, scale in zip(axes, ([1.0] * K, [1 / a for a in alpha_m])):
            for p in pos[:30]:
                ax.plot(ms, [max(v * c, 1e-8) for v, c in zip(p["delta_norm"], scale)], c=f"C{i}", alpha=0.08, lw=0.8)
            vals = [[p["delta_norm"][m] * scale[m] for p in pos] for m in range(K)]
            ax.plot(ms, [max(sum(v) / len(v), 1e-8) for v in vals], c=f"C{i}", marker="o", ms=3,
                    label=label(st) + " (mean)")
    axes[0].set_ylabel("‖Δz̃‖ = α_j ‖ẑ − z̃‖ (the step taken)")
    axes[1].set_ylabel("‖ẑ − z̃‖ = ‖Δz̃‖ / α_j (distance to the prediction)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("maturation step m (α grows from α_max/K at m = 1 to α_max at m = K)")
        ax.legend(fontsize=7)
    paths.append(_save(plt, fig, out_dir / "displacement.png",
                       "Displacement through maturation (faint: single positions of the first prompts)"))
    return [out_dir / "traces.json"] + paths


def _save(plt, fig, path: Path, title: str | None = None) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    from tmfast.checkpoint import SHIPPED, load_checkpoint
    p = argparse.ArgumentParser(prog="python -m evals.traces", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(SHIPPED["maturation"]))
    p.add_argument("--prompt", nargs="+", default=["In the beginning God created", "And the LORD said unto Moses,"])
    p.add_argument("--tail", type=int, default=16)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--tau", type=float, nargs="+", default=[1.0, 0.05])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--alpha-max", type=float, default=GenerationConfig.alpha_max)
    p.add_argument("--tail-noise", type=float, default=GenerationConfig.tail_noise,
                   help="stochastic dynamics (default: the engine's); 0 traces Algorithm 1 as published")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/traces")
    args = p.parse_args(argv)
    model, tok = load_checkpoint(args.checkpoint)
    prompts = [tok.encode(t).ids for t in args.prompt]
    gens = [GenerationConfig(max_new_tokens=args.max_new_tokens, tail=args.tail, guidance=s, seed=args.seed,
                             alpha_max=args.alpha_max, tail_noise=args.tail_noise, stop_at_eos=False)
            for s in args.guidance]
    data = record_traces(model, tok, prompts, gens, args.tau)
    for path in plot_traces(data, args.out):
        print(path)
    for s in data["summary"]:
        print(json.dumps({k: v for k, v in s.items() if k in ("setting", "mean_flips_per_token",
                                                                "share_tokens_with_flip")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
