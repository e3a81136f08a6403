"""Running the projector and the API inside one process (``up``, ``demo``, tests)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

import sqlalchemy as sa
import uvicorn

from beliefstore.api.app import create_app
from beliefstore.errors import FencedError
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
    finishes the batch in progress, commits it and returns. An exception in the worker is
    kept in ``error``."""

    def __init__(self, settings: Settings, catalog: ProjectionCatalog | None = None, *,
                 report_every_s: float = 10.0):
        super().__init__(name="projector", daemon=True)
        self.settings = settings
        self._own_catalog = catalog is None
        self.catalog = catalog or ProjectionCatalog.from_settings(settings)
        self._stop_event = threading.Event()
        self.error: BaseException | None = None
        self._report_every_s = report_every_s
        self._last_report = time.monotonic()

    def _report(self, worker: ProjectorWorker, stats: WorkerStats) -> None:
        now = time.monotonic()
        if now - self._last_report >= self._report_every_s:
            self._last_report = now
            log.info("projector: %d events, %d poison, %.0f msg/s, lag %s",
                     stats.events, stats.poison, stats.rate, worker.lag())

    def run(self) -> None:
        try:
            run_active_projection(self.settings, self.catalog, self._stop_event,
                                  on_batch=self._report)
        except BaseException as exc:  # surfaced by the owner
            self.error = exc
            log.exception("projector stopped with an error")

    def stop(self, timeout: float = 30.0) -> None:
        self._stop_event.set()
        self.join(timeout)
        if self._own_catalog:
            self.catalog.dispose()


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
                            ("KAFKA_BOOTSTRAP_SERVERS", self.settings.kafka_bootstrap_servers)):
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
            self.server.run(sockets=[self._socket])
            return
        assert self._config is not None
        Multiprocess(self._config, sockets=[self._socket]).run()

    def start_in_thread(self, timeout: float = 15.0) -> ApiServer:
        if self.workers != 1:
            raise ValueError("start_in_thread serves one process; use run() for workers > 1")
        self._thread = threading.Thread(target=self.server.run, name="api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.workers == 1:
            self.app.state.beliefstore.live.end_watches_threadsafe()
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        if self._own_catalog:
            self.catalog.dispose()
