"""Staleness of beliefs: every belief's ``age_s``, and the ``max_age_s`` filter of the reads.

A belief's age is the time from its newest counting observation (``last_observed_at``,
the fold's ``t_ref``) to the reference instant: now, or ``as_of`` for a past view. A
belief older than ``max_age_s`` is left out of the answer: the agent asked for nothing
it would treat as stale. The age is computed at answer time (never stored), so a cached
read model row still gets a fresh age.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import Query

from beliefstore.api.models import BeliefOut

MaxAge = Annotated[float | None, Query(
    gt=0, description="Leave out beliefs whose newest counting observation is older than "
    "this many seconds (relative to now, or to as_of for a past view).")]
"""The ``max_age_s`` query parameter of the self-model and beliefs reads."""


def age_seconds(belief: BeliefOut, reference: datetime) -> float:
    """Seconds from ``belief.last_observed_at`` to ``reference`` (>= 0; clock skew and
    observations dated in the future count as age 0)."""
    return max(0.0, (reference - belief.last_observed_at).total_seconds())


def with_age(beliefs: list[BeliefOut], max_age_s: float | None = None,
             as_of: datetime | None = None, now: datetime | None = None) -> list[BeliefOut]:
    """``beliefs`` with ``age_s`` set, without those older than ``max_age_s`` seconds.

    Args:
        beliefs: as rendered by :mod:`beliefstore.api.render` (order kept).
        max_age_s: the filter, seconds (> 0); ``None`` keeps every belief.
        as_of: the instant of a past view: ages are measured to it instead of now.
        now: the current time (default ``datetime.now(UTC)``), for tests.

    Returns:
        New :class:`BeliefOut` objects (the inputs are not changed, so a cache of them
        stays valid).
    """
    reference = as_of or now or datetime.now(UTC)
    out = []
    for b in beliefs:
        age = age_seconds(b, reference)
        if max_age_s is not None and age > max_age_s:
            continue
        out.append(b.model_copy(update={"age_s": round(age, 3)}))
    return out


__all__ = ["MaxAge", "age_seconds", "with_age"]
