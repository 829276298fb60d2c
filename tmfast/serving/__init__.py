"""The HTTP server, one job per module (`tmfast.server` is the entry point and re-exports):

  protocol.py   what a client sends and gets: the request schema, OpenAI fields tmfast cannot
                honour, the one error shape (ApiError → {"error": {message, type, param, code}}),
                request → GenerationConfig
  loop.py       EngineLoop: the one thread that steps the Engine, routes events to requests,
                survives any exception and beats a heartbeat /health reads
  metrics.py    ServerMetrics: Prometheus counters, gauges and histograms in the app's own registry
  app.py        create_app: the routes, limits before admission (body size, prompt length),
                abort on disconnect, one log line per request
"""
from .app import create_app
from .loop import EngineLoop, EngineUnavailable
from .metrics import ServerMetrics
from .protocol import ApiError, CompletionRequest

__all__ = ["ApiError", "CompletionRequest", "EngineLoop", "EngineUnavailable", "ServerMetrics", "create_app"]
