"""The HTTP API (FastAPI): handoff reads, traces, observation ingest and health.

Start it with ``beliefstore api`` (or as part of ``beliefstore up``); the OpenAPI
document is served at ``/openapi.json`` and browsable at ``/docs``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from beliefstore.api.deps import AppState
from beliefstore.api.routes import access, audit, ingest, operations, reads
from beliefstore.api.security import (
    BodyLimitMiddleware,
)
from beliefstore.errors import ValidationError
from beliefstore.events.producer import BeliefProducer
from beliefstore.projector.catalog import ProjectionCatalog
from beliefstore.settings import Settings


def create_app(settings: Settings, catalog: ProjectionCatalog,
               producer: BeliefProducer | None = None) -> FastAPI:
    """Build the API; it serves the catalog's active projection.

    Args:
        settings: topic and fold settings (for traces).
        catalog: the projection catalog (migrated, see :meth:`ProjectionCatalog.ensure`).
        producer: used by ``POST /v1/observations``; by default one is made from
            ``settings`` on the first POST.
    """
    state = AppState(settings, catalog, producer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.close()  # flushes the access log

    app = FastAPI(
        title="beliefstore",
        version="1",
        summary="What AI agents believe about the people they serve: self-models, "
        "traces and observation ingest.",
        lifespan=lifespan,
    )
    app.state.beliefstore = state
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       path_limits={"/v1/observations:batch": ingest.BATCH_MAX_BYTES})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            exc = StarletteHTTPException(400, "the request body cannot be parsed: send a JSON "
                                         "object, UTF-8 encoded, with Content-Type: "
                                         "application/json", exc.headers)
        return await http_exception_handler(request, exc)

    @app.exception_handler(ValidationError)
    async def _invalid(request: Request, exc: ValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": ["body", e.field], "msg": e.message, "type": "value_error"}
            for e in exc.errors
        ]})

    for module in (reads, audit, ingest, access, operations):
        app.include_router(module.router)
    return app
