"""The read model: observations, retractions, erasures, beliefs, projection_offsets.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _kafka_columns() -> list[sa.Column]:
    return [
        sa.Column("kafka_topic", sa.Text, nullable=False),
        sa.Column("kafka_partition", sa.Integer, nullable=False),
        sa.Column("kafka_offset", sa.BigInteger, nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("writer_fingerprint", sa.Text, nullable=False),
        sa.Column("projected_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
    ]


def upgrade() -> None:
    op.create_table(
        "observations",
        sa.Column("event_id", sa.Uuid(as_uuid=False), primary_key=True),
        sa.Column("subject_id", sa.Text, nullable=False),
        sa.Column("context", sa.Text, nullable=False),
        sa.Column("attribute", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=True),
        sa.Column("confidence", sa.Float(precision=53), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("evidence", sa.Text, nullable=True),
        sa.Column("metadata", JSONB, nullable=True),
        sa.Column("retracted_by", sa.Uuid(as_uuid=False), nullable=True),
        sa.Column("erased_by", sa.Uuid(as_uuid=False), nullable=True),
        *_kafka_columns(),
    )
    op.create_index("observations_key", "observations", ["subject_id", "context", "attribute"])
    op.create_table(
        "retractions",
        sa.Column("event_id", sa.Uuid(as_uuid=False), primary_key=True),
        sa.Column("subject_id", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retracted_event_id", sa.Uuid(as_uuid=False), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        *_kafka_columns(),
    )
    op.create_index("ix_retractions_retracted_event_id", "retractions", ["retracted_event_id"])
    op.create_table(
        "erasures",
        sa.Column("event_id", sa.Uuid(as_uuid=False), primary_key=True),
        sa.Column("subject_id", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        *_kafka_columns(),
    )
    op.create_index("ix_erasures_subject_id", "erasures", ["subject_id"])
    op.create_table(
        "beliefs",
        sa.Column("subject_id", sa.Text, primary_key=True),
        sa.Column("context", sa.Text, primary_key=True),
        sa.Column("attribute", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("confidence", sa.Float(precision=53), nullable=False),
        sa.Column("score", sa.Float(precision=53), nullable=False),
        sa.Column("alternatives", JSONB, nullable=False),
        sa.Column("support", JSONB, nullable=False),
        sa.Column("sources", JSONB, nullable=False),
        sa.Column("source_count", sa.Integer, nullable=False),
        sa.Column("last_observed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
    )
    op.create_table(
        "projection_offsets",
        sa.Column("projection", sa.Text, primary_key=True),
        sa.Column("topic", sa.Text, primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.Column("high_watermark", sa.BigInteger, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
    )


def downgrade() -> None:
    for table in ("projection_offsets", "beliefs", "erasures", "retractions", "observations"):
        op.drop_table(table)
