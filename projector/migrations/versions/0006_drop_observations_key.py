"""Drop ``observations_key``: a prefix of ``observations_key_source``.

``observations_key`` (subject_id, context, attribute) is the leading part of
``observations_key_source`` (subject_id, context, attribute, source), so every lookup it
served (a key's or a subject's observations: traces, ``load_events``, the erasure marks,
the API's subject checks) is served by the longer one, checked with ``EXPLAIN``, and
each inserted observation updated one b-tree more than it needed (issue 11).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("observations_key", "observations")


def downgrade() -> None:
    op.create_index("observations_key", "observations", ["subject_id", "context", "attribute"])
