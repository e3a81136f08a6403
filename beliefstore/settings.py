"""beliefstore's settings: one object, every field from one environment variable.

=================================  ===============================  =================================
field                              environment variable             default
=================================  ===============================  =================================
kafka_bootstrap_servers            KAFKA_BOOTSTRAP_SERVERS          unset → the embedded broker
database_url                       DATABASE_URL                     unset → the embedded PostgreSQL
topic                              BELIEFSTORE_TOPIC                ``beliefstore.events``
dlq_topic                          BELIEFSTORE_DLQ_TOPIC            ``<topic>.dlq``
partitions                         BELIEFSTORE_PARTITIONS           4 (used when creating topics; unset:
                                                                    1 on ``up``'s durable embedded broker)
replication_factor                 BELIEFSTORE_REPLICATION_FACTOR   1 (used when creating topics)
db_schema                          BELIEFSTORE_DB_SCHEMA            ``public`` (PostgreSQL schema)
projection                         BELIEFSTORE_PROJECTION           ``self_model`` (offsets' owner)
default_half_life_s                BELIEFSTORE_DEFAULT_HALF_LIFE    2592000 s (30 days)
half_lives                         BELIEFSTORE_HALF_LIVES           none; ``ctx=seconds,ctx2=seconds``
trust                              BELIEFSTORE_TRUST                none; ``source=weight,...``
batch_size                         BELIEFSTORE_BATCH_SIZE           500 events per transaction
poll_timeout_ms                    BELIEFSTORE_POLL_TIMEOUT_MS      500 ms
fetch_max_wait_ms                  BELIEFSTORE_FETCH_MAX_WAIT_MS    unset → 20 ms; 100 ms on ``up``'s
                                                                    durable embedded broker
produce_timeout_s                  BELIEFSTORE_PRODUCE_TIMEOUT      30 s until a send must be acked
idempotent_producer                BELIEFSTORE_IDEMPOTENT_PRODUCER  ``on`` (Kafka's idempotent producer)
api_host                           BELIEFSTORE_API_HOST             ``127.0.0.1``
api_port                           BELIEFSTORE_API_PORT             8000
api_url                            BELIEFSTORE_API_URL              ``http://<api_host>:<api_port>``
home                               BELIEFSTORE_HOME                 ``./.beliefstore`` (embedded data)
auth                               BELIEFSTORE_AUTH                 ``on`` (``off``: no API keys checked)
sealing                            BELIEFSTORE_SEALING              ``on``: observations' personal fields
                                                                    sealed per subject (crypto-shredding)
(master key)                       BELIEFSTORE_MASTER_KEY           none → ``<home>/master.key`` (32 bytes,
                                                                    base64; wraps the subject data keys)
api_key                            BELIEFSTORE_API_KEY              none; the key CLI reads send
max_body_bytes                     BELIEFSTORE_MAX_BODY_BYTES       65536 (larger request bodies: 413)
rate_limit                         BELIEFSTORE_RATE_LIMIT           50 requests/s per key (0: no limit)
rate_burst                         BELIEFSTORE_RATE_BURST           100 requests (token bucket size)
access_topic                       BELIEFSTORE_ACCESS_TOPIC         ``beliefstore.access`` (read log)
read_cache_size                    BELIEFSTORE_READ_CACHE_SIZE      100000 self-models cached per API process
                                                                    (least recently used dropped; 0: none)
kafka_security_protocol            KAFKA_SECURITY_PROTOCOL          ``PLAINTEXT`` (or SSL, SASL_SSL, ...)
kafka_sasl_mechanism               KAFKA_SASL_MECHANISM             none (PLAIN, SCRAM-SHA-256/512)
kafka_sasl_username                KAFKA_SASL_USERNAME              none
kafka_sasl_password                KAFKA_SASL_PASSWORD              none (never printed)
kafka_ssl_cafile                   KAFKA_SSL_CAFILE                 none; CA bundle (PEM) for SSL
kafka_ssl_certfile                 KAFKA_SSL_CERTFILE               none; client certificate (mTLS)
kafka_ssl_keyfile                  KAFKA_SSL_KEYFILE                none; client key (mTLS)
=================================  ===============================  =================================

The ``KAFKA_SECURITY_*``/``KAFKA_SASL_*``/``KAFKA_SSL_*`` settings reach kafka-python
through :meth:`Settings.kafka_client_config`.

``BELIEFSTORE_SCHEMA_PATH`` (extra ``.avsc`` folders) is read by
:meth:`beliefstore.events.serde.SchemaRegistry.default`.

When ``beliefstore up`` is running in the same directory it records the addresses
of the services it started in ``<home>/services.json``; :meth:`Settings.from_env`
uses them for whatever the environment leaves unset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from beliefstore.projector.fold import DEFAULT_HALF_LIFE_S, FoldSettings

ENV_VARS = (
    "KAFKA_BOOTSTRAP_SERVERS",
    "DATABASE_URL",
    "BELIEFSTORE_TOPIC",
    "BELIEFSTORE_DLQ_TOPIC",
    "BELIEFSTORE_PARTITIONS",
    "BELIEFSTORE_REPLICATION_FACTOR",
    "BELIEFSTORE_DB_SCHEMA",
    "BELIEFSTORE_PROJECTION",
    "BELIEFSTORE_DEFAULT_HALF_LIFE",
    "BELIEFSTORE_HALF_LIVES",
    "BELIEFSTORE_TRUST",
    "BELIEFSTORE_BATCH_SIZE",
    "BELIEFSTORE_POLL_TIMEOUT_MS",
    "BELIEFSTORE_FETCH_MAX_WAIT_MS",
    "BELIEFSTORE_PRODUCE_TIMEOUT",
    "BELIEFSTORE_IDEMPOTENT_PRODUCER",
    "BELIEFSTORE_API_HOST",
    "BELIEFSTORE_API_PORT",
    "BELIEFSTORE_API_URL",
    "BELIEFSTORE_HOME",
    "BELIEFSTORE_SCHEMA_PATH",
    "BELIEFSTORE_AUTH",
    "BELIEFSTORE_SEALING",
    "BELIEFSTORE_MASTER_KEY",
    "BELIEFSTORE_API_KEY",
    "BELIEFSTORE_MAX_BODY_BYTES",
    "BELIEFSTORE_RATE_LIMIT",
    "BELIEFSTORE_RATE_BURST",
    "BELIEFSTORE_ACCESS_TOPIC",
    "BELIEFSTORE_READ_CACHE_SIZE",
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CAFILE",
    "KAFKA_SSL_CERTFILE",
    "KAFKA_SSL_KEYFILE",
)
"""Every environment variable beliefstore reads."""

STATE_FILE = "services.json"

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER")


class SettingsError(ValueError):
    """An environment variable has a value that cannot be used; the message names it."""


def parse_pairs(text: str, variable: str) -> dict[str, float]:
    """Parse ``name=number,name=number`` (as in BELIEFSTORE_TRUST) into a dict.

    Raises:
        SettingsError: naming ``variable`` and the bad item.
    """
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, number = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(number)
        except ValueError:
            raise SettingsError(
                f"{variable}: {item!r} is not NAME=NUMBER (e.g. support=3600)"
            ) from None
    return out


def _number(env: Mapping[str, str], name: str, default: float, cast: type = int) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a {cast.__name__}") from None
    if value <= 0:
        raise SettingsError(f"{name}={raw!r} must be positive")
    return value


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("on", "true", "1", "yes"):
        return True
    if raw in ("off", "false", "0", "no"):
        return False
    raise SettingsError(f"{name}={raw!r} must be on or off")


def _whole(env: Mapping[str, str], name: str, default: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise SettingsError(f"{name}={raw!r} must be a whole number >= 0 (0 turns it off)")
    return int(raw)


def _non_negative(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise SettingsError(f"{name}={raw!r} must be a finite number >= 0 (0 turns it off)")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str | None:
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    if raw.upper() not in choices:
        raise SettingsError(f"{name}={raw!r} must be one of {', '.join(choices)}")
    return raw.upper()


@dataclass(frozen=True)
class Settings:
    """All configuration; see the module docstring for variables, defaults and units."""

    kafka_bootstrap_servers: str | None = None
    database_url: str | None = None
    topic: str = "beliefstore.events"
    dlq_topic: str = "beliefstore.events.dlq"
    partitions: int = 4
    replication_factor: int = 1
    db_schema: str = "public"
    projection: str = "self_model"
    default_half_life_s: float = DEFAULT_HALF_LIFE_S
    half_lives: dict[str, float] = field(default_factory=dict)
    trust: dict[str, float] = field(default_factory=dict)
    batch_size: int = 500
    poll_timeout_ms: int = 500
    fetch_max_wait_ms: int | None = None
    produce_timeout_s: float = 30.0
    idempotent_producer: bool = True
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_url: str = "http://127.0.0.1:8000"
    home: Path = Path(".beliefstore")
    auth: bool = True
    sealing: bool = True
    api_key: str | None = field(default=None, repr=False)
    max_body_bytes: int = 64 * 1024
    rate_limit: float = 50.0
    rate_burst: int = 100
    access_topic: str = "beliefstore.access"
    read_cache_size: int = 100_000
    kafka_security_protocol: str | None = None
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = field(default=None, repr=False)
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, use_running: bool = True
    ) -> Settings:
        """Read the settings from ``environ`` (default ``os.environ``).

        With ``use_running``, addresses recorded by a running ``beliefstore up`` in
        ``<home>/services.json`` fill in unset KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL
        and BELIEFSTORE_API_URL.

        Raises:
            SettingsError: a variable's value is unusable (the message names it).
        """
        env = os.environ if environ is None else environ
        topic = env.get("BELIEFSTORE_TOPIC") or "beliefstore.events"
        host = env.get("BELIEFSTORE_API_HOST") or "127.0.0.1"
        port = int(_number(env, "BELIEFSTORE_API_PORT", 8000))
        half_lives = parse_pairs(env.get("BELIEFSTORE_HALF_LIVES", ""), "BELIEFSTORE_HALF_LIVES")
        if any(v <= 0 for v in half_lives.values()):
            raise SettingsError("BELIEFSTORE_HALF_LIVES: every half-life must be > 0 seconds")
        trust = parse_pairs(env.get("BELIEFSTORE_TRUST", ""), "BELIEFSTORE_TRUST")
        if any(v < 0 for v in trust.values()):
            raise SettingsError("BELIEFSTORE_TRUST: every trust weight must be >= 0")
        settings = cls(
            kafka_bootstrap_servers=env.get("KAFKA_BOOTSTRAP_SERVERS") or None,
            database_url=env.get("DATABASE_URL") or None,
            topic=topic,
            dlq_topic=env.get("BELIEFSTORE_DLQ_TOPIC") or f"{topic}.dlq",
            partitions=int(_number(env, "BELIEFSTORE_PARTITIONS", 4)),
            replication_factor=int(_number(env, "BELIEFSTORE_REPLICATION_FACTOR", 1)),
            db_schema=env.get("BELIEFSTORE_DB_SCHEMA") or "public",
            projection=env.get("BELIEFSTORE_PROJECTION") or "self_model",
            default_half_life_s=_number(
                env, "BELIEFSTORE_DEFAULT_HALF_LIFE", DEFAULT_HALF_LIFE_S, float
            ),
            half_lives=half_lives,
            trust=trust,
            batch_size=int(_number(env, "BELIEFSTORE_BATCH_SIZE", 500)),
            poll_timeout_ms=int(_number(env, "BELIEFSTORE_POLL_TIMEOUT_MS", 500)),
            fetch_max_wait_ms=(int(_number(env, "BELIEFSTORE_FETCH_MAX_WAIT_MS", 100))
                               if env.get("BELIEFSTORE_FETCH_MAX_WAIT_MS") else None),
            produce_timeout_s=_number(env, "BELIEFSTORE_PRODUCE_TIMEOUT", 30.0, float),
            idempotent_producer=_switch(env, "BELIEFSTORE_IDEMPOTENT_PRODUCER", True),
            api_host=host,
            api_port=port,
            api_url=(env.get("BELIEFSTORE_API_URL") or f"http://{host}:{port}").rstrip("/"),
            home=Path(env.get("BELIEFSTORE_HOME") or ".beliefstore"),
            auth=_switch(env, "BELIEFSTORE_AUTH", True),
            sealing=_switch(env, "BELIEFSTORE_SEALING", True),
            api_key=(env.get("BELIEFSTORE_API_KEY") or "").strip() or None,
            max_body_bytes=int(_number(env, "BELIEFSTORE_MAX_BODY_BYTES", 64 * 1024)),
            rate_limit=_non_negative(env, "BELIEFSTORE_RATE_LIMIT", 50.0),
            rate_burst=int(_number(env, "BELIEFSTORE_RATE_BURST", 100)),
            access_topic=env.get("BELIEFSTORE_ACCESS_TOPIC") or "beliefstore.access",
            read_cache_size=_whole(env, "BELIEFSTORE_READ_CACHE_SIZE", 100_000),
            kafka_security_protocol=_choice(env, "KAFKA_SECURITY_PROTOCOL", SECURITY_PROTOCOLS),
            kafka_sasl_mechanism=_choice(env, "KAFKA_SASL_MECHANISM", SASL_MECHANISMS),
            kafka_sasl_username=env.get("KAFKA_SASL_USERNAME") or None,
            kafka_sasl_password=env.get("KAFKA_SASL_PASSWORD") or None,
            kafka_ssl_cafile=env.get("KAFKA_SSL_CAFILE") or None,
            kafka_ssl_certfile=env.get("KAFKA_SSL_CERTFILE") or None,
            kafka_ssl_keyfile=env.get("KAFKA_SSL_KEYFILE") or None,
        )
        if settings.kafka_sasl_mechanism and not (
            settings.kafka_security_protocol or "").startswith("SASL_"):
            raise SettingsError(
                f"KAFKA_SASL_MECHANISM={settings.kafka_sasl_mechanism} needs "
                "KAFKA_SECURITY_PROTOCOL=SASL_SSL (or SASL_PLAINTEXT)")
        if use_running:
            settings = settings.with_running_services(
                explicit_api_url="BELIEFSTORE_API_URL" in env
            )
        return settings

    def with_running_services(self, *, explicit_api_url: bool = False) -> Settings:
        """Fill unset service addresses from ``<home>/services.json`` (written by ``up``)."""
        state = read_state(self.home)
        if not state:
            return self
        return replace(
            self,
            kafka_bootstrap_servers=self.kafka_bootstrap_servers
            or state.get("kafka_bootstrap_servers"),
            database_url=self.database_url or state.get("database_url"),
            api_url=self.api_url if explicit_api_url else state.get("api_url", self.api_url),
        )

    def kafka_client_config(self) -> dict[str, str]:
        """The Kafka security settings as kafka-python client arguments
        (``KafkaProducer(**settings.kafka_client_config(), ...)``, same for
        ``KafkaConsumer`` and ``KafkaAdminClient``); only those that are set."""
        pairs = {
            "security_protocol": self.kafka_security_protocol,
            "sasl_mechanism": self.kafka_sasl_mechanism,
            "sasl_plain_username": self.kafka_sasl_username,
            "sasl_plain_password": self.kafka_sasl_password,
            "ssl_cafile": self.kafka_ssl_cafile,
            "ssl_certfile": self.kafka_ssl_certfile,
            "ssl_keyfile": self.kafka_ssl_keyfile,
        }
        return {k: v for k, v in pairs.items() if v}

    @property
    def fold_settings(self) -> FoldSettings:
        """The merge parameters (half-lives and trust) for :func:`~beliefstore.projector.fold.fold`."""
        return FoldSettings(
            default_half_life_s=self.default_half_life_s,
            half_lives=dict(self.half_lives),
            trust=dict(self.trust),
        )


def state_path(home: Path) -> Path:
    """Where ``beliefstore up`` records the addresses of the services it runs."""
    return home / STATE_FILE


def read_state(home: Path) -> dict[str, str]:
    """The addresses recorded by a running ``up`` (empty when none is running)."""
    path = state_path(home)
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    pid = state.get("pid")
    if isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return {}
        except PermissionError:
            pass
    return {k: v for k, v in state.items() if isinstance(v, str)}


def write_state(home: Path, state: Mapping[str, object]) -> Path:
    """Record the running services' addresses (see :func:`read_state`)."""
    home.mkdir(parents=True, exist_ok=True)
    path = state_path(home)
    path.write_text(json.dumps(dict(state), indent=2))
    return path
