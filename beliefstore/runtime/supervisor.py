"""Supervision of the embedded services ``up`` started: restart what dies, give up loudly.

:class:`Supervisor` polls each :class:`~beliefstore.embedded.base.EmbeddedService`'s
``running`` from a thread. Polling also reaps a child that exited (``Popen.poll``), so
a dead broker never lingers as a zombie. A service that is down is restarted on the same
port (clients such as the projector's consumer and the API's producer and connection
pool reconnect to the address they know) after a delay that doubles per consecutive
failure, up to a bound. After ``max_restarts`` consecutive failed lives, it gives up:
``failure`` says which service and where its log is, and ``on_give_up`` is called so the
owner can stop and exit non-zero.

A life longer than ``healthy_after_s`` resets the count, so a service that dies once a
day is restarted every time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from beliefstore.embedded.base import EmbeddedService, ServiceStartError

log = logging.getLogger("beliefstore")


@dataclass(frozen=True)
class ServiceFailure:
    """Why supervision gave up on a service.

    Attributes:
        service: the service's human name (``EmbeddedService.SERVICE``).
        port: its TCP port on 127.0.0.1.
        failures: consecutive deaths or failed restarts counted.
        log_path: its log file, or ``None`` if it has none.
        last_error: the last restart error, ``""`` if every restart came up.
    """

    service: str
    port: int
    failures: int
    log_path: Path | None
    last_error: str = ""

    def message(self) -> str:
        """One line naming the service, how often it failed, and its log file."""
        where = f"; its log file: {self.log_path}" if self.log_path else ""
        why = f" (last restart: {self.last_error.splitlines()[0]})" if self.last_error else ""
        return (f"{self.service} on port {self.port} died or failed to restart {self.failures} "
                f"times in a row{why}; giving up{where}")


class Supervisor:
    """Keeps embedded services alive from a daemon thread.

    Args:
        services: the services to watch (already started); each is pinned to its port.
        on_give_up: called once, from the supervisor's thread, after it gave up on a service
            (``failure`` is set by then).
        check_every_s: polling interval, seconds.
        backoff_s: delay before the first restart, seconds; doubled per consecutive
            failure up to ``max_backoff_s``.
        max_backoff_s: bound of the delay, seconds.
        max_restarts: restarts attempted in a row before giving up.
        healthy_after_s: a service alive this long (seconds) since its last restart has its
            failure count reset.
    """

    def __init__(
        self,
        services: Sequence[EmbeddedService],
        *,
        on_give_up: Callable[[ServiceFailure], None] | None = None,
        check_every_s: float = 0.5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        max_restarts: int = 5,
        healthy_after_s: float = 60.0,
    ) -> None:
        self.services = list(services)
        for service in self.services:
            service.pin_port()  # a restart comes back where the clients reconnect
        self.on_give_up = on_give_up
        self.check_every_s = check_every_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_restarts = max_restarts
        self.healthy_after_s = healthy_after_s
        #: Set once supervision gave up on a service.
        self.failure: ServiceFailure | None = None
        #: Successful restarts per service name (for logs and tests).
        self.restarts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Supervisor:
        """Start watching (idempotent); returns ``self``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop watching; waits up to ``timeout`` seconds for a restart in progress."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def delay(self, failures: int) -> float:
        """Seconds to wait before restart number ``failures`` (1-based) in a row."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1))

    def _run(self) -> None:
        failures = {id(s): 0 for s in self.services}
        since = {id(s): time.monotonic() for s in self.services}
        last_error = {id(s): "" for s in self.services}
        while not self._stop.wait(self.check_every_s):
            for service in self.services:
                key = id(service)
                if service.running:
                    if failures[key] and time.monotonic() - since[key] > self.healthy_after_s:
                        failures[key] = 0
                        last_error[key] = ""
                    continue
                if self._stop.is_set():
                    return
                failures[key] += 1
                log_path = service.log_path
                if failures[key] > self.max_restarts:
                    self.failure = ServiceFailure(service.SERVICE, service.port,
                                                  failures[key] - 1, log_path, last_error[key])
                    log.error("%s", self.failure.message())
                    if self.on_give_up is not None:
                        self.on_give_up(self.failure)
                    return
                wait = self.delay(failures[key])
                log.warning("%s on port %d is down; restarting it in %.1f s (restart %d of at "
                            "most %d in a row; log file: %s)", service.SERVICE, service.port,
                            wait, failures[key], self.max_restarts, log_path)
                if self._stop.wait(wait):
                    return
                try:
                    service.start()
                except ServiceStartError as exc:
                    last_error[key] = exc.problem
                    log.error("restarting %s failed: %s", service.SERVICE, exc.problem)
                    continue
                since[key] = time.monotonic()
                self.restarts[service.SERVICE] = self.restarts.get(service.SERVICE, 0) + 1
                log.warning("restarted %s on port %d", service.SERVICE, service.port)
