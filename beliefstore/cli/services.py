"""Commands that run services: ``up``, ``projector``, ``api``, ``migrate``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated

import typer

from beliefstore.cli.common import (
    console,
    describe_new_key,
    fail,
    load_settings,
    log,
    redact,
    require_services,
    setup_logging,
)
from beliefstore.errors import BeliefstoreError
from beliefstore.settings import write_state

if TYPE_CHECKING:
    from beliefstore.access.keys import NewKey
    from beliefstore.projector.catalog import ProjectionCatalog
    from beliefstore.settings import Settings


def up(
    api_port: Annotated[int | None, typer.Option(help="API port (default BELIEFSTORE_API_PORT "
                                                      "or 8000).")] = None,
    api_workers: Annotated[int | None, typer.Option(
        min=1, help="API processes sharing the port (default: the number of cores); each "
        "has its own caches and rate-limit buckets. With more than one they run as a child "
        "process group logging to .beliefstore/api.log.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Start everything in the foreground: embedded Kafka and PostgreSQL where none is
    configured (data under ./.beliefstore/, kept across restarts), migrations, topics, the
    projector and the API. An embedded service that dies is restarted (bounded backoff);
    after repeated failures `up` stops and exits 1 naming it and its log file. Ctrl-C or
    SIGTERM finishes the projector's batch, stops it all and exits 0."""
    setup_logging(verbose)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        # SIGTERM (systemd, Docker, supervisors) stops exactly like Ctrl-C; once stopping,
        # further signals must not interrupt the shutdown half-way (orphaned servers).
        if stopping.is_set():
            log.warning("already stopping (signal %d ignored)", signum)
            return
        stopping.set()
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        failure = _run_up(api_port, api_workers or os.cpu_count() or 1, stopping)
    except KeyboardInterrupt:
        failure = None
    if failure is not None:
        raise fail(failure)
    console.print("stopped")


def _run_up(api_port: int | None, api_workers: int, stopping: threading.Event) -> str | None:
    """``up``'s body; returns why it stopped on its own (a signal raises KeyboardInterrupt)."""
    settings = load_settings(use_running=False)
    if api_port:
        settings = replace(settings, api_port=api_port, api_url=f"http://{settings.api_host}:{api_port}")
    with contextlib.ExitStack() as stack:
        try:
            return _serve(settings, stack, api_workers)
        finally:
            stopping.set()  # before the stack unwinds: no signal interrupts the shutdown


def _serve(settings: Settings, stack: contextlib.ExitStack, api_workers: int = 1) -> str | None:
    """Start the services, the projector and the API on ``stack``; wait for a signal
    (KeyboardInterrupt) or for supervision to give up (returns its message)."""
    from beliefstore.embedded import EmbeddedService
    from beliefstore.runtime.serve import ApiProcesses, ApiServer, ProjectorThread
    from beliefstore.runtime.startup import prepare, start_missing_services
    from beliefstore.runtime.supervisor import Supervisor

    started: list[EmbeddedService] = []
    try:
        settings = start_missing_services(settings, stack, durable=True, started=started)
        catalog = prepare(settings)
        first_key = _first_admin_key(catalog) if settings.auth else None
    except (BeliefstoreError, RuntimeError, OSError) as exc:
        raise fail(str(exc)) from None
    projector = ProjectorThread(settings, catalog)
    projector.start()
    stack.callback(projector.stop)
    api: ApiServer | ApiProcesses
    try:
        if api_workers == 1:
            api = ApiServer(settings, settings.api_host, settings.api_port, catalog=catalog)
            api.start_in_thread()
        else:
            api = ApiProcesses(settings, settings.api_host, settings.api_port, api_workers,
                               settings.home / "api.log")
            api.start()
    except (RuntimeError, OSError) as exc:
        raise fail(f"{exc}: is port {settings.api_port} taken? Pass another with "
                   "--api-port or BELIEFSTORE_API_PORT") from None
    stack.callback(api.stop)
    gave_up = threading.Event()
    supervisor = Supervisor(started, on_give_up=lambda _failure: gave_up.set()).start()
    stack.callback(supervisor.stop)
    path = write_state(settings.home, {
        "pid": os.getpid(),
        "kafka_bootstrap_servers": settings.kafka_bootstrap_servers,
        "database_url": settings.database_url,
        "api_url": api.url,
    })
    stack.callback(lambda: path.unlink(missing_ok=True))
    console.print(f"[bold]beliefstore is up[/] (addresses recorded in {path})")
    console.print(f"  Kafka       {settings.kafka_bootstrap_servers}  topic {settings.topic}")
    console.print(f"  PostgreSQL  {redact(settings.database_url)}  schema {settings.db_schema}")
    console.print(f"  API         {api.url}  (OpenAPI at {api.url}/docs; "
                  f"{api_workers} process(es))")
    if not settings.auth:
        console.print("  [yellow]authentication is off (BELIEFSTORE_AUTH=off): anyone who "
                      "reaches the API may read and write everything[/]")
    elif first_key is not None:
        console.print(f"  [bold]first start: created {describe_new_key(first_key)}.[/]\n"
                      "  It is shown only this once; store it now, and make agents their own "
                      "keys with `beliefstore keys create`:\n"
                      f"    export BELIEFSTORE_API_KEY={first_key.token}")
    console.print("Press Ctrl-C to stop.")
    stack.callback(console.print, "stopping: the API, the projector (after its batch), "
                   "then the services")
    # Signals reach this (main) thread: SIGINT/SIGTERM raise KeyboardInterrupt here.
    while not gave_up.wait(0.5) and api.alive:
        pass
    if supervisor.failure is not None:
        return f"{supervisor.failure.message()}; everything else was stopped"
    return ("the API server stopped on its own (see the log above"
            + (f" and {settings.home / 'api.log'})" if api_workers > 1 else ")"))


def _first_admin_key(catalog: ProjectionCatalog) -> NewKey | None:
    from beliefstore.access.keys import KeyStore

    store = KeyStore.of_catalog(catalog)
    store.ensure()
    return store.create_first_admin_key()


def projector(
    until_caught_up: Annotated[bool, typer.Option(
        help="Exit 0 once every partition is projected up to its high watermark.")] = False,
    group: Annotated[str | None, typer.Option(
        help="Join this consumer group (Kafka spreads the partitions over its members); "
        "run one process per member, or use --workers.")] = None,
    workers: Annotated[int, typer.Option(
        min=1, help="Run N worker processes in one consumer group (default group "
        "`beliefstore-projector`) and supervise them.")] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    metrics_port: Annotated[int | None, typer.Option(
        min=1, max=65535, help="Serve Prometheus metrics (events, batch duration, lag per "
        "partition, dead letters) on http://0.0.0.0:PORT/metrics; with --workers N, worker i "
        "uses PORT+i. Meant for the operator's network: no key is asked.")] = None,
) -> None:
    """Run the projector: consume the event topic, fold each batch into the read model in
    one transaction with the offsets. It follows the active projection (see `replay
    --switch`). Alone it owns every partition; with --group/--workers the members of a
    consumer group share them, each fenced off from partitions it lost. SIGTERM or
    Ctrl-C finishes the current batch, commits and exits 0."""
    from beliefstore.projector.catalog import ProjectionCatalog
    from beliefstore.runtime.serve import run_active_projection

    setup_logging(verbose)
    settings = load_settings()
    require_services(settings)
    if workers > 1:
        raise typer.Exit(_supervise_workers(workers, group or "beliefstore-projector",
                                            until_caught_up, verbose, metrics_port))
    metrics_server = _serve_metrics(metrics_port) if metrics_port else None
    catalog = ProjectionCatalog.from_settings(settings)
    catalog.ensure()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stats = run_active_projection(settings, catalog, stop, until_caught_up=until_caught_up,
                                      group=group)
    except BeliefstoreError as exc:
        raise fail(str(exc)) from None
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
    log.info("projector stopped: %d events, %d poison in %d batches", stats.events,
             stats.poison, stats.batches)


def _serve_metrics(port: int):
    """Serve the projector's metrics on ``port``; exit 2 naming the port if it is taken."""
    from beliefstore.projector.metrics import serve

    try:
        server = serve(port)
    except OSError as exc:
        raise fail(f"cannot serve metrics on port {port} ({exc.strerror}): pick a free port "
                   "with --metrics-port", 2) from None
    log.info("projector metrics on http://0.0.0.0:%d/metrics", port)
    return server


def _supervise_workers(count: int, group: str, until_caught_up: bool, verbose: bool,
                       metrics_port: int | None = None) -> int:
    """Run ``count`` `projector --group` processes; forward SIGTERM/SIGINT; return the
    first non-zero exit code (0 when all exit cleanly)."""
    import subprocess

    command = [sys.argv[0], "projector", "--group", group]
    command += ["--until-caught-up"] if until_caught_up else []
    command += ["--verbose"] if verbose else []
    children = [subprocess.Popen(command + (["--metrics-port", str(metrics_port + i)]
                                            if metrics_port else []))
                for i in range(count)]
    log.info("started %d projector workers in group %r: pids %s", count, group,
             [c.pid for c in children])

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    return next((c for c in codes if c != 0), 0)


def api(
    host: Annotated[str | None, typer.Option(help="Bind address (BELIEFSTORE_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (BELIEFSTORE_API_PORT).")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="API processes sharing the port (default: the number of cores); each "
        "has its own caches and rate-limit buckets (a key may make N x "
        "BELIEFSTORE_RATE_LIMIT requests/s in all).")] = None,
) -> None:
    """Serve the HTTP API (self-model, beliefs, watch, trace, POST /v1/observations, /docs)."""
    from beliefstore.projector.catalog import ProjectionCatalog
    from beliefstore.runtime.serve import ApiServer

    setup_logging()
    settings = load_settings()
    require_services(settings)
    catalog = ProjectionCatalog.from_settings(settings)
    catalog.ensure()
    if not settings.auth:
        log.warning("authentication is off (BELIEFSTORE_AUTH=off): anyone who reaches the API "
                    "may read and write everything")
    else:
        from beliefstore.access.keys import KeyStore

        keys = KeyStore.of_catalog(catalog)
        if not keys.count():
            log.warning("no API key exists yet, so every request will get 401: make one with "
                        "`beliefstore keys create --agent NAME --read CONTEXTS --write CONTEXTS "
                        "[--admin]`")
    server = ApiServer(settings, host or settings.api_host, port or settings.api_port,
                       catalog=catalog, workers=workers or os.cpu_count() or 1)
    try:
        server.bind()
    except OSError as exc:
        raise fail(f"cannot listen on {server.url}: {exc}; pick another --port") from None
    server.run()


def migrate() -> None:
    """Create or upgrade the read model's tables (Alembic) in BELIEFSTORE_DB_SCHEMA and every
    registered projection's schema."""
    from beliefstore.db import migrate as run_migrations
    from beliefstore.projector.catalog import ProjectionCatalog

    settings = load_settings()
    if not settings.database_url:
        raise fail("DATABASE_URL is not set and no `beliefstore up` runs here", 2)
    catalog = ProjectionCatalog.from_settings(settings)
    catalog.ensure()
    for info in catalog.list():
        run_migrations(catalog.engine(info.schema), info.schema)
        console.print(f"projection {info.name}: schema {info.schema} migrated")


def register(app: typer.Typer) -> None:
    """Add ``up``, ``projector``, ``api`` and ``migrate`` to ``app``."""
    app.command()(up)
    app.command()(projector)
    app.command()(api)
    app.command()(migrate)
