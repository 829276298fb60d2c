"""Generation quality: the paper's table (and more) for any checkpoint, one command.

    tmfast-eval                                            # shipped default models
    python -m evals                                        # the same
    tmfast-eval --maturation DIR --ar DIR --judge DIR|hf:PATH \
        [--prompts FILE | --prompts val] [--num-prompts 100] [--prompt-tokens 32] \
        [--max-new-tokens 64] [--seed 0] [--out bench/results] [--traces 2] \
        [--device cuda] [--dtype bfloat16] [--batch-size 64]

Every method continues the same prompts for exactly --max-new-tokens tokens (EOS is an
ordinary token here, so lengths are equal and Dist/Rep compare like with like; --stop-at-eos
changes that). The methods (evals.quality): the validation text itself (prompts from val
only), AR greedy, AR greedy + repetition penalty (--rep-penalty), AR nucleus (--top-p,
--temperature), AR best-of-N reranked by the judge (--best-of), maturation over K ∈ --tails,
s ∈ --guidance, α_max ∈ --alpha-max (the published dynamics, no noise), the engine's
default settings, and any --maturation-row.

Metrics (evals.metrics): Dist-1, Dist-2, Rep-2, Rep-3, Loop %, mean length, corpus Dist-2,
judge perplexity exp(Σ NLL / Σ tokens) of the continuations given their prompts, and the
contrastive-search rep-2/3/4 and diversity (Su et al. 2022). The judge is a tmfast AR
checkpoint (default: the AR baseline, which also generates the AR rows, so it favours them —
pass another) or any Hugging Face causal LM ("hf:PATH|NAME", re-tokenising the text).
Output: a Markdown table on stdout and in OUT.md, everything (settings, per-method metrics,
every sample) in OUT.json; the same command and seed give the same table. --traces N also
records maturation traces of the first N prompts (evals.traces: JSON + entropy / flicker /
displacement PNGs). A user mistake is a one-line error and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from tmfast.checkpoint import SHIPPED
from tmfast.config import GenerationConfig

from . import EvalError
from .judges import TmfastJudge, display_path, load_judge
from .prompts import prompts_from_file, validation_prompts
from .quality import (DEFAULT_ALPHA_MAX, DEFAULT_GUIDANCE, DEFAULT_TAILS, QualitySettings, evaluate,
                      maturation_rows, sample_seed)
from .report import write_quality
from .table import header as table_header
from .table import markdown_table

PROG = "tmfast-eval"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise _UsageError(message)


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
    p.add_argument("--alpha-max", type=float, nargs="+", default=list(DEFAULT_ALPHA_MAX),
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
    p.add_argument("--batch-size", type=int, default=64, help="prompts generated (and scored) together")
    p.add_argument("--device", default="cpu", help="torch device for generation and the judge: cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weights of every model (the maturation tail stays float32; default: bfloat16 on CUDA, "
                        "float32 elsewhere)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar over the table's rows on stderr (default: when stderr is a terminal)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--impl", choices=("auto", "triton", "torch"), default=None)
    p.add_argument("--out", default="bench/results", metavar="DIR",
                   help="writes DIR/quality.md, DIR/quality.json and the traces in DIR/traces/ ('' : stdout only)")
    p.add_argument("--traces", type=int, default=2, help="also trace the first N prompts (0: off)")
    p.add_argument("--trace-tail", type=int, default=16)
    p.add_argument("--trace-tau", type=float, nargs="+", default=[1.0, 0.05],
                   help="temperatures of the traced entropy softmax(cos/τ) (the paper: 1)")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(_Parser(prog=PROG, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter))


def settings_from(args, extra_rows: list[tuple[str, dict]]) -> QualitySettings:
    return QualitySettings(max_new_tokens=args.max_new_tokens, seed=args.seed, stop_at_eos=args.stop_at_eos,
                           batch_size=args.batch_size, impl=args.impl, tails=tuple(args.tails),
                           guidance=tuple(args.guidance), alpha_max=tuple(args.alpha_max),
                           rep_penalty=args.rep_penalty, top_p=args.top_p, temperature=args.temperature,
                           best_of=args.best_of, extra_rows=tuple(extra_rows),
                           default_row=not args.no_default_row)


def _load(spec: str | None, device: str = "cpu", dtype=None):
    if spec is None or spec.lower() == "none":
        return None, None
    from tmfast.checkpoint import CheckpointError, load_checkpoint
    try:
        return load_checkpoint(spec, device=device, dtype=dtype)
    except CheckpointError as e:
        raise EvalError(str(e)) from None


def _device_dtype(args) -> tuple[str, torch.dtype]:
    """The device asked for (checked now, in one line) and the weights' dtype."""
    try:
        torch.empty(1, device=args.device)
    except Exception as e:  # noqa: BLE001 — unknown device, no CUDA build, no GPU
        raise EvalError(f"--device {args.device}: not available here ({str(e).splitlines()[0]})") from None
    name = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")
    return args.device, getattr(torch, name)


def run(args, out=None) -> int:
    out = out or sys.stdout
    extra = maturation_rows(args.maturation_row)  # a bad row fails before anything runs
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device, dtype = _device_dtype(args)
    mat_model, mat_tok = _load(args.maturation, device, dtype)
    if mat_model is not None:  # a row the model cannot run fails before anything runs
        for name, row in extra:
            if row.get("tail", GenerationConfig().tail) > mat_model.config.k_max:
                raise EvalError(f"{name}: tail > the model's k_max={mat_model.config.k_max}")
    ar_model, ar_tok = _load(args.ar, device, dtype)
    if mat_model is None and ar_model is None:
        raise EvalError("nothing to evaluate: give --maturation and/or --ar")
    tok = mat_tok if mat_tok is not None else ar_tok
    if tok is None:
        raise EvalError("the checkpoint has no tokenizer.json")
    judge_spec = args.judge or (args.ar if ar_model is not None else None)
    judge = None
    if judge_spec and judge_spec.lower() != "none":
        if judge_spec == args.ar and ar_model is not None:  # the AR baseline judges: no second load
            judge = TmfastJudge(ar_model, ar_tok, display_path(judge_spec))
        else:
            judge = load_judge(judge_spec, device, dtype, batch_size=args.batch_size)
    from_val = args.prompts == "val"
    if from_val:
        prompts = validation_prompts(args.maturation if mat_model is not None else args.ar, tok, args.num_prompts,
                                     args.prompt_tokens, args.max_new_tokens, args.seed)
    else:
        prompts = prompts_from_file(args.prompts, tok, args.num_prompts)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"evaluating {len(prompts)} prompts × {args.max_new_tokens} new tokens")
    t0 = time.perf_counter()
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    rows = evaluate(mat_model, mat_tok, ar_model, ar_tok, judge, prompts, settings_from(args, extra), log=log,
                    progress=progress)
    wall = time.perf_counter() - t0

    head = table_header(len(prompts), "validation split" if from_val else args.prompts,
                        args.prompt_tokens if from_val else None, args.max_new_tokens, args.seed,
                        judge.name if judge else None)
    table = markdown_table(rows)
    out.write(head + "\n\n" + table + "\n")
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k not in ("func",)}
        md, js = write_quality(Path(args.out) / "quality", head, table, settings, rows, prompts, tok, wall)
        log(f"wrote {md} and {js} ({wall:.0f} s)")
    if args.traces > 0 and mat_model is not None:
        from .traces import plot_traces, record_traces
        tdir = Path(args.out) / "traces" if args.out else Path("traces")
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
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except _UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        return run(args)
    except ValueError as e:  # EvalError, ConfigError, GenerationError, CheckpointError, DataError
        print(f"{PROG}: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
