"""beliefstore.quality: baselines, metrics, the simulated world, trust calibration and the
``calibrate`` command. Pure; no services."""

from __future__ import annotations

import json
import math
import random
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from beliefstore.cli import app
from beliefstore.events.jsonl import dumps
from beliefstore.events.model import ObservationRecorded, ObservationRetracted, SubjectErased
from beliefstore.projector.fold import FoldSettings, sigmoid
from beliefstore.quality.baselines import (
    BASELINES,
    Estimate,
    aged,
    fold_at_read_method,
    fold_method,
    highest_confidence,
    last_write_wins,
    majority_vote,
    mean_confidence,
)
from beliefstore.quality.calibrate import (
    CalibrationError,
    Labelled,
    OutcomeLineError,
    calibrate,
    fit_slope,
    label,
    load_outcomes,
    trust_env_line,
    trust_setting,
)
from beliefstore.quality.evaluate import evaluate
from beliefstore.quality.metrics import (
    RepeatQuestions,
    accuracy,
    at_most_asks,
    brier_score,
    expected_calibration_error,
    reliability_bins,
)
from beliefstore.quality.oracle import bayes_filter, true_trust
from beliefstore.quality.world import (
    CALIBRATED_AGENTS,
    DAY_S,
    OVERCONFIDENT_AGENTS,
    AgentSpec,
    AttributeSpec,
    WorldSpec,
    reported_confidence,
    simulate,
)

T0 = 1767225600000
_ids = iter(range(1, 10**9))


def obs(source: str, value: str, confidence: float, at: int, *, attribute: str = "issue",
        subject: str = "s1") -> ObservationRecorded:
    return ObservationRecorded(event_id=str(uuid.UUID(int=next(_ids), version=4)),
                               subject_id=subject, source=source, occurred_at=T0 + at,
                               context="support", attribute=attribute, value=value,
                               confidence=confidence)


# -- baselines ---------------------------------------------------------------------------


def test_baselines_on_a_hand_made_key() -> None:
    events = [
        obs("a", "refund", 0.6, 1000), obs("b", "refund", 0.7, 2000),
        obs("c", "login", 0.95, 3000), obs("d", "shipping", 0.55, 4000),
    ]
    (lww,) = last_write_wins(events)
    assert (lww.value, lww.confidence) == ("shipping", 0.55)
    (hc,) = highest_confidence(events)
    assert (hc.value, hc.confidence) == ("login", 0.95)
    (mv,) = majority_vote(events)
    assert (mv.value, mv.confidence) == ("refund", 0.5)
    (mc,) = mean_confidence(events)
    assert mc.value == "login" and mc.confidence == pytest.approx(0.95)


def test_baselines_apply_dedupe_retraction_erasure_and_supersession() -> None:
    first = obs("a", "refund", 0.9, 1000)
    second = obs("a", "login", 0.6, 2000)  # supersedes a's first observation
    wrong = obs("b", "shipping", 0.99, 3000)
    retract = ObservationRetracted(event_id=str(uuid.uuid4()), subject_id="s1", source="b",
                                   occurred_at=T0 + 3500, retracted_event_id=wrong.event_id)
    foreign = ObservationRetracted(event_id=str(uuid.uuid4()), subject_id="s1", source="x",
                                   occurred_at=T0 + 3600, retracted_event_id=second.event_id)
    events = [first, second, second, wrong, retract, foreign, first]
    for method in BASELINES.values():
        (est,) = method(events)
        assert est.value == "login", method.__name__
    erase = SubjectErased(event_id=str(uuid.uuid4()), subject_id="s1", source="p",
                          occurred_at=T0 + 5000)
    for method in BASELINES.values():
        assert method([*events, erase]) == []


def test_majority_vote_ties_go_to_the_newer_value() -> None:
    events = [obs("a", "refund", 0.9, 1000), obs("b", "login", 0.6, 2000)]
    (mv,) = majority_vote(events)
    assert (mv.value, mv.confidence) == ("login", 0.5)


def test_fold_method_is_the_fold() -> None:
    events = [obs("a", "refund", 0.8, 0), obs("b", "refund", 0.8, 0), obs("c", "login", 0.8, 0)]
    (est,) = fold_method(FoldSettings())(events)
    # score(refund) = 2·logit(0.8), score(login) = logit(0.8): σ(logit 0.8) = 0.8
    assert est.value == "refund" and est.confidence == pytest.approx(0.8)


# -- metrics -----------------------------------------------------------------------------


def test_brier_and_accuracy_by_hand() -> None:
    conf, correct = [0.9, 0.6, 0.8, 0.3], [True, False, True, False]
    # (0.1² + 0.6² + 0.2² + 0.3²) / 4 = (0.01 + 0.36 + 0.04 + 0.09) / 4 = 0.125
    assert brier_score(conf, correct) == pytest.approx(0.125)
    assert accuracy(correct) == 0.5
    with pytest.raises(ValueError, match="outside"):
        brier_score([1.2], [True])
    with pytest.raises(ValueError):
        brier_score([], [])


def test_ece_by_hand() -> None:
    conf = [0.95, 0.95, 0.95, 0.95, 0.15, 0.15, 1.0, 0.55]
    correct = [True, True, True, False, False, False, True, True]
    # bin 9 [0.9, 1]: 5 items, mean conf 0.96, accuracy 0.8 -> 5/8 · 0.16
    # bin 1: 2 items, conf 0.15, acc 0 -> 2/8 · 0.15; bin 5: 1 item, conf 0.55, acc 1 -> 1/8 · 0.45
    expected = 5 / 8 * 0.16 + 2 / 8 * 0.15 + 1 / 8 * 0.45
    assert expected_calibration_error(conf, correct) == pytest.approx(expected)
    bins = reliability_bins(conf, correct)
    assert len(bins) == 10 and bins[9].count == 5 and bins[9].accuracy == pytest.approx(0.8)
    assert bins[0].count == 0 and bins[0].accuracy is None
    assert expected_calibration_error([0.7] * 10, [True] * 7 + [False] * 3) == pytest.approx(0.0)


def test_repeat_questions_counts() -> None:
    r = RepeatQuestions(handoffs=2)
    r.add(None, "a")
    r.add(("a", 0.5), "a")
    r.add(("b", 0.9), "a")
    r.add(("a", 0.9), "a")
    assert (r.missing, r.low_confidence, r.wrong, r.needed) == (1, 1, 1, 4)
    assert r.repeats == 3 and r.repeats_per_handoff == 1.5 and r.wrong_per_handoff == 0.5


def test_at_most_asks_by_hand() -> None:
    conf = [0.9, 0.5, 0.3, 0.8, 0.5]
    correct = [True, True, False, False, False]
    # budget 3 − 1 missing = 2, but the 2nd and 3rd least confident tie at 0.5: ask 1
    r = at_most_asks(conf, correct, 1, 3)
    assert (r.threshold, r.asks, r.wrong) == (0.5, 2, 2)
    r = at_most_asks(conf, correct, 1, 4)
    assert (r.threshold, r.asks, r.wrong) == (0.8, 4, 1)
    r = at_most_asks(conf, correct, 1, 10)
    assert (r.asks, r.wrong) == (6, 0)
    r = at_most_asks(conf, correct, 1, 1)  # answer everything
    assert (r.threshold, r.asks, r.wrong) == (0.3, 1, 3)
    with pytest.raises(ValueError, match="outcomes"):
        at_most_asks([0.5], [], 0, 1)


def test_aged_applies_the_read_time_decay() -> None:
    events = [obs("a", "refund", 0.8, 0)]
    method = aged(last_write_wins, FoldSettings(half_lives={"support": 86400.0}))
    (e,) = method(events, T0 + 86_400_000)
    # one half-life: σ(½ · logit 0.8) = σ(ln 2) = 2/3
    assert e.value == "refund" and e.confidence == pytest.approx(2 / 3)
    (e,) = method(events, T0)
    assert e.confidence == pytest.approx(0.8)
    with pytest.raises(ValueError, match="observed_at"):
        aged(lambda ev: [Estimate(("s1", "support", "issue"), "x", 0.8)])(events, T0)


TWO_VALUES = WorldSpec(
    attributes=(AttributeSpec("support", "issue", ("refund", "login"), DAY_S),),
    agents=(AgentSpec("a", ("support",), (0.7, 0.9), 2.0),), correction_probability=0.3)


def test_bayes_filter_by_hand() -> None:
    oracle = bayes_filter(TWO_VALUES)
    first = obs("a", "refund", reported_confidence(0.8, 2.0), 0)
    (e,) = oracle([first], T0)
    # the agent's k = 2: p = σ(logit(c) / 2) = 0.8; it survived a 30 % correction chance:
    # 0.8 / (0.8 + 0.7 · 0.2) = 0.8 / 0.94
    p = 0.8 / 0.94
    assert e.value == "refund" and e.confidence == pytest.approx(p, abs=1e-3)
    # one day later, K = 2: μ = λ · K / (K − 1) = 2 per day: ½ + (p − ½) · e^(−2)
    (e,) = oracle([first], T0 + 86_400_000)
    assert e.confidence == pytest.approx(0.5 + (p - 0.5) * math.exp(-2), abs=1e-3)
    # a re-observation 5 minutes after a retracted one is a fresh draw: no survival factor
    retract = ObservationRetracted(event_id=str(uuid.uuid4()), subject_id="s1", source="a",
                                   occurred_at=T0 + 60_000, retracted_event_id=first.event_id)
    again = obs("a", "refund", reported_confidence(0.8, 2.0), 300_000)
    (e,) = oracle([first, retract, again], T0 + 300_000)
    assert e.confidence == pytest.approx(0.8, abs=1e-3)
    assert true_trust(TWO_VALUES) == {"a": 0.5}


def test_read_time_decay_and_oracle_in_a_world() -> None:
    spec = replace(SMALL, agents=CALIBRATED_AGENTS)
    settings = FoldSettings(half_lives=spec.half_lives())
    result = evaluate(simulate(spec), {"fold": fold_method(settings),
                                       "fold@read": fold_at_read_method(settings),
                                       "oracle": bayes_filter(spec)})
    fold_r, read_r, oracle_r = (result.methods[m] for m in ("fold", "fold@read", "oracle"))
    # same winners, only the confidence is read later: same accuracy, lower Brier
    assert read_r.accuracy == fold_r.accuracy
    assert oracle_r.brier < read_r.brier < fold_r.brier
    assert sum(b.n for b in read_r.by_age) == read_r.n
    old = read_r.by_age[-1]
    assert old.n > 0 and old.mean_confidence is not None
    assert old.mean_confidence < fold_r.by_age[-1].mean_confidence  # type: ignore[operator]
    # the exact posterior is calibrated by construction
    assert oracle_r.ece < 0.05


# -- the world ---------------------------------------------------------------------------


SMALL = WorldSpec(seed=3, subjects=60, days=90)


def test_world_is_deterministic_per_seed() -> None:
    a, b = simulate(SMALL), simulate(SMALL)
    assert a.events == b.events and a.truth == b.truth and a.handoffs == b.handoffs
    assert a.outcomes == b.outcomes
    c = simulate(WorldSpec(seed=4, subjects=60, days=90))
    assert c.events != a.events


def test_world_has_drift_duplicates_retractions_and_truth() -> None:
    w = simulate(SMALL)
    ids = [e.event_id for e in w.events]
    assert len(ids) > len(set(ids))
    assert any(isinstance(e, ObservationRetracted) for e in w.events)
    assert any(len(changes) > 1 for changes in w.truth.values())
    key = next(k for k, ch in w.truth.items() if len(ch) > 1)
    t1, v1 = w.truth[key][1]
    assert w.truth_at(key, t1) == v1 and w.truth_at(key, t1 - 1) == w.truth[key][0][1]
    assert reported_confidence(0.8, 1.0) == 0.8 and reported_confidence(0.8, 2.0) > 0.9


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fold_beats_last_write_wins_on_brier(seed: int) -> None:
    spec = WorldSpec(seed=seed, subjects=80, days=90)
    methods = {"fold": fold_method(FoldSettings(half_lives=spec.half_lives())),
               "last_write_wins": last_write_wins}
    result = evaluate(simulate(spec), methods)
    assert result.methods["fold"].brier < result.methods["last_write_wins"].brier
    assert result.no_context.repeats > result.methods["fold"].repeats.repeats


# -- calibration -------------------------------------------------------------------------


def synthetic(trust: float, n: int, seed: int) -> list[Labelled]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c = round(rng.uniform(0.55, 0.99), 3)
        x = math.log(c / (1 - c))
        out.append(Labelled("s", str(i), c, rng.random() < sigmoid(trust * x)))
    return out


@pytest.mark.parametrize("true_trust", [0.4, 1.0, 1.8])
def test_fit_recovers_a_known_trust_within_its_interval(true_trust: float) -> None:
    (fit,) = calibrate(synthetic(true_trust, 3000, seed=int(true_trust * 10)))
    assert fit.ci_low <= true_trust <= fit.ci_high
    assert fit.ci_high - fit.ci_low < 0.4


def test_fit_is_the_likelihood_maximum() -> None:
    data = synthetic(0.7, 500, seed=9)
    xs, ys = [d.x for d in data], [d.matched for d in data]
    fit = fit_slope(xs, ys)
    gradient = math.fsum((y - sigmoid(fit.slope * x)) * x for x, y in zip(xs, ys, strict=True))
    assert abs(gradient) < 1e-6
    assert fit_slope([1.0, 2.0], [True, True]).slope == math.inf


def test_calibrate_refuses_too_few_outcomes() -> None:
    with pytest.raises(CalibrationError, match="s has 10; each source needs at least 50"):
        calibrate(synthetic(1.0, 10, seed=1))
    assert calibrate(synthetic(1.0, 10, seed=1), skip_few=True) == []
    with pytest.raises(CalibrationError, match="no observation has an outcome"):
        calibrate([])


def test_label_matches_the_first_outcome_after_within_the_window() -> None:
    from beliefstore.quality.world import Outcome

    before = obs("a", "refund", 0.9, 0)
    too_old = obs("b", "refund", 0.9, -8 * 86400 * 1000)
    wrong = obs("c", "login", 0.7, 1000)
    after = obs("d", "refund", 0.9, 10 * 60_000)
    outcome = Outcome("s1", "support", "issue", "refund", T0 + 5 * 60_000)
    labelled = {x.source: x.matched for x in label([before, too_old, wrong, after], [outcome])}
    assert labelled == {"a": True, "c": False}


def test_calibrate_recovers_overconfident_agents_in_the_world() -> None:
    w = simulate(WorldSpec(seed=11, subjects=150, agents=OVERCONFIDENT_AGENTS))
    fits = {f.source: f for f in calibrate(label(w.events, w.outcomes), skip_few=True)}
    triage = fits["triage_agent"]  # k = 2: true trust 0.5
    assert triage.ci_low <= 0.5 <= triage.ci_high
    assert trust_env_line(trust_setting(fits.values())).startswith("BELIEFSTORE_TRUST=")


# -- the command -------------------------------------------------------------------------


def _files(tmp_path: Path) -> tuple[Path, Path]:
    w = simulate(WorldSpec(seed=5, subjects=150, agents=OVERCONFIDENT_AGENTS))
    events, outcomes = tmp_path / "events.jsonl", tmp_path / "outcomes.jsonl"
    events.write_text("".join(dumps(e) + "\n" for e in w.events))
    outcomes.write_text("".join(json.dumps(asdict(o)) + "\n" for o in w.outcomes))
    return events, outcomes


def test_cli_calibrate(tmp_path: Path) -> None:
    events, outcomes = _files(tmp_path)
    runner = CliRunner()
    refused = runner.invoke(app, ["calibrate", str(events), str(outcomes)])
    assert refused.exit_code == 1
    assert "needs at least 50" in refused.output and "Traceback" not in refused.output
    ok = runner.invoke(app, ["calibrate", str(events), str(outcomes), "--min-outcomes", "20"])
    assert ok.exit_code == 0, ok.output
    assert "triage_agent" in ok.output and "BELIEFSTORE_TRUST=" in ok.output
    js = runner.invoke(app, ["calibrate", str(events), str(outcomes), "--skip-few", "--json"])
    assert js.exit_code == 0, js.output
    body = json.loads(js.output)
    assert body["env"].startswith("BELIEFSTORE_TRUST=") and 0 < body["trust"]["triage_agent"] < 1


def test_cli_calibrate_names_a_malformed_outcome_line(tmp_path: Path) -> None:
    events, outcomes = _files(tmp_path)
    lines = outcomes.read_text().splitlines()
    lines[2] = lines[2].replace('"known_at": ', '"known_at": "yesterday", "x": ')
    outcomes.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(app, ["calibrate", str(events), str(outcomes)])
    assert result.exit_code == 1
    assert f"{outcomes}: line 3: known_at" in result.output and "Traceback" not in result.output
    with pytest.raises(OutcomeLineError) as info:
        load_outcomes(outcomes)
    assert info.value.line == 3


def test_cli_calibrate_names_a_malformed_event_line(tmp_path: Path) -> None:
    events, outcomes = _files(tmp_path)
    events.write_text(events.read_text() + "{not json\n")
    result = CliRunner().invoke(app, ["calibrate", str(events), str(outcomes)])
    assert result.exit_code == 1
    assert str(events) in result.output and "line " in result.output
    assert "Traceback" not in result.output
