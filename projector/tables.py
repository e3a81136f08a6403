"""The read model's tables (SQLAlchemy Core). Alembic migrations create them.

Tables are unqualified: the PostgreSQL schema they live in is chosen by the
connection's ``search_path`` (``BELIEFSTORE_DB_SCHEMA``), so one database can hold
several projections, or one per test.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()


def _kafka_columns() -> list[sa.Column]:
    return [
        sa.Column("kafka_topic", sa.Text, nullable=False, doc="Topic the event was read from."),
        sa.Column("kafka_partition", sa.Integer, nullable=False),
        sa.Column("kafka_offset", sa.BigInteger, nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=True,
                  doc="The broker's timestamp of the message (append time)."),
        sa.Column("writer_fingerprint", sa.Text, nullable=False,
                  doc="CRC-64-AVRO fingerprint (hex) of the message's writer schema."),
        sa.Column("projected_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
    ]


observations = sa.Table(
    "observations",
    metadata,
    sa.Column("event_id", sa.Uuid(as_uuid=False), primary_key=True),
    sa.Column("subject_id", sa.Text, nullable=False),
    sa.Column("context", sa.Text, nullable=False),
    sa.Column("attribute", sa.Text, nullable=False),
    sa.Column("value", sa.Text, nullable=True, doc="NULL once the subject is erased."),
    sa.Column("confidence", sa.Float(precision=53), nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("evidence", sa.Text, nullable=True),
    sa.Column("metadata", JSONB, nullable=True),
    sa.Column("retracted_by", sa.Uuid(as_uuid=False), nullable=True,
              doc="event_id of the own-source retraction that withdrew it."),
    sa.Column("erased_by", sa.Uuid(as_uuid=False), nullable=True,
              doc="event_id of the erasure that forgot it (value, evidence, metadata wiped)."),
    *_kafka_columns(),
    # A key's or a subject's observations (traces, erasure marks) by its prefix; a
    # (belief, source) pair's newest counting one by walking it (migration 0007).
    sa.Index("observations_key_source", "subject_id", "context", "attribute", "source",
             sa.text("occurred_at DESC"), sa.text("event_id DESC")),
)
"""One row per ObservationRecorded: what a trace reads. Immutable except for the
retraction mark and the erasure redaction."""

retractions = sa.Table(
    "retractions",
    metadata,
    sa.Column("event_id", sa.Uuid(as_uuid=False), primary_key=True),
    sa.Column("subject_id", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("retracted_event_id", sa.Uuid(as_uuid=False), nullable=False, index=True),
    sa.Column("reason", sa.Text, nullable=True),
    *_kafka_columns(),
)
"""One row per ObservationRetracted, including those by another source (ignored by the fold)."""

erasures = sa.Table(
    "erasures",
    metadata,
    sa.Column("event_id", sa.Uuid(as_uuid=False), primary_key=True),
    sa.Column("subject_id", sa.Text, nullable=False, index=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    *_kafka_columns(),
)
"""One row per SubjectErased."""

belief_sources = sa.Table(
    "belief_sources",
    metadata,
    sa.Column("subject_id", sa.Text, primary_key=True),
    sa.Column("context", sa.Text, primary_key=True),
    sa.Column("attribute", sa.Text, primary_key=True),
    sa.Column("source", sa.Text, primary_key=True),
    sa.Column("event_id", sa.Uuid(as_uuid=False), nullable=False),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("confidence", sa.Float(precision=53), nullable=False),
)
"""Per (belief, source): the source's latest observation that counts (not retracted, not
erased), by (occurred_at, event_id). Derived from observations; the fold of these rows
equals the fold of every event of the key, because the fold's steps 1-3 (dedupe,
drop retracted/erased, per-source supersession) leave exactly them."""

beliefs = sa.Table(
    "beliefs",
    metadata,
    sa.Column("subject_id", sa.Text, primary_key=True),
    sa.Column("context", sa.Text, primary_key=True),
    sa.Column("attribute", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("confidence", sa.Float(precision=53), nullable=False),
    sa.Column("score", sa.Float(precision=53), nullable=False),
    sa.Column("alternatives", JSONB, nullable=False, doc="Other value → its confidence."),
    sa.Column("support", JSONB, nullable=False, doc="Counting event ids of the value."),
    sa.Column("sources", JSONB, nullable=False, doc="Sources behind the support."),
    sa.Column("source_count", sa.Integer, nullable=False),
    sa.Column("last_observed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
)
"""The self-model: one row per (subject_id, context, attribute), the fold's result."""

projection_offsets = sa.Table(
    "projection_offsets",
    metadata,
    sa.Column("projection", sa.Text, primary_key=True),
    sa.Column("topic", sa.Text, primary_key=True),
    sa.Column("partition", sa.Integer, primary_key=True),
    sa.Column("next_offset", sa.BigInteger, nullable=False,
              doc="The offset of the next message to apply."),
    sa.Column("high_watermark", sa.BigInteger, nullable=True,
              doc="The partition's log end seen by the worker at that batch (for lag)."),
    sa.Column("owner", sa.Text, nullable=True, doc="The worker that claimed the partition."),
    sa.Column("epoch", sa.BigInteger, nullable=False, server_default="0",
              doc="Bumped by every claim; a commit with an older epoch is fenced off."),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
)
"""Where each projection stands in each partition, written in the batch's transaction."""

belief_changes = sa.Table(
    "belief_changes",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True,
              doc="Commit-ordered per subject (see projector/changes.py): a watch's event id."),
    sa.Column("subject_id", sa.Text, nullable=False),
    sa.Column("context", sa.Text, nullable=False),
    sa.Column("attribute", sa.Text, nullable=False),
    sa.Column("value", sa.Text, nullable=True, doc="NULL: the belief is gone (retracted, erased)."),
    sa.Column("confidence", sa.Float(precision=53), nullable=True),
    sa.Column("alternatives", JSONB, nullable=True),
    sa.Column("sources", JSONB, nullable=True),
    sa.Column("kafka_partition", sa.Integer, nullable=True,
              doc="The partition of the subject's events in the batch that changed it."),
    sa.Column("kafka_offset", sa.BigInteger, nullable=True,
              doc="The batch's last offset of that subject in that partition."),
    sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.Index("belief_changes_subject", "subject_id", "id"),
)
"""One row per recomputed belief per batch, appended in the batch's transaction: what
``GET /v1/subjects/{id}/watch`` streams."""
