"""Liveness and readiness probes.
"""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from beliefstore.api import queries
from beliefstore.api.deps import State
from beliefstore.api.models import (
    CheckOut,
    ReadyOut,
)
from beliefstore.projector.catalog import CatalogError

router = APIRouter()


@router.get("/healthz", tags=["operations"])
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}

@router.get("/readyz", response_model=ReadyOut, tags=["operations"],
         responses={503: {"model": ReadyOut, "description": "A dependency is down."}})
def readyz(state: State) -> JSONResponse:
    """Readiness: the database and the broker are reachable; reports projection lag."""
    lag = None
    try:
        with state.engine().connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            lag = queries.projection_lag(conn, state.catalog.active().name,
                                         state.settings.topic)
        database = CheckOut(ok=True, detail="reachable")
    except (sa.exc.SQLAlchemyError, CatalogError) as exc:
        database = CheckOut(ok=False, detail=f"unreachable: {exc.__class__.__name__}")
    try:
        connected = state.producer().connected()
        broker = CheckOut(ok=connected, detail="reachable" if connected else "not connected")
    except Exception as exc:  # any client failure means not ready
        broker = CheckOut(ok=False, detail=f"unreachable: {exc}")
    body = ReadyOut(ready=database.ok and broker.ok, database=database, broker=broker,
                    projection_lag=lag)
    return JSONResponse(status_code=200 if body.ready else 503,
                        content=body.model_dump(mode="json"))
