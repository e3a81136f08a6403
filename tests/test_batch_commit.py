"""The projector's batch transactions commit asynchronously (freshness), and only they:
claims stay synchronous. Real broker and database; the statements are read from libpq's
protocol trace of the worker's connections (they go through psycopg pipelines, which
SQLAlchemy's events do not see)."""

from __future__ import annotations

import re
from pathlib import Path

import sqlalchemy as sa

from beliefstore.projector.worker import ProjectorWorker
from tests.conftest import wait_caught_up

_MESSAGE = re.compile(r"^(?:\S+ \S+\t)?([FB])\t\d+\t(\w+)\t?(.*?)(?=^(?:\S+ \S+\t)?[FB]\t\d+\t|\Z)",
                      re.MULTILINE | re.DOTALL)
"""One message of libpq's trace: [timestamp] direction, length, type, contents (SQL text
may span lines)."""
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)


def transactions_of(trace: Path) -> list[list[str]]:
    """The statements the traced connections sent (``Query`` and ``Parse`` messages,
    whitespace collapsed), one list per transaction (split at ``BEGIN``; statements
    outside one are dropped)."""
    out: list[list[str]] = []
    current: list[str] | None = None
    for direction, kind, body in _MESSAGE.findall(trace.read_text(errors="replace")):
        if direction != "F" or kind not in ("Query", "Parse"):
            continue
        quoted = _QUOTED.findall(body)
        if len(quoted) < (1 if kind == "Query" else 2):
            continue
        statement = " ".join((quoted[0] if kind == "Query" else quoted[1]).split())
        if statement == "BEGIN":
            current = []
            out.append(current)
        elif statement in ("COMMIT", "ROLLBACK"):
            current = None
        elif current is not None:
            current.append(statement)
    return out


def test_batches_commit_without_waiting_for_the_wal_flush(settings, engine, producer,
                                                          tmp_path):
    worker = ProjectorWorker(settings, engine)
    trace = tmp_path / "libpq.trace"
    sink = trace.open("w")
    traced: list = []

    def _trace(dbapi_conn, record, proxy) -> None:
        if not any(c is dbapi_conn for c in traced):
            traced.append(dbapi_conn)
            dbapi_conn.pgconn.trace(sink.fileno())

    sa.event.listen(worker.recorder.engine, "checkout", _trace)
    try:
        with worker:
            receipt = producer.observe("user-sc", "support", "issue", "refund", 0.8,
                                       source="triage_agent")
            while not worker.process_batch():
                pass
    finally:
        sa.event.remove(worker.recorder.engine, "checkout", _trace)
        for conn in traced:
            if not conn.closed:
                conn.pgconn.untrace()
        sink.close()
    transactions = transactions_of(trace)
    claims = [t for t in transactions if any("owner" in s and "projection_offsets" in s
                                              for s in t)]
    batches = [t for t in transactions if any("belief_changes" in s for s in t)]
    assert claims and batches, transactions
    assert not any("synchronous_commit" in s for t in claims for s in t)
    for batch in batches:
        assert batch[0] == "SET LOCAL synchronous_commit TO off", batch
        assert any("FOR UPDATE" in s and "projection_offsets" in s for s in batch[:3])
        assert any("next_offset = excluded.next_offset" in s for s in batch)
    wait_caught_up(settings, [receipt])  # committed, offsets and all
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT value FROM beliefs WHERE subject_id = 'user-sc'")
                            ).scalar() == "refund"
        # the setting was the transaction's own: the session has the server's value
        assert conn.execute(sa.text("SHOW synchronous_commit")).scalar() == conn.execute(
            sa.text("SELECT reset_val FROM pg_settings WHERE name = 'synchronous_commit'")
        ).scalar()
