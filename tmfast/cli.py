"""`tmfast generate …` — the command line over the engine."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint
from .config import ConfigError, GenerationConfig
from .engine import GenerationError, MaturationEngine, StepEvent



class UsageError(ValueError):
    pass


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tmfast", description="Token Maturation generation engine")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt", nargs="?", help="the prompt (or use --batch-file)")
    g.add_argument("--checkpoint", help=f"checkpoint directory (default: the shipped model, {DEFAULT_CHECKPOINT})")
    g.add_argument("--batch-file", help="a file of prompts, one per line (blank lines skipped)")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--tail", type=int, default=16, help="liquid tail length K (1 = projected AR)")
    g.add_argument("--guidance", type=_finite_float, default=1.0, help="guidance scale s (1 = off)")
    g.add_argument("--alpha-max", type=_finite_float, default=None, help="front-slot step size α_max")
    g.add_argument("--embryo-scale", type=_finite_float, default=None, help="embryo norm / table radius")
    g.add_argument("--history-noise", type=_finite_float, default=None,
                   help="noise norm / R added to committed vectors as the model reads them")
    g.add_argument("--tail-noise", type=_finite_float, default=None,
                   help="stochastic dynamics: noise norm / R added to each tail slot per update (× √α)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--show-tail", action="store_true", help="redraw committed text + the tail's nearest tokens each step")
    g.add_argument("--json", action="store_true", help="print results as JSON lines")
    g.add_argument("--compile", action="store_true", help="torch.compile the generation step")
    g.add_argument("--impl", choices=("auto", "triton", "torch"), default=None, help="kernel implementation")
    g.add_argument("--device", default="cpu")

    sv = sub.add_parser("serve", help="serve /v1/completions over HTTP (continuous batching)")
    sv.add_argument("--checkpoint", help=f"checkpoint directory (default: {DEFAULT_CHECKPOINT})")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, default=8, help="sequences stepped together")
    sv.add_argument("--k-window", type=int, default=16, help="largest tail length a request may ask for")
    sv.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429s")
    sv.add_argument("--compile", action="store_true")
    sv.add_argument("--impl", choices=("auto", "triton", "torch"), default=None)
    sv.add_argument("--device", default="cpu")

    return p


def _prompts(args) -> list[str]:
    if args.batch_file is not None:
        if args.prompt is not None:
            raise UsageError("give a prompt or --batch-file, not both")
        path = Path(args.batch_file)
        if not path.is_file():
            raise UsageError(f"batch file not found: {path}")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"batch file has no prompts: {path}")
        return prompts
    if args.prompt is None or not args.prompt.strip():
        raise UsageError("prompt is empty")
    return [args.prompt]


def _load(args):
    if args.checkpoint is not None:
        return load_checkpoint(args.checkpoint, device=args.device)
    if not DEFAULT_CHECKPOINT.is_dir():
        raise CheckpointError(f"no default model installed at {DEFAULT_CHECKPOINT}; pass --checkpoint DIR")
    return load_checkpoint(DEFAULT_CHECKPOINT, device=args.device)


def _live_view(engine: MaturationEngine, prompts: list[str], out):
    tty = out.isatty()

    def draw(ev: StepEvent):
        lines = []
        for b, text in enumerate(ev.texts):
            # slot 0 is the token just committed; the rest are still liquid
            tail = "" if not ev.tail_tokens or not ev.tail_tokens[b] else " ".join(
                repr(engine.decode([t])) for t in ev.tail_tokens[b][1:])
            lines.append(f"[{ev.step:4d}] {prompts[b]}{text}  ⟨{tail}⟩")
        if tty:
            out.write("\x1b[H\x1b[J" + "\n".join(lines) + "\n")
        else:
            out.write("\n".join(lines) + "\n")
        out.flush()
    return draw


def cmd_generate(args, out=None) -> int:
    out = out or sys.stdout
    prompts = _prompts(args)
    # validates before the (slower) model load
    gen = GenerationConfig().overriding(
        max_new_tokens=args.max_new_tokens, tail=args.tail, guidance=args.guidance, seed=args.seed,
        stop=tuple(args.stop), alpha_max=args.alpha_max, embryo_scale=args.embryo_scale,
        history_noise=args.history_noise, tail_noise=args.tail_noise)
    model, tokenizer = _load(args)
    if tokenizer is None:
        raise CheckpointError("the checkpoint has no tokenizer.json; text prompts need one")
    engine = MaturationEngine(model, tokenizer, compile=args.compile, impl=args.impl)
    on_step = _live_view(engine, prompts, out) if args.show_tail else None
    results = engine.generate(prompts, gen, on_step=on_step, show_tail=args.show_tail)
    for prompt, r in zip(prompts, results):
        if args.json:
            out.write(json.dumps({"prompt": prompt, "text": r.text, "token_ids": r.token_ids,
                                  "finish_reason": r.finish_reason}) + "\n")
        else:
            out.write(prompt + r.text + "\n")
    return 0


def cmd_serve(args) -> int:
    from .engine import Engine
    from .server import serve
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    model, tokenizer = _load(args)
    if tokenizer is None:
        raise CheckpointError("the checkpoint has no tokenizer.json; the server needs one")
    engine = Engine(model, tokenizer, max_batch=args.max_batch, k_window=args.k_window,
                    max_queue=args.max_queue, compile=args.compile, impl=args.impl)
    name = Path(args.checkpoint).name if args.checkpoint else "tmfast-default"
    serve(engine, args.host, args.port, model_name=name)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "serve":
            return cmd_serve(args)
    except (UsageError, ConfigError, GenerationError, CheckpointError) as e:
        print(f"tmfast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tmfast: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
