"""HTTP endpoint over the engine: OpenAI-style /v1/completions (+ SSE streaming), /health.

One background thread owns the Engine and steps it while there is work; request
handlers hand prompts to it under a lock and read their events from an asyncio
queue. A failure while serving one request ends that request, never the others.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .config import ConfigError, GenerationConfig
from .engine import Engine, GenerationError, QueueFullError, RequestEvent

# API field ← GenerationConfig field, for error messages that name what the client sent
API_NAMES = {"max_new_tokens": "max_tokens"}


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | list[int]
    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int = 0
    # tmfast extras
    tail: int = Field(16, ge=1)
    guidance: float = 1.0
    alpha_max: float | None = None
    embryo_scale: float | None = None
    history_noise: float | None = None
    tail_noise: float | None = None
    return_tail: bool = False
    # OpenAI sampling fields: Token Maturation decodes by argmax, so these are accepted
    # and ignored (clients send them by default); n and best_of must be 1
    temperature: float | None = None
    top_p: float | None = None
    n: Literal[1] = 1
    best_of: Literal[1] | None = None
    user: str | None = None


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param}})


class EngineLoop:
    """Runs engine.step() in one thread; routes each event to its request's queue."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.lock = threading.Lock()  # serialises every call into the engine
        # Clients waiting for the lock. A plain lock is not fair: the loop thread would take it
        # back right after each step and a submit could wait many steps (batches of ~2 under 32
        # concurrent clients, measured). After a step the loop lets every waiting client in first.
        self.waiting = 0
        self.turn = threading.Condition()
        self.wake = threading.Event()
        self.routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="tmfast-engine", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self._stop = True
        self.wake.set()
        self.thread.join(timeout=10)

    def submit(self, prompt, gen: GenerationConfig, return_tail: bool) -> tuple[str, asyncio.Queue, int]:
        """Queue a request; returns (id, its event queue, prompt length in tokens)."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._client_turn():
            rid = self.engine.add_request(prompt, gen, request_id=f"cmpl-{uuid.uuid4().hex[:24]}",
                                          return_tail=return_tail)
            n_prompt = self.engine.request(rid).prompt_tokens
            self.routes[rid] = (asyncio.get_running_loop(), queue)
        self.wake.set()
        return rid, queue, n_prompt

    def abort(self, rid: str) -> None:
        with self._client_turn():
            self.engine.abort(rid)
            self.routes.pop(rid, None)

    @contextlib.contextmanager
    def _client_turn(self):
        with self.turn:
            self.waiting += 1
        try:
            with self.lock:
                yield
        finally:
            with self.turn:
                self.waiting -= 1
                self.turn.notify_all()

    def _deliver(self, ev: RequestEvent) -> None:
        route = self.routes.get(ev.request_id)
        if route is None:
            return
        if ev.finished:
            self.routes.pop(ev.request_id, None)
        loop, queue = route
        try:
            loop.call_soon_threadsafe(queue.put_nowait, ev)
        except RuntimeError:  # the client's event loop is gone
            pass

    def _run(self):
        while not self._stop:
            self.wake.wait(timeout=0.5)
            with self.lock:
                if not self.engine.has_work:
                    self.wake.clear()
                    continue
                try:
                    events = self.engine.step()
                except Exception as e:  # a broken step ends the requests in it; the server lives on
                    events = self.engine.fail_running(f"engine step failed: {e}")
                for ev in events:
                    self._deliver(ev)
            with self.turn:  # clients that queued up during the step go before the next one
                self.turn.wait_for(lambda: self.waiting == 0, timeout=1.0)


def create_app(engine: Engine, model_name: str = "tmfast") -> FastAPI:
    loop = EngineLoop(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop.start()
        yield
        loop.stop()

    app = FastAPI(title="tmfast", version="0.1.0", lifespan=lifespan)
    app.state.engine_loop = loop

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        if err.get("type") == "json_invalid":
            return _error(400, "request body is not valid JSON")
        if err.get("type") == "extra_forbidden":
            return _error(400, f"unknown field {param!r}", param)
        return _error(400, f"{param or 'body'}: {err.get('msg')}", param)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "running": engine.num_running,
                "queued": engine.num_queued, "max_batch": engine.max_batch}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        try:
            gen = GenerationConfig().overriding(
                max_new_tokens=body.max_tokens, tail=body.tail, guidance=body.guidance, seed=body.seed, stop=stop,
                alpha_max=body.alpha_max, embryo_scale=body.embryo_scale, history_noise=body.history_noise,
                tail_noise=body.tail_noise)
            rid, queue, n_prompt = loop.submit(body.prompt, gen, body.return_tail)
        except QueueFullError as e:
            return _error(429, str(e), None, "queue_full")
        except (ConfigError, GenerationError) as e:
            param = API_NAMES.get(e.param, e.param)
            return _error(400, str(e), param)
        created = int(time.time())

        def chunk(text, finish_reason, ev: RequestEvent | None):
            choice = {"index": 0, "text": text, "finish_reason": finish_reason}
            if ev is not None:
                choice["token_ids"] = ev.token_ids
                if ev.tail_tokens is not None:
                    choice["tail"] = [engine.tokenizer.decode([t]) for t in ev.tail_tokens[1:]]
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [choice]}

        def openai_reason(ev: RequestEvent):
            return {"eos": "stop", "stop": "stop", "length": "length"}.get(ev.finish_reason, ev.finish_reason)

        if body.stream:
            async def sse():
                done = False
                try:
                    while not done:
                        ev = await queue.get()
                        done = ev.finished
                        yield f"data: {json.dumps(chunk(ev.text, openai_reason(ev) if done else None, ev))}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    if not done:  # the client went away before the end: free its slot
                        loop.abort(rid)
            return StreamingResponse(sse(), media_type="text/event-stream")

        pieces, ids, last = [], [], None
        try:
            while True:
                ev = await queue.get()
                pieces.append(ev.text)
                ids.extend(ev.token_ids)
                last = ev
                if ev.finished:
                    break
        except asyncio.CancelledError:
            loop.abort(rid)
            raise
        if last.finish_reason in ("error", "abort"):
            return _error(500, last.error or "request aborted", None, "engine_error")
        out = chunk("".join(pieces), openai_reason(last), None)
        out["choices"][0]["token_ids"] = ids
        out["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": len(ids),
                        "total_tokens": n_prompt + len(ids)}
        return out

    return app


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "tmfast") -> None:
    import uvicorn
    uvicorn.run(create_app(engine, model_name), host=host, port=port, log_level="info")
