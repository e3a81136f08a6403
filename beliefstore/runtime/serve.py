"""Running the projector and the API inside one process (``up``, ``demo``, tests)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import sqlalchemy as sa
import uvicorn

from beliefstore.api.app import create_app
from beliefstore.errors import FencedError, LogResetError
from beliefstore.events.producer import Receipt
from beliefstore.events.serde import AvroSerde
from beliefstore.projector.catalog import ProjectionCatalog
from beliefstore.projector.tables import projection_offsets
from beliefstore.projector.worker import ProjectorWorker, WorkerStats
from beliefstore.settings import Settings

log = logging.getLogger("beliefstore")


def run_active_projection(
    settings: Settings,
    catalog: ProjectionCatalog,
    stop: threading.Event,
    *,
    until_caught_up: bool = False,
    on_batch: Callable[[ProjectorWorker, WorkerStats], None] | None = None,
    group: str | None = None,
) -> WorkerStats:
    """Keep the *active* projection up to date until ``stop`` is set.

    When ``beliefstore replay --switch`` makes another projection active, the worker
    finishes its batch, and a new one resumes from the new projection's stored offsets.
    With ``group``, the worker is a member of consumer group ``<group>.<projection>``;
    when it is fenced off (its partition moved while it was committing) it rejoins the
    group, which assigns it partitions afresh. Returns the last worker's counters.

    Raises:
        FencedError: without ``group``, another worker took a partition over.
    """
    stats = WorkerStats()
    # The keyring lives in the base schema, not in the projection's.
    serde = AvroSerde.for_settings(settings)
    while not stop.is_set():
        info = catalog.active()
        projection_settings = replace(settings, db_schema=info.schema, projection=info.name)
        worker = ProjectorWorker(projection_settings, catalog.engine(info.schema), serde=serde,
                                 group=f"{group}.{info.name}" if group else None)
        try:
            with worker:
                stats = worker.run(
                    stop,
                    until_caught_up=until_caught_up,
                    on_batch=(lambda s, w=worker: on_batch(w, s)) if on_batch else None,
                    keep_running=lambda name=info.name: catalog.active().name == name,
                )
        except FencedError as exc:
            if not group:
                raise
            log.warning("%s; rejoining the group", exc)
            continue
        if until_caught_up and catalog.active().name == info.name:
            break
        if not stop.is_set():
            log.info("active projection changed from %r; following it", info.name)
    return stats


def wait_projected(catalog: ProjectionCatalog, topic: str, receipts: Iterable[Receipt],
                   timeout_s: float = 60.0) -> None:
    """Block until the active projection's stored offsets are past every receipt's offset.

    Raises:
        TimeoutError: not caught up within ``timeout_s`` seconds.
    """
    needed: dict[int, int] = {}
    for r in receipts:
        needed[r.partition] = max(needed.get(r.partition, -1), r.offset)
    deadline = time.monotonic() + timeout_s
    while True:
        info = catalog.active()
        with catalog.engine(info.schema).connect() as conn:
            rows = conn.execute(sa.select(projection_offsets.c.partition,
                                          projection_offsets.c.next_offset).where(
                projection_offsets.c.projection == info.name,
                projection_offsets.c.topic == topic))
            stored = {r.partition: r.next_offset for r in rows}
        if all(stored.get(p, 0) > o for p, o in needed.items()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the projector did not catch up within {timeout_s:.0f} s")
        time.sleep(0.05)


class ProjectorThread(threading.Thread):
    """The projector in a daemon thread, following the active projection; :meth:`stop`
    finishes the batch in progress, commits it and returns.

    A lost connection (the broker or PostgreSQL went away) does not end it: the worker is
    rebuilt after a delay that doubles from ``retry_s`` up to ``max_retry_s`` seconds and
    resumes from the offsets stored in PostgreSQL, so nothing is lost or applied twice.
    Only a :class:`~beliefstore.errors.LogResetError` (the log lost events the read model
    has: an operator must decide) ends it; it is kept in ``error``. ``reconnects`` counts
    the rebuilds and ``last_error`` keeps the error behind the latest one.
    """

    def __init__(self, settings: Settings, catalog: ProjectionCatalog | None = None, *,
                 report_every_s: float = 10.0, retry_s: float = 0.5, max_retry_s: float = 10.0):
        super().__init__(name="projector", daemon=True)
        self.settings = settings
        self._own_catalog = catalog is None
        self.catalog = catalog or ProjectionCatalog.from_settings(settings)
        self._stop_event = threading.Event()
        self.error: BaseException | None = None
        self.reconnects = 0
        self.last_error: BaseException | None = None
        self._report_every_s = report_every_s
        self._last_report = time.monotonic()
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        self._delay = retry_s

    def _report(self, worker: ProjectorWorker, stats: WorkerStats) -> None:
        self._delay = self._retry_s  # a batch went through: connected again
        now = time.monotonic()
        if now - self._last_report >= self._report_every_s:
            self._last_report = now
            log.info("projector: %d events, %d poison, %.0f msg/s, lag %s",
                     stats.events, stats.poison, stats.rate, worker.lag())

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                run_active_projection(self.settings, self.catalog, self._stop_event,
                                      on_batch=self._report)
                return
            except LogResetError as exc:
                self.error = exc
                log.error("projector stopped: %s", exc)
                return
            except Exception as exc:  # a lost connection, mostly: rebuild the worker
                log.warning("projector: %s; reconnecting in %.1f s", _describe(exc), self._delay)
                log.debug("projector error", exc_info=True)
                self.reconnects += 1
                self.last_error = exc
                if self._stop_event.wait(self._delay):
                    return
                self._delay = min(self._max_retry_s, self._delay * 2)
            except BaseException as exc:  # surfaced by the owner
                self.error = exc
                log.exception("projector stopped with an error")
                return

    def stop(self, timeout: float = 30.0) -> None:
        self._stop_event.set()
        self.join(timeout)
        if self._own_catalog:
            self.catalog.dispose()


def _describe(exc: BaseException) -> str:
    """``ExceptionName: first line of the message``, for one-line logs."""
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def listen_tcp(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket for uvicorn (inheritable, for worker processes).

    Made with ``IPPROTO_TCP`` on purpose: asyncio sets ``TCP_NODELAY`` only on sockets
    whose protocol is TCP, and uvicorn's own ``bind_socket()`` creates them with protocol
    0, so every response then waits for the client's delayed ACK (about 40 ms per
    request on Linux: Nagle's algorithm).

    Raises:
        OSError: the address is in use or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def _producer_env(settings: Settings) -> list[tuple[str, str]]:
    """The environment that gives API worker processes ``settings``' producer choice
    (``up`` turns idempotence off on its durable embedded broker)."""
    return [] if settings.idempotent_producer else [("BELIEFSTORE_IDEMPOTENT_PRODUCER", "off")]


class ApiServer:
    """uvicorn serving :func:`create_app` on ``host:port``.

    ``run()`` blocks in the foreground (Ctrl-C stops it); ``start_in_thread()`` serves
    from a daemon thread and returns once it accepts connections.

    With ``workers`` > 1, ``run()`` starts that many API processes sharing the listening
    socket (uvicorn's supervisor; each process builds its app with
    :func:`beliefstore.api.app.app_from_env`, so the settings reach them through the
    environment: the database and broker addresses are exported first). Each process
    has its own caches, LISTEN connection and rate-limit buckets.
    """

    def __init__(self, settings: Settings, host: str, port: int, *,
                 catalog: ProjectionCatalog | None = None, workers: int = 1):
        self._own_catalog = catalog is None
        self.catalog = catalog or ProjectionCatalog.from_settings(settings)
        self.settings = settings
        self.host, self.port, self.workers = host, port, max(1, workers)
        self.url = f"http://{host}:{port}"
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._config: uvicorn.Config | None = None
        if self.workers == 1:
            self.app = app = create_app(settings, self.catalog)
            config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                    access_log=False, timeout_graceful_shutdown=3)
            self.server = uvicorn.Server(config)

    def bind(self) -> None:
        """Bind the listening socket now (so connections queue from this moment on, before
        the worker processes are up); :meth:`run` serves on it."""
        if self._socket is not None:
            return
        if self.workers == 1:
            self._socket = listen_tcp(self.host, self.port)
            return
        for name, value in (("DATABASE_URL", self.settings.database_url),
                            ("KAFKA_BOOTSTRAP_SERVERS", self.settings.kafka_bootstrap_servers),
                            *_producer_env(self.settings)):
            if value:
                os.environ[name] = value
        self._config = uvicorn.Config(
            "beliefstore.api.app:app_from_env", factory=True, host=self.host, port=self.port,
            workers=self.workers, log_level="warning", access_log=False,
            timeout_graceful_shutdown=3)
        self._socket = listen_tcp(self.host, self.port)

    def run(self) -> None:
        """Serve in the foreground until Ctrl-C / SIGTERM (binding first if needed)."""
        from uvicorn.supervisors import Multiprocess

        self.bind()
        assert self._socket is not None
        if self.workers == 1:
            # uvicorn handles SIGTERM, shuts down, then re-raises it with the handler it
            # found: make that one an exit, so callers' cleanup (``up``'s embedded
            # services) still runs instead of the process dying on the spot.
            if threading.current_thread() is threading.main_thread() \
                    and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, _exit_on_sigterm)
            self.app.state.freeze_gc = True  # served in the foreground: for good
            self.server.run(sockets=[self._socket])
            return
        assert self._config is not None
        Multiprocess(self._config, sockets=[self._socket]).run()

    def start_in_thread(self, timeout: float = 15.0) -> ApiServer:
        if self.workers != 1:
            raise ValueError("start_in_thread serves one process; use run() for workers > 1")
        self.bind()  # our socket: TCP_NODELAY (see listen_tcp)
        assert self._socket is not None
        sockets = [self._socket]
        self._thread = threading.Thread(target=lambda: self.server.run(sockets=sockets),
                                        name="api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start on {self.url}")
            time.sleep(0.05)
        return self

    @property
    def alive(self) -> bool:
        """Whether the server thread (``start_in_thread``) still serves."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self.workers == 1:
            self.app.state.beliefstore.live.end_watches_threadsafe()
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        if self._own_catalog:
            self.catalog.dispose()


class ApiProcesses:
    """``beliefstore api --workers N`` as a child process of ``up`` (uvicorn's supervisor
    and its N worker processes sharing one port), with the addresses of the services
    ``up`` started exported to it.

    Its output goes to ``log_path``; on Linux it gets SIGTERM if ``up`` dies without
    stopping it.

    Args:
        settings: ``up``'s settings (broker and database addresses filled in).
        host, port: where the API listens.
        workers: API processes (≥ 2; one process runs in ``up``'s own, see :class:`ApiServer`).
        log_path: the API's log file (appended).
    """

    def __init__(self, settings: Settings, host: str, port: int, workers: int, log_path: Path):
        self.settings, self.host, self.port, self.workers = settings, host, port, workers
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://HOST:PORT``."""
        return f"http://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        """Whether the API's supervisor process still runs."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> ApiProcesses:
        """Start the processes; return once ``/healthz`` answers.

        Raises:
            RuntimeError: it exited or did not answer within ``timeout`` seconds (the
                message names the log file).
        """
        import httpx

        from beliefstore.embedded.base import spawn

        env = dict(os.environ)
        for name, value in (("DATABASE_URL", self.settings.database_url),
                            ("KAFKA_BOOTSTRAP_SERVERS", self.settings.kafka_bootstrap_servers),
                            *_producer_env(self.settings)):
            if value:
                env[name] = value
        argv = [sys.executable, "-c", "from beliefstore.cli import main; main()", "api",
                "--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]
        self._proc = spawn(argv, self.log_path, env)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                try:
                    if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        except BaseException:
            # SIGTERM/Ctrl-C while waiting (a client may see /healthz answer first): the
            # caller has not registered stop() yet, so stop the processes here
            self.stop()
            raise
        self.stop()
        raise RuntimeError(f"the API processes did not start on {self.url}; see {self.log_path}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the API (uvicorn stops its workers), SIGKILL after ``timeout`` s."""
        from beliefstore.embedded.base import terminate

        terminate(self._proc, timeout)
        self._proc = None
