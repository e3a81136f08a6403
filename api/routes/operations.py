"""Liveness and readiness probes.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import sqlalchemy as sa
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from beliefstore.api import queries
from beliefstore.api.deps import RETRY_AFTER_S, AppState, State
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

#: The whole readiness answer must come within a second, even with a dependency hanging.
READY_BUDGET_S = 0.8
_checks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="readyz")


def _database_check(state: AppState) -> tuple[CheckOut, int | None]:
    try:
        with state.engine().connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            lag = queries.projection_lag(conn, state.catalog.active().name,
                                         state.settings.topic)
        return CheckOut(ok=True, detail="reachable"), lag
    except (sa.exc.SQLAlchemyError, CatalogError) as exc:
        return CheckOut(ok=False, detail=f"unreachable: {exc.__class__.__name__}"), None


def _broker_check(bootstrap: str | None, timeout_s: float) -> CheckOut:
    """A bootstrap server accepts a TCP connection within ``timeout_s`` seconds."""
    for server in (bootstrap or "").split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout_s).close()
            return CheckOut(ok=True, detail="reachable")
        except (OSError, ValueError):
            continue
    return CheckOut(ok=False, detail=f"unreachable: no connection to {bootstrap}")


@router.get("/readyz", response_model=ReadyOut, tags=["operations"],
         responses={503: {"model": ReadyOut, "description": "A dependency is down; `failing` "
                          "names it."}})
def readyz(state: State) -> JSONResponse:
    """Readiness within a second: the database and the broker are reachable; reports
    projection lag. A dependency that does not answer in time counts as down."""
    deadline = time.monotonic() + READY_BUDGET_S
    database_future = _checks.submit(_database_check, state)
    broker_future = _checks.submit(_broker_check, state.settings.kafka_bootstrap_servers,
                                   READY_BUDGET_S / 2)
    late = CheckOut(ok=False, detail=f"no answer within {READY_BUDGET_S:g} s")
    try:
        database, lag = database_future.result(max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        database, lag = late, None
    try:
        broker = broker_future.result(max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        broker = late
    failing = [name for name, check in (("database", database), ("broker", broker))
               if not check.ok]
    body = ReadyOut(ready=not failing, database=database, broker=broker,
                    projection_lag=lag, failing=failing)
    return JSONResponse(status_code=503 if failing else 200,
                        content=body.model_dump(mode="json"),
                        headers={"Retry-After": str(RETRY_AFTER_S)} if failing else None)
