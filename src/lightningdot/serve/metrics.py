"""What the service measures and exposes at `/metrics` (Prometheus), and the ASGI middleware
that counts and times every request."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lightningdot.retrieval import Retriever

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Prometheus series of one app (its own registry, so several apps can live in a process)."""

    def __init__(self, retriever: Retriever) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ldot_requests",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ldot_request_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stages = Histogram(
            "ldot_stage_seconds",
            "Time per request in each stage: queue, encode, search, rerank (queries), add "
            "(POST /images), total.",
            ["route", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "ldot_text_batch_size",
            "Text queries encoded together in one forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        items = Gauge("ldot_index_items", "Items in each index.", ["index"], registry=self.registry)
        items.labels("images").set_function(lambda: retriever.image_index.count)
        items.labels("captions").set_function(
            lambda: retriever.caption_index.count if retriever.caption_index is not None else 0
        )

    def observe(self, route: str, timing_ms: dict[str, float]) -> None:
        for stage, ms in timing_ms.items():
            self.stages.labels(route, stage).observe(ms / 1e3)


class RequestMetrics:
    """ASGI middleware: counts and times every request, unknown routes and 4xx included."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # The route template, not the raw path, keeps the label set small.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
