"""The pure fold against every merge vector, and its order/duplicate invariance."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beliefstore.events.model import ObservationRecorded
from beliefstore.events.workload import SOURCES, generate
from beliefstore.projector.fold import (
    FoldSettings,
    fold,
    fold_counting,
    logit,
    sigmoid,
    trace,
)
from beliefstore.quality.baselines import counting_observations
from tests.conftest import case_events, load_cases

CASES = load_cases()


def fold_settings(case: dict) -> FoldSettings:
    s = case["settings"]
    return FoldSettings(half_lives=s.get("half_lives", {}), trust=s.get("trust", {}))


def as_comparable(beliefs) -> list[dict]:
    return [
        {"subject_id": b.subject_id, "context": b.context, "attribute": b.attribute,
         "value": b.value, "confidence": b.confidence, "alternatives": dict(b.alternatives),
         "support": list(b.support)}
        for b in beliefs
    ]


def assert_matches(got: list[dict], expected: list[dict]) -> None:
    """Same keys, values and support; confidences within 1e-4 (DESIGN.md)."""
    assert [(g["subject_id"], g["context"], g["attribute"], g["value"]) for g in got] == [
        (e["subject_id"], e["context"], e["attribute"], e["value"]) for e in expected
    ]
    for g, e in zip(got, expected, strict=True):
        assert g["confidence"] == pytest.approx(e["confidence"], abs=1e-4), e
        assert sorted(g["support"]) == sorted(e["support"]), e
        assert set(g["alternatives"]) == set(e["alternatives"]), e
        for value, confidence in e["alternatives"].items():
            assert g["alternatives"][value] == pytest.approx(confidence, abs=1e-4), e


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vector_through_pure_fold(case):
    assert_matches(as_comparable(fold(case_events(case), fold_settings(case))), case["expected"])


def test_logit_and_sigmoid_are_inverse_and_clip():
    assert sigmoid(logit(0.88)) == pytest.approx(0.88)
    assert logit(1.0) == logit(0.999)
    assert logit(0.0) == logit(0.001)
    assert sigmoid(-1000) == 0.0 and sigmoid(1000) == 1.0


def test_trace_explains_each_status():
    case = next(c for c in CASES if c["name"] == "retraction_restores_previous")
    events = case_events(case)
    key = (events[0].subject_id, events[0].context, events[0].attribute)
    belief, entries = trace(events, key)
    statuses = {e.event.event_id: e.status.value for e in entries}
    assert "retracted" in statuses.values() and "retraction" in statuses.values()
    assert belief is not None and belief.value == case["expected"][0]["value"]
    counting = [e for e in entries if e.status == "counting"]
    assert all(e.weight is not None and e.decay == 1.0 for e in counting)


ALL_EVENTS = [(c, e) for c in CASES for e in case_events(c)]


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_fold_ignores_delivery_order_and_duplicates(data):
    case = data.draw(st.sampled_from(CASES), label="case")
    events = case_events(case)
    duplicated = events + data.draw(
        st.lists(st.sampled_from(events), max_size=2 * len(events)), label="redeliveries"
    )
    shuffled = data.draw(st.permutations(duplicated), label="delivery order")
    fs = fold_settings(case)
    assert fold(shuffled, fs) == fold(events, fs)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fold_of_mixed_cases_is_order_independent(data):
    # Events of several cases at once (distinct event ids, overlapping keys).
    picked = data.draw(st.lists(st.sampled_from(ALL_EVENTS), min_size=1, max_size=30,
                                unique_by=lambda ce: ce[1].event_id))
    events = [e for _, e in picked]
    shuffled = data.draw(st.permutations(events + events[: len(events) // 2]))
    assert fold(shuffled) == fold(events)


@given(seed=st.integers(0, 10_000), count=st.integers(1, 500), subjects=st.integers(1, 20),
       profile=st.sampled_from(["hot-key", "realistic"]),
       trust=st.dictionaries(st.sampled_from(["triage_agent", "sales_agent", "billing_agent"]),
                             st.floats(0.0, 3.0), max_size=2),
       half_life=st.floats(60.0, 1e8))
@settings(max_examples=40, deadline=None)
def test_fold_counting_equals_the_fold_of_the_events(seed, count, subjects, profile, trust,
                                                     half_life):
    """The bulk rebuild's fold of counting observations (steps 4-6 only) gives exactly
    the beliefs of the full fold, when fed the observations the trace marks counting."""
    from beliefstore.projector.fold import Status

    events = generate(count, seed=seed, subjects=subjects, profile=profile)
    fs = FoldSettings(default_half_life_s=half_life, trust=trust)
    keys = sorted({e.key for e in events if isinstance(e, ObservationRecorded)})
    counting = [
        (o.subject_id, o.context, o.attribute, o.source, o.event_id, o.occurred_at, o.value,
         o.confidence)
        for key in keys for t in trace(events, key, fs)[1] if t.status == Status.COUNTING
        for o in [t.event] if isinstance(o, ObservationRecorded)]
    assert fold_counting(reversed(counting), fs) == fold(events, fs)


def counting_rows(events) -> dict:
    """key → each source's counting observation as a ``belief_sources`` row, from
    :func:`~beliefstore.quality.baselines.counting_observations` (the fold's steps 1–3
    written apart from the fold: the latest live observation of each source)."""
    return {key: [(*o.key, o.source, o.event_id, o.occurred_at, o.value, o.confidence)
                  for o in held]
            for key, held in counting_observations(events).items()}


@given(seed=st.integers(0, 10_000), count=st.integers(1, 600), subjects=st.integers(1, 20),
       profile=st.sampled_from(["hot-key", "realistic"]),
       trust=st.dictionaries(st.sampled_from(SOURCES), st.floats(0.0, 3.0), max_size=3),
       half_life_s=st.floats(60.0, 1e8))
@settings(max_examples=60, deadline=None)
def test_fold_counting_equals_the_pure_fold(seed, count, subjects, profile, trust,
                                            half_life_s):
    """``fold_counting`` of each key's counting rows (``belief_sources``' rows, computed
    here independently of the fold's trace) gives exactly the pure fold's beliefs (same
    floats, support, sources, alternatives) on any workload with retractions, erasures,
    supersession and redeliveries, in any row order."""
    events = generate(count, seed=seed, subjects=subjects, profile=profile)
    fs = FoldSettings(default_half_life_s=half_life_s, trust=trust)
    rows = [row for held in counting_rows(events).values() for row in held]
    random.Random(seed).shuffle(rows)
    assert fold_counting(rows, fs) == fold(events, fs)
    assert fold_counting([], fs) == []
