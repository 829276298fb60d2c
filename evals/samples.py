"""Side-by-side generations and a small quality table: maturation (K, s) vs AR greedy.

    python -m evals.samples [--maturation DIR] [--ar DIR] \
        [--prompts "In the beginning" "Blessed are the" ...] [--max_new_tokens 48] [--out FILE.md]

(default checkpoints: the shipped models, tmfast.checkpoint.SHIPPED). Metrics per setting
(over the prompts): judge NLL/token of the continuation under the AR model, Dist-1/Dist-2,
Rep-2, Loop % (the n-gram rules of evals.metrics, empty-sample rule included), AR-agree
(share of committed tokens that equal the AR model's greedy choice after the same prefix).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from tmfast.ar import ar_generate, ar_logits, ar_nll
from tmfast.checkpoint import SHIPPED, load_checkpoint
from tmfast.config import GenerationConfig

from . import metrics
from .judges import display_path

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


@torch.no_grad()
def text_metrics(prompt_ids: list[list[int]], outs: list[list[int]], judge) -> dict:
    """judge_nll, judge_ppl, dist1, dist2, rep2, loop_pct (evals.metrics), ar_agree, tokens."""
    nll = agree = 0.0
    cnt = 0
    for p, o in zip(prompt_ids, outs):
        s, c = ar_nll(judge, p, o)
        nll, cnt = nll + s, cnt + c
        if o:
            full = torch.tensor([(p + o)[-judge.config.n_positions - 1:]])
            greedy = ar_logits(judge, full[:, :-1])[0].argmax(-1)[-len(o):]
            agree += float((greedy == torch.tensor(o)).sum())
    m = metrics.summarize(outs)
    return {"judge_nll": nll / cnt if cnt else None, "judge_ppl": metrics.perplexity(nll, cnt),
            "dist1": m["dist1"], "dist2": m["dist2"], "rep2": m["rep2"], "loop_pct": m["loop_pct"],
            "ar_agree": agree / cnt if cnt else None, "tokens": int(cnt)}


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


def _f(v, fmt: str) -> str:
    return "n/a" if v is None else fmt.format(v)


def to_markdown(prompts, res) -> str:
    lines = ["| setting | judge NLL/tok | Dist-1 | Dist-2 | Rep-2 | Loop % | AR-agree |",
             "|---|---|---|---|---|---|---|"]
    for name, (_, _, m) in res.items():
        lines.append(f"| {name} | " + " | ".join(_f(m[k], fmt) for k, fmt in (
            ("judge_nll", "{:.3f}"), ("dist1", "{:.3f}"), ("dist2", "{:.3f}"), ("rep2", "{:.3f}"),
            ("loop_pct", "{:.0f}"), ("ar_agree", "{:.3f}"))) + " |")
    lines.append("")
    for i, p in enumerate(prompts):
        lines.append(f"### prompt: {p!r}")
        for name, (texts, _, _) in res.items():
            t = texts[i].replace("\n", " ⏎ ")
            lines.append(f"- **{name}**: {t}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.samples", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--maturation", default=display_path(str(SHIPPED["maturation"])))
    ap.add_argument("--ar", default=display_path(str(SHIPPED["ar"])))
    ap.add_argument("--prompts", nargs="*", default=DEFAULT_PROMPTS)
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    mat, mtok = load_checkpoint(a.maturation)
    judge, jtok = load_checkpoint(a.ar)
    res = run_settings(mat, mtok, judge, jtok, a.prompts, a.max_new_tokens, seed=a.seed)
    md = (f"# Generations: maturation vs AR\n\nMade by `python -m evals.samples --maturation {a.maturation} "
          f"--ar {a.ar} --max_new_tokens {a.max_new_tokens} --seed {a.seed}` ({a.max_new_tokens} new tokens, "
          f"embryo seed {a.seed}; judge = the AR model; see evals/samples.py for the metrics).\n\n"
          + to_markdown(a.prompts, res))
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
