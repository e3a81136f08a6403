"""A deterministic synthetic workload of beliefstore events, for tests and benchmarks.

Agents observe subjects across several contexts; some repeat themselves, some change
their minds, some retract (their own observations, and now and then someone else's,
which the fold ignores), a few subjects are erased, and some events are delivered
twice. The same ``seed`` always gives the same events.
"""

from __future__ import annotations

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


def generate(count: int, *, seed: int = 7, subjects: int | None = None) -> list[Event]:
    """``count`` events (duplicate deliveries included) about ``subjects`` people
    (default ``count // 10``), in delivery order.

    Mix: ~90 % observations, ~5 % own-source retractions, ~1 % other-source
    retractions, ~0.1 % erasures, ~3 % redeliveries of earlier events.
    """
    rng = random.Random(seed)
    subjects = subjects or max(1, count // 10)
    people = [f"subject-{i:06d}" for i in range(subjects)]
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
            # Zipf-like activity: low-numbered subjects are observed far more often.
            subject = people[min(int(rng.paretovariate(1.2)) - 1, subjects - 1)]
            context, attribute = rng.choice(keys)
            o = ObservationRecorded(
                event_id=new_id(), subject_id=subject, source=rng.choice(SOURCES),
                occurred_at=clock - rng.randint(0, 3_600_000), context=context,
                attribute=attribute, value=rng.choice(ATTRIBUTES[context][attribute]),
                confidence=round(rng.uniform(0.05, 1.0), 3))
            observations.append(o)
            events.append(o)
    return events
