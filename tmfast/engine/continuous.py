"""Continuous batching: requests join and leave a running batch; one event per request per step."""
from __future__ import annotations

import asyncio
import functools
import itertools
import threading
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import torch

from csrc_triton import resolve_impl

from ..config import GenerationConfig
from ..model import TMModel
from .requests import GenerationError, QueueFullError, Sequence, check_fits, max_prompt_chars, prompt_input
from .slots import DecodeBatch, PendingStep, StepOutput
from .step import decode_step_tensors

STEP_KINDS = ("front_only", "tail", "guided")  # what a compiled engine has one graph of, per bucket


def default_compile_mode(device: torch.device) -> str | None:
    """torch.compile's mode for a device: CUDA graphs over the static buffers on CUDA."""
    return "reduce-overhead" if device.type == "cuda" else None


def check_impl(impl: str | None, device: torch.device) -> None:
    """Fail at construction, in one line, when the kernel implementation asked for cannot run here."""
    try:
        resolve_impl(impl, device, "kernels")
    except (RuntimeError, ValueError) as e:
        raise GenerationError(str(e), "impl") from None


def _int_arg(name: str, value, lo: int, hi: int | None = None, what: str | None = None) -> None:
    """An engine argument that must be an int (not a bool, not a float) in [lo, hi]: one line."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        raise GenerationError(f"{name} must be an integer {what or (f'>= {lo}' if hi is None else f'in [{lo}, {hi}]')}, "
                              f"got {value!r}", name)


class EngineBusyError(RuntimeError):
    """Two threads called into one Engine at once: the engine is not thread-safe; serialise calls."""


def _exclusive(method):
    """One caller at a time: a second thread calling in while the first is inside gets an
    EngineBusyError before anything is touched (the engine's state stays as the first leaves it)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if not self._busy.acquire(blocking=False):
            raise EngineBusyError(f"Engine.{method.__name__}() while another thread is inside the engine: "
                                  "it is not thread-safe, serialise calls (tmfast serve runs one loop thread)")
        try:
            return method(self, *args, **kwargs)
        finally:
            self._busy.release()
    return call


@dataclass(slots=True)
class RequestEvent:
    """What one request did in one engine step."""
    request_id: str
    token_ids: list[int]  # committed this step (empty when the step committed EOS or nothing)
    text: str  # new text to append
    finished: bool = False
    finish_reason: str | None = None  # "eos" | "stop" | "length" | "abort" | "error"
    tail_token_ids: list[int] | None = None  # nearest token per tail slot (return_tail)
    tail_entropy: list[float] | None = None  # per tail slot (return_stats)
    delta_norm: list[float] | None = None  # ‖Δz̃‖ per tail slot (return_stats)
    vectors: torch.Tensor | None = None  # committed vectors (return_vectors)
    error: str | None = None  # with finish_reason "error"


class RequestView:
    """A read-only view of one request (queued, running or finished), from Engine.request()."""

    def __init__(self, seq: Sequence):
        self._seq = seq

    id = property(lambda self: self._seq.id)
    prompt_ids = property(lambda self: self._seq.prompt_ids, doc="token ids, or None for a vector prompt")
    prompt_tokens = property(lambda self: self._seq.n_prompt, doc="prompt length in positions")
    token_ids = property(lambda self: list(self._seq.token_ids), doc="committed so far (EOS excluded)")
    text = property(lambda self: self._seq.text if not self._seq.finished else self._seq.final_text(),
                    doc="committed text so far (tracked text only until the request finishes)")
    finish_reason = property(lambda self: self._seq.finish_reason)
    finished = property(lambda self: self._seq.finished)


@dataclass
class _Request:
    seq: Sequence
    vectors: torch.Tensor | None  # a vector prompt (T,d) on the model's device; None: seq.prompt_ids
    return_tail: bool
    return_stats: bool
    return_vectors: bool
    entropy_tau: float
    watched: bool = False  # it reads its tail: the tail must be stepped even when inert

    def __post_init__(self):
        self.watched = self.return_tail or self.return_stats


class Engine:
    """Continuous batching over a static KV cache of `max_batch` slots.

    add_request() queues a request (token ids, text, or raw prompt vectors); step()
    admits queued requests into free slots, advances every active request by one
    maturation step and returns their events; abort() ends one; request() reads one.
    A request's output is the same whatever else runs beside it. Not thread-safe:
    serialise calls (the HTTP server runs one loop thread).
    """

    def __init__(self, model: TMModel | str | Path, tokenizer=None, *, max_batch: int = 8,
                 max_len: int | None = None, k_window: int = 16, max_queue: int = 64,
                 compile: bool = False, compile_mode: str | None = None, impl: str | None = None,
                 entropy_tau: float = 1.0, track_text: bool = True, pipeline: int | None = None):
        if isinstance(model, (str, Path)):
            from ..checkpoint import load_checkpoint
            model, loaded_tok = load_checkpoint(model)
            tokenizer = tokenizer or loaded_tok
        if not isinstance(model, TMModel):
            raise GenerationError(f"model must be a TMModel or a checkpoint directory, got {type(model).__name__}")
        cfg = model.config
        device = model.table.weight.device
        check_impl(impl, device)
        _int_arg("k_window", k_window, 1, cfg.k_max, f"[1, k_max={cfg.k_max}]")
        _int_arg("max_batch", max_batch, 1)
        _int_arg("max_queue", max_queue, 0)
        if max_len is not None:  # the cache must hold a 1-token prompt, its tail and one new token
            _int_arg("max_len", max_len, k_window + 1, None, f">= k_window + 1 = {k_window + 1}")
        if pipeline not in (None, 0, 1) or isinstance(pipeline, bool):
            raise GenerationError(f"pipeline must be 0 or 1 (steps in flight while results are read), got {pipeline!r}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_len = max_len or cfg.n_positions + k_window - 1
        # a text longer than this cannot fit, whatever it tokenises to (checked before tokenising)
        self.max_prompt_chars = max_prompt_chars(model, tokenizer) if tokenizer is not None else None
        # defaults for requests that do not say
        self.max_queue, self.entropy_tau, self.track_text = max_queue, entropy_tau, track_text
        # on CUDA the host reads a step's results while the next one runs (one step behind); on
        # the CPU a step runs synchronously and there is nothing to overlap
        self.pipeline = (1 if device.type == "cuda" else 0) if pipeline is None else pipeline
        self.compile_mode = compile_mode if compile_mode is not None or not compile else default_compile_mode(device)
        step_fn = decode_step_tensors
        if compile:
            step_fn = torch.compile(decode_step_tensors, fullgraph=True, dynamic=False, mode=self.compile_mode)
        try:
            self._batch = DecodeBatch(model, max_batch, self.max_len, k_window, step_fn, impl, compiled=compile,
                                      cuda_graphs=compile and device.type == "cuda"
                                      and "reduce-overhead" in (self.compile_mode or ""))
        except MemoryError as e:  # the cache would not fit: a user's setting, said in one line
            raise GenerationError(str(e), "max_batch") from None
        if self._batch.cuda_graphs:  # one CUDA graph per (rows, span, kind): expected, not a warning
            import torch._inductor.config as inductor_config
            inductor_config.triton.cudagraph_dynamic_shape_warn_limit = None
        if compile:  # a graph per step kind; allow one per (row bucket, span bucket, kind) in case
            variants = len(self._batch.rows) * len(self._batch.spans) * len(STEP_KINDS)
            cfg_dynamo = torch._dynamo.config
            cfg_dynamo.recompile_limit = max(cfg_dynamo.recompile_limit, variants)
            cfg_dynamo.accumulated_recompile_limit = max(cfg_dynamo.accumulated_recompile_limit, 2 * variants)
        self.compiled = compile
        self._queue: deque[_Request] = deque()
        self._running: list[_Request] = []  # slot i → request (running slots are 0..n−1)
        self._aborted: list[RequestEvent] = []
        self._pending: tuple[PendingStep, list[_Request]] | None = None  # launched, not yet read
        self._watchers: Counter = Counter()  # running requests that read their tail, by the τ of their stats
        self._n_watched = 0
        self._host_table: torch.Tensor | None = None  # for return_vectors, made on first use
        self._ids = itertools.count()
        self._busy = threading.Lock()  # see _exclusive

    # -- what the engine is ------------------------------------------------------------
    @property
    def max_batch(self) -> int:
        return self._batch.max_batch

    @property
    def k_window(self) -> int:
        return self._batch.k_window

    @property
    def kv_cache_bytes(self) -> int:
        """Memory of the static KV cache this engine owns."""
        return self._batch.cache.nbytes()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    # -- requests ----------------------------------------------------------------------
    @_exclusive
    def add_request(self, prompt, params: GenerationConfig | dict | None = None, *,
                    request_id: str | None = None, return_tail: bool = False, return_stats: bool = False,
                    return_vectors: bool = False, track_text: bool | None = None,
                    entropy_tau: float | None = None) -> str:
        """Queue a request; it joins the batch at the next step with a free slot. Returns its id.
        track_text: decode text every step (stop strings imply it; default: the engine's);
        entropy_tau: τ of the per-slot entropy that return_stats reports (default: the engine's)."""
        g = params if isinstance(params, GenerationConfig) else GenerationConfig.from_dict(params or {})
        ids, vectors = prompt_input(self.model, self.tokenizer, prompt, self.max_prompt_chars)
        n_prompt = len(ids) if vectors is None else len(vectors)
        check_fits(self.model.config, n_prompt, g, self.max_len, self.k_window)
        if g.stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer", "stop")
        tau = self.entropy_tau if entropy_tau is None else entropy_tau
        if not (isinstance(tau, (int, float)) and tau > 0):
            raise GenerationError(f"entropy_tau must be a positive number, got {tau!r}", "entropy_tau")
        # after validation (a bad request hears what is wrong); a request that a free slot takes at
        # the next step is not waiting, so max_queue=0 means "no waiting", not "nothing runs"
        free = self._batch.max_batch - self._batch.n_active
        if len(self._queue) >= self.max_queue + free:
            raise QueueFullError(f"request queue is full ({self.max_queue} waiting); retry later")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if any(r.seq.id == rid for r in itertools.chain(self._queue, self._running)):
            raise GenerationError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, ids, n_prompt, g, self.tokenizer, self.model.config.eos_token_id,
                       self.track_text if track_text is None else track_text)
        self._queue.append(_Request(seq, vectors, return_tail, return_stats, return_vectors, float(tau)))
        return rid

    def request(self, request_id: str) -> RequestView:
        """A read-only view of a queued or running request (it stays valid after the request ends)."""
        for r in itertools.chain(self._queue, self._running):
            if r.seq.id == request_id:
                return RequestView(r.seq)
        raise KeyError(f"no queued or running request {request_id!r}")

    @_exclusive
    def abort(self, request_id: str) -> bool:
        """End a request now (queued or running); its last event has finish_reason 'abort'."""
        for r in list(self._queue):
            if r.seq.id == request_id:
                self._queue.remove(r)
                break
        else:
            for slot, r in enumerate(self._running):
                if r.seq.id == request_id:
                    self._release(slot)
                    break
            else:
                return False
        r.seq.finish_reason = "abort"
        self._aborted.append(RequestEvent(request_id, [], r.seq.text_delta(), True, "abort"))
        return True

    # -- the loop ----------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self._queue or self._running or self._aborted or self._pending)

    @_exclusive
    def step(self) -> list[RequestEvent]:
        """Admit what fits, launch one step of every running request, return events.

        With pipeline=1 (the default on CUDA) the events are those of the step launched by the
        previous call: the device runs step n while the host turns step n−1's results into
        events, and a request that ended at step n−1 has its share of step n discarded. With
        pipeline=0 (the CPU default) they are this step's. The text is the same either way."""
        events, self._aborted = self._aborted, []
        events += self._admit()
        launched = None
        if self._running:
            probe = self._n_watched > 0
            taus = sorted(t for t, n in self._watchers.items() if t is not None and n) if probe else ()
            launched = (self._batch.launch(probe=probe, entropy_taus=taus), self._running[:])
        pending, self._pending = self._pending, launched
        if pending is not None:
            events += self._finish(*pending)
        if self.pipeline == 0 and launched is not None:
            self._pending = None
            events += self._finish(*launched)
        return events

    def _finish(self, pending: PendingStep, requests: list[_Request]) -> list[RequestEvent]:
        """Events of a launched step: requests[i] ran in slot i when it was launched."""
        out = self._batch.collect(pending)
        events, done = [], []
        for slot, r in enumerate(requests):
            if r.seq.finish_reason is not None:  # ended after the launch (aborted, or one step earlier)
                continue
            try:
                ev = self._event(r, slot, out)
            except Exception as e:  # one request's failure (say, its text decoding) ends only that request
                r.seq.finish_reason = "error"
                ev = RequestEvent(r.seq.id, [], "", True, "error", error=f"{type(e).__name__}: {e}")
            events.append(ev)
            if ev.finished:
                done.append(r)
        for r in sorted(done, key=lambda r: r.seq.slot, reverse=True):  # what moves into a hole still runs
            self._release(r.seq.slot)
        return events

    def _admit(self) -> list[RequestEvent]:
        """Move queued requests into free slots (one batched prefill). If that fails, each is
        admitted alone, so a request that cannot start fails by itself; returns its events."""
        if not self._queue:
            return []
        free = self._batch.free_slots()
        group = [self._queue.popleft() for _ in range(min(len(free), len(self._queue)))]
        if not group:
            return []
        try:
            self._start(group)
            return []
        except Exception:  # noqa: BLE001 — find the request that cannot start, fail only it
            pass
        events = []
        for r in group:
            try:
                self._start([r])
            except Exception as e:  # noqa: BLE001
                r.seq.finish_reason = "error"
                events.append(RequestEvent(r.seq.id, [], "", True, "error",
                                           error=f"could not start: {type(e).__name__}: {e}"))
        return events

    def _start(self, group: list[_Request]) -> None:
        slots = self._batch.free_slots()[:len(group)]
        self._batch.admit([(slot, r.vectors if r.vectors is not None else r.seq.prompt_ids, r.seq.gen, r.watched)
                           for slot, r in zip(slots, group)])
        for slot, r in zip(slots, group):  # only once the batch holds them
            r.seq.slot = slot
            self._running.append(r)
            if r.watched:
                self._watchers[r.entropy_tau if r.return_stats else None] += 1
                self._n_watched += 1

    def _release(self, slot: int) -> None:
        r = self._running[slot]
        moved = self._batch.release(slot, failed=r.seq.finish_reason == "error")
        if r.watched:
            self._watchers[r.entropy_tau if r.return_stats else None] -= 1
            self._n_watched -= 1
        last = self._running.pop()  # the last one moves into the hole, as in the batch
        if moved is not None:
            last.seq.slot = slot
            self._running[slot] = last

    def _event(self, r: _Request, slot: int, out: StepOutput) -> RequestEvent:
        seq = r.seq
        committed, text = seq.advance(out.committed[slot])
        reason = seq.finish_reason
        ev = RequestEvent(seq.id, committed, text, reason is not None, reason)
        if not (r.watched or r.return_vectors):
            return ev
        K = seq.gen.tail
        if r.return_tail:
            ev.tail_token_ids = out.tail_ids[slot][:K]
        if r.return_stats:
            ev.tail_entropy = out.tail_entropy[r.entropy_tau][slot][:K]
            ev.delta_norm = out.delta_norm[slot][:K]
        if r.return_vectors and committed:
            if self._host_table is None:  # a host copy once: a device read per event would sync
                self._host_table = self.model.table.weight.detach().float().cpu()
            ev.vectors = self._host_table[committed]
        return ev

    @_exclusive
    def fail_running(self, message: str) -> list[RequestEvent]:
        """End every running request with an error (after a failed step); queued ones stay.
        Never raises: if freeing a slot fails too, every slot is reset and scrubbed."""
        self._pending = None  # whatever was in flight is in doubt: its requests end here
        events = []
        while self._running:
            slot = len(self._running) - 1
            r = self._running[slot]
            r.seq.finish_reason = "error"
            events.append(RequestEvent(r.seq.id, [], "", True, "error", error=message))
            try:
                self._release(slot)
            except Exception:  # noqa: BLE001 — the batch state is in doubt: start it over
                self._running.pop()
                break
        if self._running or self._batch.n_active:
            for r in self._running:
                r.seq.finish_reason = "error"
                events.append(RequestEvent(r.seq.id, [], "", True, "error", error=message))
            self._running.clear()
            self._batch.reset()
            self._watchers.clear()
            self._n_watched = 0
        return events

    # -- start-up ----------------------------------------------------------------------
    @_exclusive
    def warmup(self, on_variant: Callable[[int, int], None] | None = None) -> int:
        """Compile every step variant now, not under the first requests: each row bucket × span
        bucket × step kind (front-only, tail, guided tail), each run often enough that CUDA graphs
        (mode="reduce-overhead") are captured too. Only while nothing runs; a no-op for an eager
        engine. on_variant(done, total) after each. Returns the number of variants."""
        if not self.compiled:
            return 0
        if self._running or self._pending:
            raise RuntimeError("warmup() needs an idle engine")
        b = self._batch
        kinds = [k for k in STEP_KINDS if self.k_window > 1 or k == "front_only"]
        plan = [(rows, span, kind) for rows in b.rows for span in b.spans for kind in kinds]
        repeats = 3 if "reduce-overhead" in (self.compile_mode or "") else 1  # warm-up run, then capture
        for i, (rows, span, kind) in enumerate(plan):
            flags = dict(front_only=kind == "front_only", guided=kind == "guided", history=True, tail_noise=True,
                         keep_tail=kind != "front_only")
            with torch.inference_mode():  # as DecodeBatch.launch runs it (the mode is part of a graph's guards)
                for _ in range(repeats):
                    b.run_step(rows, span, flags)
            if on_variant is not None:
                on_variant(i + 1, len(plan))
        b.reset()  # the runs wrote into unused slots: leave them as new
        return len(plan)

    def run(self) -> Iterator[RequestEvent]:
        """Step until every request is done, yielding events as they come."""
        while self.has_work:
            yield from self.step()

    async def arun(self) -> AsyncIterator[RequestEvent]:
        """Async form of run(): each step runs in a worker thread, the event loop stays free."""
        while self.has_work:
            for ev in await asyncio.to_thread(self.step):
                yield ev
