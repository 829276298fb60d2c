"""Generation-quality metrics on token-id lists (pure Python, no torch).

All diversity metrics are computed per sample on the *continuation only* (the prompt is
excluded) and then averaged over samples, the way the paper's numbers behave: its table
has Rep-2 = 1 − Dist-2 in every column, which holds exactly for per-sample ratios.

    Dist-n   distinct n-grams / n-grams of a sample            (↑; 1 = no repeat at all)
    Rep-n    1 − Dist-n: share of a sample's n-grams that repeat an earlier one (↓)
             (the "seq-rep-n" of Welleck et al. 2019)
    Loop     a sample contains a repeated trigram              (↓; Loop % = share of samples)
    corpus Dist-n   distinct n-grams over ALL samples / all n-grams: low when different
             prompts give the same text (a per-sample metric cannot see that)

A sample shorter than n tokens has no n-grams: it is left out of the mean of Dist-n /
Rep-n (``None`` when no sample has any) and counts as loop-free.
Judge perplexity: ``perplexity(nll_sum, count)`` = exp(Σ NLL / Σ tokens) over a set.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

Tokens = Sequence[int]


def ngrams(ids: Tokens, n: int) -> list[tuple]:
    """All n-grams of ids, in order (overlapping)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ids = list(ids)
    return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def distinct_n(ids: Tokens, n: int) -> float | None:
    """Distinct n-grams / n-grams of one sample; None when it has no n-gram."""
    g = ngrams(ids, n)
    return len(set(g)) / len(g) if g else None


def rep_n(ids: Tokens, n: int) -> float | None:
    """1 − distinct_n: share of n-grams that repeat an earlier one; None when no n-gram."""
    d = distinct_n(ids, n)
    return None if d is None else 1.0 - d


def has_loop(ids: Tokens, n: int = 3) -> bool:
    """True when some n-gram (default trigram) occurs twice in the sample."""
    g = ngrams(ids, n)
    return len(set(g)) < len(g)


def _mean(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def corpus_distinct_n(samples: Sequence[Tokens], n: int) -> float | None:
    """Distinct n-grams over all samples together / all their n-grams."""
    total, seen = 0, set()
    for s in samples:
        g = ngrams(s, n)
        total += len(g)
        seen.update(g)
    return len(seen) / total if total else None


def perplexity(nll_sum: float, count: int) -> float | None:
    """exp(Σ NLL / Σ tokens); None for zero tokens."""
    return math.exp(nll_sum / count) if count > 0 else None


def summarize(samples: Sequence[Tokens]) -> dict:
    """The table's diversity/repetition metrics for a set of continuations.

    Returns dist1, dist2, rep2, rep3, loop_pct (0–100), mean_len, corpus_dist2, n.
    """
    samples = [list(s) for s in samples]
    n = len(samples)
    return {
        "n": n,
        "dist1": _mean(distinct_n(s, 1) for s in samples),
        "dist2": _mean(distinct_n(s, 2) for s in samples),
        "rep2": _mean(rep_n(s, 2) for s in samples),
        "rep3": _mean(rep_n(s, 3) for s in samples),
        "loop_pct": 100.0 * sum(has_loop(s, 3) for s in samples) / n if n else None,
        "mean_len": sum(len(s) for s in samples) / n if n else None,
        "corpus_dist2": corpus_distinct_n(samples, 2),
    }
