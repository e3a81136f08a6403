"""Commands facing a failing service: one `error:` line that says what happened and what
to do, exit status 1, no traceback (unless --verbose). `produce` with the broker dying
mid-file says how many events were acknowledged and the first line that was not, and
re-running the same file is safe."""

from __future__ import annotations

import subprocess
import time
from dataclasses import replace

from beliefstore.embedded import EmbeddedKafka, free_port
from beliefstore.events.jsonl import dumps
from beliefstore.events.topics import ensure_topics
from beliefstore.events.workload import generate
from tests.conftest import read_topic
from tests.test_cli import BELIEFSTORE, cli_env, flat


def test_produce_with_the_broker_dying_mid_file_reports_and_rerun_is_safe(settings, tmp_path):
    events = generate(20_000, seed=2, subjects=500)
    path = tmp_path / "events.jsonl"
    path.write_text("".join(dumps(e) + "\n" for e in events))
    kafka = EmbeddedKafka(tmp_path / "kafka").start()
    try:
        local = replace(settings, kafka_bootstrap_servers=kafka.bootstrap_servers)
        ensure_topics(kafka.bootstrap_servers, {local.topic: 3})
        env = cli_env(local, tmp_path, BELIEFSTORE_PRODUCE_TIMEOUT="3")
        proc = subprocess.Popen([str(BELIEFSTORE), "produce", str(path), "--batch", "100"],
                                env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        # let it get some batches acknowledged, then kill the broker under it: more than
        # one batch (100 records) in the log means the second was sent, so the first was
        # acknowledged (each batch waits for its acks)
        deadline = time.monotonic() + 60
        while len(read_topic(kafka.bootstrap_servers, local.topic, 2)) <= 100 \
                and proc.poll() is None:
            assert time.monotonic() < deadline
        kafka.stop(timeout=0)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (out, err)
        message = flat(err)
        assert "Traceback" not in err, err
        assert "event(s) of" in message and "were acknowledged" in message, message
        acknowledged = int(message.split(" event(s) of")[0].split()[-1])
        assert 0 < acknowledged < len(events), message
        assert "is the first not acknowledged" in message, message
        first = int(message.split("; line ")[1].split()[0])
        assert first == acknowledged + 1, message  # no refused lines: one line per event
        assert "Re-running" in message and "deduplicated by event_id" in message, message

        kafka.start()  # same log directory: what was acknowledged is there
        # every acknowledged event is in the log (the workload redelivers some events, so
        # count records, not distinct payloads)
        assert len(read_topic(kafka.bootstrap_servers, local.topic, 20)) >= acknowledged
        # the re-run waits for acknowledgements as long as a user's would (the default
        # produce timeout): the 3-s one above is for noticing the broker die quickly, and
        # a just restarted broker on a loaded machine may take longer than that for a batch
        again = subprocess.run([str(BELIEFSTORE), "produce", str(path)],
                               env=cli_env(local, tmp_path), cwd=tmp_path,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        assert f"produced {len(events)} event(s)" in flat(again.stdout)
    finally:
        kafka.stop()


def test_commands_with_postgres_down_print_one_line_and_exit_1(settings, tmp_path):
    down = replace(settings, database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    env = cli_env(down, tmp_path)
    result = subprocess.run([str(BELIEFSTORE), "projector", "--until-caught-up"], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "PostgreSQL is unreachable" in flat(result.stderr) and "DATABASE_URL" in flat(
        result.stderr)
    verbose = subprocess.run([str(BELIEFSTORE), "projector", "--until-caught-up", "--verbose"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    for args in (["migrate"], ["projections", "list"]):
        other = subprocess.run([str(BELIEFSTORE), *args], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=60)
        assert other.returncode == 1 and "Traceback" not in other.stderr, (args, other.stderr)
        assert "PostgreSQL is unreachable" in flat(other.stderr), (args, other.stderr)
