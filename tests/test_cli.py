"""The ``beliefstore`` command line, run as a subprocess against the test's own services."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import typer.main

from beliefstore.cli import app
from beliefstore.cli.demo import SENTIMENT, TRIAGE
from beliefstore.events.serde import AvroSerde
from beliefstore.settings import ENV_VARS, Settings
from tests.conftest import load_cases, read_topic, wait_caught_up
from tests.test_fold import assert_matches

BELIEFSTORE = Path(sys.executable).parent / "beliefstore"
CASES = load_cases()
T0 = 1767225600000


def cli_env(settings: Settings, tmp_path: Path, api_url: str | None = None,
            **extra: str) -> dict[str, str]:
    """The environment of a CLI run: only this test's services and names."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
        "DATABASE_URL": settings.database_url or "",
        "BELIEFSTORE_TOPIC": settings.topic,
        "BELIEFSTORE_DLQ_TOPIC": settings.dlq_topic,
        "BELIEFSTORE_DB_SCHEMA": settings.db_schema,
        "BELIEFSTORE_API_URL": api_url or settings.api_url,
        "BELIEFSTORE_HOME": str(tmp_path / ".beliefstore"),
        "COLUMNS": "250",  # rich: wide tables, no wrapped messages
        "NO_COLOR": "1",
    })
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str] | None, cwd: Path,
        timeout: float = 60) -> subprocess.CompletedProcess:
    if env is None:
        env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
        env["COLUMNS"] = "250"
    return subprocess.run([str(BELIEFSTORE), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def flat(text: str) -> str:
    """Whitespace-normalised, so a wrapped line still matches."""
    return " ".join(text.split())


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return path


def observed(subject: str, attribute: str, value: str, confidence, source: str,
             occurred_at: int = T0, context: str = "support", **more) -> dict:
    return {"type": "observed", "event_id": str(uuid.uuid4()), "subject_id": subject,
            "context": context, "attribute": attribute, "value": value,
            "confidence": confidence, "source": source, "occurred_at": occurred_at, **more}


# -- fold (offline) ----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fold_command_matches_every_vector(case, tmp_path):
    path = write_jsonl(tmp_path / "events.jsonl", case["events"])
    args = ["fold", str(path)]
    for context, seconds in case["settings"].get("half_lives", {}).items():
        args += ["--half-life", f"{context}={seconds}"]
    for source, weight in case["settings"].get("trust", {}).items():
        args += ["--trust", f"{source}={weight}"]
    result = run(args, None, tmp_path)
    assert result.returncode == 0, result.stderr
    assert_matches(json.loads(result.stdout), case["expected"])


def test_fold_settings_flags_change_the_result(tmp_path):
    # Without the vector's trust flag, trusted_source_outweighs comes out differently.
    case = next(c for c in CASES if c["name"] == "trusted_source_outweighs")
    path = write_jsonl(tmp_path / "events.jsonl", case["events"])
    result = run(["fold", str(path)], None, tmp_path)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert [b["value"] for b in got] != [b["value"] for b in case["expected"]]


def test_fold_refuses_a_bad_line_and_names_it(tmp_path):
    path = write_jsonl(tmp_path / "events.jsonl", [
        observed("u", "mood", "calm", 0.7, "bot"),
        observed("u", "mood", "angry", 0.7, "bot"),
        observed("u", "mood", "sad", 2, "bot"),
    ])
    result = run(["fold", str(path)], None, tmp_path)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "line 3" in flat(result.stderr) and "confidence" in result.stderr, result.stderr

    bad_json = write_jsonl(tmp_path / "bad.jsonl", [observed("u", "mood", "calm", 0.7, "bot"),
                                                    "", "{not json"])
    result = run(["fold", str(bad_json)], None, tmp_path)
    assert result.returncode != 0
    assert "line 3" in flat(result.stderr) and "JSON" in result.stderr, result.stderr

    result = run(["fold", str(path), "--trust", "garbage"], None, tmp_path)
    assert result.returncode == 2
    assert "--trust" in result.stderr


COMMANDS = sorted(typer.main.get_command(app).commands)


def test_every_command_is_listed():
    assert {"up", "projector", "api", "migrate", "produce", "fold", "self-model", "trace",
            "demo"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_of_every_command(command, tmp_path):
    result = run(["--help"] if command is None else [command, "--help"], None, tmp_path,
                 timeout=30)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
    if command is not None:
        assert command in result.stdout


# -- produce -----------------------------------------------------------------------------


def test_produce_refuses_bad_lines_and_produces_exactly_the_valid_ones(settings, engine,
                                                                      tmp_path):
    first = observed("user-cli", "mood", "calm", 0.7, "bot")
    valid = [
        first,
        observed("user-cli", "mood", "angry", 0.8, "other_bot", occurred_at=T0 + 1),
        {"type": "retracted", "event_id": str(uuid.uuid4()), "subject_id": "user-cli",
         "source": "bot", "occurred_at": T0 + 2, "retracted_event_id": first["event_id"]},
        {"type": "erased", "event_id": str(uuid.uuid4()), "subject_id": "user-gone",
         "source": "privacy", "occurred_at": T0 + 3},
    ]
    lines = [
        valid[0],                                                   # 1
        '{"type": "observed", "subject_id": ',                      # 2: bad JSON
        valid[1],                                                   # 3
        observed("user-cli", "mood", "sad", 2, "bot"),              # 4: confidence 2
        "",                                                         # 5: blank, skipped
        {**observed("user-cli", "mood", "x", 0.5, "bot"), "type": "guessed"},  # 6: unknown type
        valid[2],                                                   # 7
        valid[3],                                                   # 8
    ]
    path = write_jsonl(tmp_path / "events.jsonl", lines)
    result = run(["produce", str(path)], cli_env(settings, tmp_path), tmp_path)
    output = flat(result.stdout + result.stderr)
    assert result.returncode == 1, output
    for number in (2, 4, 6):
        assert f"line {number} refused" in output, output
    for number in (1, 3, 5, 7, 8):
        assert f"line {number} refused" not in output, output
    assert "produced 4 event(s)" in output and "refused 3 line(s)" in output, output

    messages = read_topic(settings.kafka_bootstrap_servers, settings.topic)
    serde = AvroSerde.for_settings(settings)
    on_topic = sorted(serde.decode(m.value).event.event_id for m in messages)
    assert on_topic == sorted(e["event_id"] for e in valid)


# -- reads through the API ---------------------------------------------------------------


def test_self_model_and_trace_commands(settings, engine, producer, projector, api_url,
                                       tmp_path, api_key):
    s = "user-cli-read"
    receipts = [
        producer.observe(s, "support", "emotional_state", "frustrated", 0.6, "triage_agent",
                         occurred_at=T0),
        producer.observe(s, "support", "emotional_state", "angry", 0.9, "triage_agent",
                         occurred_at=T0 + 1000),
        producer.observe(s, "support", "emotional_state", "angry", 0.7, "sentiment_agent",
                         occurred_at=T0 + 2000),
        producer.observe(s, "billing", "plan_status", "cancelled_in_march", 0.95,
                         "billing_agent", occurred_at=T0),
    ]
    odd = "user cli?#%2F 1"  # characters that mean something in a URL
    odd_receipt = producer.observe(odd, "support", "tone", "calm", 0.8, "triage_agent",
                                   occurred_at=T0)
    wait_caught_up(settings, [*receipts, odd_receipt])
    env = cli_env(settings, tmp_path, api_url, BELIEFSTORE_API_KEY=api_key)

    # Subject ids are percent-encoded in the API's paths: an id with a space, ?, # or %
    # reads its own beliefs.
    result = run(["self-model", odd, "--json"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["subject_id"] == odd
    result = run(["trace", odd, "support", "tone", "--json"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert [e["event_id"] for e in json.loads(result.stdout)["events"]] == [odd_receipt.event_id]

    result = run(["self-model", s], env, tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"self-model of {s}" in out
    for text in ("emotional_state", "angry", "plan_status", "cancelled_in_march",
                 "billing_agent", "sentiment_agent, triage_agent"):
        assert text in out, (text, out)

    result = run(["self-model", s, "--json"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    assert model["subject_id"] == s and model["belief_count"] == 2
    [emotional] = model["contexts"]["support"]
    assert emotional["value"] == "angry"
    assert sorted(emotional["support"]) == sorted([receipts[1].event_id, receipts[2].event_id])

    result = run(["trace", s, "support", "emotional_state"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"trace of {s} support/emotional_state: angry" in out, out
    assert out.count("│ counting   │") == 2 and out.count("│ superseded │") == 1, out
    for r in receipts[:3]:
        assert f"p{r.partition}@{r.offset}" in out, (r, out)
    assert "superseded by" in out and receipts[1].event_id in out, out

    result = run(["trace", s, "support", "emotional_state", "--json"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    trace = json.loads(result.stdout)
    statuses = {e["event_id"]: e["status"] for e in trace["events"]}
    assert statuses == {receipts[0].event_id: "superseded", receipts[1].event_id: "counting",
                        receipts[2].event_id: "counting"}
    assert {(e["kafka"]["partition"], e["kafka"]["offset"]) for e in trace["events"]} == {
        (r.partition, r.offset) for r in receipts[:3]}

    for args in (["self-model", "nobody-here"],
                 ["trace", "nobody-here", "support", "emotional_state"]):
        result = run(args, env, tmp_path)
        assert result.returncode == 1, result
        message = flat(result.stderr)
        assert "no beliefs or observations about subject 'nobody-here'" in message, message
    result = run(["trace", s, "support", "no_such_attribute"], env, tmp_path)
    assert result.returncode == 1
    assert "has no observations of support/no_such_attribute" in flat(result.stderr)


def test_read_commands_without_a_reachable_api_say_so(settings, tmp_path):
    from beliefstore.embedded import free_port

    env = cli_env(settings, tmp_path, f"http://127.0.0.1:{free_port()}")
    result = run(["self-model", "anyone"], env, tmp_path)
    assert result.returncode == 2
    assert "cannot reach the API" in flat(result.stderr)


# -- demo --------------------------------------------------------------------------------


def test_demo_runs_on_the_configured_services(settings, engine, tmp_path):
    result = run(["demo"], cli_env(settings, tmp_path), tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "self-model of customer-" in out, out
    assert "unauthorized_recurring_charge" in out, out
    assert "trace of customer-" in out and "support/emotional_state" in out, out
    assert "counting" in out, out
    assert "starting the embedded" not in out  # it used the configured services
    assert settings.kafka_bootstrap_servers in out
    # The demo's events went to this test's topic and its read model to this schema.
    messages = read_topic(settings.kafka_bootstrap_servers, settings.topic)
    events = [AvroSerde.for_settings(settings).decode(m.value).event for m in messages]
    # The triage observations and one retraction via the SDK, the sentiment ones via HTTP.
    assert len(events) == len(TRIAGE) + 1 + len(SENTIMENT)
    assert sorted(e.source for e in events) == sorted(
        ["triage_agent"] * (len(TRIAGE) + 1) + ["sentiment_agent"] * len(SENTIMENT))
    [subject] = {e.subject_id for e in events}
    assert f"self-model of {subject}" in out
    assert not (tmp_path / ".beliefstore" / "postgres").exists()


# -- configuration errors ----------------------------------------------------------------


def test_bad_setting_exits_2_and_names_the_variable(settings, tmp_path):
    env = cli_env(settings, tmp_path, BELIEFSTORE_TRUST="garbage")
    for args in (["self-model", "anyone"], ["demo"]):
        result = run(args, env, tmp_path, timeout=30)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        message = flat(result.stderr)
        assert "configuration error" in message and "BELIEFSTORE_TRUST" in message, message
        assert "garbage" in message


def test_simulate_profiles_realistic_and_hot_key(tmp_path):
    """``simulate --profile``: realistic spreads observations over many subjects (about ten
    each, none far above ten times the mean); hot-key (the default, today's workload)
    puts most of them on one subject; an unknown profile is refused with the choices."""
    from collections import Counter

    def counts(profile: str | None) -> Counter:
        out = tmp_path / f"{profile}.jsonl"
        args = ["simulate", "--events", "20000", "--output", str(out)]
        if profile:
            args += ["--profile", profile]
        done = run(args, None, tmp_path)
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(lines) == 20000
        return Counter(e["subject_id"] for e in lines if e["type"] == "observed")

    realistic, hot, default = counts("realistic"), counts("hot-key"), counts(None)
    assert default == hot
    assert len(realistic) > 1800  # of 2,000 subjects
    assert max(realistic.values()) <= 15 * sum(realistic.values()) / 2000
    assert max(hot.values()) > 0.4 * sum(hot.values())
    done = run(["simulate", "--profile", "flat"], None, tmp_path)
    assert done.returncode == 2
    assert "hot-key" in done.stderr and "realistic" in done.stderr
