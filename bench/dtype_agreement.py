"""How often a 16-bit engine commits what the fp32 engine commits (the shipped model, on the CPU).

    python bench/dtype_agreement.py --out bench/results/dtype_agreement

Weights and KV cache in bf16 / fp16; the tail, the last committed vector and the update stay
fp32 either way, and the commit is an fp32 query against the table. The tokens diverge at the
first commit whose top two candidates are closer than the 16-bit forward's error; after that the
texts are different continuations. Reported: the share of sequences identical to fp32's, and
the share of tokens before each sequence's first difference.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tmfast import GenerationConfig, load_checkpoint
from tmfast.checkpoint import DEFAULT_CHECKPOINT
from tmfast.engine import Engine

PROMPTS = ["And God said", "In the beginning", "And it came to pass", "The LORD is my shepherd",
           "Blessed are the meek", "And Jesus answered", "Now the serpent was", "Let there be light",
           "Thus saith the LORD", "And the king said", "Hear, O Israel", "And he went up",
           "For God so loved", "And Moses spake", "Praise ye the LORD", "Then said Jesus"]
SETTINGS = {
    "defaults (α_max 1, tail noise 0.4)": {},
    "Algorithm 1 (tail noise 0)": {"tail_noise": 0.0},
    "live tail (α_max 0.7, s = 2)": {"alpha_max": 0.7, "guidance": 2.0},
}


def generate(model, tok, gens) -> list[list[int]]:
    eng = Engine(model, tok, max_batch=32, k_window=16, max_queue=len(gens))
    ids = [eng.add_request(PROMPTS[i % len(PROMPTS)], g) for i, g in enumerate(gens)]
    out = {i: [] for i in ids}
    for ev in eng.run():
        out[ev.request_id] += ev.token_ids
    return [out[i] for i in ids]


def agreement(a, b) -> tuple[float, float]:
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    before = sum(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))) for x, y in zip(a, b))
    return same, before / sum(len(x) for x in a)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {dt: load_checkpoint(args.checkpoint, dtype=dt) for dt in ("float32", "bfloat16", "float16")}
    rows = []
    for name, over in SETTINGS.items():
        gens = [GenerationConfig(max_new_tokens=args.new_tokens, seed=s, stop_at_eos=False, **over)
                for s in range(args.seeds) for _ in PROMPTS]
        out = {dt: generate(m, tok, gens) for dt, (m, tok) in models.items()}
        for dt in ("bfloat16", "float16"):
            same, before = agreement(out["float32"], out[dt])
            rows.append({"settings": name, "dtype": dt, "sequences_identical": same, "tokens_before_first_difference": before})
    n = len(PROMPTS) * args.seeds
    lines = [f"`python bench/dtype_agreement.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
             f"(shipped model, CPU, {args.threads} thread(s); {n} sequences × {args.new_tokens} tokens per setting)", "",
             "| settings | dtype | sequences identical to fp32 | tokens before the first difference |", "|---|---|---|---|"]
    lines += [f"| {r['settings']} | {r['dtype']} | {100 * r['sequences_identical']:.0f} % | "
              f"{100 * r['tokens_before_first_difference']:.1f} % |" for r in rows]
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")
        Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
