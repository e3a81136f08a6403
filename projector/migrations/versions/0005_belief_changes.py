"""belief_changes: every change of a belief, in commit order, for watchers.

The projector appends one row per recomputed belief in the batch's transaction and
NOTIFYs the API processes; ``GET /v1/subjects/{id}/watch`` streams them, and its
``Last-Event-ID`` is a row id, so a watcher resumes without gaps or duplicates.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "belief_changes",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("subject_id", sa.Text, nullable=False),
        sa.Column("context", sa.Text, nullable=False),
        sa.Column("attribute", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=True),
        sa.Column("confidence", sa.Float(precision=53), nullable=True),
        sa.Column("alternatives", JSONB, nullable=True),
        sa.Column("sources", JSONB, nullable=True),
        sa.Column("kafka_partition", sa.Integer, nullable=True),
        sa.Column("kafka_offset", sa.BigInteger, nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
    )
    op.create_index("belief_changes_subject", "belief_changes", ["subject_id", "id"])


def downgrade() -> None:
    op.drop_index("belief_changes_subject", "belief_changes")
    op.drop_table("belief_changes")
