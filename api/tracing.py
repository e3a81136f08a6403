"""OpenTelemetry tracing of the API, on only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.

Then every request becomes a span (opentelemetry-instrumentation-fastapi), exported over
OTLP/HTTP to that endpoint (the exporter reads the standard ``OTEL_*`` variables:
``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_SERVICE_NAME``
(default ``beliefstore-api``), ...). The OpenTelemetry packages are the optional extra
``beliefstore[otel]`` and are imported only when the variable is set; without them the
API logs what to install and serves untraced.
"""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI

log = logging.getLogger("beliefstore.api")

ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"


def instrument(app: FastAPI) -> bool:
    """Trace ``app`` when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; returns whether it does."""
    if not os.environ.get(ENDPOINT_VARIABLE):
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.error("%s is set but OpenTelemetry is not installed (%s): install it with "
                  "`pip install 'beliefstore[otel]'`, or unset %s; serving without tracing",
                  ENDPOINT_VARIABLE, exc.name, ENDPOINT_VARIABLE)
        return False
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME")
                                or "beliefstore-api"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider,
                                       excluded_urls="/metrics,/healthz,/readyz")
    app.state.tracer_provider = provider
    log.info("tracing requests to %s", os.environ[ENDPOINT_VARIABLE])
    return True


def shutdown(app: FastAPI) -> None:
    """Flush and stop the app's tracer provider, if tracing is on."""
    provider = getattr(app.state, "tracer_provider", None)
    if provider is not None:
        provider.shutdown()
