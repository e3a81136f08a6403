"""Learn each source's trust from outcomes (values later known to be true).

An **outcome** says the key ``(subject_id, context, attribute)`` had ``value`` at
``known_at`` (epoch ms): a system of record, or a confirmation by the person. Each live
observation (not retracted by its own source, not erased) is **labelled** by the first
outcome of its key known at or after it, at most ``window_s`` later: ``y = 1`` when the
observation's value equals the outcome's value, else ``y = 0``.

Per source, the trust ``a`` is fitted by maximum likelihood in

    P(y = 1) = σ(a · x),   x = logit(clip(confidence, 0.001, 0.999))

— Platt scaling (Platt 1999) without intercept: a logistic calibration through the
origin of the observation's log-odds. This is exactly how the fold uses trust
(``w = trust · logit(c)``), so ``a`` is the factor that makes the source's log-odds
calibrated: ``a < 1`` shrinks an overconfident source, ``a > 1`` boosts an
underconfident one. The fit uses Newton's method on the concave log-likelihood; its
standard error is ``1 / sqrt(I(â))`` with the Fisher information
``I(a) = Σ σ(a x_i) (1 − σ(a x_i)) x_i²``, giving the Wald 95% interval
``â ± 1.96 · SE``.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from beliefstore.events.model import (
    Event,
)
from beliefstore.projector.fold import logit, sigmoid
from beliefstore.quality.baselines import live_observations
from beliefstore.quality.world import Outcome

DEFAULT_MIN_OUTCOMES = 50
"""Labelled observations a source needs before its trust is fitted. With typical
confidences (0.6–0.95) 50 outcomes give a 95% interval of about ±0.5 around a
trust of 1 — enough to tell a source that is twice too confident (trust ≈ 0.5) from a
calibrated one (1.0); with fewer, the interval spans both."""
DEFAULT_WINDOW_S = 7 * 86400.0
"""How long before an outcome an observation may be and still be labelled by it:
7 days, in seconds."""
Z_95 = 1.959963984540054
"""The standard normal's 97.5% quantile."""
MAX_TRUST = 100.0
"""Beyond this slope a fit is reported as unbounded (separable data)."""


class CalibrationError(ValueError):
    """Outcomes cannot be used or are too few; the message says what to fix."""


@dataclass(frozen=True)
class OutcomeLineError(CalibrationError):
    """A line of an outcomes file is malformed.

    Attributes:
        path: the file; line: the 1-based line number; message: what is wrong and the fix.
    """

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}: line {self.line}: {self.message}"


_OUTCOME_FIELDS = ("subject_id", "context", "attribute", "value")
_OUTCOME_EXAMPLE = ('{"subject_id": "p-1", "context": "billing", "attribute": "plan_status", '
                    '"value": "active", "known_at": 1767225600000}')


def parse_outcome(data: object) -> Outcome:
    """An :class:`Outcome` from one decoded JSON object.

    Raises:
        ValueError: naming the missing or malformed field.
    """
    if not isinstance(data, dict):
        raise ValueError(f"must be a JSON object like {_OUTCOME_EXAMPLE}")
    for name in (*_OUTCOME_FIELDS, "known_at"):
        if name not in data:
            raise ValueError(f"{name}: missing; every outcome needs subject_id, context, "
                             "attribute, value and known_at")
    for name in _OUTCOME_FIELDS:
        if not isinstance(data[name], str) or not data[name].strip():
            raise ValueError(f"{name}: must be a non-empty string")
    known_at = data["known_at"]
    if isinstance(known_at, bool) or not isinstance(known_at, int) or known_at < 0:
        raise ValueError(f"known_at: must be epoch milliseconds (a non-negative integer), "
                         f"got {known_at!r}")
    return Outcome(data["subject_id"], data["context"], data["attribute"], data["value"],
                   known_at)


def load_outcomes(path: str | Path) -> list[Outcome]:
    """Read a JSON Lines file of outcomes (blank lines skipped).

    Raises:
        OutcomeLineError: naming the file and the first bad line.
        OSError: the file cannot be read.
    """
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append(parse_outcome(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise OutcomeLineError(str(path), number, f"is not valid JSON ({exc.msg}); "
                                       f"write one object per line, e.g. {_OUTCOME_EXAMPLE}"
                                       ) from None
            except ValueError as exc:
                raise OutcomeLineError(str(path), number, str(exc)) from None
    return out


@dataclass(frozen=True)
class Labelled:
    """One observation with its outcome: ``x`` = logit of its confidence, ``y`` = matched."""

    source: str
    event_id: str
    confidence: float
    matched: bool

    @property
    def x(self) -> float:
        return logit(self.confidence)


def label(events: Iterable[Event], outcomes: Iterable[Outcome],
          window_s: float = DEFAULT_WINDOW_S) -> list[Labelled]:
    """Label each live observation with the first outcome of its key known at or after it
    and at most ``window_s`` seconds later; observations without one are left out.

    Live: deduplicated by ``event_id``, not retracted by its own source, not erased (an
    erasure at or after it). Superseded observations count: they were the source's claim
    at their time.
    """
    by_key: dict[tuple[str, str, str], list[Outcome]] = defaultdict(list)
    for o in outcomes:
        by_key[o.key].append(o)
    times = {}
    for k, v in by_key.items():
        v.sort(key=lambda o: o.known_at)
        times[k] = [o.known_at for o in v]
    window_ms = window_s * 1000.0
    out = []
    for obs in sorted(live_observations(events), key=lambda o: (o.occurred_at, o.event_id)):
        if obs.key not in by_key:
            continue
        i = bisect.bisect_left(times[obs.key], obs.occurred_at)
        if i == len(times[obs.key]) or times[obs.key][i] - obs.occurred_at > window_ms:
            continue
        out.append(Labelled(obs.source, obs.event_id, obs.confidence,
                            obs.value == by_key[obs.key][i].value))
    return out


def _log_likelihood(a: float, xs: Sequence[float], ys: Sequence[bool]) -> float:
    total = []
    for x, y in zip(xs, ys, strict=True):
        z = a * x if y else -a * x  # log σ(z): the probability of what happened
        total.append(-math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z)))
    return math.fsum(total)


def _fisher(a: float, xs: Sequence[float]) -> float:
    return math.fsum(sigmoid(a * x) * (1.0 - sigmoid(a * x)) * x * x for x in xs)


@dataclass(frozen=True)
class SlopeFit:
    """A fitted slope ``a`` of ``P(y) = σ(a · x)``.

    Attributes:
        slope: the maximum-likelihood ``a`` (``±inf`` when the data are separable).
        se: its standard error ``1/sqrt(I(a))`` (``inf`` when unbounded or I = 0).
        iterations: Newton iterations used.
    """

    slope: float
    se: float
    iterations: int

    @property
    def ci95(self) -> tuple[float, float]:
        """Wald 95% interval ``slope ± 1.96 · se``."""
        return (self.slope - Z_95 * self.se, self.slope + Z_95 * self.se)


def fit_slope(xs: Sequence[float], ys: Sequence[bool], *, start: float = 1.0,
              tol: float = 1e-10, max_iter: int = 100) -> SlopeFit:
    """Maximum-likelihood slope of a logistic regression through the origin (Platt 1999
    without intercept), by Newton's method with step halving.

    Args:
        xs: log-odds of the reported confidences (any reals).
        ys: whether each observation matched its outcome.

    Returns:
        The fit; ``slope = +inf`` when every informative observation (``x ≠ 0``) is on the
        side its confidence predicts (no mistake at confidence > 0.5 and no success at
        < 0.5), ``-inf`` when every one is on the other side.

    Raises:
        ValueError: unequal lengths, or no observation with ``x ≠ 0``.
    """
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} confidences but {len(ys)} outcomes")
    informative = [(x, y) for x, y in zip(xs, ys, strict=True) if x != 0.0]
    if not informative:
        raise ValueError("no observation with a confidence other than 0.5: nothing to fit")
    if all((x > 0) == y for x, y in informative):
        return SlopeFit(math.inf, math.inf, 0)
    if all((x > 0) != y for x, y in informative):
        return SlopeFit(-math.inf, math.inf, 0)
    a, ll = start, _log_likelihood(start, xs, ys)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (the count is reported)
        gradient = math.fsum((y - sigmoid(a * x)) * x for x, y in zip(xs, ys, strict=True))
        info = _fisher(a, xs)
        if info <= 0.0:
            break
        step, new_ll = gradient / info, -math.inf
        while True:
            new_ll = _log_likelihood(a + step, xs, ys)
            if new_ll >= ll - 1e-12 or abs(step) < tol:
                break
            step /= 2.0
        a, ll = a + step, new_ll
        if abs(step) < tol * max(1.0, abs(a)):
            break
    info = _fisher(a, xs)
    return SlopeFit(a, 1.0 / math.sqrt(info) if info > 0 else math.inf, iterations)


@dataclass(frozen=True)
class SourceFit:
    """One source's calibration.

    Attributes:
        source: the source.
        n: labelled observations.
        accuracy: fraction that matched their outcome, [0, 1].
        mean_confidence: their mean reported confidence, [0, 1].
        trust: the fitted slope (``inf`` if unbounded).
        se: its standard error; ci_low, ci_high: the Wald 95% interval.
        note: why the fitted slope is not used as is (unbounded, negative), else ``""``.
    """

    source: str
    n: int
    accuracy: float
    mean_confidence: float
    trust: float
    se: float
    ci_low: float
    ci_high: float
    note: str = ""

    @property
    def usable_trust(self) -> float | None:
        """The trust to configure: the slope clipped to [0, MAX_TRUST], ``None`` when the
        data cannot bound it."""
        if math.isinf(self.trust):
            return None
        return min(max(self.trust, 0.0), MAX_TRUST)


def calibrate(labelled: Iterable[Labelled], *, min_outcomes: int = DEFAULT_MIN_OUTCOMES,
              skip_few: bool = False) -> list[SourceFit]:
    """Fit each source's trust from its labelled observations.

    Args:
        labelled: from :func:`label`.
        min_outcomes: labelled observations each source needs (≥ 1).
        skip_few: leave out sources with too few instead of raising.

    Returns:
        One :class:`SourceFit` per source, sorted by source.

    Raises:
        CalibrationError: no labelled observation at all, or (unless ``skip_few``) a
            source has fewer than ``min_outcomes``; the message names each such source,
            its count and how many it needs.
    """
    if min_outcomes < 1:
        raise CalibrationError("min_outcomes must be at least 1")
    by_source: dict[str, list[Labelled]] = defaultdict(list)
    for item in labelled:
        by_source[item.source].append(item)
    if not by_source:
        raise CalibrationError("no observation has an outcome of its key known at or after "
                               "it within the window: check that the outcomes' subject_id, "
                               "context and attribute match the events, and the window")
    few = {s: len(v) for s, v in by_source.items() if len(v) < min_outcomes}
    if few and not skip_few:
        detail = ", ".join(f"{s} has {n}" for s, n in sorted(few.items()))
        raise CalibrationError(
            f"too few outcomes to fit trust: {detail}; each source needs at least "
            f"{min_outcomes} observations with an outcome (more outcomes, a lower "
            "--min-outcomes, or --skip-few to leave those sources at trust 1.0)")
    fits = []
    for source in sorted(by_source):
        items = by_source[source]
        if len(items) < min_outcomes:
            continue
        xs = [i.x for i in items]
        ys = [i.matched for i in items]
        acc = sum(ys) / len(ys)
        mean_c = math.fsum(i.confidence for i in items) / len(items)
        try:
            fit = fit_slope(xs, ys)
        except ValueError as exc:
            fits.append(SourceFit(source, len(items), acc, mean_c, math.nan, math.inf,
                                  math.nan, math.nan, str(exc)))
            continue
        note = ""
        if fit.slope == math.inf:
            note = ("unbounded: no mistake at confidence > 0.5 among its outcomes; "
                    "left at the default trust, collect more outcomes")
        elif fit.slope == -math.inf:
            note = "unbounded below: every confident observation was wrong; trust 0"
        elif fit.slope < 0:
            note = "negative slope (worse than chance): use trust 0"
        elif fit.slope > MAX_TRUST:
            note = f"clipped to {MAX_TRUST:g}"
        low, high = fit.ci95
        fits.append(SourceFit(source, len(items), acc, mean_c, fit.slope, fit.se, low, high,
                              note))
    return fits


def trust_setting(fits: Iterable[SourceFit]) -> dict[str, float]:
    """Source → trust to configure (rounded to 3 places); unbounded or failed fits of a
    source left out (it keeps the default 1.0), except ``-inf`` which becomes 0."""
    out = {}
    for f in fits:
        if f.trust == -math.inf:
            out[f.source] = 0.0
        elif f.usable_trust is not None and not math.isnan(f.trust):
            out[f.source] = round(f.usable_trust, 3)
    return out


def trust_env_line(trust: dict[str, float]) -> str:
    """The ``BELIEFSTORE_TRUST=source=weight,...`` line for ``trust``."""
    return "BELIEFSTORE_TRUST=" + ",".join(f"{s}={w:g}" for s, w in sorted(trust.items()))
