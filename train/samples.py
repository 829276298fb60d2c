"""Side-by-side generations and a small quality table: maturation (K, s) vs AR greedy.

    python -m train.samples --maturation tmfast/assets/maturation --ar tmfast/assets/ar \
        [--prompts "In the beginning" "Blessed are the" ...] [--max_new_tokens 48] [--out FILE.md]

Metrics per setting (over the prompts): judge NLL/token of the continuation under the
AR model, Dist-1/Dist-2, Rep-2 (share of repeated bigrams), Loop % (samples with a
repeated trigram), AR-agree (share of committed tokens that equal the AR model's
greedy choice after the same prefix).
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from tmfast.ar import ar_generate, ar_logits, ar_nll
from tmfast.checkpoint import load_checkpoint
from tmfast.config import GenerationConfig

DEFAULT_PROMPTS = ["In the beginning", "And the LORD said unto Moses,", "Blessed are the",
                   "The LORD is my shepherd;", "And it came to pass, when the king"]


# (name, GenerationConfig fields): the engine defaults; the published Algorithm 1 (no noise) at
# α_max = 1 and 0.5 (where the tail and guidance can change the committed token, see
# train/README.md); and the best setting measured with α_max < 1
DEFAULT_SETTINGS = [("maturation, engine defaults (K=16 s=1 α_max=1 tail_noise=0.4)", {}),
                    ("maturation K=16 s=1, no noise (Algorithm 1)", {"tail": 16, "tail_noise": 0.0}),
                    ("maturation K=16 s=2 α_max=0.5, no noise", {"tail": 16, "guidance": 2.0, "alpha_max": 0.5,
                                                                  "tail_noise": 0.0}),
                    ("maturation K=16 s=2 α_max=0.7 tail_noise=0.4", {"tail": 16, "guidance": 2.0,
                                                                      "alpha_max": 0.7, "tail_noise": 0.4})]


def ngrams(ids, n):
    return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def text_metrics(prompt_ids: list[list[int]], outs: list[list[int]], judge) -> dict:
    nll = cnt = agree = 0.0
    d1 = d2 = rep2 = 0.0
    loops = 0
    for p, o in zip(prompt_ids, outs):
        s, c = ar_nll(judge, p, o)
        nll, cnt = nll + s, cnt + c
        if o:
            full = torch.tensor([(p + o)[-judge.config.n_positions - 1:]])
            greedy = ar_logits(judge, full[:, :-1])[0].argmax(-1)[-len(o):]
            agree += float((greedy == torch.tensor(o)).sum())
        g1, g2, g3 = ngrams(o, 1), ngrams(o, 2), ngrams(o, 3)
        d1 += len(set(g1)) / max(len(g1), 1)
        d2 += len(set(g2)) / max(len(g2), 1)
        rep2 += 1 - len(set(g2)) / max(len(g2), 1)
        loops += int(len(set(g3)) < len(g3))
    n = max(len(outs), 1)
    return {"judge_nll": nll / max(cnt, 1), "judge_ppl": math.exp(nll / max(cnt, 1)), "dist1": d1 / n,
            "dist2": d2 / n, "rep2": rep2 / n, "loop_pct": 100.0 * loops / n, "ar_agree": agree / max(cnt, 1),
            "tokens": int(cnt)}


@torch.no_grad()
def run_settings(mat_model, mat_tok, judge, judge_tok, prompts, max_new_tokens=48, settings=None, seed=0):
    """{name: (texts, token lists, metrics)} for maturation settings and the AR baselines."""
    from tmfast.engine import MaturationEngine
    settings = settings or DEFAULT_SETTINGS
    res = {}
    pids = [mat_tok.encode(p).ids if isinstance(p, str) else list(p) for p in prompts]
    for name, fields in settings:
        eng = MaturationEngine(mat_model, mat_tok)
        t0 = time.time()
        out = eng.generate(pids, GenerationConfig(**{**fields, "max_new_tokens": max_new_tokens, "seed": seed}))
        toks = [r.token_ids for r in out]
        res[name] = ([r.text for r in out], toks, {**text_metrics(pids, toks, judge),
                                                   "seconds": round(time.time() - t0, 1)})
    for name, pen in (("AR greedy", 1.0), ("AR greedy + rep. penalty 1.3", 1.3)):
        t0 = time.time()
        out = ar_generate(judge, judge_tok, pids, max_new_tokens=max_new_tokens, repetition_penalty=pen)
        toks = [r.token_ids for r in out]
        res[name] = ([r.text for r in out], toks, {**text_metrics(pids, toks, judge),
                                                   "seconds": round(time.time() - t0, 1)})
    return res


def to_markdown(prompts, res) -> str:
    lines = ["| setting | judge NLL/tok | Dist-1 | Dist-2 | Rep-2 | Loop % | AR-agree |",
             "|---|---|---|---|---|---|---|"]
    for name, (_, _, m) in res.items():
        lines.append(f"| {name} | {m['judge_nll']:.3f} | {m['dist1']:.3f} | {m['dist2']:.3f} | {m['rep2']:.3f} "
                     f"| {m['loop_pct']:.0f} | {m['ar_agree']:.3f} |")
    lines.append("")
    for i, p in enumerate(prompts):
        lines.append(f"### prompt: {p!r}")
        for name, (texts, _, _) in res.items():
            t = texts[i].replace("\n", " ⏎ ")
            lines.append(f"- **{name}**: {t}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--maturation", default="tmfast/assets/maturation")
    ap.add_argument("--ar", default="tmfast/assets/ar")
    ap.add_argument("--prompts", nargs="*", default=DEFAULT_PROMPTS)
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    mat, mtok = load_checkpoint(a.maturation)
    judge, jtok = load_checkpoint(a.ar)
    res = run_settings(mat, mtok, judge, jtok, a.prompts, a.max_new_tokens, seed=a.seed)
    md = (f"# Generations: maturation vs AR\n\nMade by `python -m train.samples --maturation {a.maturation} "
          f"--ar {a.ar} --max_new_tokens {a.max_new_tokens} --seed {a.seed}` ({a.max_new_tokens} new tokens, "
          f"embryo seed {a.seed}; judge = the AR model; see train/samples.py for the metrics).\n\n"
          + to_markdown(a.prompts, res))
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
