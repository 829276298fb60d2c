"""Continuous batching: requests join and leave a running batch; one event per request per step."""
from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator

import torch

from csrc_triton import resolve_impl

from ..config import GenerationConfig
from ..model import TMModel
from .requests import GenerationError, QueueFullError, Sequence, check_fits, max_prompt_chars, prompt_vectors
from .slots import DecodeBatch, StepOutput
from .step import decode_step_tensors


def check_impl(impl: str | None, device: torch.device) -> None:
    """Fail at construction, in one line, when the kernel implementation asked for cannot run here."""
    try:
        resolve_impl(impl, device, "tmfast")
    except (RuntimeError, ValueError) as e:
        raise GenerationError(str(e), "impl") from None


@dataclass
class RequestEvent:
    """What one request did in one engine step."""
    request_id: str
    token_ids: list[int]  # committed this step (empty when the step committed EOS or nothing)
    text: str  # new text to append
    finished: bool = False
    finish_reason: str | None = None  # "eos" | "stop" | "length" | "abort" | "error"
    tail_tokens: list[int] | None = None  # nearest token per tail slot (return_tail)
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
    vectors: torch.Tensor
    return_tail: bool
    return_stats: bool
    return_vectors: bool
    entropy_tau: float

    @property
    def watched(self) -> bool:  # it reads its tail: the tail must be stepped even when inert
        return self.return_tail or self.return_stats


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
                 entropy_tau: float = 1.0, track_text: bool = True):
        if isinstance(model, (str, Path)):
            from ..checkpoint import load_checkpoint
            model, loaded_tok = load_checkpoint(model)
            tokenizer = tokenizer or loaded_tok
        cfg = model.config
        check_impl(impl, model.table.weight.device)
        if not 1 <= k_window <= cfg.k_max:
            raise GenerationError(f"k_window must lie in [1, k_max={cfg.k_max}], got {k_window}")
        if max_batch < 1 or max_queue < 0:
            raise GenerationError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_len = max_len or cfg.n_positions + k_window - 1
        # a text longer than this cannot fit, whatever it tokenises to (checked before tokenising)
        self.max_prompt_chars = max_prompt_chars(model, tokenizer) if tokenizer is not None else None
        # defaults for requests that do not say
        self.max_queue, self.entropy_tau, self.track_text = max_queue, entropy_tau, track_text
        step_fn = decode_step_tensors
        if compile:
            # one graph per (row bucket, step kind, noises in use): 1, 2, 4, … max_batch rows
            # × {front-only, tail, guided tail, kept (probed) tail} × history noise × tail noise
            variants = 24 * (max_batch.bit_length() + 1)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, variants)
            step_fn = torch.compile(decode_step_tensors, fullgraph=True, dynamic=False, mode=compile_mode)
        self._batch = DecodeBatch(model, max_batch, self.max_len, k_window, step_fn, impl, bounded_span=not compile)
        self._queue: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}  # slot → request
        self._aborted: list[RequestEvent] = []
        self._ids = itertools.count()

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
    def has_work(self) -> bool:
        return bool(self._queue or self._running or self._aborted)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    # -- requests ----------------------------------------------------------------------
    def add_request(self, prompt, params: GenerationConfig | dict | None = None, *,
                    request_id: str | None = None, return_tail: bool = False, return_stats: bool = False,
                    return_vectors: bool = False, track_text: bool | None = None,
                    entropy_tau: float | None = None) -> str:
        """Queue a request; it joins the batch at the next step with a free slot. Returns its id.
        track_text: decode text every step (stop strings imply it; default: the engine's);
        entropy_tau: τ of the per-slot entropy that return_stats reports (default: the engine's)."""
        g = params if isinstance(params, GenerationConfig) else GenerationConfig.from_dict(params or {})
        ids, vectors = prompt_vectors(self.model, self.tokenizer, prompt, self.max_prompt_chars)
        check_fits(self.model.config, len(vectors), g, self.max_len, self.k_window)
        if g.stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer", "stop")
        tau = self.entropy_tau if entropy_tau is None else entropy_tau
        if not (isinstance(tau, (int, float)) and tau > 0):
            raise GenerationError(f"entropy_tau must be a positive number, got {tau!r}", "entropy_tau")
        if len(self._queue) >= self.max_queue:  # after validation: a bad request hears what is wrong
            raise QueueFullError(f"request queue is full ({self.max_queue} waiting); retry later")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if any(r.seq.id == rid for r in itertools.chain(self._queue, self._running.values())):
            raise GenerationError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, ids, len(vectors), g, self.tokenizer, self.model.config.eos_token_id,
                       self.track_text if track_text is None else track_text)
        self._queue.append(_Request(seq, vectors, return_tail, return_stats, return_vectors, float(tau)))
        return rid

    def request(self, request_id: str) -> RequestView:
        """A read-only view of a queued or running request (it stays valid after the request ends)."""
        for r in itertools.chain(self._queue, self._running.values()):
            if r.seq.id == request_id:
                return RequestView(r.seq)
        raise KeyError(f"no queued or running request {request_id!r}")

    def abort(self, request_id: str) -> bool:
        """End a request now (queued or running); its last event has finish_reason 'abort'."""
        for r in list(self._queue):
            if r.seq.id == request_id:
                self._queue.remove(r)
                break
        else:
            for slot, r in list(self._running.items()):
                if r.seq.id == request_id:
                    self._release(slot)
                    break
            else:
                return False
        r.seq.finish_reason = "abort"
        self._aborted.append(RequestEvent(request_id, [], r.seq.text_delta(), True, "abort"))
        return True

    # -- the loop ----------------------------------------------------------------------
    def step(self) -> list[RequestEvent]:
        """Admit what fits, advance every running request by one step, return their events."""
        events, self._aborted = self._aborted, []
        events += self._admit()
        if not self._running:
            return events
        running = self._running.values()
        taus = sorted({r.entropy_tau for r in running if r.return_stats})
        out = self._batch.step(probe=any(r.watched for r in running), entropy_taus=taus)
        done = []
        for slot, r in sorted(self._running.items()):
            try:
                ev = self._event(r, slot, out)
            except Exception as e:  # one request's failure (say, its text decoding) ends only that request
                r.seq.finish_reason = "error"
                ev = RequestEvent(r.seq.id, [], "", True, "error", error=f"{type(e).__name__}: {e}")
            events.append(ev)
            if ev.finished:
                done.append(slot)
        for slot in reversed(done):  # highest first: what moves into a hole is still running
            self._release(slot)
        return events

    def _admit(self) -> list[RequestEvent]:
        """Move queued requests into free slots (one batched prefill). If that fails, each is
        admitted alone, so a request that cannot start fails by itself; returns its events."""
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
        self._batch.admit([(slot, r.vectors, r.seq.gen, r.watched) for slot, r in zip(slots, group)])
        for slot, r in zip(slots, group):  # only once the batch holds them
            r.seq.slot = slot
            self._running[slot] = r

    def _release(self, slot: int) -> None:
        failed = self._running[slot].seq.finish_reason == "error"
        del self._running[slot]
        moved = self._batch.release(slot, failed)
        if moved is not None:
            r = self._running.pop(moved)
            r.seq.slot = slot
            self._running[slot] = r

    def _event(self, r: _Request, slot: int, out: StepOutput) -> RequestEvent:
        seq = r.seq
        seq.commit(out.committed[slot])
        committed = seq.token_ids[-1:] if seq.finish_reason != "eos" else []
        ev = RequestEvent(seq.id, committed, seq.text_delta() if seq.track_text or seq.finished else "",
                          seq.finished, seq.finish_reason)
        K = seq.gen.tail
        if r.return_tail:
            ev.tail_tokens = out.tail_ids[slot][:K]
        if r.return_stats:
            ev.tail_entropy = out.tail_entropy[r.entropy_tau][slot, :K].tolist()
            ev.delta_norm = out.delta_norm[slot, :K].tolist()
        if r.return_vectors and committed:
            ev.vectors = self.model.table.weight[committed].detach().cpu()
        return ev

    def fail_running(self, message: str) -> list[RequestEvent]:
        """End every running request with an error (after a failed step); queued ones stay.
        Never raises: if freeing a slot fails too, every slot is reset and scrubbed."""
        events = []
        for slot in sorted(self._running, reverse=True):
            r = self._running[slot]
            r.seq.finish_reason = "error"
            events.append(RequestEvent(r.seq.id, [], "", True, "error", error=message))
            try:
                self._release(slot)
            except Exception:  # noqa: BLE001 — the batch state is in doubt: start it over
                self._running.pop(slot, None)
        if self._running or self._batch.n_active:
            for r in self._running.values():
                r.seq.finish_reason = "error"
                events.append(RequestEvent(r.seq.id, [], "", True, "error", error=message))
            self._running.clear()
            self._batch.reset()
        return events

    def run(self) -> Iterator[RequestEvent]:
        """Step until every request is done, yielding events as they come."""
        while self.has_work:
            yield from self.step()

    async def arun(self) -> AsyncIterator[RequestEvent]:
        """Async form of run(): each step runs in a worker thread, the event loop stays free."""
        while self.has_work:
            for ev in await asyncio.to_thread(self.step):
                yield ev
