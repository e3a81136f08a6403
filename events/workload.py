"""A deterministic synthetic workload of beliefstore events, for tests and benchmarks.

Agents observe subjects across several contexts; some repeat themselves, some change
their minds, some retract (their own observations, and now and then someone else's,
which the fold ignores), a few subjects are erased, and some events are delivered
twice. The same ``seed`` always gives the same events.

Two profiles of who is observed (:data:`PROFILES`):

* ``hot-key`` (the default, the original workload): subjects drawn from a Pareto(1.2)
  over subject ranks, so a few subjects get most events (at 250,000 events, 56 % of the
  observations are about one subject).
* ``realistic``: many people with a few dozen observations each. Subjects are drawn from
  a Zipf distribution with exponent s = 1.1 over ``subjects`` ranks (P(rank k) ∝ k^-1.1,
  the exponent commonly fitted to per-user activity), capped: a draw that lands on a
  subject which already has :data:`HOT_CAP` times the mean is redrawn uniformly, so no
  subject gets much more than that, and 1,000,000 events make about 10 per subject
  over 100,000 subjects.
"""

from __future__ import annotations

import bisect
import itertools
import random
import uuid

from beliefstore.events.model import (
    Event,
    ObservationRecorded,
    ObservationRetracted,
    SubjectErased,
)

ATTRIBUTES = {
    "support": {"emotional_state": ["calm", "frustrated", "angry", "relieved"],
                "issue": ["refund", "login", "unauthorized_recurring_charge", "shipping"],
                "expertise_level": ["low", "medium", "high"]},
    "billing": {"plan_status": ["active", "cancelled", "paused"],
                "payment_method": ["card", "invoice", "paypal"]},
    "purchase_motivation": {"primary_driver": ["price", "quality", "speed", "brand"]},
    "communication": {"preference": ["direct", "detailed", "friendly"]},
}
SOURCES = ["triage_agent", "billing_agent", "sales_agent", "research_agent", "sentiment_agent",
           "operator_tool", "churn_model", "qa_agent"]
START_MS = 1767225600000
"""2026-01-01T00:00:00Z."""
PROFILES = ("hot-key", "realistic")
"""Workload profiles of :func:`generate` (see the module docstring)."""
ZIPF_S = 1.1
"""Zipf exponent of the ``realistic`` profile."""
HOT_CAP = 10
"""``realistic``: most events one subject gets, as a multiple of the mean per subject."""


def generate(count: int, *, seed: int = 7, subjects: int | None = None,
             profile: str = "hot-key") -> list[Event]:
    """``count`` events (duplicate deliveries included) about ``subjects`` people
    (default ``count // 10``), in delivery order.

    Mix: ~90 % observations, ~5 % own-source retractions, ~1 % other-source
    retractions, ~0.1 % erasures, ~3 % redeliveries of earlier events. ``profile``
    chooses who is observed: ``hot-key`` or ``realistic`` (module docstring).

    Raises:
        ValueError: an unknown ``profile``.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown workload profile {profile!r}: use one of "
                         f"{', '.join(PROFILES)}")
    rng = random.Random(seed)
    subjects = subjects or max(1, count // 10)
    people = [f"subject-{i:06d}" for i in range(subjects)]
    pick = _hot_key(rng, subjects) if profile == "hot-key" else _realistic(rng, subjects, count)
    keys = [(c, a) for c, attrs in ATTRIBUTES.items() for a in attrs]
    events: list[Event] = []
    observations: list[ObservationRecorded] = []
    clock = START_MS

    def new_id() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    while len(events) < count:
        clock += rng.randint(1, 60_000)
        roll = rng.random()
        if roll < 0.03 and events:
            events.append(rng.choice(events))
        elif roll < 0.08 and observations:
            target = rng.choice(observations)
            events.append(ObservationRetracted(
                event_id=new_id(), subject_id=target.subject_id, source=target.source,
                occurred_at=clock, retracted_event_id=target.event_id, reason="mistaken"))
        elif roll < 0.09 and observations:
            target = rng.choice(observations)
            other = rng.choice([s for s in SOURCES if s != target.source])
            events.append(ObservationRetracted(
                event_id=new_id(), subject_id=target.subject_id, source=other,
                occurred_at=clock, retracted_event_id=target.event_id))
        elif roll < 0.091:
            events.append(SubjectErased(
                event_id=new_id(), subject_id=rng.choice(people), source="privacy_officer",
                occurred_at=clock, reason="erasure request"))
        else:
            subject = people[pick()]
            context, attribute = rng.choice(keys)
            o = ObservationRecorded(
                event_id=new_id(), subject_id=subject, source=rng.choice(SOURCES),
                occurred_at=clock - rng.randint(0, 3_600_000), context=context,
                attribute=attribute, value=rng.choice(ATTRIBUTES[context][attribute]),
                confidence=round(rng.uniform(0.05, 1.0), 3))
            observations.append(o)
            events.append(o)
    return events


def _hot_key(rng: random.Random, subjects: int):  # type: ignore[no-untyped-def]
    """Pareto(1.2) over ranks: low-numbered subjects are observed far more often."""
    return lambda: min(int(rng.paretovariate(1.2)) - 1, subjects - 1)


def _realistic(rng: random.Random, subjects: int, count: int):  # type: ignore[no-untyped-def]
    """Zipf(s = ZIPF_S) over ranks, each subject capped at HOT_CAP x the mean."""
    cumulative = list(itertools.accumulate(1.0 / (k ** ZIPF_S) for k in range(1, subjects + 1)))
    total = cumulative[-1]
    cap = max(1, HOT_CAP * count // subjects)
    seen = [0] * subjects

    def pick() -> int:
        rank = min(bisect.bisect_left(cumulative, rng.random() * total), subjects - 1)
        if seen[rank] >= cap:
            rank = rng.randrange(subjects)
        seen[rank] += 1
        return rank

    return pick
