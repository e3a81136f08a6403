"""``GET /metrics``: Prometheus metrics of this process (API, and the projector when it
runs in the same process). No API key: it is meant for the operator's network only
(expose it to Prometheus, not to the internet); it holds no subject data, only routes,
statuses, partitions and counts.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter()


@router.get("/metrics", tags=["operations"], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                             "description": "Prometheus text exposition format."}})
def metrics() -> Response:
    """Prometheus metrics: API request latency by route and status, projector events,
    batch duration, lag per partition, dead letters, cache lookups."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
