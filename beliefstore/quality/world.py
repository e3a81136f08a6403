"""A seeded simulated world with ground truth, for measuring belief quality.

People (subjects) have attributes in several contexts whose true values drift: each
``(subject, context, attribute)`` keeps a value for an exponentially distributed
dwell time (mean :attr:`AttributeSpec.mean_dwell_s`), then changes to another value
drawn uniformly. Agents (sources) with known reliabilities observe some of those
attributes during conversation sessions and report a value with a self-reported
confidence:

* each observation has a difficulty: its probability ``p`` of being right is drawn
  uniformly from the agent's ``accuracy`` range; it reports the true value with
  probability ``p``, else one of the other values uniformly;
* its reported confidence is ``σ(k · logit(p))`` rounded to 3 places, where ``k`` is the
  agent's ``confidence_scale``: ``k = 1`` is a calibrated agent, ``k > 1`` an
  overconfident one, ``k < 1`` an underconfident one (the temperature model of
  Guo et al. 2017; ``1/k`` is the trust that makes the agent calibrated).

The world also has supersession (an agent looks again and records a new observation of
the same attribute), retractions (the person corrects a wrong observation and its
source retracts it), retractions by another source (ignored by the fold), duplicate
deliveries, a few erasures, handoffs between agents (the receiving agent needs some
attributes), and outcomes (a value later known to be true: a confirmation by the
person, or a system of record).

Everything is a pure function of :class:`WorldSpec` (including its seed): no clock, no
I/O. Times are epoch milliseconds.
"""

from __future__ import annotations

import bisect
import math
import random
import uuid
from collections import defaultdict
from dataclasses import dataclass, field, replace

from beliefstore.events.model import (
    Event,
    ObservationRecorded,
    ObservationRetracted,
    SubjectErased,
)

START_MS = 1767225600000
"""2026-01-01T00:00:00Z, the world's first instant (epoch ms)."""
DAY_S = 86400.0
MINUTE_MS = 60_000

Key = tuple[str, str, str]
"""``(subject_id, context, attribute)``."""


@dataclass(frozen=True)
class AttributeSpec:
    """One attribute of every person.

    Attributes:
        context, attribute: the names used in events.
        values: the possible values (≥ 2).
        mean_dwell_s: mean time a true value lasts before it changes, seconds (> 0).
    """

    context: str
    attribute: str
    values: tuple[str, ...]
    mean_dwell_s: float


@dataclass(frozen=True)
class AgentSpec:
    """One observing agent (a source).

    Attributes:
        source: the agent's id.
        contexts: the contexts whose attributes it observes.
        accuracy: ``(low, high)``: per observation, the probability of reporting the true
            value is drawn uniformly from this range (both in [0, 1]).
        confidence_scale: ``k`` in ``confidence = σ(k · logit(p))``: 1 calibrated, > 1
            overconfident, < 1 underconfident.
        role: ``"front"`` (handles sessions, receives handoffs), ``"companion"`` (observes
            during sessions of front agents), or ``"background"`` (observes at random times).
        rate: for a companion, the probability of observing in a session; for a background
            agent, its mean observations per subject per 30 days.
    """

    source: str
    contexts: tuple[str, ...]
    accuracy: tuple[float, float]
    confidence_scale: float = 1.0
    role: str = "front"
    rate: float = 1.0


ATTRIBUTES: tuple[AttributeSpec, ...] = (
    AttributeSpec("support", "issue", ("refund", "login", "unauthorized_recurring_charge",
                                       "shipping"), 14 * DAY_S),
    AttributeSpec("support", "urgency", ("low", "medium", "high"), 14 * DAY_S),
    AttributeSpec("sentiment", "emotional_state", ("calm", "frustrated", "angry", "relieved"),
                  3 * DAY_S),
    AttributeSpec("billing", "plan_status", ("active", "cancelled", "paused"), 120 * DAY_S),
    AttributeSpec("billing", "payment_method", ("card", "invoice", "paypal"), 120 * DAY_S),
    AttributeSpec("purchase_motivation", "primary_driver", ("price", "quality", "speed", "brand"),
                  180 * DAY_S),
    AttributeSpec("communication", "preference", ("direct", "detailed", "friendly"), 365 * DAY_S),
    AttributeSpec("communication", "expertise_level", ("low", "medium", "high"), 365 * DAY_S),
)
"""The default attributes: contexts grouped so that attributes of one context drift at
about the same rate (one half-life per context)."""

MIXED_AGENTS: tuple[AgentSpec, ...] = (
    AgentSpec("triage_agent", ("support", "sentiment", "communication"), (0.75, 0.98), 1.0),
    AgentSpec("billing_agent", ("billing", "support"), (0.85, 0.99), 1.0),
    AgentSpec("sales_agent", ("purchase_motivation", "communication", "billing"), (0.6, 0.9), 2.0),
    AgentSpec("sentiment_agent", ("sentiment",), (0.5, 0.85), 2.5, role="companion", rate=0.7),
    AgentSpec("research_agent", ("purchase_motivation", "communication", "support"), (0.55, 0.85),
              0.6, role="background", rate=1.0),
    AgentSpec("crm_sync", ("billing",), (0.95, 0.995), 1.0, role="background", rate=0.5),
)
"""The default world's agents: two calibrated front agents, an overconfident sales agent,
an overconfident sentiment classifier, an underconfident research agent and a reliable
system of record."""


def _with_scale(agents: tuple[AgentSpec, ...], scales: dict[str, float]) -> tuple[AgentSpec, ...]:
    return tuple(replace(a, confidence_scale=scales[a.source]) for a in agents)


CALIBRATED_AGENTS = _with_scale(MIXED_AGENTS, {a.source: 1.0 for a in MIXED_AGENTS})
"""The default agents, all calibrated (``k = 1``)."""
OVERCONFIDENT_AGENTS = _with_scale(MIXED_AGENTS, {
    "triage_agent": 2.0, "billing_agent": 1.5, "sales_agent": 2.5, "sentiment_agent": 3.0,
    "research_agent": 2.0, "crm_sync": 1.5,
})
"""The default agents, all overconfident (``k`` from 1.5 to 3)."""


@dataclass(frozen=True)
class WorldSpec:
    """Parameters of a simulated world; the world is a pure function of them.

    Attributes:
        seed: seed of the world's random generator.
        subjects: number of people.
        days: length of the simulated period, days.
        attributes: the attributes every person has.
        agents: the observing agents.
        mean_session_gap_days: mean time between two sessions of one person, days.
        attributes_per_session: ``(low, high)`` attributes a front agent observes per session.
        handoff_probability: probability that a session ends with a handoff.
        extra_needed: ``(low, high)`` attributes of the receiving agent's contexts it needs
            besides those of the session.
        recheck_probability: per observation, probability that the agent looks again a few
            minutes later (a newer observation supersedes it).
        correction_probability: per wrong observation, probability that the person corrects
            it during the session (its source retracts it and observes again).
        foreign_retraction_probability: per observation, probability that another source
            tries to retract it (recorded, ignored by the fold).
        duplicate_probability: per event, probability that it is delivered twice.
        erasure_probability: per subject, probability of one erasure request.
        outcome_probability: per session, probability that the person confirms the true
            value of one attribute observed in it (an outcome for ``calibrate``).
        crm_outcome_probability: per session, probability that a system of record reports a
            billing attribute's true value (an outcome).
        name: a label for reports.
    """

    seed: int = 1
    subjects: int = 400
    days: float = 120.0
    attributes: tuple[AttributeSpec, ...] = ATTRIBUTES
    agents: tuple[AgentSpec, ...] = MIXED_AGENTS
    mean_session_gap_days: float = 12.0
    attributes_per_session: tuple[int, int] = (2, 4)
    handoff_probability: float = 0.6
    extra_needed: tuple[int, int] = (0, 2)
    recheck_probability: float = 0.1
    correction_probability: float = 0.3
    foreign_retraction_probability: float = 0.01
    duplicate_probability: float = 0.03
    erasure_probability: float = 0.01
    outcome_probability: float = 0.5
    crm_outcome_probability: float = 0.2
    name: str = "default"

    def half_lives(self) -> dict[str, float]:
        """Per context, the half-life that matches its drift, seconds.

        A value that changes at Poisson rate ``λ = 1/mean_dwell`` is still true after an
        age ``a`` with probability ``e^(−λa) = 2^(−a/H)`` for ``H = ln 2 · mean_dwell``;
        for a context, the shortest mean dwell of its attributes is used.
        """
        out: dict[str, float] = {}
        for a in self.attributes:
            h = math.log(2) * a.mean_dwell_s
            out[a.context] = min(out.get(a.context, h), h)
        return out


@dataclass(frozen=True)
class Handoff:
    """One handoff: at ``at`` (epoch ms) ``to_source`` takes over ``subject_id`` from
    ``from_source`` and needs the attributes ``needed`` (``(context, attribute)`` pairs)."""

    subject_id: str
    at: int
    from_source: str
    to_source: str
    needed: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Outcome:
    """A value later known to be true: ``value`` of the key at ``known_at`` (epoch ms)."""

    subject_id: str
    context: str
    attribute: str
    value: str
    known_at: int

    @property
    def key(self) -> Key:
        return (self.subject_id, self.context, self.attribute)


@dataclass(frozen=True)
class World:
    """A simulated world.

    Attributes:
        spec: the parameters it was made from.
        events: every event in delivery order (duplicates included).
        truth: key → sorted ``(since_ms, value)`` changes; see :meth:`truth_at`.
        handoffs: the handoffs, by time.
        outcomes: values later known to be true, by time.
        end: the world's last instant, epoch ms.
    """

    spec: WorldSpec
    events: tuple[Event, ...]
    truth: dict[Key, tuple[tuple[int, str], ...]]
    handoffs: tuple[Handoff, ...]
    outcomes: tuple[Outcome, ...]
    end: int
    _times: dict[Key, list[int]] = field(default_factory=dict, repr=False, compare=False)

    def truth_at(self, key: Key, at: int) -> str:
        """The true value of ``key`` at ``at`` (epoch ms).

        Raises:
            KeyError: ``key`` is not in the world.
        """
        changes = self.truth[key]
        times = self._times.get(key)
        if times is None:
            times = self._times[key] = [t for t, _ in changes]
        i = bisect.bisect_right(times, at) - 1
        return changes[max(i, 0)][1]

    def subjects(self) -> list[str]:
        """The subject ids, sorted."""
        return sorted({k[0] for k in self.truth})


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def reported_confidence(p: float, scale: float) -> float:
    """The confidence an agent reports for an observation that is right with probability
    ``p`` (in (0, 1)): ``σ(scale · logit(p))``, rounded to 3 places and kept in
    [0.001, 0.999]."""
    p = min(max(p, 1e-6), 1 - 1e-6)
    c = _sigmoid(scale * math.log(p / (1 - p)))
    return min(max(round(c, 3), 0.001), 0.999)


def simulate(spec: WorldSpec | None = None) -> World:
    """Build the world of ``spec`` (default :class:`WorldSpec()`); deterministic per spec."""
    spec = spec or WorldSpec()
    rng = random.Random(spec.seed)
    end = START_MS + int(spec.days * DAY_S * 1000)
    attrs = {(a.context, a.attribute): a for a in spec.attributes}
    by_context: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for a in spec.attributes:
        by_context[a.context].append((a.context, a.attribute))
    front = [a for a in spec.agents if a.role == "front"]
    companions = [a for a in spec.agents if a.role == "companion"]
    background = [a for a in spec.agents if a.role == "background"]
    if not front:
        raise ValueError("a world needs at least one front agent")

    def new_id() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    people = [f"person-{i:05d}" for i in range(spec.subjects)]
    truth: dict[Key, tuple[tuple[int, str], ...]] = {}
    for person in people:
        for a in spec.attributes:
            t, value = START_MS, rng.choice(a.values)
            changes = [(t, value)]
            while True:
                t += int(rng.expovariate(1.0 / a.mean_dwell_s) * 1000) + 1
                if t > end:
                    break
                value = rng.choice([v for v in a.values if v != value])
                changes.append((t, value))
            truth[(person, a.context, a.attribute)] = tuple(changes)
    world_truth = World(spec, (), truth, (), (), end)

    events: list[Event] = []
    handoffs: list[Handoff] = []
    outcomes: list[Outcome] = []

    def observe(agent: AgentSpec, person: str, ca: tuple[str, str], at: int) -> ObservationRecorded:
        spec_a = attrs[ca]
        key = (person, ca[0], ca[1])
        true_value = world_truth.truth_at(key, at)
        p = rng.uniform(*agent.accuracy)
        value = true_value if rng.random() < p else rng.choice(
            [v for v in spec_a.values if v != true_value])
        o = ObservationRecorded(
            event_id=new_id(), subject_id=person, source=agent.source, occurred_at=at,
            context=ca[0], attribute=ca[1], value=value,
            confidence=reported_confidence(p, agent.confidence_scale))
        events.append(o)
        if rng.random() < spec.foreign_retraction_probability:
            other = rng.choice([a.source for a in spec.agents if a.source != agent.source]
                               or [agent.source + "_peer"])
            events.append(ObservationRetracted(
                event_id=new_id(), subject_id=person, source=other, occurred_at=at + MINUTE_MS,
                retracted_event_id=o.event_id, reason="not mine to retract"))
        return o

    def observe_with_followups(agent: AgentSpec, person: str, ca: tuple[str, str], at: int) -> None:
        o = observe(agent, person, ca, at)
        true_value = world_truth.truth_at(o.key, at)
        if o.value != true_value and rng.random() < spec.correction_probability:
            fix_at = at + rng.randint(1, 5) * MINUTE_MS
            events.append(ObservationRetracted(
                event_id=new_id(), subject_id=person, source=agent.source, occurred_at=fix_at,
                retracted_event_id=o.event_id, reason="corrected by the person"))
            observe(agent, person, ca, fix_at + 1)
        elif rng.random() < spec.recheck_probability:
            observe(agent, person, ca, at + rng.randint(1, 10) * MINUTE_MS)

    for person in people:
        t = START_MS
        while True:
            t += int(rng.expovariate(1.0 / (spec.mean_session_gap_days * DAY_S)) * 1000)
            if t > end - 3_600_000:
                break
            agent = rng.choice(front)
            keys = [ca for c in agent.contexts for ca in by_context.get(c, [])]
            lo, hi = spec.attributes_per_session
            session_keys = rng.sample(keys, min(len(keys), rng.randint(lo, hi)))
            for ca in session_keys:
                observe_with_followups(agent, person, ca, t + rng.randint(0, 20) * MINUTE_MS)
            for comp in companions:
                if rng.random() < comp.rate:
                    for ca in [ca for c in comp.contexts for ca in by_context.get(c, [])]:
                        observe_with_followups(comp, person, ca, t + rng.randint(0, 20) * MINUTE_MS)
            session_end = t + 30 * MINUTE_MS
            if rng.random() < spec.outcome_probability and session_keys:
                ca = rng.choice(session_keys)
                known_at = session_end + rng.randint(0, 120) * MINUTE_MS
                outcomes.append(Outcome(person, ca[0], ca[1],
                                        world_truth.truth_at((person, *ca), known_at), known_at))
            billing = by_context.get("billing", [])
            if billing and rng.random() < spec.crm_outcome_probability:
                ca = rng.choice(billing)
                known_at = session_end + rng.randint(0, 24 * 60) * MINUTE_MS
                outcomes.append(Outcome(person, ca[0], ca[1],
                                        world_truth.truth_at((person, *ca), known_at), known_at))
            if len(front) > 1 and rng.random() < spec.handoff_probability:
                to = rng.choice([a for a in front if a.source != agent.source])
                own = [ca for c in to.contexts for ca in by_context.get(c, [])
                       if ca not in session_keys]
                lo, hi = spec.extra_needed
                extra = rng.sample(own, min(len(own), rng.randint(lo, hi)))
                handoffs.append(Handoff(person, session_end, agent.source, to.source,
                                        tuple(session_keys) + tuple(extra)))
        for agent in background:
            keys = [ca for c in agent.contexts for ca in by_context.get(c, [])]
            n = _poisson(rng, agent.rate * spec.days / 30.0)
            for _ in range(n):
                at = START_MS + rng.randint(0, end - START_MS)
                observe_with_followups(agent, person, rng.choice(keys), at)
        if rng.random() < spec.erasure_probability:
            events.append(SubjectErased(
                event_id=new_id(), subject_id=person, source="privacy_officer",
                occurred_at=START_MS + rng.randint(0, end - START_MS), reason="erasure request"))

    delivered: list[Event] = []
    for e in events:
        delivered.append(e)
        if rng.random() < spec.duplicate_probability:
            delivered.append(e)
    return World(
        spec=spec,
        events=tuple(delivered),
        truth=truth,
        handoffs=tuple(sorted(handoffs, key=lambda h: (h.at, h.subject_id))),
        outcomes=tuple(sorted(outcomes, key=lambda o: (o.known_at, o.key))),
        end=end,
    )


def _poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw by Knuth's method (means here are small)."""
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1
