"""Run merge methods over a simulated world and score them against its ground truth.

The reads are the world's handoffs: at each handoff, each method merges every event
about the subject that occurred up to that instant, and every belief of the subject is
scored against the true value at that instant (accuracy, Brier score, ECE); the
attributes the receiving agent needs are counted as answered, asked again, or wrong
(:class:`~beliefstore.quality.metrics.RepeatQuestions`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from beliefstore.events.model import Event, ObservationRecorded, SubjectErased
from beliefstore.quality.baselines import Method, ReadMethod
from beliefstore.quality.metrics import (
    DEFAULT_BINS,
    DEFAULT_THRESHOLD,
    ReliabilityBin,
    RepeatQuestions,
    accuracy,
    brier_score,
    expected_calibration_error,
    reliability_bins,
)
from beliefstore.quality.world import World

AGE_BUCKETS_DAYS: tuple[tuple[float, float], ...] = ((0.0, 1.0), (1.0, 7.0), (7.0, math.inf))
"""Age of a belief at its read (read time − newest counting observation), in days:
the buckets of :attr:`MethodResult.by_age`."""


@dataclass(frozen=True)
class AgeBucket:
    """Scores of the beliefs whose age at the read is in ``[low_days, high_days)``.

    Attributes:
        low_days, high_days: the bucket's edges, days (``high_days`` may be ``inf``).
        n: beliefs in it; accuracy, mean_confidence, brier, ece: their scores
            (``None`` when ``n == 0``).
    """

    low_days: float
    high_days: float
    n: int
    accuracy: float | None
    mean_confidence: float | None
    brier: float | None
    ece: float | None


@dataclass(frozen=True)
class MethodResult:
    """Scores of one method over one world.

    ``needed_confidences`` and ``needed_correct`` are the per-attribute records behind
    ``needed_*`` (the needed attributes that had a belief, in handoff order), for
    comparisons at another threshold (:func:`beliefstore.quality.metrics.at_most_asks`).

    Attributes:
        name: the method's name.
        n: beliefs scored (one per subject key with a belief, per handoff).
        accuracy: fraction of winning values true at read time, [0, 1].
        brier: Brier score of the winning value's confidence, [0, 1], lower is better.
        ece: expected calibration error, 10 equal-width bins, [0, 1].
        bins: the reliability bins behind ``ece``.
        repeats: the handoff repeat-question counts.
        needed_n, needed_accuracy, needed_brier, needed_ece: the same scores over only the
            attributes the receiving agents needed (and that had a belief), ``None`` if none.
        by_age: the scores of all beliefs by their age at the read (:data:`AGE_BUCKETS_DAYS`).
    """

    name: str
    n: int
    accuracy: float
    brier: float
    ece: float
    bins: tuple[ReliabilityBin, ...]
    repeats: RepeatQuestions
    needed_n: int = 0
    needed_accuracy: float | None = None
    needed_brier: float | None = None
    needed_ece: float | None = None
    by_age: tuple[AgeBucket, ...] = ()
    needed_confidences: tuple[float, ...] = field(default=(), repr=False)
    needed_correct: tuple[bool, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Evaluation:
    """Every method's scores over one world.

    Attributes:
        world: the world's name; seed, subjects, events: its size.
        handoffs: handoffs evaluated.
        threshold: confidence below which a receiving agent asks again, [0, 1].
        no_context: the repeat counts without shared context (every needed attribute
            that was observed before is asked again).
        methods: name → :class:`MethodResult`, in the order given.
    """

    world: str
    seed: int
    subjects: int
    events: int
    handoffs: int
    threshold: float
    no_context: RepeatQuestions
    methods: dict[str, MethodResult] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with the derived per-handoff rates."""
        def repeats(r: RepeatQuestions) -> dict[str, Any]:
            return {**asdict(r), "asks": r.asks, "repeats": r.repeats,
                    "repeats_per_handoff": r.repeats_per_handoff,
                    "wrong_per_handoff": r.wrong_per_handoff, "repeat_rate": r.repeat_rate}

        return {
            "world": self.world, "seed": self.seed, "subjects": self.subjects,
            "events": self.events, "handoffs": self.handoffs, "threshold": self.threshold,
            "no_context": repeats(self.no_context),
            "methods": {
                name: {"n": m.n, "accuracy": m.accuracy, "brier": m.brier, "ece": m.ece,
                       "bins": [asdict(b) for b in m.bins], "repeats": repeats(m.repeats),
                       "needed": {"n": m.needed_n, "accuracy": m.needed_accuracy,
                                  "brier": m.needed_brier, "ece": m.needed_ece},
                       "by_age": [asdict(b) for b in m.by_age]}
                for name, m in self.methods.items()
            },
        }


def _observed(events: list[Event], key: tuple[str, str, str], at: int) -> bool:
    erased = max((e.occurred_at for e in events
                  if isinstance(e, SubjectErased) and e.occurred_at <= at), default=None)
    return any(isinstance(e, ObservationRecorded) and e.key == key and e.occurred_at <= at
               and (erased is None or e.occurred_at > erased) for e in events)


def evaluate(world: World, methods: Mapping[str, Method | ReadMethod], *,
             threshold: float = DEFAULT_THRESHOLD, subjects: Collection[str] | None = None,
             bins: int = DEFAULT_BINS) -> Evaluation:
    """Score ``methods`` over ``world``'s handoffs.

    Args:
        world: from :func:`beliefstore.quality.world.simulate`.
        methods: name → merge function (events → estimates), or a
            :class:`~beliefstore.quality.baselines.ReadMethod` (called with the handoff's
            time as well).
        threshold: confidence below which a receiving agent asks again, [0, 1].
        subjects: only evaluate these subjects' handoffs (default: all).
        bins: number of equal-width ECE bins.

    Raises:
        ValueError: no handoff had a belief to score.
    """
    by_subject: dict[str, list[Event]] = defaultdict(list)
    for e in world.events:
        by_subject[e.subject_id].append(e)
    handoffs = [h for h in world.handoffs if subjects is None or h.subject_id in subjects]
    scored: dict[str, tuple[list[float], list[bool]]] = {n: ([], []) for n in methods}
    ages: dict[str, list[float]] = {n: [] for n in methods}
    scored_needed: dict[str, tuple[list[float], list[bool]]] = {n: ([], []) for n in methods}
    repeats = {n: RepeatQuestions() for n in methods}
    no_context = RepeatQuestions()
    for h in handoffs:
        events = [e for e in by_subject.get(h.subject_id, []) if e.occurred_at <= h.at]
        needed = [(h.subject_id, c, a) for c, a in h.needed
                  if _observed(events, (h.subject_id, c, a), h.at)]
        no_context.handoffs += 1
        for key in needed:
            no_context.add(None, world.truth_at(key, h.at), threshold)
        for name, method in methods.items():
            found = method(events, h.at) if isinstance(method, ReadMethod) else method(events)
            estimates = {e.key: e for e in found}
            confs, correct = scored[name]
            for belief in estimates.values():
                confs.append(belief.confidence)
                correct.append(belief.value == world.truth_at(belief.key, h.at))
                ages[name].append(math.nan if belief.observed_at is None
                                  else (h.at - belief.observed_at) / 86_400_000)
            r = repeats[name]
            r.handoffs += 1
            for key in needed:
                est = estimates.get(key)
                truth = world.truth_at(key, h.at)
                r.add(None if est is None else (est.value, est.confidence), truth, threshold)
                if est is not None:
                    scored_needed[name][0].append(est.confidence)
                    scored_needed[name][1].append(est.value == truth)
    result = Evaluation(world.spec.name, world.spec.seed,
                        len(subjects) if subjects is not None else world.spec.subjects,
                        len(world.events), len(handoffs), threshold, no_context)
    for name in methods:
        confs, correct = scored[name]
        if not confs:
            raise ValueError(f"{name}: no belief was read at any handoff")
        nc, ny = scored_needed[name]
        result.methods[name] = MethodResult(
            name, len(confs), accuracy(correct), brier_score(confs, correct),
            expected_calibration_error(confs, correct, bins),
            tuple(reliability_bins(confs, correct, bins)), repeats[name],
            len(nc), accuracy(ny) if ny else None, brier_score(nc, ny) if nc else None,
            expected_calibration_error(nc, ny, bins) if nc else None,
            _by_age(confs, correct, ages[name], bins), tuple(nc), tuple(ny))
    return result


def _by_age(confs: list[float], correct: list[bool], ages: list[float],
            bins: int) -> tuple[AgeBucket, ...]:
    out = []
    for low, high in AGE_BUCKETS_DAYS:
        idx = [i for i, a in enumerate(ages) if low <= a < high]
        c, y = [confs[i] for i in idx], [correct[i] for i in idx]
        out.append(AgeBucket(low, high, len(idx), accuracy(y) if y else None,
                             math.fsum(c) / len(c) if c else None,
                             brier_score(c, y) if c else None,
                             expected_calibration_error(c, y, bins) if c else None))
    return tuple(out)
