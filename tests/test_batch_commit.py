"""The projector's batch transactions commit asynchronously (freshness), and only they:
claims stay synchronous. Real broker and database."""

from __future__ import annotations

import sqlalchemy as sa

from beliefstore.projector.worker import ProjectorWorker
from tests.conftest import wait_caught_up


def test_batches_commit_without_waiting_for_the_wal_flush(settings, engine, producer):
    worker = ProjectorWorker(settings, engine)
    transactions: list[list[str]] = [[]]  # the statements of each transaction, in order

    @sa.event.listens_for(worker.recorder.engine, "before_cursor_execute")
    def _statement(conn, cursor, statement, parameters, context, executemany) -> None:
        transactions[-1].append(statement)

    @sa.event.listens_for(worker.recorder.engine, "commit")
    def _commit(conn: sa.Connection) -> None:
        transactions.append([])

    with worker:
        claims = len(transactions) - 1
        assert claims >= 1
        assert not any("synchronous_commit" in s for t in transactions for s in t)
        receipt = producer.observe("user-sc", "support", "issue", "refund", 0.8,
                                   source="triage_agent")
        while not worker.process_batch():
            pass
        batch = transactions[claims:-1]
        assert batch and all(t[0] == "SET LOCAL synchronous_commit TO off" for t in batch)
        assert any("projection_offsets" in s for t in batch for s in t)
    wait_caught_up(settings, [receipt])  # committed, offsets and all
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT value FROM beliefs WHERE subject_id = 'user-sc'")
                            ).scalar() == "refund"
        # the setting was the transaction's own: the session has the server's value
        assert conn.execute(sa.text("SHOW synchronous_commit")).scalar() == conn.execute(
            sa.text("SELECT reset_val FROM pg_settings WHERE name = 'synchronous_commit'")
        ).scalar()
