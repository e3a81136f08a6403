"""Running the projector and the API inside one process (``up``, ``demo``, tests)."""

from __future__ import annotations

import logging
import threading
import time

import sqlalchemy as sa
import uvicorn

from beliefstore.api.app import create_app
from beliefstore.projector.worker import ProjectorWorker
from beliefstore.settings import Settings

log = logging.getLogger("beliefstore")


class ProjectorThread(threading.Thread):
    """A :class:`ProjectorWorker` in a daemon thread; :meth:`stop` finishes the batch in
    progress, commits it and returns. An exception in the worker is kept in ``error``."""

    def __init__(self, settings: Settings, engine: sa.Engine, *, report_every_s: float = 10.0):
        super().__init__(name="projector", daemon=True)
        self.worker = ProjectorWorker(settings, engine)
        self._stop_event = threading.Event()
        self.error: BaseException | None = None
        self._report_every_s = report_every_s
        self._last_report = time.monotonic()

    def _report(self, stats) -> None:
        now = time.monotonic()
        if now - self._last_report >= self._report_every_s:
            self._last_report = now
            log.info("projector: %d events, %d poison, %.0f msg/s, lag %s",
                     stats.events, stats.poison, stats.rate, self.worker.lag())

    def run(self) -> None:
        try:
            with self.worker:
                self.worker.run(self._stop_event, on_batch=self._report)
        except BaseException as exc:  # surfaced by the owner
            self.error = exc
            log.exception("projector stopped with an error")

    def stop(self, timeout: float = 30.0) -> None:
        self._stop_event.set()
        self.join(timeout)


class ApiServer:
    """uvicorn serving :func:`create_app` on ``host:port``.

    ``run()`` blocks in the foreground (Ctrl-C stops it); ``start_in_thread()`` serves
    from a daemon thread and returns once it accepts connections.
    """

    def __init__(self, settings: Settings, engine: sa.Engine, host: str, port: int):
        config = uvicorn.Config(create_app(settings, engine), host=host, port=port,
                                log_level="warning", access_log=False)
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

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
