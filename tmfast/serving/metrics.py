"""Prometheus metrics of one app, in the app's own CollectorRegistry (never the global one, so
several apps in one process, tests included, do not collide)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# what became of a completion request (the label of tmfast_requests_total)
OUTCOMES = ("ok", "invalid", "too_large", "queue_full", "disconnected", "error", "unavailable")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class ServerMetrics:
    def __init__(self, engine, loop=None):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tmfast_requests", "Completion requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.prompt_tokens = Counter("tmfast_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("tmfast_generated_tokens", "Tokens committed (generated)", registry=r)
        self.ttft = Histogram("tmfast_time_to_first_token_seconds",
                              "Request arrival to its first committed token", buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("tmfast_request_duration_seconds", "Request arrival to its last event",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.step_time = Histogram("tmfast_engine_step_seconds", "One engine step (all running sequences)",
                                   buckets=STEP_BUCKETS, registry=r)
        self.step_failures = Counter("tmfast_engine_step_failures", "Engine steps that raised", registry=r)
        Gauge("tmfast_queue_depth", "Requests waiting for a slot", registry=r).set_function(
            lambda: engine.num_queued)
        Gauge("tmfast_running_sequences", "Sequences in the running batch", registry=r).set_function(
            lambda: engine.num_running)
        Gauge("tmfast_max_batch", "Slots in the running batch", registry=r).set_function(lambda: engine.max_batch)
        if loop is not None:
            Gauge("tmfast_engine_loop_healthy", "1 while the engine loop is alive, beating and not failing",
                  registry=r).set_function(lambda: float(loop.health()[0]))

    def on_step(self, seconds: float, failed: bool) -> None:
        self.step_time.observe(seconds)
        if failed:
            self.step_failures.inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
