"""create_app: the routes over one EngineLoop.

  POST /v1/completions   OpenAI completions (+ SSE streaming), one engine request per prompt
  GET  /v1/models        the one model, OpenAI list format (+ /v1/models/{id})
  GET  /health           200 while the engine loop is alive and stepping, else 503
  GET  /metrics          Prometheus text format

Work is bounded before admission: the body size (BodyLimit, 413), then the prompt's length in
characters and in tokens, counted off the event loop and outside the engine lock, before
anything is embedded (400 naming `prompt`). A client that goes away is aborted, streaming or
not. One log line per completion request: its id, outcome, tokens and duration.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from ..config import ConfigError
from ..engine import Engine, GenerationError, QueueFullError, RequestEvent, prompt_ids
from .loop import EngineLoop, EngineUnavailable, Sink
from .metrics import ServerMetrics
from .protocol import (ApiError, AsciiJSONResponse, CompletionRequest, api_message, api_name, check_supported,
                       error_body,
                       generation_config, openai_finish_reason, split_prompts, sse, validation_error)

log = logging.getLogger("tmfast.server")
COMPLETIONS = "/v1/completions"
OUTCOME_OF_STATUS = {400: "invalid", 413: "too_large", 429: "queue_full", 499: "disconnected", 503: "unavailable"}
DISCONNECTED = object()  # put in a request's sink when its client goes away


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 before any handler reads it.
    A declared (Content-Length) or streamed (chunked) body is drained, up to `drain` bytes, so the
    client reads the 413 rather than a reset connection; nothing over the limit is kept."""

    def __init__(self, app, limit: int, on_reject=None, drain: int = 64 << 20, on_disconnect=None):
        self.app, self.limit, self.on_reject, self.drain = app, limit, on_reject, drain
        self.on_disconnect = on_disconnect  # (scope) a client that hung up before its body was whole

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send, more=True)
        chunks, size, pending = [], 0, []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # gone mid-body: nothing to answer, nobody to answer
                if self.on_disconnect is not None:
                    self.on_disconnect(scope)
                return
            if message["type"] != "http.request":
                pending.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._reject(scope, receive, send, more=message.get("more_body", False))
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        pending.insert(0, {"type": "http.request", "body": b"".join(chunks), "more_body": False})

        async def replay():
            return pending.pop(0) if pending else await receive()
        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send, more: bool):
        drained = 0
        while more and drained <= self.drain:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        rid = new_request_id()
        if self.on_reject is not None:
            self.on_reject(scope, rid)
        err = ApiError(413, f"request body exceeds the limit of {self.limit} bytes", None,
                       code="body_too_large", headers={"x-request-id": rid})
        await err.response()(scope, receive, send)


class ClosingStream(StreamingResponse):
    """A StreamingResponse that calls `on_close` however it ends: a client that disconnects before
    the first chunk cancels the response before its generator ever runs (so no `finally` in it)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class PromptLimits:
    """The engine's prompt checks (tmfast.engine.prompt_ids: valid Unicode, not empty, a text too
    long to fit refused before it is tokenised, at most the context in tokens), run in a worker
    thread before the engine sees the prompt: tokenising never blocks the event loop and holds no
    engine lock. max_chars may only lower the engine's own character bound."""

    def __init__(self, engine: Engine, max_chars: int | None):
        self.model, self.tokenizer = engine.model, engine.tokenizer
        bounds = [n for n in (engine.max_prompt_chars, max_chars) if n is not None]
        self.max_chars = min(bounds) if bounds else None

    async def token_ids(self, prompt) -> list[int]:
        try:
            return await run_in_threadpool(prompt_ids, self.model, self.tokenizer, prompt, self.max_chars)
        except GenerationError as e:
            code = "context_length_exceeded" if "does not fit" in str(e) else None
            raise ApiError(400, str(e), e.param or "prompt", code=code) from None
        except Exception as e:  # noqa: BLE001 — whatever the tokenizer raises is this prompt's problem
            raise ApiError(400, f"prompt could not be tokenised: {type(e).__name__}", "prompt") from None


def new_request_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


async def watch_disconnect(request: Request, sink: Sink) -> None:
    """Wait for the client to go away (the body is already read), then wake the handler."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                break
    except Exception:  # the server can no longer say: treat it as gone
        pass
    sink.queue.put_nowait(DISCONNECTED)


def create_app(engine: Engine, model_name: str = "tmfast", *, max_body_bytes: int = 1 << 20,
               max_prompt_chars: int | None = None, stall_after: float = 60.0, retry_after: int = 1,
               warmup: bool = False) -> FastAPI:
    """The HTTP app over `engine`. max_body_bytes: larger request bodies get a 413; max_prompt_chars:
    longer text prompts get a 400 before tokenising (default: context × the longest token);
    stall_after: seconds without an engine-loop heartbeat (while there is work) before /health
    says 503; retry_after: the Retry-After seconds of a 429 (and of a 503 while starting); warmup:
    compile every step variant (a compiled engine) before serving, /health 503 "starting" until then."""
    loop = EngineLoop(engine, stall_after=stall_after, warmup=warmup)
    metrics = ServerMetrics(engine, loop)
    loop.on_step = metrics.on_step
    limits = PromptLimits(engine, max_prompt_chars)
    started = int(time.time())
    context = engine.model.config.n_positions

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop.start()
        yield
        loop.stop()

    app = FastAPI(title="tmfast", version="0.1.0", lifespan=lifespan, default_response_class=AsciiJSONResponse)
    app.state.engine_loop, app.state.metrics, app.state.limits = loop, metrics, limits

    def note(rid: str, outcome: str, status: int, t0: float, *, prompts=0, prompt_tokens=0, tokens=0,
             finish=None, error=None) -> None:
        """The one log line (and outcome count) of a completion request."""
        metrics.requests.labels(outcome).inc()
        duration = time.perf_counter() - t0
        if outcome == "ok":
            metrics.duration.observe(duration)
        log.info("request %s outcome=%s status=%d prompts=%d prompt_tokens=%d completion_tokens=%d finish=%s "
                 "duration_ms=%.1f%s", rid, outcome, status, prompts, prompt_tokens, tokens, finish,
                 duration * 1e3, f" error={error!r}" if error else "")

    def reject(scope, rid):
        if scope.get("path") == COMPLETIONS:
            note(rid, "too_large", 413, time.perf_counter())

    def hung_up(scope):
        if scope.get("path") == COMPLETIONS:
            note(new_request_id(), "disconnected", 499, time.perf_counter(), error="hung up before the body was sent")
    app.add_middleware(BodyLimit, limit=max_body_bytes, on_reject=reject, on_disconnect=hung_up)

    def error_response(request: Request, err: ApiError) -> Response:
        resp = err.response()
        if request.url.path == COMPLETIONS and request.method == "POST":
            state = request.state
            rid = getattr(state, "rid", None) or new_request_id()
            note(rid, OUTCOME_OF_STATUS.get(err.status, "error"), err.status, getattr(state, "t0", time.perf_counter()),
                 error=err.message)
            resp.headers["x-request-id"] = rid
        return resp

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        return error_response(request, validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = ApiError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = ApiError(405, f"method {request.method} is not allowed on {request.url.path}",
                           code="method_not_allowed")
        elif exc.status_code == 400:  # the body could not be read as JSON at all (say, not UTF-8)
            err = ApiError(400, f"request body is not valid JSON: {exc.detail}", code="invalid_json")
        else:
            err = ApiError(exc.status_code, str(exc.detail), code=None)
        err.headers = dict(exc.headers or {})
        return error_response(request, err)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.error("request %s failed: %s", getattr(request.state, "rid", "-"), type(exc).__name__, exc_info=exc)
        return error_response(request, ApiError(500, f"internal server error ({type(exc).__name__})",
                                                type="server_error", code="internal_error"))

    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with HEAD
    async def health():
        ok, why, code = loop.health()
        state = {"model": model_name, "running": engine.num_running, "queued": engine.num_queued,
                 "max_batch": engine.max_batch}
        if ok:
            return {"status": "ok", **state}
        status = "starting" if code == "engine_starting" else "unhealthy"
        return AsciiJSONResponse({"status": status, **state, **error_body(why, "server_error", None, code)},
                                 status_code=503)

    @app.get("/metrics")
    async def prometheus():
        content, media_type = metrics.render()
        return Response(content, media_type=media_type)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "tmfast",
                "max_model_len": context, "context_length": context, "tail_window": engine.k_window}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise ApiError(404, f"model {model_id!r} not found (this server serves {model_name!r})", "model",
                           code="model_not_found")
        return model_card()

    @app.post(COMPLETIONS)
    async def completions(body: CompletionRequest, request: Request):
        t0 = request.state.t0 = time.perf_counter()
        rid = request.state.rid = new_request_id()
        if body.model is not None and body.model != model_name:
            raise ApiError(404, f"model {body.model!r} not found (this server serves {model_name!r})", "model",
                           code="model_not_found")
        check_supported(body)
        gen = generation_config(body, engine.k_window)
        prompts = split_prompts(body.prompt)
        most = engine.max_queue + engine.max_batch  # every slot free and the queue empty
        if len(prompts) > most:
            raise ApiError(400, f"at most {most} prompts per request (max_batch + max_queue)", "prompt")
        ids = [await limits.token_ids(p) for p in prompts]
        rids = [rid] if len(ids) == 1 else [f"{rid}-{i}" for i in range(len(ids))]
        sink = Sink()
        try:
            admitted = await run_in_threadpool(
                loop.submit_many, [(p, gen, body.return_tail, r) for p, r in zip(ids, rids)], sink)
        except QueueFullError as e:
            raise ApiError(429, str(e), None, type="queue_full", code="queue_full",
                           headers={"Retry-After": str(retry_after)}) from None
        except (ConfigError, GenerationError) as e:
            raise ApiError(400, api_message(str(e)), api_name(e.param), code="invalid_value") from None
        except EngineUnavailable as e:
            err = ApiError(503, str(e), type="server_error", code=e.code)
            if e.code == "engine_starting":
                err.headers = {"Retry-After": str(retry_after)}
            raise err from None
        except BaseException:  # cancelled while queuing: nobody will read these
            for r in rids:
                loop.abort_soon(r)
            raise
        n_prompt = sum(n for _, n in admitted)
        metrics.prompt_tokens.inc(n_prompt)
        index = {r: i for i, r in enumerate(rids)}
        created = int(time.time())
        first = [True]

        def on_tokens(ev: RequestEvent) -> None:
            if ev.token_ids:
                metrics.generated_tokens.inc(len(ev.token_ids))
                if first[0]:
                    first[0] = False
                    metrics.ttft.observe(time.perf_counter() - t0)

        def failure(ev: RequestEvent) -> ApiError:
            if ev.finish_reason == "abort":
                return ApiError(503, f"request aborted: {ev.error or 'aborted by the server'}", type="server_error",
                                code="aborted")
            return ApiError(500, ev.error or "the engine failed this request", type="server_error",
                            code="engine_error")

        def choice(ev: RequestEvent, text: str, finish: str | None) -> dict:
            c = {"index": index[ev.request_id], "text": text, "logprobs": None, "finish_reason": finish,
                 "token_ids": ev.token_ids}
            if ev.tail_token_ids is not None:
                c["tail"] = [engine.tokenizer.decode([t]) for t in ev.tail_token_ids[1:]]
            return c

        def envelope(choices: list[dict]) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices}

        def usage(n_tokens: int) -> dict:
            return {"prompt_tokens": n_prompt, "completion_tokens": n_tokens, "total_tokens": n_prompt + n_tokens}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            st = {"open": set(rids), "tokens": 0, "outcome": "disconnected", "status": 499, "finish": None,
                  "error": None, "closed": False}

            def close():  # once, whether the stream ended, failed, or never started (client gone)
                if st["closed"]:
                    return
                st["closed"] = True
                for r in st["open"]:
                    loop.abort_soon(r)
                note(rid, st["outcome"], st["status"], t0, prompts=len(rids), prompt_tokens=n_prompt,
                     tokens=st["tokens"], finish=st["finish"], error=st["error"])

            async def events():
                try:
                    while st["open"]:
                        ev = await sink.queue.get()
                        if ev.finish_reason in ("error", "abort"):
                            err = failure(ev)
                            st.update(outcome=OUTCOME_OF_STATUS.get(err.status, "error"), status=err.status,
                                      error=err.message)
                            yield sse(err.body())
                            break
                        on_tokens(ev)
                        st["tokens"] += len(ev.token_ids)
                        finish = openai_finish_reason(ev.finish_reason) if ev.finished else None
                        if ev.finished:
                            st["open"].discard(ev.request_id)
                            st["finish"] = finish
                        chunk = envelope([choice(ev, ev.text, finish)])
                        if include_usage:
                            chunk["usage"] = None
                        yield sse(chunk)
                    else:
                        if include_usage:
                            yield sse({**envelope([]), "usage": usage(st["tokens"])})
                        st.update(outcome="ok", status=200)
                    yield sse("[DONE]")
                finally:
                    close()
            return ClosingStream(events(), close, media_type="text/event-stream", headers={"x-request-id": rid})

        texts = {r: [] for r in rids}
        token_ids = {r: [] for r in rids}
        last: dict[str, RequestEvent] = {}
        watcher = asyncio.create_task(watch_disconnect(request, sink))
        try:
            while len(last) < len(rids):
                ev = await sink.queue.get()
                if ev is DISCONNECTED:
                    n = sum(len(v) for v in token_ids.values())
                    note(rid, "disconnected", 499, t0, prompts=len(rids), prompt_tokens=n_prompt, tokens=n)
                    return Response(status_code=499)
                if ev.finish_reason in ("error", "abort"):
                    raise failure(ev)
                on_tokens(ev)
                texts[ev.request_id].append(ev.text)
                token_ids[ev.request_id].extend(ev.token_ids)
                if ev.finished:
                    last[ev.request_id] = ev
        finally:
            watcher.cancel()
            for r in set(rids) - set(last):  # disconnected, failed or cancelled: free the slots
                loop.abort_soon(r)
        choices = [{"index": i, "text": "".join(texts[r]), "logprobs": None,
                    "finish_reason": openai_finish_reason(last[r].finish_reason), "token_ids": token_ids[r]}
                   for i, r in enumerate(rids)]
        n_tokens = sum(len(v) for v in token_ids.values())
        note(rid, "ok", 200, t0, prompts=len(rids), prompt_tokens=n_prompt, tokens=n_tokens,
             finish=",".join(sorted({c["finish_reason"] for c in choices})))
        return AsciiJSONResponse({**envelope(choices), "usage": usage(n_tokens)}, headers={"x-request-id": rid})

    return app
