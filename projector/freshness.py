"""The read-time view of a belief: its confidence at the instant it is read.

The fold (:mod:`beliefstore.projector.fold`, DESIGN.md "The fold") is fixed: its weights
decay with ``age_i = t_ref − occurred_at_i`` where ``t_ref`` is the key's newest counting
observation, so a belief's confidence describes the value *as of its newest observation*
and does not fall while nobody re-observes it. This module moves the reference time of
DESIGN.md's weight rule (step 4) to the read instant ``t`` and changes nothing else:

    w_i(t) = trust(source_i) · logit(clip(c_i)) · 2^(−(t − occurred_at_i) / H)

Every counting observation of the key gets the same extra factor
``d = 2^(−(t − t_ref) / H)`` against the fold's weight, so every score is multiplied by
``d > 0``: the winning value, the order of the alternatives and the support are unchanged,
and step 5's confidence becomes

    confidence(v, t) = σ(d · (score(v) − max(0, max_{u≠v} score(u))))
                     = σ(d · logit(confidence(v)))    (the fold's margin, scaled by d)

so a belief nobody re-observed loses confidence toward 0.5 (its log-odds halve every
half-life ``H`` of its context).

Assumption: exponential forgetting with the context's half-life, applied to the
log-odds, as the fold already does between observations; with ``H = ln 2 × mean
time a value lasts`` the factor ``d`` is the probability that the value has not changed
since the newest observation when changes are a Poisson process. It is a heuristic, not
the exact posterior of a drifting value: see docs/confidence.md, "Confidence at read
time".

Pure: no clock, no I/O; the read instant is an argument.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace

from beliefstore.events.model import Event
from beliefstore.projector.fold import Belief, FoldSettings, fold, sigmoid


def decay_factor(last_observed_at: int, at: int, half_life_s: float) -> float:
    """``d = 2^(−max(0, at − last_observed_at) / H)``, in (0, 1].

    Args:
        last_observed_at: the belief's ``t_ref`` (newest counting observation), epoch ms.
        at: the read instant, epoch ms. A read at or before ``last_observed_at`` (clock
            skew between producers and the reader) gets ``d = 1``: the fold's confidence.
        half_life_s: the context's half-life ``H`` in seconds (> 0).

    Raises:
        ValueError: ``half_life_s`` is not a positive finite number.
    """
    if not (half_life_s > 0 and math.isfinite(half_life_s)):
        raise ValueError(f"half-life {half_life_s!r} s must be a positive number of seconds")
    age_ms = max(0, at - last_observed_at)
    return float(2.0 ** (-age_ms / (half_life_s * 1000.0)))


def _logit(p: float) -> float:
    """Unclipped ``ln(p / (1 − p))``, accurate for small ``p`` (``log1p``)."""
    return math.log(p) - math.log1p(-p)


def margin(belief: Belief) -> float:
    """The fold's step-5 margin of the winning value, ``score(v) − max(0, best rival)``.

    Recovered exactly from the belief's stored fields: every alternative's confidence is
    ``σ(score(u) − max(0, score(v)))`` (the winner has the highest score), so the best
    rival is the alternative with the highest confidence and
    ``score(u*) = max(0, score(v)) + logit(confidence(u*))``. No alternative: the rival
    is 0 and the margin is ``score(v)``. Alternatives' confidences are ≤ 0.5, where the
    logit is well conditioned.
    """
    if not belief.alternatives:
        return belief.score
    best = max(belief.alternatives.values())
    if best <= 0.0:  # σ underflowed: the rival's score is far below 0
        return belief.score
    rival = max(0.0, belief.score) + _logit(best)
    return belief.score - max(0.0, rival)


def confidence_at(belief: Belief, at: int, half_life_s: float) -> float:
    """The confidence of ``belief``'s value read at ``at``: ``σ(d · margin)``.

    Args:
        belief: a belief from :func:`beliefstore.projector.fold.fold`.
        at: the read instant, epoch ms.
        half_life_s: the half-life ``H`` of the belief's context, seconds (> 0).

    Returns:
        A confidence in [0.5, 1) for a winning value with a non-negative margin (in
        (0, 0.5) only when every score is negative, e.g. one source reporting below 0.5);
        equal to ``belief.confidence`` when ``at <= belief.last_observed_at``, and
        non-increasing in ``at``, tending to 0.5.

    Raises:
        ValueError: ``half_life_s`` is not positive.
    """
    d = decay_factor(belief.last_observed_at, at, half_life_s)
    if d == 1.0:
        return belief.confidence
    return sigmoid(d * margin(belief))


def belief_at(belief: Belief, at: int, settings: FoldSettings | None = None) -> Belief:
    """``belief`` as read at ``at``: score, confidence and alternatives with the weights
    of DESIGN.md step 4 for ``t_ref = at``; value, support, sources and
    ``last_observed_at`` unchanged.

    Args:
        belief: from :func:`~beliefstore.projector.fold.fold` with the same ``settings``.
        at: the read instant, epoch ms.
        settings: the fold's settings (for the context's half-life); default
            :class:`FoldSettings()`.
    """
    settings = settings or FoldSettings()
    d = decay_factor(belief.last_observed_at, at, settings.half_life_s(belief.context))
    if d == 1.0:
        return belief
    # An alternative's confidence is σ(score(u) − max(0, score(v))): scaled by d as well.
    alternatives = {u: sigmoid(d * _logit(c)) if 0.0 < c < 1.0 else c
                    for u, c in belief.alternatives.items()}
    return replace(belief, score=belief.score * d, confidence=sigmoid(d * margin(belief)),
                   alternatives=alternatives)


def fold_at(events: Iterable[Event], at: int, settings: FoldSettings | None = None) -> list[Belief]:
    """Fold ``events`` and read every belief at ``at`` (:func:`belief_at`).

    Use the events known at ``at`` (``occurred_at <= at``); later events are folded as
    given (their age is taken as 0).

    Args:
        events: any iterable of events, any order, duplicates allowed.
        at: the read instant, epoch ms.
        settings: half-lives and trust; default :class:`FoldSettings()`.

    Returns:
        One belief per key with a counting observation, sorted by key, as read at ``at``.
    """
    settings = settings or FoldSettings()
    return [belief_at(b, at, settings) for b in fold(events, settings)]
