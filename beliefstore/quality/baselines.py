"""The merges teams use today, as baselines for the fold.

Each baseline is a pure function with the fold's input shape — any iterable of events,
any order, duplicates allowed — and returns one :class:`Estimate` per key, sorted by key.
To compare merge rules and nothing else, every baseline first applies the fold's steps
1–3 (DESIGN.md, "The fold"): dedupe by ``event_id``; drop observations retracted by
their own source and observations of an erased subject at or before the erasure; keep
each source's latest observation of a key (by ``(occurred_at, event_id)``). Ties are
broken as the fold does: the value whose newest counting observation is newer, then the
greater value in code-point order.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from beliefstore.events.model import (
    Event,
    ObservationRecorded,
    ObservationRetracted,
    SubjectErased,
)
from beliefstore.projector.fold import FoldSettings, fold, logit, sigmoid
from beliefstore.projector.freshness import decay_factor, fold_at

Key = tuple[str, str, str]


@dataclass(frozen=True)
class Estimate:
    """A method's answer for one key: its winning ``value``, that value's
    ``confidence`` in [0, 1], and ``observed_at``, the newest counting observation of the
    key (epoch ms; ``None`` if the method does not say)."""

    key: Key
    value: str
    confidence: float
    observed_at: int | None = None


Method = Callable[[Iterable[Event]], list[Estimate]]
"""A merge: events → one estimate per key, sorted by key."""


@dataclass(frozen=True)
class ReadMethod:
    """A merge that also takes the read instant: ``(events, at) → estimates``.

    :func:`beliefstore.quality.evaluate.evaluate` calls it with the handoff's time.
    """

    run: Callable[[Iterable[Event], int], list[Estimate]]

    def __call__(self, events: Iterable[Event], at: int) -> list[Estimate]:
        return self.run(events, at)


def live_observations(events: Iterable[Event]) -> list[ObservationRecorded]:
    """The fold's steps 1–2: observations deduplicated by ``event_id``, without those
    retracted by their own source or erased (an erasure of the subject at or after them),
    in delivery order. Superseded ones are kept (step 3 is the caller's)."""
    seen: set[str] = set()
    observations: list[ObservationRecorded] = []
    retracted: dict[str, set[str]] = defaultdict(set)
    erased: dict[str, int] = {}
    for e in events:
        if e.event_id in seen:
            continue
        seen.add(e.event_id)
        if isinstance(e, ObservationRecorded):
            observations.append(e)
        elif isinstance(e, ObservationRetracted):
            retracted[e.retracted_event_id].add(e.source)
        elif isinstance(e, SubjectErased):
            erased[e.subject_id] = max(erased.get(e.subject_id, e.occurred_at), e.occurred_at)
    return [o for o in observations
            if o.source not in retracted.get(o.event_id, ())
            and not (o.subject_id in erased and o.occurred_at <= erased[o.subject_id])]


def counting_observations(events: Iterable[Event]) -> dict[Key, list[ObservationRecorded]]:
    """The fold's steps 1–3: per key, each source's latest live observation, sorted by
    ``(occurred_at, event_id)``."""
    latest: dict[tuple[Key, str], ObservationRecorded] = {}
    for o in live_observations(events):
        current = latest.get((o.key, o.source))
        if current is None or (o.occurred_at, o.event_id) > (current.occurred_at, current.event_id):
            latest[(o.key, o.source)] = o
    out: dict[Key, list[ObservationRecorded]] = defaultdict(list)
    for (key, _), o in latest.items():
        out[key].append(o)
    return {k: sorted(v, key=lambda o: (o.occurred_at, o.event_id)) for k, v in sorted(out.items())}


def _decide(key: Key, observations: list[ObservationRecorded], scores: dict[str, float],
            confidence: dict[str, float]) -> Estimate:
    newest: dict[str, int] = {}
    for o in observations:
        newest[o.value] = max(newest.get(o.value, o.occurred_at), o.occurred_at)
    winner = max(scores, key=lambda v: (scores[v], newest[v], v))
    return Estimate(key, winner, confidence[winner], observations[-1].occurred_at)


def last_write_wins(events: Iterable[Event]) -> list[Estimate]:
    """A shared stash: the newest observation's value, with its reported confidence."""
    out = []
    for key, obs in counting_observations(events).items():
        o = obs[-1]
        out.append(Estimate(key, o.value, o.confidence, o.occurred_at))
    return out


def highest_confidence(events: Iterable[Event]) -> list[Estimate]:
    """The most confident report wins (ties: newest), with its reported confidence."""
    out = []
    for key, obs in counting_observations(events).items():
        o = max(obs, key=lambda o: (o.confidence, o.occurred_at, o.event_id))
        out.append(Estimate(key, o.value, o.confidence, obs[-1].occurred_at))
    return out


def majority_vote(events: Iterable[Event]) -> list[Estimate]:
    """One vote per source; the value with most votes wins; its confidence is its share of
    the votes."""
    out = []
    for key, obs in counting_observations(events).items():
        votes: dict[str, float] = defaultdict(float)
        for o in obs:
            votes[o.value] += 1.0
        out.append(_decide(key, obs, votes, {v: k / len(obs) for v, k in votes.items()}))
    return out


def mean_confidence(events: Iterable[Event]) -> list[Estimate]:
    """Per value, the mean reported confidence of its sources' latest observations; the
    value with the highest mean wins, with that mean as its confidence."""
    out = []
    for key, obs in counting_observations(events).items():
        by_value: dict[str, list[float]] = defaultdict(list)
        for o in obs:
            by_value[o.value].append(o.confidence)
        means = {v: math.fsum(cs) / len(cs) for v, cs in by_value.items()}
        out.append(_decide(key, obs, means, means))
    return out


def fold_method(settings: FoldSettings | None = None) -> Method:
    """The real fold (``beliefstore.projector.fold.fold``) as a :data:`Method`."""

    def run(events: Iterable[Event]) -> list[Estimate]:
        return [Estimate(b.key, b.value, b.confidence, b.last_observed_at)
                for b in fold(events, settings)]

    return run


def fold_at_read_method(settings: FoldSettings | None = None) -> ReadMethod:
    """The fold read at the read instant
    (:func:`beliefstore.projector.freshness.fold_at`) as a :class:`ReadMethod`."""

    def run(events: Iterable[Event], at: int) -> list[Estimate]:
        return [Estimate(b.key, b.value, b.confidence, b.last_observed_at)
                for b in fold_at(events, at, settings)]

    return ReadMethod(run)


def aged(method: Method, settings: FoldSettings | None = None) -> ReadMethod:
    """``method`` with the fold's read-time decay applied to its confidence:
    ``σ(d · logit(c))``, ``d = 2^(−(at − observed_at) / H)`` (H: the context's half-life
    in ``settings``). For separating what read-time decay gains from what the merge rule
    gains; the estimates must carry ``observed_at``.

    Raises:
        ValueError: an estimate has no ``observed_at``.
    """
    settings = settings or FoldSettings()

    def run(events: Iterable[Event], at: int) -> list[Estimate]:
        out = []
        for e in method(events):
            if e.observed_at is None:
                raise ValueError(f"{e.key}: the method gives no observed_at to age from")
            d = decay_factor(e.observed_at, at, settings.half_life_s(e.key[1]))
            out.append(Estimate(e.key, e.value, sigmoid(d * logit(e.confidence)),
                                e.observed_at))
        return out

    return ReadMethod(run)


BASELINES: dict[str, Method] = {
    "last_write_wins": last_write_wins,
    "highest_confidence": highest_confidence,
    "majority_vote": majority_vote,
    "mean_confidence": mean_confidence,
}
"""The four baselines by name."""
