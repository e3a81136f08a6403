"""Belief changes: what a batch changed, recorded in its transaction and announced.

For every belief a batch recomputed, :func:`record_changes` appends a row to
``belief_changes`` (the belief as it now stands, or NULLs when it is gone, with the
Kafka partition and offset of the batch's events about the subject), then sends
``NOTIFY beliefstore_changes`` with the projection's schema, the highest change id and
the subjects touched. PostgreSQL delivers a NOTIFY only when its transaction commits,
so an API process that hears it can drop its cached self-models of those subjects and
wake the watchers of ``GET /v1/subjects/{id}/watch``, and a read made after that never
sees the pre-batch answer.

Ordering: the ids come from one sequence, allocated while the batch holds the row lock
of its partitions' offsets (:meth:`ProjectionRecorder.apply` locks them first), and a
subject's events all live in one partition; so the changes of one subject commit in id
order, and "every change with id > last seen" never skips a change that commits later.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from beliefstore.projector.fold import Key
from beliefstore.projector.tables import belief_changes, beliefs

CHANNEL = "beliefstore_changes"
"""The NOTIFY channel of belief changes (payload: see :func:`notify_payload`)."""

NOTIFY_LIMIT = 7900
"""Bytes: PostgreSQL refuses NOTIFY payloads of 8000 bytes or more."""

_CHUNK = 1000


def notify_payload(schema: str, max_id: int, subjects: Sequence[str]) -> str:
    """The NOTIFY payload: JSON ``{"schema": ..., "max_id": N, "subjects": [...]}``;
    ``subjects`` is ``null`` when the list does not fit in :data:`NOTIFY_LIMIT` bytes (a
    listener then treats every subject of the schema as changed)."""
    payload = json.dumps({"schema": schema, "max_id": max_id, "subjects": sorted(subjects)},
                         separators=(",", ":"))
    if len(payload.encode("utf-8")) <= NOTIFY_LIMIT:
        return payload
    return json.dumps({"schema": schema, "max_id": max_id, "subjects": None},
                      separators=(",", ":"))


def parse_payload(payload: str) -> tuple[str, int, frozenset[str] | None]:
    """``(schema, max_id, subjects or None)`` of a :func:`notify_payload` string.

    Raises:
        ValueError: not such a payload.
    """
    data = json.loads(payload)
    subjects = data.get("subjects")
    return (str(data["schema"]), int(data["max_id"]),
            frozenset(subjects) if subjects is not None else None)


def record_changes(conn: sa.Connection, keys: Iterable[Key],
                   batch: Sequence[Any]) -> int | None:
    """In the batch's transaction, after the beliefs of ``keys`` were recomputed: append
    one ``belief_changes`` row per key and NOTIFY :data:`CHANNEL`. Returns the highest
    change id (``None`` when ``keys`` is empty: nothing is sent).

    ``batch`` holds the batch's :class:`~beliefstore.projector.store.LoggedEvent` items
    (their positions give each subject's partition and last offset)."""
    ordered = sorted(keys)
    if not ordered:
        return None
    where = subject_positions(batch)
    b = beliefs
    max_id = 0
    for i in range(0, len(ordered), _CHUNK):
        chunk = ordered[i:i + _CHUNK]
        wanted = sa.values(
            sa.column("s", sa.Text), sa.column("c", sa.Text), sa.column("a", sa.Text),
            sa.column("p", sa.Integer), sa.column("o", sa.BigInteger), name="wanted",
        ).data([(s, c, a, *where.get(s, (None, None))) for s, c, a in chunk])
        source = (
            sa.select(wanted.c.s, wanted.c.c, wanted.c.a, b.c.value, b.c.confidence,
                      b.c.alternatives, b.c.sources, wanted.c.p, wanted.c.o)
            .select_from(wanted.outerjoin(b, sa.and_(
                b.c.subject_id == wanted.c.s, b.c.context == wanted.c.c,
                b.c.attribute == wanted.c.a)))
            .order_by(wanted.c.s, wanted.c.c, wanted.c.a)
        )
        ids = conn.execute(sa.insert(belief_changes).from_select(
            ["subject_id", "context", "attribute", "value", "confidence", "alternatives",
             "sources", "kafka_partition", "kafka_offset"], source,
        ).returning(belief_changes.c.id)).scalars().all()
        max_id = max([max_id, *ids])
    schema = conn.execute(sa.select(sa.func.current_schema())).scalar_one()
    conn.execute(sa.select(sa.func.pg_notify(
        CHANNEL, notify_payload(schema, max_id, sorted({k[0] for k in ordered})))))
    return max_id


def subject_positions(batch: Sequence[Any]) -> dict[str, tuple[int, int]]:
    """subject_id → ``(partition, offset)`` of the batch's last event about it.

    ``batch`` holds :class:`~beliefstore.projector.store.LoggedEvent` items."""
    where: dict[str, tuple[int, int]] = {}
    for item in batch:
        p = item.position
        seen = where.get(item.event.subject_id)
        if seen is None or p.offset > seen[1]:
            where[item.event.subject_id] = (p.partition, p.offset)
    return where


_RECORD_STAGED = """
WITH added AS (
  INSERT INTO belief_changes (subject_id, context, attribute, value, confidence,
                              alternatives, sources, kafka_partition, kafka_offset)
  SELECT subject_id, context, attribute, value, confidence, alternatives, sources,
         kafka_partition, kafka_offset
  FROM {stage} ORDER BY subject_id, context, attribute
  RETURNING id)
SELECT pg_notify(%s, json_build_object('schema', current_schema(),
                                       'max_id', coalesce(max(id), 0),
                                       'subjects', CAST(%s AS json))::text)
FROM added
"""

_PAYLOAD_OVERHEAD = 160
"""Bytes of a payload besides its subjects list, at most: the keys and spaces
``json_build_object`` writes, a schema name (≤ 63 bytes) and a change id (≤ 19 digits)."""


def record_staged_changes(cursor: Any, stage: str, subjects: Iterable[str]) -> None:
    """The bulk form of :func:`record_changes`, on a psycopg ``cursor``, in one statement
    (it needs no answer, so it can be pipelined with the rest of a batch): one
    ``belief_changes`` row per row of the staging table ``stage``, which holds each
    recomputed key's belief as it now stands (NULL value: gone) with the columns of
    ``belief_changes`` (see :mod:`beliefstore.projector.bulk`), ids allocated in key
    order; then NOTIFY :data:`CHANNEL` with the :func:`notify_payload` fields (the
    schema, the highest id, ``subjects`` sorted, or ``null`` when they would not fit in
    :data:`NOTIFY_LIMIT` bytes), delivered when the transaction commits."""
    listed = json.dumps(sorted(set(subjects)), separators=(",", ":"))
    if len(listed.encode("utf-8")) + _PAYLOAD_OVERHEAD > NOTIFY_LIMIT:
        listed = "null"
    cursor.execute(_RECORD_STAGED.format(stage=stage), (CHANNEL, listed))


def notify(cursor: Any, schema: str, max_id: int, subjects: Iterable[str]) -> None:
    """Send ``NOTIFY`` :data:`CHANNEL` with :func:`notify_payload` on a psycopg
    ``cursor`` (delivered when the transaction commits)."""
    cursor.execute("SELECT pg_notify(%s, %s)",
                   (CHANNEL, notify_payload(schema, max_id, sorted(set(subjects)))))


__all__ = ["CHANNEL", "NOTIFY_LIMIT", "notify", "notify_payload",
           "parse_payload", "record_changes",
           "record_staged_changes", "subject_positions"]
