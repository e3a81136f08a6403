"""The HTTP API (FastAPI): handoff reads, traces, observation ingest and health.

Start it with ``beliefstore api`` (or as part of ``beliefstore up``); the OpenAPI
document is served at ``/openapi.json`` and browsable at ``/docs``.
"""

from __future__ import annotations

import gc
from contextlib import asynccontextmanager

import psycopg
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from beliefstore.api.deps import RETRY_AFTER_S, AppState, unavailable
from beliefstore.api.live import Unavailable
from beliefstore.api.metrics import MetricsMiddleware
from beliefstore.api.routes import (
    access,
    audit,
    console,
    discovery,
    docs,
    ingest,
    listings,
    metrics,
    operations,
    reads,
    retractions,
    watch,
)
from beliefstore.api.routes import mcp as mcp_route
from beliefstore.api.security import (
    BodyLimitMiddleware,
)
from beliefstore.api.tracing import instrument, shutdown
from beliefstore.errors import ValidationError
from beliefstore.events.producer import BeliefProducer
from beliefstore.projector.catalog import ProjectionCatalog
from beliefstore.settings import Settings


def create_app(settings: Settings, catalog: ProjectionCatalog,
               producer: BeliefProducer | None = None, *, freeze_gc: bool = False) -> FastAPI:
    """Build the API; it serves the catalog's active projection.

    Args:
        settings: topic and fold settings (for traces).
        catalog: the projection catalog (migrated, see :meth:`ProjectionCatalog.ensure`).
        producer: used by ``POST /v1/observations``; by default one is made from
            ``settings`` on the first POST.
        freeze_gc: the process serves only this app: ``gc.freeze()`` once started (also
            settable as ``app.state.freeze_gc`` before it starts).
    """
    state = AppState(settings, catalog, producer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.live.start()  # the async pool and the LISTEN connection
        if getattr(app.state, "freeze_gc", False):
            # A process that serves only this app: everything built so far (modules,
            # routes, models) lives as long as it does, so it goes out of the garbage
            # collector's sight (gc.freeze) and a full collection during a read scans
            # only what requests made. Not in a process that builds apps again and
            # again (tests): each freeze would keep its garbage cycles for good.
            gc.collect()
            gc.freeze()
        try:
            async with mcp_route.running(app):
                yield
        finally:
            await state.live.stop()
            state.close()  # flushes the access log
            shutdown(app)

    app = FastAPI(
        title="beliefstore",
        version="1",
        summary="What AI agents believe about the people they serve: self-models, "
        "traces and observation ingest.",
        lifespan=lifespan,
        # /docs and /redoc are served with local assets (api/routes/docs.py), not a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.beliefstore = state
    app.state.freeze_gc = freeze_gc
    # POST /v1/observations without FastAPI's per-request work (inside the body limit)
    app.add_middleware(ingest.HotIngest, state=state)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       path_limits={"/v1/observations:batch": ingest.BATCH_MAX_BYTES})
    # the handoff reads of now, without FastAPI's per-request dependency resolution
    app.add_middleware(reads.HotReads, state=state)
    app.add_middleware(MetricsMiddleware)

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

    @app.exception_handler(sa.exc.OperationalError)
    @app.exception_handler(sa.exc.InterfaceError)
    @app.exception_handler(psycopg.OperationalError)
    async def _database_down(request: Request, exc: Exception) -> JSONResponse:
        # A lost or refused connection: the pool reconnects once PostgreSQL is back.
        return JSONResponse(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                            content={"detail": "the database is unreachable "
                                     f"({exc.__class__.__name__}); retry later"})

    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Unavailable) -> Response:
        return await http_exception_handler(request, unavailable(str(exc)))

    for module in (reads, audit, ingest, access, operations, watch):
        app.include_router(module.router)
    for module in (discovery, retractions, metrics, mcp_route, listings, console, docs):
        app.include_router(module.router)
    mcp_route.mount(app)
    # The console's page, scripts and styles, and the vendored front-end libraries.
    app.mount("/static", StaticFiles(packages=[("beliefstore.api", "static")]), name="static")
    instrument(app)
    return app


def app_from_env() -> FastAPI:
    """The app of the settings in the environment (``uvicorn --factory``): what each of
    ``beliefstore api --workers N``'s processes serves. DATABASE_URL (or a running
    ``up``) must be set; the catalog is expected migrated (the parent did it).
    """
    settings = Settings.from_env()
    return create_app(settings, ProjectionCatalog.from_settings(settings), freeze_gc=True)
