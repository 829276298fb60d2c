"""EngineLoop: the one thread that steps the Engine and routes each event to its request.

Request handlers hand prompts to it under a lock (between steps, every waiting client first)
and read their events from an asyncio queue. Nothing a request does may end the loop: every
step and every delivery is wrapped, a failed step ends only the requests it was running (and
if the engine cannot even say which, every request the engine no longer knows gets an error
event, so no client waits forever). The loop beats a heartbeat each iteration; `health()` says
whether it is alive, stuck in a step, or failing step after step.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from typing import Callable

from ..config import GenerationConfig
from ..engine import Engine, RequestEvent

log = logging.getLogger("tmfast.server")
SELF_CHECK = "self-check-"  # the loop's own requests (see EngineLoop._self_check)


class EngineUnavailable(RuntimeError):
    """The engine loop is not running, is still starting, or has held the engine too long:
    nothing can be queued. `code` says which."""

    def __init__(self, message: str, code: str = "engine_unavailable"):
        super().__init__(message)
        self.code = code


class Sink:
    """Where one HTTP request's events go: an asyncio queue on the handler's event loop, fed from
    the loop thread. Several engine requests (a list of prompts) can share one sink."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> bool:
        """From any thread; False when the handler's event loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:
            return False


class EngineLoop:
    """Runs engine.step() in one thread while there is work; routes events to their sinks.

    stall_after: seconds without a heartbeat, while there is work, before health() says the
    loop is stuck (and before a client gives up waiting for the engine lock); failing_after:
    consecutive failed steps before health() says the engine is failing. on_step(seconds,
    failed) is called after every step (metrics)."""

    def __init__(self, engine: Engine, *, stall_after: float = 60.0, failing_after: int = 5,
                 on_step: Callable[[float, bool], None] | None = None, warmup: bool = False):
        self.engine = engine
        # warmup: compile every step variant (Engine.warmup) in the loop thread before serving;
        # until it is done the loop is "starting": /health says so and nothing is queued
        self.warmup, self.starting = warmup, warmup
        self.progress = "0 step variants"
        self.stall_after, self.failing_after, self.on_step = stall_after, failing_after, on_step
        self.lock = threading.Lock()  # serialises every call into the engine
        # Clients waiting for the lock. A plain lock is not fair: the loop thread would take it
        # back right after each step and a submit could wait many steps (batches of ~2 under 32
        # concurrent clients, measured). After a step the loop lets every waiting client in first.
        self.waiting = 0
        self.turn = threading.Condition()
        self.wake = threading.Event()
        self.routes: dict[str, Sink] = {}
        self.aborts: deque[str] = deque()  # ids to abort at the next iteration (abort_soon)
        self.beat = time.monotonic()  # the heartbeat: the start of the loop's latest iteration
        self.failures = 0  # consecutive failed steps
        # a model that can only fail must not look healthy, and hostile requests must not make a good
        # one look broken: after failing_after requests in a row end in an engine error, a plain
        # self-check request (one token, default settings) decides
        self.request_failures = 0
        self.last_request_error: str | None = None
        self.model_broken = False
        self._self_checks = itertools.count()
        self.last_error: str | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="tmfast-engine", daemon=True)

    # -- life ------------------------------------------------------------------------------
    def start(self):
        self.beat = time.monotonic()
        self.thread.start()

    def stop(self, timeout: float = 10.0):
        self.stopping = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=timeout)

    @property
    def running(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def health(self) -> tuple[bool, str | None, str | None]:
        """(healthy, why not, code): dead thread, no heartbeat for stall_after s while there is
        work, or failing_after failed steps in a row are unhealthy: restart the server. While the
        step is still compiling at start-up: not yet healthy, code engine_starting."""
        if not self.thread.is_alive():
            return False, "the engine loop is not running", "engine_dead"
        if self.starting:
            return False, f"the engine is starting (compiling its step: {self.progress})", "engine_starting"
        quiet = time.monotonic() - self.beat
        if quiet > self.stall_after and self.engine.has_work:
            return False, f"the engine loop has not stepped for {quiet:.0f} s", "engine_stuck"
        if self.failures >= self.failing_after:
            return False, f"the last {self.failures} engine steps failed: {self.last_error}", "engine_failing"
        if self.model_broken:  # steps run, but requests fail, and so does a plain self-check request
            return False, (f"requests fail in the engine, a plain self-check too: {self.last_request_error}"),\
                "engine_failing"
        return True, None, None

    # -- what request handlers call (any thread) -------------------------------------------
    def submit(self, prompt, gen: GenerationConfig, return_tail: bool, *, request_id: str | None = None,
               sink: Sink | None = None) -> tuple[str, asyncio.Queue, int]:
        """Queue one request; returns (id, its event queue, prompt length in tokens)."""
        sink = sink or Sink()
        [(rid, n_prompt)] = self.submit_many([(prompt, gen, return_tail, request_id)], sink)
        return rid, sink.queue, n_prompt

    def submit_many(self, items: list[tuple], sink: Sink) -> list[tuple[str, int]]:
        """Queue (prompt, gen, return_tail, request_id) items, all or none; their events go to sink.
        Returns [(id, prompt length in tokens)]. Raises what add_request raises, or EngineUnavailable."""
        if not self.running:
            raise EngineUnavailable("the engine loop is not running")
        if self.starting:
            raise EngineUnavailable(f"the engine is starting (compiling its step: {self.progress}); retry shortly",
                                    "engine_starting")
        out: list[tuple[str, int]] = []
        queued: list[str] = []
        with self._client_turn():
            try:
                for prompt, gen, return_tail, request_id in items:
                    rid = self.engine.add_request(prompt, gen, request_id=request_id, return_tail=return_tail)
                    queued.append(rid)
                    self.routes[rid] = sink
                    out.append((rid, self.engine.request(rid).prompt_tokens))
            except BaseException:
                for rid in queued:  # all or none: take back the ones already queued
                    self.routes.pop(rid, None)
                    self._abort_quietly(rid)
                raise
        self.wake.set()
        return out

    def abort(self, rid: str) -> None:
        """End a request now (waits for the engine between steps)."""
        with self._client_turn():
            self.routes.pop(rid, None)
            self._abort_quietly(rid)

    def abort_soon(self, rid: str) -> None:
        """End a request at the loop's next iteration, without waiting (safe from an event loop)."""
        self.aborts.append(rid)
        self.wake.set()

    @contextlib.contextmanager
    def _client_turn(self):
        with self.turn:
            self.waiting += 1
        try:
            if not self.lock.acquire(timeout=self.stall_after):
                raise EngineUnavailable(f"the engine has been busy for over {self.stall_after:.0f} s")
            try:
                yield
            finally:
                self.lock.release()
        finally:
            with self.turn:
                self.waiting -= 1
                self.turn.notify_all()

    # -- the loop thread -------------------------------------------------------------------
    def _start_up(self) -> None:
        """Compile every step variant before the first request (the loop is "starting" meanwhile)."""
        def progress(done: int, total: int) -> None:
            self.progress = f"{done}/{total} step variants"
            self.beat = time.monotonic()
        t0 = time.monotonic()
        try:
            with self.lock:
                n = self.engine.warmup(progress)
            log.info("engine ready: %d step variants compiled in %.0f s", n, time.monotonic() - t0)
        except BaseException as e:  # a step that cannot compile cannot serve: say so in /health
            self.failures = self.failing_after
            self._note_failure(e)
            log.exception("compiling the engine's step failed")
        finally:
            self.starting = False

    def _run(self):
        if self.warmup:
            self._start_up()
        try:
            while not self.stopping:
                self.beat = time.monotonic()
                self.wake.wait(timeout=0.25)
                if self.stopping:
                    break
                stepped = False
                try:
                    stepped = self._iteration()
                except BaseException as e:  # survive anything, even a bug of ours or a Rust panic
                    self._note_failure(e)
                    log.exception("engine loop iteration failed")
                if stepped:
                    self._hand_over()
                if self.failures:  # an engine failing step after step must not spin a core
                    time.sleep(min(0.5, 0.005 * 2 ** min(self.failures, 7)))
        finally:
            if self.stopping:
                self._close_routes("abort", "the server is shutting down")
            else:
                self._close_routes("error", "the engine loop stopped")

    def _iteration(self) -> bool:
        """Apply aborts, step once if there is work, deliver. True when a step ran."""
        with self.lock:
            while self.aborts:
                self._abort_quietly(self.aborts.popleft())
            if not self.engine.has_work:
                self.wake.clear()
                if self.routes:  # requests the engine no longer knows: they will get no event
                    self._deliver_all(self._lost("the request was lost by the engine"))
                return False
            t0 = time.perf_counter()
            failed = False
            try:
                events = self.engine.step()
                self.failures = 0
            except BaseException as e:  # a broken step ends the requests in it; the server lives on
                failed = True
                self._note_failure(e)
                msg = f"engine step failed: {type(e).__name__}: {e}"
                log.error("%s", msg)
                try:
                    events = list(self.engine.fail_running(msg))
                except BaseException as e2:
                    log.exception("fail_running failed too (%s); ending the requests the engine lost", e2)
                    events = []
                seen = {ev.request_id for ev in events}
                events += [ev for ev in self._lost(msg) if ev.request_id not in seen]
            dt = time.perf_counter() - t0
            self._deliver_all(events)
        if self.on_step is not None:
            try:
                self.on_step(dt, failed)
            except Exception:
                log.exception("on_step hook failed")
        return True

    def _note_failure(self, e: BaseException) -> None:
        self.failures += 1
        self.last_error = f"{type(e).__name__}: {e}"[:500]

    def _lost(self, message: str) -> list[RequestEvent]:
        """Error events for routed requests the engine no longer knows (queued or running)."""
        lost = []
        for rid in list(self.routes):
            try:
                self.engine.request(rid)
            except Exception:  # KeyError: gone; anything else: the engine cannot vouch for it
                lost.append(RequestEvent(rid, [], "", True, "error", error=message))
        return lost

    def _abort_quietly(self, rid: str) -> None:
        try:
            self.engine.abort(rid)
        except Exception:
            log.exception("abort of %s failed", rid)

    def _deliver_all(self, events) -> None:
        for ev in events:
            try:
                self._deliver(ev)
            except Exception:
                log.exception("delivering an event of %s failed", getattr(ev, "request_id", "?"))

    def _deliver(self, ev: RequestEvent) -> None:
        if ev.finished:
            self._note_outcome(ev)
        sink = self.routes.get(ev.request_id)
        if sink is None:
            return
        if ev.finished:
            self.routes.pop(ev.request_id, None)
        if not sink.put(ev):  # the handler's event loop is gone: nobody reads the rest (the request
            self.routes.pop(ev.request_id, None)  # runs on to its end; HTTP handlers abort what they leave)

    def _note_outcome(self, ev: RequestEvent) -> None:
        check = ev.request_id.startswith(SELF_CHECK)
        if ev.finish_reason in ("eos", "stop", "length"):
            self.request_failures, self.model_broken = 0, False
        elif ev.finish_reason == "error":
            self.last_request_error = (ev.error or "")[:300]
            if check:
                self.model_broken = True
            else:
                self.request_failures += 1
                if self.request_failures == self.failing_after:
                    self._self_check()

    def _self_check(self) -> None:
        """Queue one plain request (under the loop's lock: called while delivering)."""
        try:
            tail = min(GenerationConfig().tail, self.engine.k_window)
            self.engine.add_request([0], GenerationConfig(max_new_tokens=1, stop_at_eos=False, tail=tail),
                                    request_id=f"{SELF_CHECK}{next(self._self_checks)}")
        except Exception as e:  # noqa: BLE001 — a full queue: the next failure tries again
            log.warning("self-check not queued (%s); the next failing request tries again", e)
            self.request_failures -= 1

    def _hand_over(self) -> None:
        with self.turn:  # clients that queued up during the step go before the next one
            self.turn.wait_for(lambda: self.waiting == 0, timeout=1.0)

    def _close_routes(self, reason: str, message: str) -> None:
        """The loop is ending: every request still routed gets a last event, none waits forever."""
        locked = self.lock.acquire(timeout=5.0)
        try:
            for rid, sink in list(self.routes.items()):
                self.routes.pop(rid, None)
                if locked:
                    self._abort_quietly(rid)
                sink.put(RequestEvent(rid, [], "", True, reason, error=message))
        finally:
            if locked:
                self.lock.release()
