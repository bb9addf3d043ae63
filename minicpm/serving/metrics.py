"""Prometheus metrics of one server: requests, tokens, queue, latency, time to first token.

Each app gets its own registry (several servers in one process, as in tests, stay apart); the
queue and batch gauges read the engine when scraped, so they are never stale. Requests are
counted by route template (`/v1/models/{model_id}`), never by the raw path: unknown paths share
one label, so a scan of random URLs cannot grow the number of series.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: decode steps are tens of ms; a queued request on a busy CPU waits tens of seconds.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

CONTENT_TYPE = CONTENT_TYPE_LATEST
UNMATCHED = "unmatched"  # the endpoint label of a path no route serves
disable_created_metrics()  # "_created" timestamps per series only add noise to the text


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("minicpm_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("minicpm_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("minicpm_generation_tokens", "Tokens generated for finished requests",
                                        registry=r)
        self.finished = Counter("minicpm_finished_sequences", "Sequences ended, by finish reason",
                                ["reason"], registry=r)
        self.latency = Histogram("minicpm_request_latency_seconds", "Time from submit to the last token",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("minicpm_time_to_first_token_seconds", "Time from submit to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("minicpm_queue_time_seconds", "Time waiting for a KV-cache slot",
                                    buckets=LATENCY_BUCKETS, registry=r)
        Gauge("minicpm_queue_depth", "Requests waiting for a slot", registry=r).set_function(
            lambda: engine.stats()["waiting"])
        Gauge("minicpm_running_sequences", "Sequences in the decode batch", registry=r).set_function(
            lambda: engine.stats()["running"])
        Gauge("minicpm_max_batch", "KV-cache slots", registry=r).set_function(lambda: engine.max_batch)
        Gauge("minicpm_prefix_cache_hits", "Requests that found part of their prompt in a slot's cache, since start",
              registry=r).set_function(lambda: engine.stats()["prefix_cache_hits"])
        Gauge("minicpm_prefix_cache_reused_tokens", "Prompt tokens taken from a slot's cache instead of prefilled, "
              "since start", registry=r).set_function(lambda: engine.stats()["prefix_cache_tokens"])

    def observe_stream(self, endpoint: str, stream) -> None:
        """Record a finished engine stream (its usage and timings)."""
        self.prompt_tokens.inc(stream.usage["prompt_tokens"])
        self.generated_tokens.inc(stream.usage["completion_tokens"])
        self.finished.labels(stream.finish_reason or "unknown").inc()
        timings = stream.metrics
        if "total_s" in timings:
            self.latency.labels(endpoint).observe(timings["total_s"])
        if "ttft_s" in timings:
            self.ttft.observe(timings["ttft_s"])
        if "queued_s" in timings:
            self.queue_time.observe(timings["queued_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware counting HTTP requests by route template and status.

    A plain ASGI wrapper on purpose: Starlette's BaseHTTPMiddleware (`@app.middleware("http")`)
    runs the route with a receive channel that never reports the client's disconnect, so a
    non-streaming request whose client hung up kept generating to the end.
    """

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app fails before answering

        async def send_and_note_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            route = scope.get("route")  # set by the router once a route matched
            endpoint = getattr(route, "path", None) or UNMATCHED
            self.metrics.requests.labels(endpoint, str(status)).inc()
