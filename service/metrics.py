"""Prometheus metrics of one app instance, on its own registry (several apps can share a process).

The names are a public contract (dashboards and alert rules are built on them); change them only
on purpose.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Every metric the service exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_duration = Histogram(
            "letterrec_http_request_duration_seconds",
            "HTTP request latency by route template, method and status code.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "letterrec_queue_wait_seconds",
            "Time a recommendation request waited before its decoding batch started.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "letterrec_batch_size",
            "User requests per decoding batch.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.decode_seconds = Histogram(
            "letterrec_decode_seconds",
            "Wall time of one decoding batch in the engine.",
            ["engine"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenized_items = Counter(
            "letterrec_tokenized_items_total",
            "Items newly stored or replaced through /tokenize (dry runs and repeats excluded).",
            registry=r,
        )
        self.catalogue_items = Gauge(
            "letterrec_catalogue_items",
            "Active (recommendable) items in the catalogue.",
            registry=r,
        )
        self.trie_version = Gauge(
            "letterrec_trie_version", "Version counter of the in-process item trie.", registry=r
        )
        self.inflight = Gauge(
            "letterrec_inflight_requests", "HTTP requests being handled now.", registry=r
        )
        self.redis_errors = Counter(
            "letterrec_redis_errors_total",
            "Failed Redis operations by operation.",
            ["op"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "letterrec_queue_depth", "Recommendation requests waiting for decoding.", registry=r
        )
        self.ready = Gauge("letterrec_ready", "1 when /readyz passes, else 0.", registry=r)
        self.store_up = Gauge(
            "letterrec_store_up",
            "1 when the catalogue store (Redis, or the embedded one) is reachable, else 0.",
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def route_label(scope: Scope) -> str:
    """The matched route's template (bounded label values), or 'unmatched'."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware: latency histogram and in-flight gauge for every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()
        self.metrics.inflight.inc()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.inflight.dec()
            self.metrics.http_duration.labels(
                route_label(scope), scope.get("method", ""), str(status)
            ).observe(time.perf_counter() - start)
