"""The methods of the quality table, run on the same prompts and scored the same way.

Every method continues the same prompts for exactly `max_new_tokens` tokens (EOS is an
ordinary token here: stop_at_eos=False, so lengths are equal and Dist/Rep compare like
with like). Methods:

  reference            the true continuation from the validation split (prompts from val only)
  AR greedy            argmax of the AR baseline
  AR greedy + rep. pen.  CTRL repetition penalty (rep_penalty, 1.2)
  AR nucleus           top-p sampling (top_p 0.9, temperature 1), one sample per prompt
  AR best-of-N         N nucleus samples per prompt, the one the judge finds most likely
                       (lowest NLL/token) kept: the compute-matched baseline of the paper's v3
                       (16 forward tokens per committed token, like maturation with K=16)
  maturation K, s      the engine on the maturation model, K ∈ tails, s ∈ guidance,
                       α_max ∈ alpha_max; K > the model's k_max is reported as skipped
  extra rows           GenerationConfig fields over the engine defaults (the engine-defaults
                       row first unless default_row=False)

Sample i of a method is seeded by sample_seed(seed, i, j) (tmfast.config.mix_seed), the same
whatever the batch. AR baselines decode with tmfast.ar.ar_decode.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

from tmfast.ar import ar_decode
from tmfast.config import GenerationConfig, mix_seed

from . import EvalError, metrics
from .judges import judge_scores, same_tokenizer
from .prompts import Prompt

DEFAULT_TAILS = (1, 4, 16, 64)
DEFAULT_GUIDANCE = (1.0, 2.0)
DEFAULT_ALPHA_MAX = (1.0, 0.5)


@dataclass
class MethodResult:
    name: str
    kind: str  # reference | ar | maturation
    settings: dict
    samples: list[list[int]] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    skipped: str | None = None
    seconds: float = 0.0


@dataclass
class QualitySettings:
    """What `evaluate` runs: the decoding settings shared by every method, and the methods."""

    max_new_tokens: int = 64
    seed: int = 0
    stop_at_eos: bool = False
    batch_size: int = 64
    impl: str | None = None  # the engine's kernel implementation (None: its default)
    tails: tuple[int, ...] = DEFAULT_TAILS
    guidance: tuple[float, ...] = DEFAULT_GUIDANCE
    alpha_max: tuple[float, ...] = DEFAULT_ALPHA_MAX
    rep_penalty: float = 1.2
    top_p: float = 0.9
    temperature: float = 1.0
    best_of: int = 16  # < 2: no reranked baseline
    extra_rows: tuple[tuple[str, dict], ...] = ()  # (name, GenerationConfig fields): see maturation_rows
    default_row: bool = True  # the row of the engine's default settings (what `tmfast generate` does)


def sample_seed(seed: int, i: int, j: int = 0) -> int:
    """Seed of sample j of prompt i: the same for a prompt whatever the batch or the method."""
    return mix_seed(seed, i, j)


def maturation_rows(specs: list[str]) -> list[tuple[str, dict]]:
    """Extra maturation rows from JSON objects of GenerationConfig fields (optional "name")."""
    rows = []
    for spec in specs or []:
        try:
            d = json.loads(spec)
        except json.JSONDecodeError as e:
            raise EvalError(f"--maturation-row must be a JSON object, got {spec!r} ({e})") from None
        if not isinstance(d, dict):
            raise EvalError(f"--maturation-row must be a JSON object, got {spec!r}")
        name = d.pop("name", None)
        for k in ("max_new_tokens", "seed", "stop_at_eos"):
            if k in d:
                raise EvalError(f"--maturation-row: {k} is set by the evaluation itself")
        try:
            GenerationConfig(**d)
        except TypeError as e:
            raise EvalError(f"--maturation-row: {e}") from None
        rows.append((name or "maturation " + " ".join(f"{k}={v}" for k, v in d.items()), d))
    return rows


def run_maturation(model, tokenizer, prompts: list[Prompt], settings: dict, *, max_new_tokens: int, seed: int,
                   stop_at_eos: bool = False, batch_size: int = 64, impl: str | None = None) -> list[list[int]]:
    """Maturation continuations; settings: GenerationConfig fields over the engine defaults."""
    from tmfast.engine import MaturationEngine
    engine = MaturationEngine(model, tokenizer, impl=impl)
    out = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo:lo + batch_size]
        gens = [GenerationConfig(**{**settings, "max_new_tokens": max_new_tokens, "stop_at_eos": stop_at_eos,
                                    "seed": sample_seed(seed, lo + i)})
                for i in range(len(chunk))]
        out.extend(r.token_ids for r in engine.generate([p.ids for p in chunk], gens))
    return out


def best_of_n(ar_model, judge, tokenizer, prompts: list[Prompt], n: int, *, max_new_tokens: int, seed: int,
              top_p: float = 0.9, temperature: float = 1.0, stop_at_eos: bool = False,
              batch_size: int = 64) -> list[list[int]]:
    """n nucleus samples per prompt (seeds sample_seed(seed, i, 1 + j)); the judge's most likely kept."""
    rep_prompts = [p for p in prompts for _ in range(n)]
    seeds = [sample_seed(seed, i, 1 + j) for i in range(len(prompts)) for j in range(n)]
    cands = ar_decode(ar_model, [p.ids for p in rep_prompts], max_new_tokens, top_p=top_p,
                      temperature=temperature, seeds=seeds, stop_at_eos=stop_at_eos, batch_size=batch_size)
    scores = judge_scores(judge, tokenizer, rep_prompts, cands)
    best = []
    for i in range(len(prompts)):
        group = [(s / max(c, 1), j) for j, (s, c) in enumerate(scores[i * n:(i + 1) * n])]
        best.append(cands[i * n + min(group)[1]])
    return best


def score_samples(samples: list[list[int]], prompts: list[Prompt], judge, tokenizer) -> dict:
    """The table's metrics of one method's continuations: the paper's (token ids), the
    contrastive-search ones (words of the decoded text), judge NLL/PPL when there is a judge."""
    out = metrics.summarize(samples)
    out.update(metrics.contrastive_search_measures([metrics.words(tokenizer.decode(s)) for s in samples]))
    if judge is not None:
        sc = judge_scores(judge, tokenizer, prompts, samples)
        nll, n = sum(s for s, _ in sc), sum(c for _, c in sc)
        out["judge_nll"] = nll / n if n else None
        out["judge_ppl"] = metrics.perplexity(nll, n)
    return out


def evaluate(mat_model, mat_tok, ar_model, ar_tok, judge, prompts: list[Prompt], settings: QualitySettings,
             log=print, progress: bool = False) -> list[MethodResult]:
    """Run every method on the prompts and score it; returns the rows of the table.
    progress: a bar over the rows on stderr (the per-row lines still go to log)."""
    from tqdm import tqdm
    st = settings
    rows: list[MethodResult] = []
    bar = tqdm(desc="methods", unit="row", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    tok = mat_tok if mat_tok is not None else ar_tok
    decode = dict(max_new_tokens=st.max_new_tokens, seed=st.seed, stop_at_eos=st.stop_at_eos,
                  batch_size=st.batch_size)

    def add(name, kind, row_settings, fn):
        r = MethodResult(name, kind, row_settings)
        t0 = time.perf_counter()
        try:
            r.samples = fn()
        except Exception as e:  # noqa: BLE001 — one failing method must not sink the table
            if not isinstance(e, (EvalError, ValueError)):
                raise
            r.skipped = str(e)
        r.seconds = time.perf_counter() - t0
        rows.append(r)
        bar.update(1)
        log(f"  {name}: {'skipped: ' + r.skipped if r.skipped else f'{r.seconds:.1f} s'}")

    def mature(row_settings):
        return run_maturation(mat_model, tok, prompts, row_settings, impl=st.impl, **decode)

    if all(p.reference is not None for p in prompts):
        add("reference (validation text)", "reference", {}, lambda: [p.reference for p in prompts])
    if ar_model is not None:
        if not same_tokenizer(ar_tok, tok):
            raise EvalError("the AR model and the maturation model use different tokenizers")
        pid = [p.ids for p in prompts]
        kw = dict(stop_at_eos=st.stop_at_eos, batch_size=st.batch_size)
        add("AR greedy", "ar", {"decoding": "greedy"},
            lambda: ar_decode(ar_model, pid, st.max_new_tokens, **kw))
        add(f"AR greedy + rep. penalty {st.rep_penalty:g}", "ar",
            {"decoding": "greedy", "repetition_penalty": st.rep_penalty},
            lambda: ar_decode(ar_model, pid, st.max_new_tokens, repetition_penalty=st.rep_penalty, **kw))
        seeds = [sample_seed(st.seed, i) for i in range(len(prompts))]
        add(f"AR nucleus p={st.top_p:g}", "ar", {"decoding": "nucleus", "top_p": st.top_p,
                                                "temperature": st.temperature},
            lambda: ar_decode(ar_model, pid, st.max_new_tokens, top_p=st.top_p, temperature=st.temperature,
                              seeds=seeds, **kw))
        if st.best_of > 1:
            add(f"AR best-of-{st.best_of} (judge rerank)", "ar",
                {"decoding": "nucleus", "top_p": st.top_p, "best_of": st.best_of, "rerank": judge.name},
                lambda: best_of_n(ar_model, judge, tok, prompts, st.best_of, top_p=st.top_p,
                                  temperature=st.temperature, **decode))
    if mat_model is not None:
        for a in st.alpha_max:
            for K in st.tails:
                for s in st.guidance:
                    name = f"maturation K={K} s={s:g}" + (f" α_max={a:g}" if list(st.alpha_max) != [1.0] else "")
                    row = {"tail": K, "guidance": s, "alpha_max": a, "history_noise": 0.0, "tail_noise": 0.0}
                    if K > mat_model.config.k_max:
                        rows.append(MethodResult(name, "maturation", row,
                                                 skipped=f"K={K} > the model's k_max={mat_model.config.k_max}"))
                        log(f"  {name}: skipped (K > k_max)")
                        continue
                    add(name, "maturation", row, lambda row=row: mature(row))
        extra = list(st.extra_rows)
        if st.default_row:  # what `tmfast generate` does out of the box
            d = GenerationConfig()
            extra.insert(0, (f"maturation, engine defaults (K={d.tail} s={d.guidance:g} α_max={d.alpha_max:g} "
                             f"tail_noise={d.tail_noise:g} history_noise={d.history_noise:g})", {}))
        for name, row in extra:
            add(name, "maturation", row, lambda row=row: mature(row))
    bar.set_description("scoring")
    for r in rows:
        if r.skipped:
            continue
        r.metrics = score_samples(r.samples, prompts, judge, tok)
    bar.close()
    return rows
