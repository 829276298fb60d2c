"""HTTP endpoint over the engine: OpenAI-style /v1/completions (+ SSE streaming), /v1/models,
/health and /metrics, served by uvicorn. The parts live in tmfast/serving/ (protocol, loop,
metrics, app); this module is the entry point and keeps the names callers import.

One background thread owns the Engine and steps it while there is work; request handlers
hand prompts to it under a lock and read their events from an asyncio queue. A failure while
serving one request ends that request, never the others, and never the loop.
"""
from __future__ import annotations

import logging

from .engine import Engine
from .serving import ApiError, CompletionRequest, EngineLoop, EngineUnavailable, ServerMetrics, create_app
from .serving.protocol import API_NAMES

__all__ = ["API_NAMES", "ApiError", "CompletionRequest", "EngineLoop", "EngineUnavailable", "ServerMetrics",
           "create_app", "serve", "server_config"]


READ_TIMEOUT = 10.0  # seconds a request may take to arrive whole (headers and body)
KEEP_ALIVE = 5.0  # seconds an idle kept-alive connection is held


def server_config(app, host: str = "127.0.0.1", port: int = 8000, *, read_timeout: float = READ_TIMEOUT,
                  graceful_timeout: float = 30.0, log_level: str = "info", **uvicorn_options):
    """The uvicorn Config every tmfast server runs with: h11 with a read deadline, a connection cap
    below the descriptor limit and JSON protocol errors (tmfast/serving/http.py), the keep-alive
    and graceful-shutdown timeouts."""
    import uvicorn
    from .serving.http import connection_limits, protocol_class, quiet_accept_errors
    quiet_accept_errors()
    max_connections, backlog = connection_limits()
    return uvicorn.Config(app, host=host, port=port, http=protocol_class(read_timeout, max_connections),
                          backlog=backlog, log_level=log_level,
                          timeout_keep_alive=KEEP_ALIVE, timeout_graceful_shutdown=graceful_timeout,
                          **uvicorn_options)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "tmfast", *,
          max_body_bytes: int = 1 << 20, max_prompt_chars: int | None = None, stall_after: float = 60.0,
          graceful_timeout: float = 30.0, read_timeout: float = READ_TIMEOUT, log_level: str = "info",
          warmup: bool | None = None) -> None:
    """Serve until SIGINT/SIGTERM. On the first signal the server stops accepting connections and
    lets requests in flight finish (at most graceful_timeout seconds, then they are cancelled and
    aborted), then stops the engine loop: one signal is enough. A request must arrive whole within
    read_timeout seconds (a client that stalls mid-headers or mid-body is cut off). warmup
    (default: whether the engine is compiled): compile every step variant before /health says ready."""
    import uvicorn
    logger = logging.getLogger("tmfast")
    if not logger.handlers:  # one line per request (tmfast.server), beside uvicorn's own log
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(log_level.upper())
    app = create_app(engine, model_name, max_body_bytes=max_body_bytes, max_prompt_chars=max_prompt_chars,
                     stall_after=stall_after, warmup=engine.compiled if warmup is None else warmup)
    uvicorn.Server(server_config(app, host, port, read_timeout=read_timeout, graceful_timeout=graceful_timeout,
                                 log_level=log_level)).run()
