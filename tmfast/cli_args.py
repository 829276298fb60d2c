"""The `tmfast` command line's arguments: flags, their types and defaults, one-line parse errors.

Every generation default is GenerationConfig()'s, every engine default Engine()'s: the CLI
restates none of them.
"""
from __future__ import annotations

import argparse
import difflib
import inspect
import math
import re

import torch

from . import __version__
from .checkpoint import DEFAULT_CHECKPOINT
from .config import GenerationConfig
from .engine import Engine

DEFAULTS = GenerationConfig()  # the one source of every generation default (Python, HTTP and CLI)
ENGINE_DEFAULTS = {k: p.default for k, p in inspect.signature(Engine.__init__).parameters.items()}
GENERATE_MAX_BATCH = 32  # a batch file's throughput grows with the batch on CPU (README, "Throughput")
DTYPES = ("float32", "bfloat16", "float16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class UsageError(ValueError):
    """A user mistake the CLI finds itself: one line, exit 2."""


# -- arguments -------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error; a near miss of a flag gets a suggestion
        if message.startswith("unrecognized arguments: "):
            flags = getattr(self, "flag_names", [])
            for word in message.split(": ", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.6)
                if word.startswith("--") and close:
                    message += f" (did you mean {close[0]}?)"
                    break
        self.exit(2, f"tmfast: error: {message} (see `{self.prog} --help`)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: …)" where there is one to show
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        shown = "none" if action.default in ([], ()) else "%(default)s"
        return f"{text} (default: {shown})"


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return v


SERVE_READ_TIMEOUT = 10.0  # = tmfast.server.READ_TIMEOUT (not imported: serving pulls in fastapi)


def _positive_seconds(text: str) -> float:
    v = _finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return v


def _int_at_least(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be >= {lo}" + (f" and <= {hi}" if hi else "") + f", got {v}")
        return v
    return parse


# the GenerationConfig fields the CLI sets, by flag: (flag, type, metavar, help)
GENERATION_FLAGS = [
    ("--max-new-tokens", int, "N", "tokens to commit at most"),
    ("--tail", int, "K", "liquid tail length K (1 = projected AR)"),
    ("--guidance", _finite_float, "S", "guidance scale s (1 = off)"),
    ("--alpha-max", _finite_float, "A", "front-slot step size α_max"),
    ("--alpha-min", _finite_float, "A", "back-slot step size (default: α_max / K)"),
    ("--embryo-scale", _finite_float, "X", "embryo norm / table radius"),
    ("--history-noise", _finite_float, "X", "noise norm / R added to committed vectors as the model reads them"),
    ("--tail-noise", _finite_float, "X",
     "stochastic dynamics: noise norm / R added to each tail slot per update (× √α)"),
    ("--seed", int, "N", "embryo and noise seed (every prompt gets this seed)"),
]


def _field(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="DIR", help=f"checkpoint directory (default: the shipped model, "
                                                       f"{DEFAULT_CHECKPOINT})")
    p.add_argument("--device", default="cpu", metavar="DEV", help="torch device: cpu, cuda, cuda:N, mps, …")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights and KV cache (the tail and its update stay float32; "
                        "default: bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--compile", action="store_true", help="torch.compile the generation step")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile mode with --compile (default: reduce-overhead — CUDA graphs — on CUDA, "
                        "default elsewhere)")
    p.add_argument("--impl", choices=("auto", "triton", "torch"), default=None,
                   help="kernel implementation (default: auto — Triton on CUDA, torch elsewhere)")


def build_parser() -> argparse.ArgumentParser:
    d, e = DEFAULTS, ENGINE_DEFAULTS
    p = _Parser(prog="tmfast", description="Token Maturation generation engine")
    p.add_argument("--version", action="version", version=f"tmfast {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate text from a prompt or a file of prompts", formatter_class=_Help,
                       description="Generate a continuation of a prompt, or of every line of --batch-file "
                                   "(streamed: results print in input order as they finish).")
    g.add_argument("prompt", nargs="?", help="the prompt (or use --batch-file)")
    _common(g)
    g.add_argument("--batch-file", metavar="FILE",
                   help="a UTF-8 file of prompts, one per line (blank lines skipped), read as it runs")
    g.add_argument("--max-batch", type=_int_at_least(1), default=GENERATE_MAX_BATCH, metavar="N",
                   help="sequences stepped together (a batch file's prompts run this many at a time)")
    for flag, kind, metavar, text in GENERATION_FLAGS:  # defaults: GenerationConfig()'s
        g.add_argument(flag, type=kind, metavar=metavar, default=getattr(d, _field(flag)), help=text)
    g.add_argument("--stop", action="append", default=list(d.stop), metavar="STR", help="stop string (repeatable)")
    g.add_argument("--show-tail", action="store_true",
                   help="live view of each running sequence: committed text + the tail's nearest tokens")
    g.add_argument("--json", action="store_true", help="print results as JSON lines")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr for a batch file (default: when stderr is a terminal)")

    sv = sub.add_parser("serve", help="serve /v1/completions over HTTP (continuous batching)",
                        formatter_class=_Help)
    _common(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=_int_at_least(1, 65535), metavar="N", default=8000, help="port to listen on")
    sv.add_argument("--max-batch", type=_int_at_least(1), metavar="N", default=GENERATE_MAX_BATCH,
                    help="sequences stepped together")
    sv.add_argument("--k-window", type=_int_at_least(1), metavar="K", default=e["k_window"],
                    help="largest tail length a request may ask for (at most the model's k_max)")
    sv.add_argument("--max-queue", type=_int_at_least(0), metavar="N", default=e["max_queue"],
                    help="waiting requests before 429s")
    sv.add_argument("--read-timeout", type=_positive_seconds, metavar="S", default=SERVE_READ_TIMEOUT,
                    help="seconds a request may take to arrive whole (headers and body); a client that "
                         "stalls longer is cut off")
    p.flag_names = sorted({f for sp in (p, g, sv) for f in re.findall(r"--[a-z][a-z0-9-]*", sp.format_help())})
    return p
