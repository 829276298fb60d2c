"""This checkout against another one (say, the commit before an engine change), side by side:
the same committed tokens, and the step time of each, in alternating processes.

    git worktree add /tmp/before HEAD~3
    python bench/ab_checkout.py /tmp/before                   # both checks
    python bench/ab_checkout.py /tmp/before --skip-tokens --rounds 3

tokens: 50 random 24-token prompts × 48 new tokens of the shipped model for every combination of
K ∈ {1, 16}, s ∈ {1, 2}, α_max ∈ {1, 0.5}, tail noise ∈ {0, 0.4}, eager and compiled, each as a
uniform batch and as a batch where every other sequence is inert (α_max = 1); prints how many
sequences differ. steps: median step time (best of 3 generates) of 32-token prompts, 64 new
tokens, for each (batch, α_max, compiled), the two checkouts alternating, --rounds times.
Each checkout runs its own code: every measurement is a fresh `python` with that checkout first
on sys.path. 1 thread.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


# each checkout's own shipped model, by its path in the checkout (the other checkout may predate
# tmfast.checkpoint.SHIPPED, so the path is spelled out here rather than imported)
CHECKOUT_MODEL = Path("tmfast") / "assets" / "maturation"


def child_tokens(out: str) -> None:
    import torch
    torch.set_num_threads(1)
    from tmfast import GenerationConfig, MaturationEngine, load_checkpoint
    model, _ = load_checkpoint(Path.cwd() / CHECKOUT_MODEL)
    prompts = torch.randint(0, model.config.vocab_size, (50, 24), generator=torch.Generator().manual_seed(0)).tolist()
    res = {}
    for K, s, a, tn, comp in itertools.product((1, 16), (1.0, 2.0), (1.0, 0.5), (0.0, 0.4), (False, True)):
        eng = MaturationEngine(model, compile=comp)
        gens = [GenerationConfig(max_new_tokens=48, tail=K, guidance=s, alpha_max=a, tail_noise=tn, seed=i,
                                 stop_at_eos=False) for i in range(50)]
        res[f"K={K} s={s:g} α={a:g} noise={tn:g} compiled={comp}"] = [r.token_ids for r in eng.generate(prompts, gens)]
        mixed = [GenerationConfig(**{**g.to_dict(), "alpha_max": 1.0 if i % 2 else a}) for i, g in enumerate(gens)]
        res[f"mixed K={K} s={s:g} α={a:g} noise={tn:g} compiled={comp}"] = \
            [r.token_ids for r in eng.generate(prompts, mixed)]
    Path(out).write_text(json.dumps(res))


def child_step(B: int, a: float, comp: bool) -> None:
    import torch
    torch.set_num_threads(1)
    from tmfast import GenerationConfig, MaturationEngine, load_checkpoint
    model, _ = load_checkpoint(Path.cwd() / CHECKOUT_MODEL)
    prompts = torch.randint(0, model.config.vocab_size, (B, 32), generator=torch.Generator().manual_seed(0)).tolist()
    g = GenerationConfig(max_new_tokens=64, tail=16, alpha_max=a, seed=0, stop_at_eos=False)
    eng = MaturationEngine(model, compile=comp)
    eng.generate(prompts, g)
    meds = []
    for _ in range(3):
        stamps = []
        eng.generate(prompts, g, on_step=lambda ev: stamps.append(time.perf_counter()))
        meds.append(statistics.median(b - x for x, b in zip(stamps[1:], stamps[2:])))
    print(json.dumps({"step_ms": 1e3 * min(meds)}))


def run_in(root: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=root, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{root}: {out.stderr.strip().splitlines()[-1]}")
    return out.stdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("other", nargs="?", help="the other checkout (a git worktree)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip-tokens", action="store_true")
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--_tokens", dest="tokens", help=argparse.SUPPRESS)
    p.add_argument("--_step", dest="step", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tokens:
        child_tokens(args.tokens)
        return 0
    if args.step:
        B, a, comp = args.step.split(",")
        child_step(int(B), float(a), comp == "1")
        return 0
    if not args.other:
        p.error("give the other checkout")
    roots = {"other": Path(args.other).resolve(), "this": HERE}
    if not args.skip_tokens:
        got = {}
        for name, root in roots.items():
            path = f"/tmp/ab_tokens_{name}.json"
            run_in(root, "--_tokens", path)
            got[name] = json.loads(Path(path).read_text())
        n = sum(len(v) for v in got["this"].values())
        diff = {k: sum(x != y for x, y in zip(got["other"][k], got["this"][k])) for k in got["this"]}
        print(f"tokens: {len(diff)} configurations, {n} sequences; differing sequences: {sum(diff.values())}")
        for k, v in diff.items():
            if v:
                print(f"  {k}: {v}")
    if not args.skip_steps:
        print("| batch | α_max | compiled | other ms/step | this ms/step | this ÷ other |")
        print("|---|---|---|---|---|---|")
        for B, a, comp in ((1, 1.0, 0), (1, 1.0, 1), (32, 1.0, 0), (32, 1.0, 1), (32, 0.5, 0), (32, 0.5, 1)):
            t = {name: [] for name in roots}
            for _ in range(args.rounds):
                for name, root in roots.items():
                    t[name].append(json.loads(run_in(root, "--_step", f"{B},{a},{comp}").splitlines()[-1])["step_ms"])
            o, m = statistics.median(t["other"]), statistics.median(t["this"])
            print(f"| {B} | {a:g} | {'yes' if comp else 'no'} | {o:.2f} | {m:.2f} | {m / o:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
