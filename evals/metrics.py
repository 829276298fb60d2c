"""Generation-quality metrics: the one set of n-gram rules (pure Python, no torch).

Everything here works on the *continuation only* (the prompt excluded), given as a sequence
of units: token ids for the paper's measures, whitespace words for the contrastive-search
ones. Every table, sample sheet and sweep in `evals` scores through these functions.

The paper's measures (the quality table's Dist/Rep/Loop columns) are per sample, then
averaged over the samples (its table has Rep-2 = 1 − Dist-2 in every column, which holds
exactly for per-sample ratios):

    Dist-n   distinct n-grams / n-grams of a sample            (↑; 1 = no repeat at all)
    Rep-n    1 − Dist-n: share of a sample's n-grams that repeat an earlier one (↓)
             (the "seq-rep-n" of Welleck et al. 2019)
    Loop     a sample contains a repeated trigram              (↓; Loop % = share of samples)
    corpus Dist-n   distinct n-grams over ALL samples / all n-grams: low when different
             prompts give the same text (a per-sample metric cannot see that)

The contrastive-search measures (Su et al. 2022, "A Contrastive Framework for Neural Text
Generation", §5.1; SimCTG's reference script, simctg/evaluation.py
`measure_repetition_and_diversity`):

    rep-n (CS)      100 × (1 − Σ_x |unique n-grams(x)| / Σ_x |n-grams(x)|)   for n = 2, 3, 4
                    in percent: unique n-grams are counted within each text x, and both
                    counts are summed over the texts before dividing (a pooled ratio, so a
                    long text weighs more than a short one; not a corpus-level set, so two
                    texts that say the same thing do not count as repeats)
    diversity (CS)  Π_{n=2..4} (1 − rep-n/100)                               (↑, 0–1)

    Units are the whitespace-separated words of the decoded text (`words`), as the reference
    script splits (`text.strip().split()`). Two details differ from that script on purpose:
    it skips the last n-gram of every text (its loop stops at `end < len`), and it rounds rep-n
    to 2 decimals before the product; here every n-gram counts and nothing is rounded.

The empty-sample rule, the same for every measure: a sample with fewer than n units has no
n-grams, so it says nothing about n-gram repetition. It is left out of the per-sample means of
Dist-n / Rep-n, adds nothing to the pooled (CS) and corpus counts, and counts as loop-free; a
measure no sample has any n-gram for is ``None`` (the table prints n/a). It still counts in
`n` and in the mean length (as length 0).

Judge perplexity: ``perplexity(nll_sum, count)`` = exp(Σ NLL / Σ tokens) over a set.
"""
from __future__ import annotations

import math
from typing import Hashable, Iterable, Sequence

Units = Sequence[Hashable]  # token ids, or words
CS_ORDERS = (2, 3, 4)


def ngrams(ids: Units, n: int) -> list[tuple]:
    """All n-grams of ids, in order (overlapping)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ids = list(ids)
    return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def distinct_n(ids: Units, n: int) -> float | None:
    """Distinct n-grams / n-grams of one sample; None when it has no n-gram."""
    g = ngrams(ids, n)
    return len(set(g)) / len(g) if g else None


def rep_n(ids: Units, n: int) -> float | None:
    """1 − distinct_n: share of n-grams that repeat an earlier one; None when no n-gram."""
    d = distinct_n(ids, n)
    return None if d is None else 1.0 - d


def has_loop(ids: Units, n: int = 3) -> bool:
    """True when some n-gram (default trigram) occurs twice in the sample."""
    g = ngrams(ids, n)
    return len(set(g)) < len(g)


def _mean(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def corpus_distinct_n(samples: Sequence[Units], n: int) -> float | None:
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


def summarize(samples: Sequence[Units]) -> dict:
    """The paper's diversity/repetition metrics for a set of continuations (token ids).

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


# --------------------------------------------------------------------------------------
# the contrastive-search measures (Su et al. 2022)
# --------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """The units of the contrastive-search measures: whitespace-separated words."""
    return text.split()


def cs_rep_n(texts: Sequence[Units], n: int) -> float | None:
    """rep-n of Su et al. 2022, in percent: 100 × (1 − Σ unique n-grams per text / Σ n-grams)."""
    unique = total = 0
    for x in texts:
        g = ngrams(x, n)
        unique += len(set(g))
        total += len(g)
    return 100.0 * (1.0 - unique / total) if total else None


def cs_diversity(reps: Iterable[float | None]) -> float | None:
    """Π (1 − rep-n/100) over the given rep-n values (n = 2, 3, 4); None if one is None."""
    out = 1.0
    for r in reps:
        if r is None:
            return None
        out *= 1.0 - r / 100.0
    return out


def contrastive_search_measures(texts: Sequence[Units]) -> dict:
    """rep2_cs, rep3_cs, rep4_cs (percent, ↓) and diversity_cs (0–1, ↑) of a set of texts
    (each a sequence of units, normally `words(decoded continuation)`)."""
    texts = [list(x) for x in texts]
    reps = {n: cs_rep_n(texts, n) for n in CS_ORDERS}
    out = {f"rep{n}_cs": r for n, r in reps.items()}
    out["diversity_cs"] = cs_diversity(reps.values())
    return out
