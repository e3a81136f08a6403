"""After a projection switch nothing keeps connections to the old projection: the catalog,
the live projector and the API close the old schema's engine, so its PostgreSQL backends
(each holding its relation, plan and temporary-table caches) exit. And the live
projector's backend bounds its temporary-table buffers to what a batch needs.

All on the real embedded PostgreSQL: a backend is "gone" when ``pg_stat_activity`` no
longer lists its pid.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import sqlalchemy as sa

from beliefstore.db import make_engine
from beliefstore.embedded import free_port
from beliefstore.events.workload import generate
from beliefstore.projector.bulk import live_temp_buffers_kib
from beliefstore.projector.catalog import ProjectionCatalog
from beliefstore.projector.fold import fold
from beliefstore.projector.replay import BeliefRow, compare, read_beliefs
from beliefstore.projector.store import ProjectionRecorder
from beliefstore.runtime.serve import ApiServer, ProjectorThread
from tests.conftest import wait_caught_up
from tests.test_bulk import TOPIC, logged, progress_of


def backends(settings) -> set[int]:
    """The pids of every client backend now (from a connection of its own)."""
    engine = make_engine(settings.database_url, "public")
    try:
        with engine.connect() as conn:
            return set(conn.execute(sa.text(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid()")).scalars())
    finally:
        engine.dispose()


def used_pids(engine: sa.Engine) -> set[int]:
    """A set that collects the backend pid of every connection of ``engine``'s pool
    checked out from now on."""
    pids: set[int] = set()
    sa.event.listen(engine, "checkout",
                    lambda dbapi_conn, _record, _proxy: pids.add(dbapi_conn.info.backend_pid))
    return pids


def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(0.05)


def switch_elsewhere(settings, name: str) -> None:
    """Create and switch to projection ``name`` from another catalog (as ``beliefstore
    replay --switch`` does from its own process)."""
    other = ProjectionCatalog.from_settings(settings)
    try:
        other.create(name)
        other.switch(name)
    finally:
        other.dispose()


def test_a_switch_closes_the_old_projections_engine_and_its_backends(settings, catalog):
    old = catalog.active()
    engine = catalog.engine(old.schema)
    with engine.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    assert old.schema in catalog.engine_schemas() and pid in backends(settings)

    switch_elsewhere(settings, "second")
    assert catalog.refresh().name == "second"
    assert old.schema not in catalog.engine_schemas()
    eventually(lambda: pid not in backends(settings))
    # the base schema's engine (catalog, keys) stays
    assert settings.db_schema in catalog.engine_schemas()


def test_an_old_engine_in_use_is_closed_once_it_is_returned(settings, catalog):
    old = catalog.active()
    conn = catalog.engine(old.schema).connect()
    pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    switch_elsewhere(settings, "third")
    catalog.refresh()
    # a request still reading the old projection keeps its connection
    assert catalog.release_retired() == [old.schema]
    assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    conn.close()
    assert catalog.release_retired() == []
    assert old.schema not in catalog.engine_schemas()
    eventually(lambda: pid not in backends(settings))


def test_the_live_projector_leaves_the_old_projection_after_a_switch(settings, catalog,
                                                                     producer):
    old = catalog.active()
    pids = used_pids(catalog.engine(old.schema))
    projector = ProjectorThread(settings, catalog)
    projector.start()
    try:
        wait_caught_up(settings, [producer.observe("user-e", "support", "mood", "calm", 0.8,
                                                  source="triage_agent")])
        assert pids and pids <= backends(settings)
        switch_elsewhere(settings, "followed")
        new_schema = catalog.schema_for("followed")
        # the projector follows the switch (applies to the new projection) ...
        wait_caught_up(settings, [producer.observe("user-e", "support", "mood", "glad", 0.9,
                                                  source="triage_agent")])
        # ... and no longer holds the old one
        eventually(lambda: old.schema not in catalog.engine_schemas())
        assert new_schema in catalog.engine_schemas()
        eventually(lambda: not pids & backends(settings))
    finally:
        projector.stop()
    assert projector.error is None and projector.reconnects == 0, projector.last_error


def test_the_api_closes_the_old_projections_engine_when_a_switch_is_notified(
        settings, catalog, auth):
    server = ApiServer(settings, "127.0.0.1", free_port(), catalog=catalog).start_in_thread()
    try:
        live = server.app.state.beliefstore.live
        eventually(lambda: live.listening)
        old = catalog.active()
        pids = used_pids(catalog.engine(old.schema))
        # a read on the synchronous path opens a connection to the active projection
        r = httpx.get(f"{server.url}/v1/contexts", headers=auth)
        assert r.status_code == 200, r.text
        assert pids and pids <= backends(settings)
        assert old.schema in catalog.engine_schemas()

        switch_elsewhere(settings, "notified")
        # no request needed: the NOTIFY of the switch makes the API let go of it
        eventually(lambda: old.schema not in catalog.engine_schemas())
        eventually(lambda: not pids & backends(settings))
        assert httpx.get(f"{server.url}/v1/contexts", headers=auth).status_code == 200
        assert catalog.schema_for("notified") in catalog.engine_schemas()
    finally:
        server.stop()


def test_the_live_projectors_connection_bounds_its_temporary_buffers(settings, catalog):
    engine = catalog.engine(catalog.active().schema)
    recorder = ProjectionRecorder(engine, settings.projection, settings.fold_settings,
                                  temp_buffers_kib=live_temp_buffers_kib(settings.batch_size))
    # batches whose staging (about 2 MB) exceeds the buffers: it spills to its temporary file
    events = list(generate(12000, subjects=300, seed=11))
    items = logged(events)
    for start in range(0, len(items), 6000):
        chunk = items[start:start + 6000]
        recorder.apply(TOPIC, chunk, progress_of(chunk))
    assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]  # the one connection
    with engine.connect() as conn:
        assert conn.execute(sa.text("SHOW temp_buffers")).scalar_one() == "1MB"
    expected = {b.key: BeliefRow.of(b) for b in fold(events, settings.fold_settings)}
    assert len(expected) > 100
    assert compare(read_beliefs(engine), expected) == []


def test_temp_buffers_follow_the_batch_size():
    assert live_temp_buffers_kib(1) == 1024  # PostgreSQL's minimum is 800 kB
    assert live_temp_buffers_kib(500) == 1024
    assert live_temp_buffers_kib(2000) == 4000
    assert live_temp_buffers_kib(100_000) == 8192  # PostgreSQL's default, the most
