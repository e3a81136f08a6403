"""Partition ownership for fencing: owner and epoch on projection_offsets.

A worker claims a partition by bumping its epoch; every batch commit checks that
owner and epoch are still its own, in the same transaction, so a worker that lost
the partition in a rebalance cannot commit for it afterwards.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("projection_offsets", sa.Column("owner", sa.Text, nullable=True))
    op.add_column("projection_offsets", sa.Column("epoch", sa.BigInteger, nullable=False,
                                                  server_default="0"))


def downgrade() -> None:
    op.drop_column("projection_offsets", "epoch")
    op.drop_column("projection_offsets", "owner")
