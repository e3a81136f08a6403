"""One index of ``observations`` by key and source instead of two.

``observations_key_source`` (subject_id, context, attribute, source) served the lookups of
a key's or a subject's observations (traces, ``load_events``, the erasure marks) and the
partial ``observations_counting_latest`` (the same columns, then ``occurred_at DESC,
event_id DESC``, only rows neither retracted nor erased) the refresh of a (belief, source)
pair after a retraction or erasure. Both are replaced by one full index,
``observations_key_source`` (subject_id, context, attribute, source, occurred_at DESC,
event_id DESC): its prefix serves the first lookups, and the refresh walks a pair's
observations newest first and stops at the first one that counts (usually the first).
Every inserted observation then updates two b-trees besides its primary key, not three,
and a retraction's mark or an erasure's redaction changes no indexed column (issue 11).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_KEY_SOURCE = ["subject_id", "context", "attribute", "source"]
_NEWEST_FIRST = [sa.text("occurred_at DESC"), sa.text("event_id DESC")]


def upgrade() -> None:
    op.drop_index("observations_counting_latest", "observations")
    op.drop_index("observations_key_source", "observations")
    op.create_index("observations_key_source", "observations", [*_KEY_SOURCE, *_NEWEST_FIRST])


def downgrade() -> None:
    op.drop_index("observations_key_source", "observations")
    op.create_index("observations_key_source", "observations", _KEY_SOURCE)
    op.create_index("observations_counting_latest", "observations",
                    [*_KEY_SOURCE, *_NEWEST_FIRST],
                    postgresql_where=sa.text("retracted_by IS NULL AND erased_by IS NULL"))
