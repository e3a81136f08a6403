"""Running the projector and the API inside one process (``up``, ``demo``, tests)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

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


class ApiServer:
    """uvicorn serving :func:`create_app` on ``host:port``.

    ``run()`` blocks in the foreground (Ctrl-C stops it); ``start_in_thread()`` serves
    from a daemon thread and returns once it accepts connections.
    """

    def __init__(self, settings: Settings, host: str, port: int, *,
                 catalog: ProjectionCatalog | None = None):
        self._own_catalog = catalog is None
        self.catalog = catalog or ProjectionCatalog.from_settings(settings)
        app = create_app(settings, self.catalog)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.url = f"http://{host}:{port}"
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        self.server.run()

    def start_in_thread(self, timeout: float = 15.0) -> ApiServer:
        self._thread = threading.Thread(target=self.server.run, name="api", daemon=True)
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
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        if self._own_catalog:
            self.catalog.dispose()
