"""`tmfast generate …` / `tmfast serve …` — the command line over the engine.

Every prompt, one or a whole batch file, runs through the continuous-batching `Engine`: prompts
are read lazily, at most --max-batch run at once, and each result is printed as soon as it and
every result before it are done (input order). Exit codes: 0 done, 1 a generation failed,
2 a user mistake (one line on stderr), 130 interrupted (what was printed stays).
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import torch

from .checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint
from .cli_args import GENERATE_MAX_BATCH  # noqa: F401 (cli.GENERATE_MAX_BATCH: the generate default)
from .cli_args import DEFAULTS, GENERATION_FLAGS, UsageError, _field, build_parser
from .config import ConfigError, GenerationConfig, one_line
from .engine import Engine, GenerationError, check_fits, check_impl, max_prompt_chars, prompt_ids

class GenerationFailed(RuntimeError):
    """A request ended in error: one line, exit 1."""


# -- set-up ----------------------------------------------------------------------------------
def check_device(text: str) -> torch.device:
    """The device asked for, or a one-line UsageError: unknown, or not usable on this machine."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device {text!r} is not a device (cpu, cuda, cuda:N, mps, …)") from None
    try:
        torch.empty(1, device=device)
    except Exception as e:  # noqa: BLE001 — AssertionError (no CUDA build), RuntimeError (no device) …
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"--device {text}: not available on this machine ({first})") from None
    return device


def _load(args):
    directory = Path(args.checkpoint) if args.checkpoint is not None else DEFAULT_CHECKPOINT
    if args.checkpoint is None and not DEFAULT_CHECKPOINT.is_dir():
        raise CheckpointError(f"no default model installed at {DEFAULT_CHECKPOINT}; pass --checkpoint DIR")
    dtype = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")
    try:
        model, tokenizer = load_checkpoint(directory, device=args.device, dtype=dtype)
    except (CheckpointError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 — a corrupt file is the user's mistake, never a traceback
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot load the checkpoint in {directory}: {type(e).__name__}: {first}") from None
    if tokenizer is None:
        raise CheckpointError(f"the checkpoint in {directory} has no tokenizer.json; text prompts need one")
    return model, tokenizer


class Prompt(NamedTuple):
    text: str
    line: int | None = None  # line number in a batch file


def read_prompts(path: Path) -> Iterator[Prompt]:
    """The non-blank lines of a batch file, read lazily."""
    try:
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.rstrip(b"\n").rstrip(b"\r").decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise UsageError(f"line {n}: batch file {path} is not UTF-8 text ({e.reason})") from None
                if line.strip():
                    yield Prompt(line, n)
    except OSError as e:
        raise UsageError(f"cannot read batch file {path}: {e.strerror or e}") from None


def _where(p: Prompt) -> str:
    return f"line {p.line}: " if p.line is not None else ""


def check_prompts(prompts: Iterable[Prompt], model, tokenizer, gen: GenerationConfig) -> tuple[int, int]:
    """(count, longest in tokens) of the prompts, each checked to fit the model with `gen`
    before anything runs: a bad line is a one-line error naming it."""
    max_chars = max_prompt_chars(model, tokenizer)
    count, longest = 0, 0
    for p in prompts:
        try:
            n = len(prompt_ids(model, tokenizer, p.text, max_chars))  # the engine's own prompt checks
            check_fits(model.config, n, gen)
        except (GenerationError, ConfigError) as e:
            raise UsageError(f"{_where(p)}{e}") from None
        count, longest = count + 1, max(longest, n)
    return count, longest


# -- the stream ------------------------------------------------------------------------------
@dataclass
class Result:
    index: int
    prompt: str
    line: int | None
    text: str
    token_ids: list[int]
    finish_reason: str
    error: str | None = None


@dataclass
class _InFlight:
    index: int
    prompt: Prompt
    view: object  # the engine's RequestView
    steps: int = 0


def stream_results(engine: Engine, prompts: Iterable[Prompt | str], gen: GenerationConfig, *,
                   read_ahead: int | None = None, show_tail: bool = False,
                   on_step: Callable[[list], None] | None = None) -> Iterator[Result]:
    """Run `prompts` through `engine`, yielding one Result per prompt in input order as soon as
    it and all before it are done. Prompts are taken from the iterable only while fewer than
    engine.max_batch are queued or running and fewer than `read_ahead` (default 4 × max_batch)
    are taken but not yet yielded: memory stays bounded whatever the input's length. After a
    request ends in error, the ones before it finish, the ones after it are aborted, and the
    error result is the last one yielded. on_step(ticks) sees every step (show_tail: with tails)."""
    from .cli_view import Tick
    window = read_ahead or 4 * engine.max_batch
    source = iter(prompts)
    exhausted, taken, yielded = False, 0, 0
    inflight: dict[str, _InFlight] = {}
    done: dict[int, Result] = {}
    failed_at: int | None = None
    decode = engine.tokenizer.decode
    try:
        while True:
            while (not exhausted and failed_at is None and taken - yielded < window
                   and engine.num_running + engine.num_queued < engine.max_batch):
                p = next(source, None)
                if p is None:
                    exhausted = True
                    break
                p = Prompt(p) if isinstance(p, str) else p
                rid = f"cli-{taken}"
                try:
                    engine.add_request(p.text, gen, request_id=rid, return_tail=show_tail,
                                       track_text=True if on_step is not None else None)
                except (GenerationError, ConfigError) as e:
                    raise UsageError(f"{_where(p)}{e}") from None
                inflight[rid] = _InFlight(taken, p, engine.request(rid))
                taken += 1
            if not engine.has_work:
                return
            try:
                events = engine.step()
            except RuntimeError as e:  # the batch's step itself failed (say, out of device memory)
                raise GenerationFailed(f"generation step failed: {type(e).__name__}: {one_line(e)}") from None
            ticks = []
            for ev in events:
                item = inflight.get(ev.request_id)
                if item is None:  # an abort's last event
                    continue
                if on_step is not None:
                    tail = [decode([t]) for t in (ev.tail_token_ids or [])[1:]]
                    ticks.append(Tick(item.index, item.prompt.text, item.steps, item.view.text, tail, ev.finished))
                item.steps += 1
                if not ev.finished:
                    continue
                del inflight[ev.request_id]
                v = item.view
                error = (ev.error or "generation failed") if ev.finish_reason == "error" else None
                done[item.index] = Result(item.index, item.prompt.text, item.prompt.line, v.text, v.token_ids,
                                          ev.finish_reason, error)
                if error is not None and (failed_at is None or item.index < failed_at):
                    failed_at = item.index
                    for rid, other in list(inflight.items()):
                        if other.index > failed_at:
                            engine.abort(rid)
                            del inflight[rid]
                    for i in [i for i in done if i > failed_at]:
                        del done[i]
            if on_step is not None:
                on_step(ticks)
            while yielded in done:
                r = done.pop(yielded)
                yielded += 1
                yield r
                if r.error is not None:
                    return
    finally:  # a consumer that stops early (an error, ^C) leaves nothing running
        for rid in inflight:
            engine.abort(rid)


# -- commands --------------------------------------------------------------------------------
def _gen_config(args) -> GenerationConfig:
    values = {_field(flag): getattr(args, _field(flag)) for flag, *_ in GENERATION_FLAGS}
    return DEFAULTS.overriding(**values, stop=tuple(args.stop))


def inert_note(args, gen: GenerationConfig) -> str | None:
    """The flags given that cannot change the text at these settings: at α_max = 1 the front is the
    prediction from history, so nothing in the tail reaches a commit (docs/how_a_step_works.md)."""
    if gen.alpha_profile()[0] < 1.0:
        return None
    given = [flag for flag in ("--guidance", "--alpha-min", "--embryo-scale")
             if getattr(args, _field(flag)) != getattr(DEFAULTS, _field(flag))]
    if not given:
        return None
    return (f"{', '.join(given)} change{'s' if len(given) == 1 else ''} nothing at --alpha-max 1: the tail is "
            "inert (the front is overwritten by the prediction from history); try --alpha-max 0.7")


def _format(r: Result, as_json: bool) -> str:
    if not as_json:
        return r.prompt + r.text
    row = {"index": r.index, "prompt": r.prompt, "text": r.text, "token_ids": r.token_ids,
           "finish_reason": r.finish_reason}
    if r.line is not None:
        row["line"] = r.line
    if r.error is not None:
        row["error"] = r.error
    return json.dumps(row)


def cmd_generate(args, out=None, err=None) -> int:
    from rich.console import Console

    from .cli_view import LiveTailView, PlainTailView, make_progress
    out, err = out or sys.stdout, err or sys.stderr
    # everything that can be checked before the (slower) model load
    if args.batch_file is not None:
        if args.prompt is not None:
            raise UsageError("give a prompt or --batch-file, not both")
        path = Path(args.batch_file)
        if path.is_dir():
            raise UsageError(f"batch file {path} is a directory, not a file of prompts")
        if not path.is_file():
            raise UsageError(f"batch file not found: {path}")
        source = lambda: read_prompts(path)  # noqa: E731 — read twice: checked, then run
    else:
        if args.prompt is None:
            raise UsageError("give a prompt or --batch-file")
        if not args.prompt.strip():
            raise UsageError("prompt is empty")
        source = lambda: iter([Prompt(args.prompt)])  # noqa: E731
    gen = _gen_config(args)
    device = check_device(args.device)
    check_impl(args.impl, device)
    mode = _compile_mode(args)
    note = inert_note(args, gen)
    if note:
        print(f"tmfast: note: {note}", file=err)
    model, tokenizer = _load(args)
    total, longest = check_prompts(source(), model, tokenizer, gen)
    if total == 0:
        raise UsageError(f"batch file has no prompts: {args.batch_file}")
    batch = min(args.max_batch, total)
    engine = Engine(model, tokenizer, max_batch=batch, max_queue=batch, k_window=gen.tail,
                    max_len=longest + gen.max_new_tokens + gen.tail - 1, compile=args.compile, impl=args.impl,
                    track_text=args.show_tail, compile_mode=mode)
    if args.compile:  # the first step of each kind compiles (cached on disk for later runs)
        print("tmfast: compiling the generation step (the first run takes a while; later ones reuse the cache)",
              file=err, flush=True)

    out_tty, err_tty = out.isatty(), err.isatty()
    finished, view = 0, None

    def status() -> str:
        return (f"tmfast generate · {finished}/{total} done · {engine.num_running} running"
                f" · {engine.num_queued} queued")
    if args.show_tail:  # not on a terminal: plain view lines on stderr, so stdout stays the results
        view = LiveTailView(Console(file=out, highlight=False), status) if out_tty else PlainTailView(err)
    bar = args.progress if args.progress is not None else (err_tty and args.batch_file is not None)
    if isinstance(view, LiveTailView):
        bar = False  # the live view counts what is done in its status line
    progress = task = None
    if bar:  # on stderr; when stdout is the same terminal, results print above it (one console)
        console = Console(file=out if (out_tty and err_tty) else err,
                          force_terminal=True if args.progress else None)
        progress, task = make_progress(console, total)

    def emit(line: str) -> None:
        if isinstance(view, LiveTailView):  # the plain view is on stderr: results stay on stdout
            view.print(line)
        elif progress is not None and progress.console.file is out:
            progress.console.print(line, soft_wrap=True, markup=False, highlight=False, emoji=False)
        else:
            out.write(line + "\n")
            out.flush()

    failure = None
    with (view or nullcontext()), (progress or nullcontext()):
        for r in stream_results(engine, source(), gen, show_tail=args.show_tail,
                                on_step=view.update if view is not None else None):
            if r.error is not None:
                failure = f"{_where(Prompt(r.prompt, r.line))}generation failed: {r.error}"
                if args.json:
                    emit(_format(r, True))
                break
            finished += 1
            emit(_format(r, args.json))
            if progress is not None:
                progress.update(task, completed=finished)
    if failure is not None:
        raise GenerationFailed(failure)
    return 0


def check_port(host: str, port: int) -> None:
    """The port must be free before anything loads: one line, not uvicorn's six and exit 3."""
    import socket
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
            sock.bind((host, port))
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_serve(args) -> int:
    from .server import serve
    check_port(args.host, args.port)
    device = check_device(args.device)
    check_impl(args.impl, device)
    mode = _compile_mode(args)
    model, tokenizer = _load(args)
    if args.k_window > model.config.k_max:
        raise UsageError(f"--k-window must be <= the model's k_max={model.config.k_max}, got {args.k_window}")
    engine = Engine(model, tokenizer, max_batch=args.max_batch, k_window=args.k_window,
                    max_queue=args.max_queue, compile=args.compile, impl=args.impl, compile_mode=mode)
    name = Path(args.checkpoint).name if args.checkpoint else "tmfast-default"
    # --compile: every step variant compiles before /health says ready ("starting" until then)
    serve(engine, args.host, args.port, model_name=name, warmup=args.compile, read_timeout=args.read_timeout)
    return 0


def _compile_mode(args) -> str | None:
    if args.compile_mode is not None and not args.compile:
        raise UsageError("--compile-mode needs --compile")
    return args.compile_mode  # None: the engine's default for the device


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        return cmd_serve(args)
    except (UsageError, ConfigError, GenerationError, CheckpointError) as e:
        print(f"tmfast: error: {one_line(e)}", file=sys.stderr)
        return 2
    except GenerationFailed as e:
        print(f"tmfast: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tmfast: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tmfast generate … | head`: the reader left; no traceback at exit either
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141


if __name__ == "__main__":
    sys.exit(main())
