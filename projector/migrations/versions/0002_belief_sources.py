"""belief_sources: each source's latest counting observation of each belief.

The projector refolds a touched belief from these few rows (one per source) instead
of every observation of the key. Backfilled from observations.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "belief_sources",
        sa.Column("subject_id", sa.Text, primary_key=True),
        sa.Column("context", sa.Text, primary_key=True),
        sa.Column("attribute", sa.Text, primary_key=True),
        sa.Column("source", sa.Text, primary_key=True),
        sa.Column("event_id", sa.Uuid(as_uuid=False), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("confidence", sa.Float(precision=53), nullable=False),
    )
    op.create_index("observations_key_source", "observations",
                    ["subject_id", "context", "attribute", "source"])
    op.execute("""
        INSERT INTO belief_sources
        SELECT DISTINCT ON (subject_id, context, attribute, source)
               subject_id, context, attribute, source, event_id, occurred_at, value, confidence
        FROM observations
        WHERE retracted_by IS NULL AND erased_by IS NULL
        ORDER BY subject_id, context, attribute, source, occurred_at DESC, event_id DESC
    """)


def downgrade() -> None:
    op.drop_index("observations_key_source", "observations")
    op.drop_table("belief_sources")
