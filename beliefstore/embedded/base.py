"""What the embedded broker and PostgreSQL share: processes, locks, readiness, errors.

:class:`EmbeddedService` is the lifecycle both services follow:

* ``start()`` returns once the service really answers and raises
  :class:`ServiceStartError` otherwise; ``stop()`` is idempotent; both are a context
  manager's enter and exit.
* A service with a data directory holds an exclusive ``flock`` on it while it runs
  (:class:`DirLock`), so two owners (two processes, or two objects in one process) never
  share one data directory. The lock dies with the owning process.
* A port chosen by the service itself is re-chosen when the process reports it taken
  (:meth:`EmbeddedService._retry_port`).
* A normal interpreter exit stops whatever is still running (``atexit``).

Child processes started with :func:`spawn` run in their own session (Ctrl-C in the
terminal reaches only the owner, which then stops them in order) and, on Linux, with
``PR_SET_PDEATHSIG=SIGTERM`` so they also die if the owner is SIGKILLed.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from beliefstore.errors import BeliefstoreError

LOOPBACK = "127.0.0.1"
LOG_TAIL_LINES = 20
_PORT_IN_USE_MARKERS = ("address already in use", "address in use", "addrinuse")


class ServiceStartError(BeliefstoreError, RuntimeError):
    """An embedded service did not start (or could not be used).

    The message names the service, the log file, its last lines and a
    suggested fix.

    Attributes:
        service: human name of the service, e.g. ``"Kafka broker (tansu)"``.
        problem: what went wrong, one sentence.
        log_path: the service's log file, or ``None`` if it has none.
        log_tail: the last lines of that log (``""`` if unreadable/absent).
        hint: what to try.
    """

    def __init__(
        self,
        service: str,
        problem: str,
        *,
        log_path: Path | None = None,
        hint: str = "",
        lines: int = LOG_TAIL_LINES,
    ) -> None:
        self.service = service
        self.problem = problem
        self.log_path = log_path
        self.log_tail = tail(log_path, lines) if log_path is not None else ""
        self.hint = hint
        parts = [f"{service} did not start: {problem}"]
        if log_path is not None:
            parts.append(f"log file: {log_path}")
            if self.log_tail:
                parts.append(f"--- last {lines} lines of the log ---\n{self.log_tail}\n---")
            else:
                parts.append("(the log file is empty or missing)")
        if hint:
            parts.append(f"hint: {hint}")
        super().__init__("\n".join(parts))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The port is found by binding to port 0 and closing the socket, so another
    process may take it before the caller binds it; the services below retry
    with a new port when they chose it themselves and it turns out to be taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of a text file, ``""`` if it cannot be read."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def log_size(path: Path) -> int:
    """Current size of a log file in bytes (0 if missing), to read only what follows."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def port_in_use(log_path: Path, since: int) -> bool:
    """Whether the log, from byte ``since`` on, says a bind failed on a taken port."""
    try:
        with open(log_path, "rb") as f:
            f.seek(since)
            text = f.read(256 * 1024).decode("utf-8", errors="replace").lower()
    except OSError:
        return False
    return any(marker in text for marker in _PORT_IN_USE_MARKERS)


def tcp_accepts(port: int, timeout: float = 0.25) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


_PR_SET_PDEATHSIG = 1


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this thread dies.

    Linux only, and only on the main thread (the death signal is tied to the
    thread that forks, so a worker thread's exit would kill the child).
    Returns ``None`` where it does not apply.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def spawn(
    argv: list[str], log_path: Path, env: dict[str, str], *, display: str | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout+stderr appended to ``log_path``, detached from the tty.

    ``display`` replaces the command line in the log's header line.

    Raises:
        OSError: the executable or the log file cannot be opened.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"\n=== {stamp} starting: {display or shlex.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            # only calls prctl (resolved beforehand) between fork and exec
            preexec_fn=_pdeathsig_preexec(),
        )


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM ``proc``, wait up to ``timeout`` seconds, then SIGKILL it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class DirLock:
    """An exclusive, non-blocking ``flock`` on a directory, held by this process.

    Released by :meth:`release` or automatically when the process dies.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, service: str) -> None:
        """Take the lock.

        Raises:
            ServiceStartError: another process (or object) holds it.
        """
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ServiceStartError(
                service,
                f"its data directory {self.path} is in use by another running instance",
                hint="stop the other instance (or its process), or use another data directory",
            ) from None
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (no-op if not held)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def rmtree_quiet(path: Path) -> None:
    """Remove a directory tree, ignoring errors (a temporary log folder)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


#: How many ports a service tries when it chose them itself and they turn out taken.
PORT_ATTEMPTS = 3


class EmbeddedService(ABC):
    """The lifecycle of an embedded service (a process tree on 127.0.0.1).

    Subclasses implement :meth:`_start` (start the processes and wait until the
    service answers, before ``deadline``), :meth:`_shutdown` (stop them) and
    :attr:`running`.

    Args:
        data_dir: the service's data directory, locked while it runs; ``None`` for
            a service without one (created if missing).
        port: the TCP port; ``None`` picks a free one (re-chosen if taken by the
            time the service binds it).
        start_timeout: seconds ``start()`` waits for the service to answer.
    """

    #: Human name of the service, used in errors and logs.
    SERVICE: ClassVar[str]
    #: Default seconds ``stop()`` gives the processes before SIGKILL.
    STOP_TIMEOUT: ClassVar[float] = 5.0

    def __init__(self, data_dir: Path | None, *, port: int | None, start_timeout: float) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir is not None else None
        self._fixed_port = port is not None
        self._port = port if port is not None else free_port()
        self.start_timeout = start_timeout
        self._lock = DirLock(self.data_dir) if self.data_dir is not None else None

    @property
    def port(self) -> int:
        """The service's TCP port on 127.0.0.1."""
        return self._port

    def pin_port(self) -> None:
        """Keep the current port on every later start, even if it was chosen here: a
        restarted service must come back where its clients reconnect (a taken port is
        then a start error, not a new port)."""
        self._fixed_port = True

    @property
    def log_path(self) -> Path | None:
        """The service's log file, ``None`` if it has none (subclasses override)."""
        return None

    @property
    @abstractmethod
    def running(self) -> bool:
        """Whether the service's main process is alive."""

    def start(self) -> Self:
        """Start the service; return once it answers. No-op if already running.

        Raises:
            ServiceStartError: a process exited, the service did not answer within
                ``start_timeout`` seconds, or the data directory is in use by another
                instance (the message names the log file and a fix).
        """
        if self.running:
            return self
        self._shutdown(timeout=2.0)  # leftovers of a process that died on its own
        deadline = time.monotonic() + self.start_timeout
        try:
            if self.data_dir is not None and self._lock is not None:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                self._lock.acquire(self.SERVICE)
            self._start(deadline)
        except BaseException:
            self._shutdown(timeout=10.0)
            if self._lock is not None:
                self._lock.release()
            raise
        atexit.register(self.stop)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the service (SIGTERM, then SIGKILL after ``timeout`` seconds, default
        :attr:`STOP_TIMEOUT`) and release its data directory; idempotent."""
        atexit.unregister(self.stop)
        self._shutdown(self.STOP_TIMEOUT if timeout is None else timeout)
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @abstractmethod
    def _start(self, deadline: float) -> None:
        """Start the processes and wait until the service answers (``time.monotonic()``
        deadline). Raise :class:`ServiceStartError` on failure; :meth:`_shutdown` then
        cleans up."""

    @abstractmethod
    def _shutdown(self, timeout: float) -> None:
        """Stop whatever :meth:`_start` started; safe to call when nothing runs."""

    def _retry_port(self, log_path: Path, since: int, attempt: int) -> bool:
        """After a failed start: whether to retry on a new port (the log says the port
        was taken, we chose it ourselves, and attempts remain). Picks the new port."""
        if self._fixed_port or attempt >= PORT_ATTEMPTS - 1 or not port_in_use(log_path, since):
            return False
        self._port = free_port()
        return True

    def _port_hint(self, log_path: Path, since: int, otherwise: str) -> str:
        """The hint of a failed start: the taken port, or ``otherwise``."""
        if port_in_use(log_path, since):
            return f"port {self._port} is taken; pass another port or port=None"
        return otherwise
