"""Prometheus metrics of the API: request latency by route and status, and cache
lookups (for the read caches, where one exists).

Metrics live in ``prometheus_client``'s default registry, once per process; ``GET
/metrics`` (:mod:`beliefstore.api.routes.metrics`) serves them together with the
projector's (:mod:`beliefstore.projector.metrics`) when both run in one process
(``beliefstore up``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_SECONDS = Histogram(
    "beliefstore_api_request_duration_seconds",
    "Time from a request's arrival to the end of its response, seconds.",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
"""Latency histogram; ``route`` is the route's path template (``/v1/subjects/{subject_id}/
self-model``), ``unmatched`` for paths no route has (so ids never become labels)."""

CACHE_LOOKUPS = Counter(
    "beliefstore_api_cache_lookups_total",
    "Lookups in an API read cache, by cache and result (hit or miss); the hit ratio is "
    "rate(hit) / rate(hit + miss).",
    ["cache", "result"],
)


def record_cache(cache: str, hit: bool) -> None:
    """Count one lookup in the read cache named ``cache`` (call it where the cache is read)."""
    CACHE_LOOKUPS.labels(cache, "hit" if hit else "miss").inc()


@dataclass(frozen=True)
class RouteTemplate:
    """What :class:`MetricsMiddleware` reads of a route (``scope["route"].path``): a lane
    that answers without routing sets it so its requests count under the route's
    template."""

    path: str


class MetricsMiddleware:
    """ASGI middleware timing every HTTP request into :data:`REQUEST_SECONDS`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            REQUEST_SECONDS.labels(scope.get("method", ""), template, str(status)).observe(
                time.perf_counter() - start)


__all__ = ["CACHE_LOOKUPS", "REQUEST_SECONDS", "MetricsMiddleware", "RouteTemplate",
           "record_cache"]
