"""Bulk SQL of the projection: COPY rows, staging tables and set-based statements.

Shared by the batch apply (:meth:`ProjectionRecorder.apply
<beliefstore.projector.store.ProjectionRecorder.apply>`) and the bulk rebuild of a fresh
projection (:mod:`beliefstore.projector.rebuild`). Everything here works on one psycopg 3
connection inside the caller's transaction; nothing commits.

Staging tables are session-local temporary tables (``ON COMMIT DELETE ROWS``), created
once per connection (:func:`ensure_staging`) and emptied by every commit or rollback:

* ``beliefstore_stage_obs``: the batch's observation rows (``COPY``), same columns as
  ``observations``;
* ``beliefstore_stage_stale``: ``(subject_id, context, attribute, source)`` pairs whose
  counting observation a retraction or erasure may have removed;
* ``beliefstore_stage_marks``: a bulk rebuild's retraction and erasure marks;
* ``beliefstore_stage_beliefs``: the refolded beliefs of the touched keys (``value`` NULL:
  the belief is gone) with the Kafka partition and offset of the batch's events about
  the subject, for ``belief_changes``.

Row builders turn events into the tuples ``COPY`` writes (times as ``datetime`` in UTC,
JSON columns as JSON text).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from beliefstore.events.model import ObservationRecorded, ObservationRetracted, SubjectErased
from beliefstore.projector.fold import Belief, Key
from beliefstore.timefmt import from_millis

if TYPE_CHECKING:
    import psycopg

    from beliefstore.projector.store import LogPosition

STAGE_OBS = "beliefstore_stage_obs"
STAGE_STALE = "beliefstore_stage_stale"
STAGE_BELIEFS = "beliefstore_stage_beliefs"
STAGE_MARKS = "beliefstore_stage_marks"

KAFKA_COLUMNS = ("kafka_topic", "kafka_partition", "kafka_offset", "recorded_at",
                 "writer_fingerprint")
OBS_COLUMNS = ("event_id", "subject_id", "context", "attribute", "value", "confidence",
               "source", "occurred_at", "evidence", "metadata", *KAFKA_COLUMNS)
"""Columns of an observation row as :func:`observation_row` builds it."""
RETRACTION_COLUMNS = ("event_id", "subject_id", "source", "occurred_at",
                      "retracted_event_id", "reason", *KAFKA_COLUMNS)
ERASURE_COLUMNS = ("event_id", "subject_id", "source", "occurred_at", "reason",
                   *KAFKA_COLUMNS)
BELIEF_COLUMNS = ("subject_id", "context", "attribute", "value", "confidence", "score",
                  "alternatives", "support", "sources", "source_count", "last_observed_at")
"""Columns of a belief row as :func:`belief_row` builds it (``updated_at`` defaults)."""
SOURCE_COLUMNS = ("subject_id", "context", "attribute", "source", "event_id", "occurred_at",
                  "value", "confidence")
"""Columns of ``belief_sources``."""

_STAGING_DDL = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGE_OBS} (LIKE observations INCLUDING DEFAULTS) "
    "ON COMMIT DELETE ROWS",
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGE_STALE} (subject_id text, context text, "
    "attribute text, source text) ON COMMIT DELETE ROWS",
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGE_BELIEFS} (subject_id text, context text, "
    "attribute text, value text, confidence float8, score float8, alternatives jsonb, "
    "support jsonb, sources jsonb, source_count integer, last_observed_at timestamptz, "
    "kafka_partition integer, kafka_offset bigint) ON COMMIT DELETE ROWS",
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGE_MARKS} (event_id uuid, retracted_by uuid, "
    "erased_by uuid) ON COMMIT DELETE ROWS",
)


STAGED_BYTES_PER_EVENT = 2048
"""Upper estimate of the staging-table bytes one event of a live batch takes (measured:
a 500-event batch of the benchmark workload stages 180 KB in its four tables, 360 bytes
an event), to size the live projector's ``temp_buffers``
(:func:`live_temp_buffers_kib`)."""


def live_temp_buffers_kib(batch_size: int) -> int:
    """``temp_buffers`` (KiB) for a connection that stages live batches of up to
    ``batch_size`` events: :data:`STAGED_BYTES_PER_EVENT` per event, at least 1 MiB and
    at most 8 MiB (PostgreSQL's default).

    Why: a session's temporary-table buffers are allocated as its clock sweep first
    reaches each of its ``temp_buffers`` slots, and ``ON COMMIT DELETE ROWS`` frees the
    pages but not the slots' memory, so a long-lived connection that stages one small
    batch after another ends up holding all of ``temp_buffers`` (8 MiB by default),
    growing towards it for minutes. Sized to what a batch needs, the projector's backend
    reaches its bound within seconds. A larger batch still works: its staging pages
    then go to the temporary file (PostgreSQL's own spilling).
    """
    return max(1024, min(8192, batch_size * STAGED_BYTES_PER_EVENT // 1024))


def ensure_staging(conn: psycopg.Connection, temp_buffers_kib: int | None = None) -> None:
    """Create the staging tables of this session (idempotent) and commit; with
    ``temp_buffers_kib``, first set the session's ``temp_buffers`` to that many KiB
    (possible only before the session's first use of a temporary table, so pass it the
    first time; see :func:`live_temp_buffers_kib`).

    Must run outside a batch's transaction: it commits, so the tables outlive a batch
    that rolls back.
    """
    with conn.cursor() as cur:
        if temp_buffers_kib is not None:
            cur.execute(f"SET temp_buffers = '{int(temp_buffers_kib)}kB'")
        for ddl in _STAGING_DDL:
            cur.execute(ddl)
    conn.commit()


# -- rows ---------------------------------------------------------------------------------


def _kafka(p: LogPosition) -> tuple:
    return (p.topic, p.partition, p.offset,
            from_millis(p.recorded_at) if p.recorded_at is not None else None,
            p.writer_fingerprint)


def observation_row(e: ObservationRecorded, p: LogPosition) -> tuple:
    """The :data:`OBS_COLUMNS` tuple of an observation read at ``p``."""
    return (e.event_id, e.subject_id, e.context, e.attribute, e.value, e.confidence,
            e.source, from_millis(e.occurred_at), e.evidence,
            json.dumps(dict(e.metadata)) if e.metadata is not None else None, *_kafka(p))


def retraction_row(e: ObservationRetracted, p: LogPosition) -> tuple:
    """The :data:`RETRACTION_COLUMNS` tuple of a retraction read at ``p``."""
    return (e.event_id, e.subject_id, e.source, from_millis(e.occurred_at),
            e.retracted_event_id, e.reason, *_kafka(p))


def erasure_row(e: SubjectErased, p: LogPosition) -> tuple:
    """The :data:`ERASURE_COLUMNS` tuple of an erasure read at ``p``."""
    return (e.event_id, e.subject_id, e.source, from_millis(e.occurred_at), e.reason,
            *_kafka(p))


def belief_row(b: Belief) -> tuple:
    """The :data:`BELIEF_COLUMNS` tuple of a belief (JSON columns as JSON text, by
    ``orjson``: the same JSON values as :func:`json.dumps`, written faster)."""
    return (b.subject_id, b.context, b.attribute, b.value, b.confidence, b.score,
            orjson.dumps(b.alternatives).decode(), orjson.dumps(b.support).decode(),
            orjson.dumps(b.sources).decode(), b.source_count, from_millis(b.last_observed_at))


def copy_rows(cur: psycopg.Cursor, table: str, columns: Sequence[str],
              rows: Iterable[Sequence[Any]]) -> None:
    """``COPY table (columns) FROM STDIN`` of ``rows`` (text format)."""
    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


# -- statements of the batch apply ---------------------------------------------------------

INDEX_PROBES_ONLY = ("SELECT set_config('enable_hashjoin', 'off', true), "
                     "set_config('enable_mergejoin', 'off', true), "
                     "set_config('enable_seqscan', 'off', true)")
"""For the batch's transaction: every statement is driven by a batch's few hundred rows,
so it must probe the read model's indexes, never read a whole table. The planner cannot
be trusted to see that: the staging tables have no statistics, so a hash or merge join
would read all of ``belief_sources`` or ``observations``; and the statistics of the read
model's own tables lag behind it until autovacuum's next ANALYZE (a minute or more while
a projector catches up), so a plan made while a table was small (psycopg prepares a
statement from its sixth execution, and PostgreSQL keeps its generic plan) scans it
sequentially from then on. Measured before ``enable_seqscan`` was turned off here:
:data:`MARK_ERASED` scanned all of ``observations`` for every erasure (20 ms each at
300,000 events) and :data:`MARK_RETRACTED` all of ``retractions`` for every batch (2 ms
at 200,000 events), both growing with the read model. Sequential scans of the staging
tables remain (they have no index)."""

_COLS = ", ".join(OBS_COLUMNS)

MARK_RETRACTED = f"""
WITH marked AS (
  UPDATE observations o SET retracted_by = r.event_id FROM retractions r
  WHERE r.event_id = ANY(%s::uuid[]) AND o.event_id = r.retracted_event_id
    AND o.source = r.source AND o.retracted_by IS NULL
  RETURNING o.subject_id, o.context, o.attribute, o.source)
INSERT INTO {STAGE_STALE} SELECT * FROM marked
"""
"""Mark the observations the batch's own-source retractions withdraw (param: their
event ids); their (key, source) pairs go to the stale stage."""

MARK_ERASED = f"""
WITH marked AS (
  UPDATE observations o SET erased_by = e.event_id, value = NULL, evidence = NULL,
         metadata = NULL
  FROM erasures e
  WHERE e.event_id = ANY(%s::uuid[]) AND o.subject_id = e.subject_id
    AND o.occurred_at <= e.occurred_at AND o.erased_by IS NULL
  RETURNING o.subject_id, o.context, o.attribute, o.source)
INSERT INTO {STAGE_STALE} SELECT * FROM marked
"""
"""Wipe the observations the batch's erasures forget (param: their event ids); their
(key, source) pairs go to the stale stage."""

_SRC = ", ".join(SOURCE_COLUMNS)
_O_SRC = ", ".join(f"o.{c}" for c in SOURCE_COLUMNS)
UPSERT_SOURCE = (
    "ON CONFLICT (subject_id, context, attribute, source) DO UPDATE SET "
    "event_id = excluded.event_id, occurred_at = excluded.occurred_at, "
    "value = excluded.value, confidence = excluded.confidence "
    "WHERE (belief_sources.occurred_at, belief_sources.event_id) "
    "< (excluded.occurred_at, excluded.event_id)"
)
"""The conflict clause of an insert into ``belief_sources``: a (key, source) pair keeps
its newest observation, by ``(occurred_at, event_id)`` (also the raw limit's
``same_writes`` ceiling, ``bench/raw_upsert_limit.py``)."""

INSERT_OBSERVATIONS = f"""
WITH inserted AS (
INSERT INTO observations ({_COLS}, retracted_by, erased_by)
SELECT s.event_id, s.subject_id, s.context, s.attribute,
       CASE WHEN er.event_id IS NULL THEN s.value END, s.confidence, s.source, s.occurred_at,
       CASE WHEN er.event_id IS NULL THEN s.evidence END,
       CASE WHEN er.event_id IS NULL THEN s.metadata END,
       s.kafka_topic, s.kafka_partition, s.kafka_offset, s.recorded_at, s.writer_fingerprint,
       (SELECT r.event_id FROM retractions r
         WHERE r.retracted_event_id = s.event_id AND r.source = s.source LIMIT 1),
       er.event_id
FROM {STAGE_OBS} s
LEFT JOIN LATERAL (SELECT e.event_id FROM erasures e
                    WHERE e.subject_id = s.subject_id AND s.occurred_at <= e.occurred_at
                    LIMIT 1) er ON true
ON CONFLICT (event_id) DO NOTHING
RETURNING {_SRC}, retracted_by, erased_by)
INSERT INTO belief_sources ({_SRC})
SELECT DISTINCT ON (subject_id, context, attribute, source) {_SRC}
FROM inserted WHERE retracted_by IS NULL AND erased_by IS NULL
ORDER BY subject_id, context, attribute, source, occurred_at DESC, event_id DESC
{UPSERT_SOURCE}
"""
"""Staged observations into ``observations``, marked at once by the retractions and
erasures already stored (they may arrive before their observation), duplicates skipped;
then, per (key, source), the newest counting one of the rows it inserted replaces the
stored ``belief_sources`` row when it is newer (by ``(occurred_at, event_id)``).

The advance reads the inserted rows (``RETURNING``), not ``observations``: a lookup of
the batch's event ids there let the planner walk the whole partial index
``observations_counting_latest`` (dropped since, migration 0007) for its order (20 ms a
batch at 100,000 events, growing with the table). A duplicate of a stored event inserts
nothing, so it advances nothing (its first delivery did). An observation the batch's own
retractions or erasures then mark is refreshed by :data:`REFRESH_STALE`, which runs after the marks."""

REFRESH_STALE = (
    f"""
DELETE FROM belief_sources bs USING (SELECT DISTINCT * FROM {STAGE_STALE}) st
WHERE bs.subject_id = st.subject_id AND bs.context = st.context
  AND bs.attribute = st.attribute AND bs.source = st.source
""",
    f"""
INSERT INTO belief_sources ({_SRC})
SELECT l.* FROM (SELECT DISTINCT * FROM {STAGE_STALE}) st
CROSS JOIN LATERAL (
  SELECT {_O_SRC} FROM observations o
  WHERE o.subject_id = st.subject_id AND o.context = st.context
    AND o.attribute = st.attribute AND o.source = st.source
    AND o.retracted_by IS NULL AND o.erased_by IS NULL
  ORDER BY o.occurred_at DESC, o.event_id DESC LIMIT 1) l
""",
)
"""Recompute the stale pairs' ``belief_sources`` rows from ``observations``: per pair, a
walk of the index ``observations_key_source`` newest first, to the first observation
neither retracted nor erased (migration 0007)."""

TOUCHED_SOURCES = f"""
SELECT k.subject_id, k.context, k.attribute, bs.source, bs.event_id::text,
       (extract(epoch FROM bs.occurred_at) * 1000)::bigint, bs.value, bs.confidence
FROM (SELECT subject_id, context, attribute FROM {STAGE_OBS}
      UNION SELECT subject_id, context, attribute FROM {STAGE_STALE}) k
LEFT JOIN belief_sources bs
  ON bs.subject_id = k.subject_id AND bs.context = k.context AND bs.attribute = k.attribute
"""
"""Every key the batch touched (its observations' keys and the stale pairs' keys) with
its ``belief_sources`` rows (NULLs when it has none), occurred_at in epoch ms."""

_BCOLS = ", ".join(BELIEF_COLUMNS)
_BSET = ", ".join(f"{c} = excluded.{c}" for c in BELIEF_COLUMNS[3:])
UPSERT_BELIEFS = f"""
INSERT INTO beliefs ({_BCOLS})
SELECT {_BCOLS} FROM {STAGE_BELIEFS} WHERE value IS NOT NULL
ON CONFLICT (subject_id, context, attribute) DO UPDATE SET {_BSET}, updated_at = now()
"""
DELETE_GONE_BELIEFS = f"""
DELETE FROM beliefs b USING {STAGE_BELIEFS} k
WHERE k.value IS NULL AND b.subject_id = k.subject_id AND b.context = k.context
  AND b.attribute = k.attribute
"""

UPSERT_OFFSETS = """
INSERT INTO projection_offsets (projection, topic, partition, next_offset, high_watermark)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (projection, topic, partition) DO UPDATE SET
  next_offset = excluded.next_offset, high_watermark = excluded.high_watermark,
  updated_at = now()
"""

LOCK_OFFSETS = """
SELECT partition, epoch FROM projection_offsets
WHERE projection = %s AND topic = %s AND partition = ANY(%s)
FOR UPDATE
"""
"""The fence of a batch: lock its partitions' offset rows (a concurrent claim waits for the
batch's transaction) and read their epochs. Params: projection, topic, partitions."""

ASYNCHRONOUS_COMMIT = "SET LOCAL synchronous_commit TO off"
"""First statement of a batch transaction that commits without waiting for the WAL flush
(see :class:`~beliefstore.projector.worker.ProjectorWorker`)."""


def insert_sql(table: str, columns: Sequence[str]) -> str:
    """``INSERT INTO table (columns) VALUES (%s, ...)``: the direct path's stand-in for
    :func:`copy_rows` (pipelined with ``executemany``; the same rows, the same values)."""
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})"


APPLY_MARKS = f"""
UPDATE observations o SET retracted_by = m.retracted_by, erased_by = m.erased_by,
  value = CASE WHEN m.erased_by IS NULL THEN o.value END,
  evidence = CASE WHEN m.erased_by IS NULL THEN o.evidence END,
  metadata = CASE WHEN m.erased_by IS NULL THEN o.metadata END
FROM {STAGE_MARKS} m WHERE o.event_id = m.event_id
"""
"""A bulk rebuild's retraction and erasure marks (computed in memory) onto the rows it
COPYed (an erased observation's value, evidence and metadata wiped)."""

STAGE_BELIEF_COLUMNS = (*BELIEF_COLUMNS, "kafka_partition", "kafka_offset")


def staged_belief_rows(keys: Iterable[Key], folded: dict[Key, Belief],
                       where: dict[str, tuple[int, int]]) -> list[tuple]:
    """:data:`STAGE_BELIEF_COLUMNS` tuples of ``keys``: the belief of ``folded`` (or NULLs:
    gone) and the subject's ``(partition, offset)`` from ``where`` (or NULLs)."""
    rows = []
    for key in keys:
        p, o = where.get(key[0], (None, None))
        b = folded.get(key)
        if b is None:
            rows.append((*key, None, None, None, None, None, None, None, None, p, o))
        else:
            rows.append((*belief_row(b), p, o))
    return rows


__all__ = [
    "APPLY_MARKS", "ASYNCHRONOUS_COMMIT", "LOCK_OFFSETS", "insert_sql",
    "BELIEF_COLUMNS", "DELETE_GONE_BELIEFS", "ERASURE_COLUMNS",
    "INDEX_PROBES_ONLY", "INSERT_OBSERVATIONS", "MARK_ERASED", "MARK_RETRACTED", "OBS_COLUMNS",
    "REFRESH_STALE",
    "RETRACTION_COLUMNS", "SOURCE_COLUMNS", "STAGE_BELIEFS", "STAGE_BELIEF_COLUMNS",
    "STAGE_MARKS", "STAGE_OBS", "STAGE_STALE", "TOUCHED_SOURCES", "UPSERT_BELIEFS",
    "UPSERT_SOURCE",
    "UPSERT_OFFSETS",
    "belief_row", "copy_rows", "ensure_staging", "erasure_row", "live_temp_buffers_kib",
    "observation_row",
    "retraction_row", "staged_belief_rows",
]
