"""The read-time view of a belief (projector/freshness.py): hand-computed examples, the
identity with DESIGN.md's weight rule for ``t_ref = t``, monotone decay, purity."""

from __future__ import annotations

import math
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beliefstore.events.model import ObservationRecorded
from beliefstore.projector import freshness
from beliefstore.projector.fold import FoldSettings, Status, fold, sigmoid, trace
from beliefstore.projector.freshness import (
    belief_at,
    confidence_at,
    decay_factor,
    fold_at,
    margin,
)
from tests.conftest import case_events, load_cases

T0 = 1767225600000
DAY_MS = 86_400_000
ONE_DAY = FoldSettings(half_lives={"support": 86400.0})


def obs(source: str, value: str, confidence: float, at: int, n: int) -> ObservationRecorded:
    return ObservationRecorded(event_id=str(uuid.UUID(int=n + 1, version=4)), subject_id="s1",
                               source=source, occurred_at=T0 + at, context="support",
                               attribute="issue", value=value, confidence=confidence)


def test_one_observation_by_hand() -> None:
    (b,) = fold([obs("a", "refund", 0.8, 0, 0)], ONE_DAY)
    assert b.confidence == pytest.approx(0.8)
    # d = 1/2 after one half-life: σ(½ · ln 4) = σ(ln 2) = 2/3.
    assert confidence_at(b, T0 + DAY_MS, 86400.0) == pytest.approx(2 / 3, abs=1e-12)
    # d = 1/4: σ(¼ · ln 4) = √2 / (1 + √2).
    assert confidence_at(b, T0 + 2 * DAY_MS, 86400.0) == pytest.approx(
        math.sqrt(2) / (1 + math.sqrt(2)), abs=1e-12)


def test_two_agreeing_sources_by_hand() -> None:
    events = [obs("a", "refund", 0.8, 0, 1), obs("b", "refund", 0.8, DAY_MS, 2)]
    (b,) = fold(events, ONE_DAY)
    assert b.confidence == pytest.approx(8 / 9)  # σ(1.5 · ln 4) = 8 / 9
    # read a day after the newest: ln 4 · (¼ + ½) = 0.75 · ln 4 → 4^0.75 / (1 + 4^0.75)
    (r,) = fold_at(events, T0 + 2 * DAY_MS, ONE_DAY)
    assert r.confidence == pytest.approx(4**0.75 / (1 + 4**0.75), abs=1e-12)
    assert (r.value, r.support, r.last_observed_at) == (b.value, b.support, b.last_observed_at)


def test_conflict_and_alternatives_by_hand() -> None:
    events = [obs("a", "refund", 0.9, 0, 3), obs("b", "login", 0.6, DAY_MS, 4)]
    (b,) = fold(events, ONE_DAY)
    # refund: ½ · ln 9 = ln 3; login: ln 1.5 → σ(ln 2) = 2/3 and σ(−ln 2) = 1/3
    assert (b.value, b.confidence) == ("refund", pytest.approx(2 / 3))
    assert b.alternatives["login"] == pytest.approx(1 / 3)
    assert margin(b) == pytest.approx(math.log(2), abs=1e-12)
    r = belief_at(b, T0 + 2 * DAY_MS, ONE_DAY)
    assert r.confidence == pytest.approx(math.sqrt(2) / (1 + math.sqrt(2)), abs=1e-12)
    assert r.alternatives["login"] == pytest.approx(1 / (1 + math.sqrt(2)), abs=1e-12)
    assert r.score == pytest.approx(math.log(3) / 2, abs=1e-12)


def test_decay_factor() -> None:
    assert decay_factor(T0, T0 + 3 * DAY_MS, 86400.0) == 0.125
    assert decay_factor(T0, T0 - DAY_MS, 86400.0) == 1.0  # clock skew: no growth
    with pytest.raises(ValueError, match="half-life"):
        decay_factor(T0, T0, 0.0)


def test_equals_the_fold_at_t_ref_on_every_merge_vector() -> None:
    for case in load_cases():
        s = case["settings"]
        fs = FoldSettings(half_lives=s.get("half_lives", {}), trust=s.get("trust", {}))
        for b in fold(case_events(case), fs):
            for at in (b.last_observed_at, b.last_observed_at - 5000):
                r = belief_at(b, at, fs)
                assert r == b, case.get("name")


def brute_force(events: list[ObservationRecorded], at: int, fs: FoldSettings) -> dict:
    """DESIGN.md steps 4–5 recomputed from the trace's counting observations with
    ``t_ref = at``."""
    out = {}
    for b in fold(events, fs):
        _, entries = trace(events, b.key, fs)
        scores: dict[str, list[float]] = {}
        for e in entries:
            if e.status is Status.COUNTING:
                assert e.trust is not None and e.log_odds is not None
                age = at - e.event.occurred_at
                w = e.trust * e.log_odds * 2.0 ** (-age / (fs.half_life_s(b.context) * 1000))
                scores.setdefault(e.event.value, []).append(w)
        total = {v: math.fsum(ws) for v, ws in scores.items()}

        def conf(v: str, total: dict[str, float] = total) -> float:
            rival = max((s for u, s in total.items() if u != v), default=0.0)
            return sigmoid(total[v] - max(0.0, rival))

        out[b.key] = (conf(b.value), {u: conf(u) for u in total if u != b.value})
    return out


observations = st.lists(
    st.tuples(st.sampled_from("abcd"), st.sampled_from(["x", "y", "z"]),
              st.floats(0.05, 0.999), st.integers(0, 10 * DAY_MS)),
    min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(observations, st.integers(0, 60 * DAY_MS), st.floats(0.5, 90.0))
def test_equals_the_weight_rule_with_t_ref_at_the_read(raw, later, half_life_days) -> None:
    events = [obs(s, v, round(c, 3), t, i) for i, (s, v, c, t) in enumerate(raw)]
    fs = FoldSettings(half_lives={"support": half_life_days * 86400.0})
    at = T0 + 10 * DAY_MS + later
    expected = brute_force(events, at, fs)
    for r in fold_at(events, at, fs):
        conf, alternatives = expected[r.key]
        assert r.confidence == pytest.approx(conf, abs=1e-9)
        assert r.alternatives == pytest.approx(alternatives, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(observations)
def test_confidence_decays_monotonically_toward_one_half(raw) -> None:
    events = [obs(s, v, round(c, 3), t, i) for i, (s, v, c, t) in enumerate(raw)]
    for b in fold(events, ONE_DAY):
        reads = [confidence_at(b, b.last_observed_at + k * DAY_MS // 2, 86400.0)
                 for k in range(0, 80)]
        distance = [abs(c - 0.5) for c in reads]
        assert reads[0] == b.confidence
        assert all(x >= y - 1e-15 for x, y in zip(distance, distance[1:], strict=False))
        assert all((c >= 0.5) == (b.confidence >= 0.5) for c in reads)
        assert distance[-1] < 1e-9


def test_pure_no_clock() -> None:
    events = [obs("a", "refund", 0.9, 0, 5), obs("b", "login", 0.7, DAY_MS, 6)]
    first = fold_at(events, T0 + 5 * DAY_MS, ONE_DAY)
    assert fold_at(list(reversed(events * 2)), T0 + 5 * DAY_MS, ONE_DAY) == first
    assert first != fold_at(events, T0 + 6 * DAY_MS, ONE_DAY)
    source = freshness.__loader__.get_source(freshness.__name__)  # type: ignore[union-attr]
    assert source is not None
    for clock in ("import time", "datetime", "time.time", "monotonic"):
        assert clock not in source


def test_saturated_confidence_keeps_its_margin() -> None:
    events = [obs(s, "refund", 0.999, 0, 10 + i) for i, s in enumerate("abcdefghijkl")]
    (b,) = fold(events, ONE_DAY)
    assert b.confidence == 1.0  # σ(12 · ln 999) rounds to 1 in binary64
    # the margin comes from the stored score, not from logit(1.0)
    assert confidence_at(b, T0 + 10 * DAY_MS, 86400.0) == pytest.approx(
        sigmoid(12 * math.log(999) / 1024), abs=1e-12)
