"""A partial index of counting observations, newest first per (belief, source).

Refreshing a (belief, source) pair after a retraction or erasure becomes one index
probe instead of a scan of the pair's whole history.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "observations_counting_latest", "observations",
        ["subject_id", "context", "attribute", "source", sa.text("occurred_at DESC"),
         sa.text("event_id DESC")],
        postgresql_where=sa.text("retracted_by IS NULL AND erased_by IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("observations_counting_latest", "observations")
