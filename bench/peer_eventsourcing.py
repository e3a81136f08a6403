"""Peer comparison: the Python ``eventsourcing`` library projecting the same events.

    .venv/bin/python bench/peer_eventsourcing.py [--quick] [--events N] [--runs N]

The same workload (``beliefstore.events.workload.generate``) is stored as domain events in an
``eventsourcing`` application on the same PostgreSQL server (``eventsourcing.postgres``,
psycopg 3): one aggregate sequence per subject, one stored event per delivery
(redeliveries included, so both sides process the same number of events). That
storing is not timed.

The timed step is the library's own projection machinery: a ``ProjectionRunner`` with
a ``Projection`` whose materialised view is a ``PostgresTrackingRecorder`` subclass.
The runner subscribes to the application (LISTEN/NOTIFY plus batched selects of 500
notifications) and calls ``process_event`` once per event; each call writes, in one
transaction with the tracking record (the library's exactly-once pattern), the same
thing beliefstore's projector writes: the event row (observations, retractions,
erasures; a redelivered ``event_id`` is ignored), then the belief of every key the event
touches **recomputed with the same fold** and upserted (or deleted): one SQL query picks,
per source, its newest observation of the key that is neither retracted by that source
nor covered by an erasure (the fold's steps 1-3, over an index), and
``beliefstore.projector.fold.fold`` of those observations gives the belief — exactly the
fold of all the key's events, with work per event bounded by the number of sources
rather than by the key's history (the workload has keys with thousands of
observations). The result must equal the pure fold, as beliefstore's must.

So what is compared is the projection step of each system from its own log (Kafka for
beliefstore, the eventsourcing PostgreSQL event store for the peer) into an
equivalent ``beliefs`` table with the same fold and the same exactly-once guarantee.
The difference is the processing model: the library's runner processes one event per
transaction, beliefstore's worker a batch of events per transaction. beliefstore is
measured here on the same events (one ``ProjectorWorker``, as in projector_throughput),
and the result is the ratio beliefstore / eventsourcing of the median events/s.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import common
import projector_throughput
import psycopg
import sqlalchemy as sa
from eventsourcing.application import Application
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.domain import DomainEvent
from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresTrackingRecorder
from eventsourcing.projection import Projection, ProjectionRunner
from psycopg.types.json import Jsonb

from beliefstore.events.model import (
    Event,
    ObservationRecorded,
    ObservationRetracted,
    SubjectErased,
)
from beliefstore.projector.fold import Belief, FoldSettings, fold
from beliefstore.settings import Settings

NAME = "peer_eventsourcing"
TITLE = "beliefstore's projector vs the eventsourcing library's ProjectionRunner"
_NAMESPACE = uuid.UUID("6f1c0a52-3d5e-4a8e-9a51-0b6f2f7c1e10")


def params(quick: bool) -> dict[str, Any]:
    # the library projects ~200 events/s here: 30,000 events × 3 runs take ~8 minutes
    return {"events": 3_000 if quick else 30_000, "runs": 3}


# -- the write model: domain events in an eventsourcing application ----------------------


class Observed(DomainEvent):
    event_id: str
    subject_id: str
    source: str
    occurred_at: int
    context: str
    attribute: str
    value: str
    confidence: float
    evidence: str | None
    metadata: dict[str, str]


class Retracted(DomainEvent):
    event_id: str
    subject_id: str
    source: str
    occurred_at: int
    retracted_event_id: str
    reason: str | None


class Erased(DomainEvent):
    event_id: str
    subject_id: str
    source: str
    occurred_at: int
    reason: str | None


class BeliefLog(Application[uuid.UUID]):
    """The event-sourced application holding the subjects' event sequences."""


def to_domain_event(e: Event, version: int) -> DomainEvent:
    common_fields = {
        "originator_id": uuid.uuid5(_NAMESPACE, e.subject_id),
        "originator_version": version,
        "timestamp": datetime.fromtimestamp(e.occurred_at / 1000, UTC),
        "event_id": e.event_id, "subject_id": e.subject_id, "source": e.source,
        "occurred_at": e.occurred_at,
    }
    if isinstance(e, ObservationRecorded):
        return Observed(**common_fields, context=e.context, attribute=e.attribute,
                        value=e.value, confidence=e.confidence, evidence=e.evidence,
                        metadata=dict(e.metadata))
    if isinstance(e, ObservationRetracted):
        return Retracted(**common_fields, retracted_event_id=e.retracted_event_id,
                         reason=e.reason)
    assert isinstance(e, SubjectErased)
    return Erased(**common_fields, reason=e.reason)


# -- the read model: a materialised view (tracking recorder) ------------------------------


class BeliefsView(PostgresTrackingRecorder):
    """Observations, retractions, erasures and folded beliefs, written with tracking."""

    fold_settings = FoldSettings()

    def __init__(self, datastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        s = psycopg.sql.Identifier(self.datastore.schema)
        self.sql_create_statements.extend(psycopg.sql.SQL(q).format(s=s) for q in (
            "CREATE TABLE IF NOT EXISTS {s}.es_observations (event_id uuid PRIMARY KEY, "
            "subject_id text NOT NULL, context text NOT NULL, attribute text NOT NULL, "
            "value text NOT NULL, confidence float8 NOT NULL, source text NOT NULL, "
            "occurred_at bigint NOT NULL, evidence text, metadata jsonb)",
            "CREATE INDEX IF NOT EXISTS es_observations_key ON {s}.es_observations "
            "(subject_id, context, attribute, source, occurred_at DESC, event_id DESC)",
            "CREATE TABLE IF NOT EXISTS {s}.es_retractions (event_id uuid PRIMARY KEY, "
            "subject_id text NOT NULL, source text NOT NULL, occurred_at bigint NOT NULL, "
            "retracted_event_id uuid NOT NULL, reason text)",
            "CREATE INDEX IF NOT EXISTS es_retractions_target "
            "ON {s}.es_retractions (retracted_event_id)",
            "CREATE TABLE IF NOT EXISTS {s}.es_erasures (event_id uuid PRIMARY KEY, "
            "subject_id text NOT NULL, source text NOT NULL, occurred_at bigint NOT NULL, "
            "reason text)",
            "CREATE INDEX IF NOT EXISTS es_erasures_subject ON {s}.es_erasures (subject_id)",
            "CREATE TABLE IF NOT EXISTS {s}.es_beliefs (subject_id text, context text, "
            "attribute text, value text NOT NULL, confidence float8 NOT NULL, "
            "score float8 NOT NULL, alternatives jsonb NOT NULL, support jsonb NOT NULL, "
            "sources jsonb NOT NULL, source_count int NOT NULL, "
            "last_observed_at bigint NOT NULL, "
            "PRIMARY KEY (subject_id, context, attribute))",
        ))

        def q(text: str) -> psycopg.sql.Composed:
            return psycopg.sql.SQL(text).format(s=s)

        self.insert_observation = q(
            "INSERT INTO {s}.es_observations VALUES "
            "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING")
        self.insert_retraction = q(
            "INSERT INTO {s}.es_retractions VALUES (%s, %s, %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING")
        self.insert_erasure = q(
            "INSERT INTO {s}.es_erasures VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING")
        self.select_target_key = q(
            "SELECT subject_id, context, attribute FROM {s}.es_observations "
            "WHERE event_id = %s")
        self.select_subject_keys = q(
            "SELECT DISTINCT subject_id, context, attribute FROM {s}.es_observations "
            "WHERE subject_id = %s")
        # The fold's steps 1-3 in SQL: per source, its newest observation of the key that
        # is neither retracted by its own source nor covered by an erasure of the subject.
        self.select_counting = q(
            "SELECT DISTINCT ON (o.source) o.* FROM {s}.es_observations o "
            "WHERE o.subject_id = %s AND o.context = %s AND o.attribute = %s "
            "AND NOT EXISTS (SELECT 1 FROM {s}.es_retractions r "
            "WHERE r.retracted_event_id = o.event_id AND r.source = o.source) "
            "AND NOT EXISTS (SELECT 1 FROM {s}.es_erasures e "
            "WHERE e.subject_id = o.subject_id AND e.occurred_at >= o.occurred_at) "
            "ORDER BY o.source, o.occurred_at DESC, o.event_id DESC")
        self.upsert_belief = q(
            "INSERT INTO {s}.es_beliefs VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (subject_id, context, attribute) DO UPDATE SET "
            "value = excluded.value, confidence = excluded.confidence, score = excluded.score, "
            "alternatives = excluded.alternatives, support = excluded.support, "
            "sources = excluded.sources, source_count = excluded.source_count, "
            "last_observed_at = excluded.last_observed_at")
        self.delete_belief = q(
            "DELETE FROM {s}.es_beliefs WHERE subject_id = %s AND context = %s "
            "AND attribute = %s")
        self.last_commit = 0.0
        self.processed = 0

    # commands (one transaction each, with the tracking record)

    def observed(self, e: Observed, tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as curs:
            self._insert_tracking(curs, tracking)
            curs.execute(self.insert_observation, (
                e.event_id, e.subject_id, e.context, e.attribute, e.value, e.confidence,
                e.source, e.occurred_at, e.evidence, Jsonb(e.metadata)), prepare=True)
            if curs.rowcount:
                self._refold(curs, [(e.subject_id, e.context, e.attribute)])
        self._committed()

    def retracted(self, e: Retracted, tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as curs:
            self._insert_tracking(curs, tracking)
            curs.execute(self.insert_retraction, (
                e.event_id, e.subject_id, e.source, e.occurred_at, e.retracted_event_id,
                e.reason), prepare=True)
            if curs.rowcount:
                curs.execute(self.select_target_key, (e.retracted_event_id,), prepare=True)
                row = curs.fetchone()
                if row is not None:
                    self._refold(curs, [(row["subject_id"], row["context"], row["attribute"])])
        self._committed()

    def erased(self, e: Erased, tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as curs:
            self._insert_tracking(curs, tracking)
            curs.execute(self.insert_erasure, (
                e.event_id, e.subject_id, e.source, e.occurred_at, e.reason), prepare=True)
            if curs.rowcount:
                curs.execute(self.select_subject_keys, (e.subject_id,), prepare=True)
                self._refold(curs, [(r["subject_id"], r["context"], r["attribute"])
                                    for r in curs.fetchall()])
        self._committed()

    def skipped(self, tracking: Tracking) -> None:
        self.insert_tracking(tracking)
        self._committed()

    def _committed(self) -> None:
        self.processed += 1
        self.last_commit = time.perf_counter()

    def _refold(self, curs, keys: list[tuple[str, str, str]]) -> None:
        """Recompute the beliefs of ``keys``: ``fold`` of each source's counting observation
        (the same belief as the fold of all the key's events, in O(sources) Python work)."""
        for key in keys:
            curs.execute(self.select_counting, key, prepare=True)
            events: list[Event] = [ObservationRecorded(
                event_id=str(r["event_id"]), subject_id=r["subject_id"], source=r["source"],
                occurred_at=r["occurred_at"], context=r["context"], attribute=r["attribute"],
                value=r["value"], confidence=r["confidence"], evidence=r["evidence"],
                metadata=r["metadata"] or {}) for r in curs.fetchall()]
            folded = fold(events, self.fold_settings)
            if folded:
                b = folded[0]
                curs.execute(self.upsert_belief, (
                    b.subject_id, b.context, b.attribute, b.value, b.confidence, b.score,
                    Jsonb(b.alternatives), Jsonb(list(b.support)), Jsonb(list(b.sources)),
                    b.source_count, b.last_observed_at), prepare=True)
            else:
                curs.execute(self.delete_belief, key, prepare=True)

    # query
    def beliefs(self) -> dict[tuple[str, str, str], dict]:
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(psycopg.sql.SQL("SELECT * FROM {s}.es_beliefs").format(
                s=psycopg.sql.Identifier(self.datastore.schema)))
            return {(r["subject_id"], r["context"], r["attribute"]): r for r in curs.fetchall()}


class BeliefsProjection(Projection[BeliefsView]):
    name = "beliefs_projection"

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.skipped(tracking)

    @process_event.register
    def _observed(self, domain_event: Observed, tracking: Tracking) -> None:
        self.view.observed(domain_event, tracking)

    @process_event.register
    def _retracted(self, domain_event: Retracted, tracking: Tracking) -> None:
        self.view.retracted(domain_event, tracking)

    @process_event.register
    def _erased(self, domain_event: Erased, tracking: Tracking) -> None:
        self.view.erased(domain_event, tracking)


# -- the benchmark ------------------------------------------------------------------------


def es_env(database_url: str, app_schema: str, view_schema: str) -> dict[str, str]:
    url = sa.make_url(common.psycopg_conninfo(database_url))
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": url.database or "postgres",
        "POSTGRES_HOST": url.host or "127.0.0.1",
        "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": url.username or "postgres",
        "POSTGRES_PASSWORD": url.password or "",
        "POSTGRES_SCHEMA": app_schema,
        "CREATE_TABLE": "y",
        f"{BeliefsProjection.name.upper()}_POSTGRES_SCHEMA": view_schema,
    }


def store_events(env: dict[str, str], events: list[Event], chunk: int = 1000) -> int:
    """Record the workload as domain events; return the last notification id."""
    app = BeliefLog(env=env)
    try:
        versions: dict[str, int] = {}
        stored = []
        for e in events:
            versions[e.subject_id] = versions.get(e.subject_id, 0) + 1
            stored.append(app.mapper.to_stored_event(to_domain_event(e, versions[e.subject_id])))
        with common.progress() as bar:
            task = bar.add_task("storing domain events", total=len(stored))
            for i in range(0, len(stored), chunk):
                app.recorder.insert_events(stored[i:i + chunk])
                bar.advance(task, len(stored[i:i + chunk]))
        last = app.recorder.max_notification_id()
        assert last is not None
        return last
    finally:
        app.close()


def project_es(env: dict[str, str], total: int, label: str) -> dict[str, Any]:
    """Run the ProjectionRunner from the start until the view has tracked ``total`` events."""
    started = time.perf_counter()
    runner = ProjectionRunner(application_class=BeliefLog, projection_class=BeliefsProjection,
                              view_class=BeliefsView, env=env)
    runner.__enter__()
    view: BeliefsView = runner.view
    try:
        with common.progress() as bar:
            task = bar.add_task(label, total=total)
            while view.processed < total:
                if runner.is_interrupted.is_set():
                    runner.run_forever(timeout=0)  # re-raises the processing thread's error
                    raise RuntimeError("the projection runner stopped early")
                time.sleep(0.1)
                bar.update(task, completed=view.processed)
        seconds = view.last_commit - started
        beliefs = view.beliefs()
    finally:
        stopper = threading.Thread(target=runner.__exit__, args=(None, None, None))
        stopper.start()
        stopper.join(30)
    return {"seconds": round(seconds, 3), "events": view.processed,
            "events_per_second": round(view.processed / seconds, 1), "beliefs": beliefs}


def compare(expected: list[Belief], stored: dict[tuple[str, str, str], dict]) -> list[str]:
    return projector_throughput.compare(expected, stored)


def run(ctx: common.Context, *, events: int, runs: int) -> dict[str, Any]:
    key = common.workload_key(events)
    workload = ctx.events(key)
    expected = ctx.expected(key)
    app_schema = ctx.name("es_app")
    ctx.stack.callback(ctx.drop_schemas, app_schema)
    with psycopg.connect(common.psycopg_conninfo(ctx.database_url), autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE SCHEMA {}").format(
            psycopg.sql.Identifier(app_schema)))
    store_started = time.perf_counter()
    last = store_events(es_env(ctx.database_url, app_schema, app_schema), workload)
    store_seconds = time.perf_counter() - store_started
    common.console.print(f"  stored {len(workload):,} domain events (notification ids up to "
                         f"{last}) in {store_seconds:.1f} s")

    es_runs, failures = [], []
    for number in range(1, runs + 1):
        view_schema = ctx.name("es_view")
        with psycopg.connect(common.psycopg_conninfo(ctx.database_url), autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("CREATE SCHEMA {}").format(
                psycopg.sql.Identifier(view_schema)))
        try:
            r = project_es(es_env(ctx.database_url, app_schema, view_schema), len(workload),
                           f"eventsourcing run {number}/{runs}")
        finally:
            ctx.drop_schemas(view_schema)
        problems = compare(expected, r.pop("beliefs"))
        r["fold_check"] = "ok" if not problems else f"{len(problems)} differences"
        failures.extend(f"eventsourcing run {number}: {p}" for p in problems)
        es_runs.append({"run": number, **r})
        common.console.print(f"  eventsourcing run {number}: {r['events']:,} events in "
                             f"{r['seconds']:.1f} s = {r['events_per_second']:,.0f} events/s "
                             f"(fold check {r['fold_check']})")

    bs = projector_throughput.measure(ctx, key, mode="1", runs=runs,
                                      batch_size=Settings().batch_size, poll_timeout_ms=100)
    es_median = common.median([r["events_per_second"] for r in es_runs])
    ratio = bs["median_events_per_second"] / es_median
    failures.extend(bs["fold_differences"])
    return {
        "workload": {**key.describe(), "kinds": common.event_counts(workload),
                     "beliefs": len(expected)},
        "compared": "projection step only: beliefstore ProjectorWorker (Kafka → PostgreSQL, "
                    "batches of 500 per transaction) vs eventsourcing ProjectionRunner "
                    "(eventsourcing PostgreSQL event store → PostgreSQL view, one transaction "
                    "per event with its tracking record); both refold touched keys with "
                    "beliefstore.projector.fold.fold and must equal the pure fold",
        "eventsourcing": {"store_seconds": round(store_seconds, 2), "runs": es_runs,
                          "median_events_per_second": es_median},
        "beliefstore": {"runs": bs["runs"],
                        "median_events_per_second": bs["median_events_per_second"]},
        "ratio_beliefstore_over_eventsourcing": round(ratio, 2),
        "target_ratio": 3.0,
        "target_met": ratio >= 3.0,
        "fold_check": "ok" if not failures else "FAILED",
        "fold_differences": failures[:100],
        "failed": bool(failures),
    }


def summary(result: dict) -> list[str]:
    w = result["workload"]
    return [f"{w['events']:,} events: beliefstore "
            f"{result['beliefstore']['median_events_per_second']:,.0f} events/s, eventsourcing "
            f"{result['eventsourcing']['median_events_per_second']:,.0f} events/s: ratio "
            f"{result['ratio_beliefstore_over_eventsourcing']:.2f} (target ≥ 3: "
            f"{'met' if result['target_met'] else 'missed'}); fold check {result['fold_check']}"]


if __name__ == "__main__":
    sys.exit(common.standalone(sys.modules[__name__]))
