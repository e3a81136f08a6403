"""The bulk rebuild's fold (``fold.fold_counting(..., ordered=False)``): the beliefs of
the ordered ``fold_counting`` and of the pure fold, same floats, in any order; on
generated workloads with trust and half-lives, and on the merge vectors."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from beliefstore.events.workload import SOURCES, generate
from beliefstore.projector.fold import (
    FoldSettings,
    fold,
    fold_counting,
)
from tests.conftest import case_events, load_cases
from tests.test_fold import counting_rows, fold_settings


def by_key(beliefs) -> dict:
    return {b.key: b for b in beliefs}


@given(seed=st.integers(0, 10_000), count=st.integers(1, 600), subjects=st.integers(1, 20),
       profile=st.sampled_from(["hot-key", "realistic"]),
       trust=st.dictionaries(st.sampled_from(SOURCES), st.floats(0.0, 3.0), max_size=3),
       half_life_s=st.floats(60.0, 1e8),
       half_lives=st.dictionaries(st.sampled_from(["support", "billing"]),
                                  st.floats(1.0, 1e9), max_size=2))
@settings(max_examples=80, deadline=None)
def test_the_unordered_fold_equals_fold_counting_and_the_pure_fold(seed, count, subjects,
                                                                    profile, trust,
                                                                    half_life_s, half_lives):
    events = generate(count, seed=seed, subjects=subjects, profile=profile)
    fs = FoldSettings(default_half_life_s=half_life_s, half_lives=half_lives, trust=trust)
    rows = [row for held in counting_rows(events).values() for row in held]
    random.Random(seed).shuffle(rows)
    unordered = fold_counting(rows, fs, ordered=False)
    ordered = fold_counting(rows, fs)
    assert len(unordered) == len(by_key(unordered))  # one belief per key
    assert by_key(unordered) == by_key(ordered) == by_key(fold(events, fs))
    assert [b.key for b in ordered] == sorted(b.key for b in ordered)
    assert fold_counting([], fs, ordered=False) == []


def test_the_unordered_fold_of_the_merge_vectors():
    for case in load_cases():
        events = case_events(case)
        rows = [row for held in counting_rows(events).values() for row in held]
        fs = fold_settings(case)
        assert by_key(fold_counting(rows, fs, ordered=False)) == by_key(fold(events, fs)), \
            case["name"]
