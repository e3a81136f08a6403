"""Beliefs as the API returns them: read-model rows and folded beliefs → response models.
"""

from __future__ import annotations

import sqlalchemy as sa

from beliefstore.api.models import (
    BeliefOut,
)
from beliefstore.projector.fold import Belief
from beliefstore.timefmt import from_millis


def belief_out(row: sa.Row) -> BeliefOut:
    """A ``beliefs`` row of the read model as the API's belief."""
    return BeliefOut(
        context=row.context, attribute=row.attribute, value=row.value,
        confidence=row.confidence, alternatives=row.alternatives, sources=row.sources,
        support=row.support, source_count=row.source_count,
        last_observed_at=row.last_observed_at, updated_at=row.updated_at,
    )


def computed_belief_out(b: Belief) -> BeliefOut:
    """A belief folded on the fly (as-of reads) as the API's belief (no ``updated_at``)."""
    return BeliefOut(
        context=b.context, attribute=b.attribute, value=b.value, confidence=b.confidence,
        alternatives=b.alternatives, sources=list(b.sources), support=list(b.support),
        source_count=b.source_count, last_observed_at=from_millis(b.last_observed_at),
        updated_at=None,
    )
