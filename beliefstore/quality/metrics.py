"""Scores of confidences against ground truth: accuracy, Brier score, expected
calibration error, reliability bins, and the handoff repeat-question count.

Every function takes plain sequences: ``confidences`` in [0, 1] (the confidence of the
winning value) and ``correct`` booleans (whether that value was the truth at read time).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_BINS = 10
DEFAULT_THRESHOLD = 0.7
"""Confidence below which a receiving agent asks again."""


def _check(confidences: Sequence[float], correct: Sequence[bool]) -> None:
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} outcomes")
    if not confidences:
        raise ValueError("no predictions to score")
    for c in confidences:
        if not 0.0 <= c <= 1.0 or math.isnan(c):
            raise ValueError(f"confidence {c!r} is outside [0, 1]")


def accuracy(correct: Sequence[bool]) -> float:
    """Fraction of winning values that were true, in [0, 1].

    Raises:
        ValueError: ``correct`` is empty.
    """
    if not correct:
        raise ValueError("no predictions to score")
    return sum(1 for y in correct if y) / len(correct)


def brier_score(confidences: Sequence[float], correct: Sequence[bool]) -> float:
    """Mean squared error ``(1/N) Σ (c_i − y_i)²`` of the winning value's confidence
    against whether it was true, in [0, 1]; lower is better (Brier 1950, in its binary
    form applied to the top label).

    Raises:
        ValueError: empty or unequal inputs, or a confidence outside [0, 1].
    """
    _check(confidences, correct)
    return math.fsum((c - (1.0 if y else 0.0)) ** 2 for c, y in zip(confidences, correct,
                                                                    strict=True)) / len(correct)


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin ``[low, high)`` (the last one includes 1.0).

    Attributes:
        low, high: the bin's edges in [0, 1].
        count: predictions in the bin.
        mean_confidence: their mean confidence (``None`` when empty).
        accuracy: the fraction of them that were true (``None`` when empty).
    """

    low: float
    high: float
    count: int
    mean_confidence: float | None
    accuracy: float | None


def reliability_bins(confidences: Sequence[float], correct: Sequence[bool],
                     bins: int = DEFAULT_BINS) -> list[ReliabilityBin]:
    """``bins`` equal-width bins over [0, 1] with each bin's count, mean confidence and
    accuracy: the data of a reliability diagram (DeGroot & Fienberg 1983; Guo et al. 2017).

    Raises:
        ValueError: empty or unequal inputs, a confidence outside [0, 1], or ``bins < 1``.
    """
    _check(confidences, correct)
    if bins < 1:
        raise ValueError("bins must be >= 1")
    members: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for c, y in zip(confidences, correct, strict=True):
        members[min(int(c * bins), bins - 1)].append((c, y))
    out = []
    for i, m in enumerate(members):
        if m:
            out.append(ReliabilityBin(i / bins, (i + 1) / bins, len(m),
                                      math.fsum(c for c, _ in m) / len(m),
                                      sum(1 for _, y in m if y) / len(m)))
        else:
            out.append(ReliabilityBin(i / bins, (i + 1) / bins, 0, None, None))
    return out


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool],
                               bins: int = DEFAULT_BINS) -> float:
    """``ECE = Σ_b (n_b / N) · |accuracy_b − mean_confidence_b|`` over ``bins`` equal-width
    bins of the confidence, in [0, 1]; 0 is perfectly calibrated (Naeini, Cooper &
    Hauskrecht 2015; Guo et al. 2017).

    Raises:
        ValueError: as :func:`reliability_bins`.
    """
    n = len(confidences)
    return math.fsum(
        b.count / n * abs(b.accuracy - b.mean_confidence)
        for b in reliability_bins(confidences, correct, bins)
        if b.accuracy is not None and b.mean_confidence is not None
    )


@dataclass
class RepeatQuestions:
    """What receiving agents had to ask again over a set of handoffs.

    For each attribute a receiving agent needs that was observed before the handoff: it
    asks again when the belief is missing (``missing``) or below the threshold
    (``low_confidence``); a belief at or above the threshold whose value is not the truth
    is ``wrong`` — the person has to correct the agent, which is worse than asking.
    ``repeats = missing + low_confidence + wrong``; ``answered = needed − repeats``.

    Attributes:
        handoffs: number of handoffs.
        needed: needed attributes that had been observed before their handoff.
        missing, low_confidence, wrong: counts as above.
    """

    handoffs: int = 0
    needed: int = 0
    missing: int = 0
    low_confidence: int = 0
    wrong: int = 0

    @property
    def asks(self) -> int:
        """Questions asked again knowingly: ``missing + low_confidence``."""
        return self.missing + self.low_confidence

    @property
    def repeats(self) -> int:
        """Times the person repeats themselves: ``asks + wrong``."""
        return self.asks + self.wrong

    @property
    def repeats_per_handoff(self) -> float:
        """Mean repeats per handoff (the unit of the published 2.8–3.2 figures)."""
        return self.repeats / self.handoffs if self.handoffs else 0.0

    @property
    def wrong_per_handoff(self) -> float:
        """Mean confident-but-wrong answers per handoff."""
        return self.wrong / self.handoffs if self.handoffs else 0.0

    @property
    def repeat_rate(self) -> float:
        """Repeats per needed (previously observed) attribute, in [0, 1]."""
        return self.repeats / self.needed if self.needed else 0.0

    def add(self, belief: tuple[str, float] | None, truth: str,
            threshold: float = DEFAULT_THRESHOLD) -> None:
        """Count one needed attribute whose belief is ``(value, confidence)`` or ``None``."""
        self.needed += 1
        if belief is None:
            self.missing += 1
        elif belief[1] < threshold:
            self.low_confidence += 1
        elif belief[0] != truth:
            self.wrong += 1


@dataclass(frozen=True)
class AtMostAsks:
    """A method's needed attributes re-scored at the highest threshold that asks at most
    a given number of times (:func:`at_most_asks`).

    Attributes:
        threshold: the confidence below which it asks (a belief at or above answers).
        asks: ``missing`` + beliefs below ``threshold``.
        wrong: beliefs at or above ``threshold`` whose value is not the truth.
    """

    threshold: float
    asks: int
    wrong: int


def at_most_asks(confidences: Sequence[float], correct: Sequence[bool], missing: int,
                 max_asks: int) -> AtMostAsks:
    """Wrong answers of a method when it asks no more often than ``max_asks``: the highest
    threshold ``τ`` with ``missing + #{c < τ} <= max_asks`` (a threshold cannot split
    equal confidences), to compare wrong answers at equal asking.

    Args:
        confidences, correct: the method's needed attributes that had a belief.
        missing: needed attributes without a belief (always asked).
        max_asks: the asking budget (e.g. another method's asks).

    Raises:
        ValueError: unequal inputs.
    """
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} outcomes")
    ranked = sorted(zip(confidences, correct, strict=True), key=lambda p: p[0])
    budget = max_asks - missing
    j = 0  # ask the j least confident; j must fall between two distinct confidences
    for i in range(min(budget, len(ranked)), -1, -1):
        if i == 0 or i == len(ranked) or ranked[i - 1][0] < ranked[i][0]:
            j = i
            break
    threshold = ranked[j][0] if j < len(ranked) else math.inf
    wrong = sum(1 for _, y in ranked[j:] if not y)
    return AtMostAsks(threshold, missing + j, wrong)
