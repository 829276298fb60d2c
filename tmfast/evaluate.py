"""Generation quality: the paper's table (and more) for any checkpoint, one command.

    python -m tmfast.evaluate                                   # shipped default models
    python -m tmfast.evaluate --maturation DIR --ar DIR --judge DIR|hf:PATH \
        [--prompts FILE | --prompts val] [--num-prompts 100] [--prompt-tokens 32] \
        [--max-new-tokens 64] [--seed 0] [--out bench/results/quality] [--traces 2]

Every method continues the same prompts for exactly --max-new-tokens tokens (EOS is an
ordinary token here: stop_at_eos=False, so lengths are equal and Dist/Rep compare like
with like; --stop-at-eos changes that). Methods:

  reference            the true continuation from the validation split (prompts from val only)
  AR greedy            argmax of the AR baseline (--ar)
  AR greedy + rep. pen.  CTRL repetition penalty (--rep-penalty, 1.2)
  AR nucleus           top-p sampling (--top-p 0.9, temperature 1), one sample per prompt
  AR best-of-16        16 nucleus samples per prompt, the one the judge finds most likely
                       (lowest NLL/token) kept: the compute-matched baseline of the paper's v3
                       (16 forward tokens per committed token, like maturation with K=16)
  maturation K, s      the engine on the maturation model (--maturation), K ∈ --tails,
                       s ∈ --guidance; K > the model's k_max is reported as skipped

Metrics (tmfast.metrics): Dist-1, Dist-2, Rep-2, Rep-3, Loop %, mean length, corpus Dist-2
and judge perplexity exp(Σ NLL / Σ tokens) of the continuations given their prompts.
The judge is a tmfast AR checkpoint (default: the AR baseline, which also generates the AR
rows, so it favours them — pass another) or any Hugging Face causal LM ("hf:PATH|NAME",
re-tokenising the text). Output: a Markdown table on stdout and in OUT.md, everything
(settings, per-method metrics, every sample) in OUT.json; the same command and seed give
the same table. --traces N also records maturation traces of the first N prompts
(tmfast.traces: JSON + entropy / flicker / displacement PNGs).

AR baselines decode with tmfast.ar.ar_decode (batched, static KV cache; tests check it
commits exactly what the simple tmfast.ar.ar_generate does).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import metrics
from .ar import ar_decode
from .config import ConfigError, GenerationConfig, mix_seed
from .model import TMModel

from .checkpoint import SHIPPED
DEFAULT_TAILS = (1, 4, 16, 64)
DEFAULT_GUIDANCE = (1.0, 2.0)


class EvalError(ConfigError):
    """A bad evaluation request (missing checkpoint, prompts that do not fit, ...)."""


# --------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------
@dataclass
class Prompt:
    ids: list[int]
    text: str
    reference: list[int] | None = None  # the true continuation (prompts from the val split)


def prompts_from_file(path: str | Path, tokenizer, limit: int | None = None) -> list[Prompt]:
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"prompt file not found: {p}")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise EvalError(f"prompt file has no prompts: {p}")
    lines = lines[:limit] if limit else lines
    return [Prompt(tokenizer.encode(ln).ids, ln) for ln in lines]


def validation_documents(checkpoint_dir: str | Path) -> list[str]:
    """The validation split of the corpus a checkpoint was trained on (its train_config.json),
    re-made exactly as training made it (train.data: same documents, same split seed)."""
    cfg_path = Path(checkpoint_dir) / "train_config.json"
    if not cfg_path.is_file():
        raise EvalError(f"{checkpoint_dir} has no train_config.json: cannot find its validation split; "
                        "give --prompts FILE")
    from train.config import config_from
    from train.data import load_documents
    cfg = config_from(str(cfg_path))
    ds = load_documents(cfg)
    split = ds.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed, shuffle=True)
    return list(split["test"]["text"])


def prompts_from_documents(docs: list[str], tokenizer, n: int, prompt_tokens: int, ref_tokens: int,
                           seed: int) -> list[Prompt]:
    """n windows of prompt_tokens tokens (+ the next ref_tokens as the reference), drawn
    round-robin over the documents at seeded random offsets, without overlap."""
    gen = torch.Generator().manual_seed(seed)
    encoded = [tokenizer.encode(d).ids for d in docs]
    span = prompt_tokens + ref_tokens
    usable = [e for e in encoded if len(e) >= span]
    if not usable:
        raise EvalError(f"no validation document has {span} tokens")
    order = torch.randperm(len(usable), generator=gen).tolist()
    taken: dict[int, list[int]] = {}
    out: list[Prompt] = []
    tries = 0
    while len(out) < n and tries < 50 * n:
        d = order[tries % len(order)]
        tries += 1
        e = usable[d]
        start = int(torch.randint(0, len(e) - span + 1, (1,), generator=gen))
        if any(abs(start - s) < span for s in taken.get(d, [])):
            continue
        taken.setdefault(d, []).append(start)
        ids = e[start:start + prompt_tokens]
        out.append(Prompt(ids, tokenizer.decode(ids), e[start + prompt_tokens:start + span]))
    if len(out) < n:
        raise EvalError(f"the validation split only holds {len(out)} non-overlapping windows of {span} tokens")
    return out


# --------------------------------------------------------------------------------------
# judges
# --------------------------------------------------------------------------------------
class TmfastJudge:
    """A tmfast checkpoint scored with its AR head (table logits)."""

    def __init__(self, model: TMModel, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name

    @torch.no_grad()
    def nll(self, pairs: list[tuple[list[int], list[int]]], batch_size: int = 64) -> list[tuple[float, int]]:
        """(Σ NLL nats, n tokens) of each continuation given its prompt (token ids of this judge)."""
        n_pos = self.model.config.n_positions
        out = []
        for lo in range(0, len(pairs), batch_size):
            chunk = pairs[lo:lo + batch_size]
            seqs = [(p + c)[-(n_pos + 1):] for p, c in chunk]
            T = max(len(s) for s in seqs) - 1
            x = torch.zeros(len(seqs), T, dtype=torch.long)
            y = torch.full((len(seqs), T), -100, dtype=torch.long)
            for i, ((_, c), s) in enumerate(zip(chunk, seqs)):
                x[i, :len(s) - 1] = torch.tensor(s[:-1])
                n = len(c)
                if n:
                    y[i, len(s) - 1 - n:len(s) - 1] = torch.tensor(s[-n:])
            dev = self.model.table.weight.device
            logits = self.model.table.logits(self.model.hidden(self.model.table(x.to(dev)))).float()
            nll = F.cross_entropy(logits.flatten(0, 1), y.to(dev).flatten(), reduction="none",
                                  ignore_index=-100).view(len(seqs), T)
            for i, (_, c) in enumerate(chunk):
                out.append((float(nll[i].sum()), len(c)))
        return out


class HFJudge:
    """Any Hugging Face causal LM: texts are re-tokenised with its own tokenizer."""

    def __init__(self, name_or_path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.name = f"hf:{name_or_path}"
        self.tok = AutoTokenizer.from_pretrained(name_or_path)
        self.model = AutoModelForCausalLM.from_pretrained(name_or_path).eval()

    @torch.no_grad()
    def nll_text(self, pairs: list[tuple[str, str]]) -> list[tuple[float, int]]:
        n_pos = getattr(self.model.config, "n_positions", None) or self.model.config.max_position_embeddings
        out = []
        for p, c in pairs:
            pi, ci = self.tok(p)["input_ids"], self.tok(c)["input_ids"]
            if not ci:
                out.append((0.0, 0))
                continue
            ids = (pi + ci)[-(n_pos + 1):]
            x = torch.tensor([ids[:-1]])
            logp = F.log_softmax(self.model(x).logits[0].float(), -1)
            y = torch.tensor(ids[1:])
            nll = -logp[torch.arange(len(y)), y][-len(ci):]
            out.append((float(nll.sum()), len(ci)))
        return out


def display_path(spec: str) -> str:
    """A checkpoint path as the table shows it: relative to the working directory when inside it."""
    try:
        return str(Path(spec).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return spec


def load_judge(spec: str):
    if spec.startswith("hf:"):
        return HFJudge(spec[3:])
    from .checkpoint import load_checkpoint
    model, tok = load_checkpoint(spec)
    return TmfastJudge(model, tok, display_path(spec))


def judge_scores(judge, gen_tokenizer, prompts: list[Prompt], conts: list[list[int]]) -> list[tuple[float, int]]:
    """Score continuations (generator token ids) with any judge; re-tokenise text when the
    judge's vocabulary is not the generator's."""
    if isinstance(judge, TmfastJudge) and _same_tokenizer(judge.tokenizer, gen_tokenizer):
        return judge.nll([(p.ids, c) for p, c in zip(prompts, conts)])
    texts = [(p.text, gen_tokenizer.decode(c)) for p, c in zip(prompts, conts)]
    if isinstance(judge, HFJudge):
        return judge.nll_text(texts)
    enc = judge.tokenizer
    return judge.nll([(enc.encode(p).ids, enc.encode(c).ids) for p, c in texts])


def _same_tokenizer(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or a.to_str() == b.to_str()


# --------------------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------------------
@dataclass
class MethodResult:
    name: str
    kind: str  # reference | ar | maturation
    settings: dict
    samples: list[list[int]] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    skipped: str | None = None
    seconds: float = 0.0


def sample_seed(seed: int, i: int, j: int = 0) -> int:
    """Seed of sample j of prompt i: the same for a prompt whatever the batch or the method."""
    return mix_seed(seed, i, j)


def run_maturation(model, tokenizer, prompts: list[Prompt], settings: dict, args) -> list[list[int]]:
    """Maturation continuations; settings: GenerationConfig fields over the engine defaults."""
    from .engine import MaturationEngine
    engine = MaturationEngine(model, tokenizer, impl=args.impl)
    out = []
    for lo in range(0, len(prompts), args.batch_size):
        chunk = prompts[lo:lo + args.batch_size]
        gens = [GenerationConfig(**{**settings, "max_new_tokens": args.max_new_tokens, "stop_at_eos": args.stop_at_eos,
                                    "seed": sample_seed(args.seed, lo + i)})
                for i in range(len(chunk))]
        out.extend(r.token_ids for r in engine.generate([p.ids for p in chunk], gens))
    return out


def extra_settings(specs: list[str]) -> list[tuple[str, dict]]:
    """--maturation-row values: JSON objects of GenerationConfig fields, optional "name"."""
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


def best_of_n(ar_model, judge, tokenizer, prompts: list[Prompt], n: int, args) -> list[list[int]]:
    rep_prompts = [p for p in prompts for _ in range(n)]
    seeds = [sample_seed(args.seed, i, 1 + j) for i in range(len(prompts)) for j in range(n)]
    cands = ar_decode(ar_model, [p.ids for p in rep_prompts], args.max_new_tokens, top_p=args.top_p,
                      temperature=args.temperature, seeds=seeds, stop_at_eos=args.stop_at_eos,
                      batch_size=args.batch_size)
    scores = judge_scores(judge, tokenizer, rep_prompts, cands)
    best = []
    for i in range(len(prompts)):
        group = [(s / max(c, 1), j) for j, (s, c) in enumerate(scores[i * n:(i + 1) * n])]
        best.append(cands[i * n + min(group)[1]])
    return best


def evaluate(mat_model, mat_tok, ar_model, ar_tok, judge, prompts: list[Prompt], args,
             log=print) -> list[MethodResult]:
    """Run every method on the prompts and score it; returns the rows of the table."""
    rows: list[MethodResult] = []
    tok = mat_tok if mat_tok is not None else ar_tok

    def add(name, kind, settings, fn):
        r = MethodResult(name, kind, settings)
        t0 = time.perf_counter()
        try:
            r.samples = fn()
        except Exception as e:  # noqa: BLE001 — one failing method must not sink the table
            if not isinstance(e, (EvalError, ValueError)):
                raise
            r.skipped = str(e)
        r.seconds = time.perf_counter() - t0
        rows.append(r)
        log(f"  {name}: {'skipped: ' + r.skipped if r.skipped else f'{r.seconds:.1f} s'}")

    if all(p.reference is not None for p in prompts):
        add("reference (validation text)", "reference", {}, lambda: [p.reference for p in prompts])
    if ar_model is not None:
        if not _same_tokenizer(ar_tok, tok):
            raise EvalError("the AR model and the maturation model use different tokenizers")
        pid = [p.ids for p in prompts]
        kw = dict(stop_at_eos=args.stop_at_eos, batch_size=args.batch_size)
        add("AR greedy", "ar", {"decoding": "greedy"},
            lambda: ar_decode(ar_model, pid, args.max_new_tokens, **kw))
        add(f"AR greedy + rep. penalty {args.rep_penalty:g}", "ar",
            {"decoding": "greedy", "repetition_penalty": args.rep_penalty},
            lambda: ar_decode(ar_model, pid, args.max_new_tokens, repetition_penalty=args.rep_penalty, **kw))
        seeds = [sample_seed(args.seed, i) for i in range(len(prompts))]
        add(f"AR nucleus p={args.top_p:g}", "ar", {"decoding": "nucleus", "top_p": args.top_p,
                                                  "temperature": args.temperature},
            lambda: ar_decode(ar_model, pid, args.max_new_tokens, top_p=args.top_p, temperature=args.temperature,
                              seeds=seeds, **kw))
        if args.best_of > 1:
            add(f"AR best-of-{args.best_of} (judge rerank)", "ar",
                {"decoding": "nucleus", "top_p": args.top_p, "best_of": args.best_of, "rerank": judge.name},
                lambda: best_of_n(ar_model, judge, tok, prompts, args.best_of, args))
    if mat_model is not None:
        for a in args.alpha_max:
            for K in args.tails:
                for s in args.guidance:
                    name = f"maturation K={K} s={s:g}" + (f" α_max={a:g}" if list(args.alpha_max) != [1.0] else "")
                    settings = {"tail": K, "guidance": s, "alpha_max": a, "history_noise": 0.0, "tail_noise": 0.0}
                    if K > mat_model.config.k_max:
                        rows.append(MethodResult(name, "maturation", settings,
                                                 skipped=f"K={K} > the model's k_max={mat_model.config.k_max}"))
                        log(f"  {name}: skipped (K > k_max)")
                        continue
                    add(name, "maturation", settings,
                        lambda st=settings: run_maturation(mat_model, tok, prompts, st, args))
        extra = extra_settings(args.maturation_row)
        if not args.no_default_row:  # what `tmfast generate` does out of the box
            d = GenerationConfig()
            extra.insert(0, (f"maturation, engine defaults (K={d.tail} s={d.guidance:g} α_max={d.alpha_max:g} "
                             f"tail_noise={d.tail_noise:g} history_noise={d.history_noise:g})", {}))
        for name, settings in extra:
            add(name, "maturation", settings, lambda st=settings: run_maturation(mat_model, tok, prompts, st, args))
    for r in rows:
        if r.skipped:
            continue
        r.metrics = score_samples(r.samples, prompts, judge, tok)
    return rows


def score_samples(samples: list[list[int]], prompts: list[Prompt], judge, tokenizer) -> dict:
    """The table's metrics of one method's continuations, plus judge NLL/PPL when there is a judge."""
    out = metrics.summarize(samples)
    if judge is not None:
        sc = judge_scores(judge, tokenizer, prompts, samples)
        nll, n = sum(s for s, _ in sc), sum(c for _, c in sc)
        out["judge_nll"] = nll / n if n else None
        out["judge_ppl"] = metrics.perplexity(nll, n)
    return out


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------
COLUMNS = [("dist1", "Dist-1 ↑", "{:.3f}"), ("dist2", "Dist-2 ↑", "{:.3f}"), ("rep2", "Rep-2 ↓", "{:.3f}"),
           ("rep3", "Rep-3 ↓", "{:.3f}"), ("loop_pct", "Loop % ↓", "{:.0f} %"), ("mean_len", "mean len", "{:.1f}"),
           ("judge_ppl", "judge PPL", "{:.1f}"), ("corpus_dist2", "corpus Dist-2 ↑", "{:.3f}")]


def markdown_table(rows: list[MethodResult]) -> str:
    lines = ["| method | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.name} | " + " | ".join("—" for _ in COLUMNS) + " |")
            continue
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.metrics.get(key)
            cells.append("n/a" if v is None else fmt.format(v))
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    notes = [f"- {r.name}: skipped ({r.skipped})" for r in rows if r.skipped]
    return "\n".join(lines + ([""] + notes if notes else []))


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--maturation", default=str(SHIPPED["maturation"]),
                   help="maturation checkpoint ('none' to skip; default: the shipped model)")
    p.add_argument("--ar", default=str(SHIPPED["ar"]), help="AR baseline checkpoint ('none' to skip)")
    p.add_argument("--judge", default=None,
                   help="judge: a tmfast AR checkpoint or hf:NAME_OR_PATH (default: --ar)")
    p.add_argument("--prompts", default="val",
                   help="a file of prompts (one per line) or 'val': windows of the validation split "
                        "of the corpus the maturation checkpoint was trained on (default)")
    p.add_argument("--num-prompts", type=int, default=100, help="samples per method (one per prompt)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for --prompts val")
    p.add_argument("--max-new-tokens", type=int, default=64, help="continuation length")
    p.add_argument("--tails", type=int, nargs="+", default=list(DEFAULT_TAILS), help="maturation K values")
    p.add_argument("--guidance", type=float, nargs="+", default=list(DEFAULT_GUIDANCE), help="guidance s values")
    p.add_argument("--alpha-max", type=float, nargs="+", default=[1.0, 0.5],
                   help="front-slot step sizes α_max (with α_max = 1 the front slot is overwritten by a "
                        "prediction from the committed history alone, so the tail and s cannot change "
                        "what is committed)")
    p.add_argument("--maturation-row", action="append", default=[], metavar="JSON",
                   help='an extra maturation row: GenerationConfig fields over the engine defaults, '
                        'e.g. \'{"name": "tuned", "alpha_max": 0.7, "tail_noise": 0.3}\' (repeatable)')
    p.add_argument("--no-default-row", action="store_true",
                   help="leave out the row of the engine's default settings")
    p.add_argument("--rep-penalty", type=float, default=1.2)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--best-of", type=int, default=16, help="candidates for the reranked baseline (<2: off)")
    p.add_argument("--stop-at-eos", action="store_true", help="end a continuation at EOS (default: fixed length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--impl", choices=("auto", "triton", "torch"), default=None)
    p.add_argument("--out", default="bench/results/quality", help="writes OUT.md and OUT.json")
    p.add_argument("--traces", type=int, default=2, help="also trace the first N prompts (0: off)")
    p.add_argument("--trace-tail", type=int, default=16)
    p.add_argument("--trace-tau", type=float, nargs="+", default=[1.0, 0.05],
                   help="temperatures of the traced entropy softmax(cos/τ) (the paper: 1)")
    return p


def _load(spec: str | None):
    if spec is None or spec.lower() == "none":
        return None, None
    from .checkpoint import CheckpointError, load_checkpoint
    try:
        return load_checkpoint(spec)
    except CheckpointError as e:
        raise EvalError(str(e)) from None


def run(args, out=None) -> int:
    out = out or sys.stdout
    extra_settings(args.maturation_row)  # a bad row fails before anything runs
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    mat_model, mat_tok = _load(args.maturation)
    if mat_model is not None:  # a row the model cannot run fails before anything runs
        for name, settings in extra_settings(args.maturation_row):
            if settings.get("tail", GenerationConfig().tail) > mat_model.config.k_max:
                raise EvalError(f"{name}: tail > the model's k_max={mat_model.config.k_max}")
    ar_model, ar_tok = _load(args.ar)
    if mat_model is None and ar_model is None:
        raise EvalError("nothing to evaluate: give --maturation and/or --ar")
    tok = mat_tok if mat_tok is not None else ar_tok
    if tok is None:
        raise EvalError("the checkpoint has no tokenizer.json")
    judge_spec = args.judge or (args.ar if ar_model is not None else None)
    judge = None
    if judge_spec and judge_spec.lower() != "none":
        judge = TmfastJudge(ar_model, ar_tok, display_path(judge_spec)) if judge_spec == args.ar and ar_model is not None \
            else load_judge(judge_spec)
    if args.prompts == "val":
        docs = validation_documents(args.maturation if mat_model is not None else args.ar)
        prompts = prompts_from_documents(docs, tok, args.num_prompts, args.prompt_tokens, args.max_new_tokens,
                                         args.seed)
    else:
        prompts = prompts_from_file(args.prompts, tok, args.num_prompts)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"evaluating {len(prompts)} prompts × {args.max_new_tokens} new tokens")
    t0 = time.perf_counter()
    rows = evaluate(mat_model, mat_tok, ar_model, ar_tok, judge, prompts, args, log=log)
    wall = time.perf_counter() - t0

    src = "validation split" if args.prompts == "val" else args.prompts
    header = (f"{len(prompts)} prompts ({src}{f', {args.prompt_tokens} tokens each' if args.prompts == 'val' else ''}), "
              f"{args.max_new_tokens} new tokens each, seed {args.seed}; judge: {judge.name if judge else 'none'}")
    table = markdown_table(rows)
    out.write(header + "\n\n" + table + "\n")
    if args.out:
        base = Path(args.out)
        base.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k not in ("func",)}
        doc = {"settings": settings, "header": header, "table": table,
               "methods": [{"name": r.name, "kind": r.kind, "settings": r.settings, "skipped": r.skipped,
                            "metrics": r.metrics,
                            "samples": [{"prompt": p.text, "prompt_ids": p.ids, "token_ids": s,
                                         "text": tok.decode(s)} for p, s in zip(prompts, r.samples)]}
                           for r in rows],
               "run_info": {"argv": sys.argv, "machine": machine_info(), "wall_s": round(wall, 1),
                            "method_s": {r.name: round(r.seconds, 1) for r in rows}}}
        base.with_suffix(".json").write_text(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n")
        base.with_suffix(".md").write_text(header + "\n\n" + table + "\n")
        log(f"wrote {base.with_suffix('.md')} and {base.with_suffix('.json')} ({wall:.0f} s)")
    if args.traces > 0 and mat_model is not None:
        from .traces import record_traces, plot_traces
        tdir = Path(args.out).parent / "traces" if args.out else Path("traces")
        # the published dynamics (no noise), like the grid rows: noise would only add jitter to the figures
        gens = [GenerationConfig(max_new_tokens=args.max_new_tokens, tail=min(args.trace_tail, mat_model.config.k_max),
                                 guidance=s, alpha_max=a, seed=sample_seed(args.seed, 0), stop_at_eos=False,
                                 tail_noise=0.0, history_noise=0.0)
                for a in args.alpha_max for s in args.guidance]
        data = record_traces(mat_model, mat_tok, [p.ids for p in prompts[:args.traces]], gens, args.trace_tau)
        paths = plot_traces(data, tdir)
        log("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv=None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="python -m tmfast.evaluate", description=__doc__,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))
    args = p.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:  # EvalError, ConfigError, GenerationError, CheckpointError
        print(f"tmfast eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
