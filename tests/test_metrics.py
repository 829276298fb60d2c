"""evals.metrics on hand-made token lists with known answers."""
import math

import pytest

from evals import metrics as M


def test_ngrams():
    assert M.ngrams([1, 2, 3], 2) == [(1, 2), (2, 3)]
    assert M.ngrams([1, 2], 3) == []
    with pytest.raises(ValueError):
        M.ngrams([1], 0)


def test_distinct_and_rep_known_answers():
    s = [1, 2, 1, 2, 1, 2]  # bigrams 12 21 12 21 12: 2 distinct of 5
    assert M.distinct_n(s, 1) == pytest.approx(2 / 6)
    assert M.distinct_n(s, 2) == pytest.approx(2 / 5)
    assert M.rep_n(s, 2) == pytest.approx(3 / 5)
    assert M.rep_n(s, 3) == pytest.approx(1 - 2 / 4)  # 121 212 121 212
    assert M.distinct_n([5, 6, 7], 1) == 1.0 and M.rep_n([5, 6, 7], 2) == 0.0
    assert M.distinct_n([7], 2) is None and M.rep_n([], 1) is None


def test_loop_is_any_repeated_trigram():
    assert M.has_loop([1, 2, 3, 9, 1, 2, 3])
    assert not M.has_loop([1, 2, 3, 1, 2, 4])  # bigram repeats, no trigram does
    assert not M.has_loop([1, 1])
    assert M.has_loop([4, 4, 4, 4])


def test_corpus_distinct_sees_cross_sample_copies():
    a = [1, 2, 3, 4]
    assert M.corpus_distinct_n([a, a], 2) == pytest.approx(3 / 6)
    assert M.corpus_distinct_n([a, [5, 6]], 2) == 1.0
    assert M.corpus_distinct_n([[1]], 2) is None


def test_summarize():
    samples = [[1, 2, 3, 1, 2, 3], [4, 5, 6, 7], [8]]
    r = M.summarize(samples)
    assert r["n"] == 3
    assert r["dist1"] == pytest.approx((3 / 6 + 1 + 1) / 3)
    # [8] has no bigram: left out of the bigram means
    assert r["dist2"] == pytest.approx((3 / 5 + 1) / 2)
    assert r["rep2"] == pytest.approx((2 / 5 + 0) / 2)
    assert r["rep3"] == pytest.approx((1 - 3 / 4 + 0) / 2)
    assert r["rep2"] == pytest.approx(1 - r["dist2"])  # the paper's table has this identity
    assert r["loop_pct"] == pytest.approx(100 / 3)
    assert r["mean_len"] == pytest.approx(11 / 3)
    assert r["corpus_dist2"] == pytest.approx((3 + 3) / (5 + 3))


def test_summarize_greedy_like_loop_vs_fresh_text():
    loop = [[7, 8, 9] * 10]
    fresh = [list(range(30))]
    assert M.summarize(loop)["loop_pct"] == 100.0 and M.summarize(fresh)["loop_pct"] == 0.0
    assert M.summarize(fresh)["dist2"] == 1.0 and M.summarize(fresh)["rep3"] == 0.0


def test_perplexity():
    assert M.perplexity(0.0, 5) == 1.0
    assert M.perplexity(2 * math.log(3), 2) == pytest.approx(3.0)
    assert M.perplexity(1.0, 0) is None


def test_empty_sample_rule():
    """A sample with fewer than n units has no n-grams: left out of the Dist/Rep means, loop-free,
    nothing added to the pooled and corpus counts; still counted in n and in the mean length."""
    r = M.summarize([[1, 2, 1, 2], []])
    assert r["n"] == 2 and r["mean_len"] == 2.0
    assert r["dist1"] == pytest.approx(2 / 4) and r["dist2"] == pytest.approx(2 / 3)
    assert r["rep2"] == pytest.approx(1 / 3) and r["rep3"] == 0.0  # 121 212: no trigram repeats
    assert r["loop_pct"] == 0.0 and r["corpus_dist2"] == pytest.approx(2 / 3)
    empty = M.summarize([[], [3]])
    assert empty["dist2"] is None and empty["rep2"] is None and empty["corpus_dist2"] is None
    assert empty["dist1"] == 1.0 and empty["loop_pct"] == 0.0
    assert M.summarize([])["loop_pct"] is None
    cs = M.contrastive_search_measures([["a", "b", "a", "b"], []])
    assert cs == M.contrastive_search_measures([["a", "b", "a", "b"]])
    assert M.contrastive_search_measures([[], ["x", "y", "z"]])["rep4_cs"] is None


def test_contrastive_search_rep_and_diversity_known_answers():
    texts = [["a", "b", "a", "b", "a"], ["c", "d"], ["e"]]
    # bigrams: ab ba ab ba (2 unique of 4) + cd (1 of 1) + none → 100 × (1 − 3/5)
    assert M.cs_rep_n(texts, 2) == pytest.approx(40.0)
    # trigrams: aba bab aba (2 of 3) → 100 × (1 − 2/3); 4-grams: abab baba (2 of 2) → 0
    assert M.cs_rep_n(texts, 3) == pytest.approx(100 / 3)
    assert M.cs_rep_n(texts, 4) == 0.0
    r = M.contrastive_search_measures(texts)
    assert r["rep2_cs"] == pytest.approx(40.0) and r["rep3_cs"] == pytest.approx(100 / 3) and r["rep4_cs"] == 0.0
    assert r["diversity_cs"] == pytest.approx(0.6 * (2 / 3) * 1.0)  # Π (1 − rep-n/100)
    assert M.cs_diversity([0.0, 0.0, 0.0]) == 1.0 and M.cs_diversity([100.0, 50.0, 0.0]) == 0.0


def test_contrastive_search_rep_is_pooled_within_texts():
    # pooled over texts (Σ unique / Σ total), not the mean of per-text ratios: 1 − 6/7, not (½ + 0)/2
    assert M.cs_rep_n([[1, 1, 1], [1, 2, 3, 4, 5, 6]], 2) == pytest.approx(100 * (1 - 6 / 7))
    # unique n-grams are counted within each text: a copy in another text is not a repeat
    assert M.cs_rep_n([[1, 2], [1, 2]], 2) == 0.0 and M.corpus_distinct_n([[1, 2], [1, 2]], 2) == 0.5
    assert M.words(" In  the\nbeginning ") == ["In", "the", "beginning"]
