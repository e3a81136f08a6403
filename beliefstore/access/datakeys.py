"""Per-subject data keys for crypto-shredding, kept in PostgreSQL wrapped by a master key.

Events on Kafka are immutable, so erasure makes them unreadable instead: the personal
fields of every observation (value, evidence, metadata) are sealed with AES-256-GCM
under a data key of its subject (:mod:`beliefstore.events.sealing`). Erasing the
subject destroys its data keys; the sealed fields on the log can then never be
decrypted again, by the projector, a replay, or anyone holding a copy of the log.

Table ``<base schema>.subject_keys`` (created on first use, next to the projection
catalog): ``key_id``, ``subject_id``, the data key wrapped (AES-256-GCM) by the master
key, ``created_at``, ``destroyed_at``. A destroyed key's wrapped bytes are deleted; a
subject has at most one live key (the unique partial index :data:`LIVE_KEY_INDEX`).

The master key comes from ``BELIEFSTORE_MASTER_KEY`` (32 bytes, base64) or, for the
embedded default, is generated once in ``<home>/master.key`` (mode 0600).
"""

from __future__ import annotations

import base64
import os
import secrets
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path

import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from beliefstore.db import check_schema_name, create_tables, make_engine
from beliefstore.errors import BeliefstoreError

KEY_BYTES = 32
"""AES-256."""

LIVE_KEY_INDEX = "subject_keys_live"
"""The unique partial index on ``subject_keys (subject_id) WHERE wrapped IS NOT NULL``."""

#: How often :meth:`Keyring.data_keys` repeats its statement for subjects whose key another
#: process created at the same moment (its snapshot predates that commit; the next
#: statement sees it). One repeat is the usual worst case.
_DATA_KEY_ATTEMPTS = 5


class KeyringError(BeliefstoreError):
    """The master key is missing or malformed, or a wrapped key does not unwrap."""


def load_master_key(home: Path, environ: dict[str, str] | None = None) -> bytes:
    """The master key: ``BELIEFSTORE_MASTER_KEY`` (base64 of 32 bytes), else
    ``<home>/master.key``, generated (mode 0600) if missing.

    Raises:
        KeyringError: the variable or file does not hold 32 base64-encoded bytes.
    """
    env = os.environ if environ is None else environ
    raw = env.get("BELIEFSTORE_MASTER_KEY")
    origin = "BELIEFSTORE_MASTER_KEY"
    if not raw:
        path = home / "master.key"
        origin = str(path)
        if not path.exists():
            # Written whole under a temporary name, then linked into place (fails if another
            # thread or process won the race): a reader never sees a half-written key.
            home.mkdir(parents=True, exist_ok=True)
            temp = home / f".master.key.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n")
            try:
                os.link(temp, path)
            except FileExistsError:
                pass
            finally:
                temp.unlink()
        raw = path.read_text().strip()
    try:
        key = base64.b64decode(raw, validate=True)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise KeyringError(f"{origin} must hold {KEY_BYTES} random bytes, base64-encoded "
                           "(e.g. `python -c 'import os,base64;print(base64.b64encode("
                           "os.urandom(32)).decode())'`)")
    return key


def _table(schema: str) -> sa.Table:
    return sa.Table(
        "subject_keys", sa.MetaData(schema=schema),
        sa.Column("key_id", sa.Text, primary_key=True),
        sa.Column("subject_id", sa.Text, nullable=False, index=True),
        sa.Column("wrapped", sa.LargeBinary, nullable=True,
                  doc="nonce (12 bytes) + AES-GCM(master, data key); NULL once destroyed."),
        sa.Column("created_at", sa.BigInteger, nullable=False, doc="Epoch ms."),
        sa.Column("destroyed_at", sa.BigInteger, nullable=True, doc="Epoch ms."),
        # at most one live key per subject: what lets Keyring.data_keys create keys with
        # one INSERT ... ON CONFLICT instead of locks, a select and an insert
        sa.Index(LIVE_KEY_INDEX, "subject_id", unique=True,
                 postgresql_where=sa.text("wrapped IS NOT NULL")),
    )


class Keyring:
    """Creates, finds and destroys subjects' data keys.

    Args:
        database_url: the PostgreSQL URL.
        schema: the base schema (``BELIEFSTORE_DB_SCHEMA``) holding ``subject_keys``.
        master_key: 32 bytes (see :func:`load_master_key`).
    """

    def __init__(self, database_url: str, schema: str, master_key: bytes):
        if len(master_key) != KEY_BYTES:
            raise KeyringError(f"the master key must be {KEY_BYTES} bytes")
        self.engine = make_engine(database_url, check_schema_name(schema), pool_size=2)
        self.table = _table(schema)
        self._master = AESGCM(master_key)
        self._cache: dict[str, bytes | None] = {}
        self._active: dict[str, tuple[str, bytes]] = {}
        self._lock = threading.Lock()
        self._ensured = False
        self.schema = schema
        # The statement of data_keys: insert the fresh keys of :subjects where none is
        # live, and return (subject_id, key_id, wrapped, created) for every live key of
        # :wanted (created: inserted by this statement, its wrapped bytes not returned).
        table = f'"{schema}".subject_keys'
        self._keys_sql = sa.text(f"""
            WITH new AS (
                INSERT INTO {table} (key_id, subject_id, wrapped, created_at)
                SELECT n.key_id, n.subject_id, n.wrapped, :now
                FROM unnest(CAST(:key_ids AS text[]), CAST(:subjects AS text[]),
                            CAST(:wrapped AS bytea[])) AS n(key_id, subject_id, wrapped)
                ORDER BY n.subject_id
                ON CONFLICT (subject_id) WHERE wrapped IS NOT NULL DO NOTHING
                RETURNING subject_id, key_id)
            SELECT subject_id, key_id, NULL::bytea AS wrapped, true AS created FROM new
            UNION ALL
            SELECT subject_id, key_id, wrapped, false FROM {table}
            WHERE subject_id = ANY(CAST(:wanted AS text[])) AND wrapped IS NOT NULL""")

    @classmethod
    def from_settings(cls, settings) -> Keyring:
        """The keyring of ``settings.database_url`` / ``db_schema`` / ``home``.

        Raises:
            KeyringError: no database configured, or a bad master key.
        """
        if not settings.database_url:
            raise KeyringError("sealing needs DATABASE_URL (the data keys live in PostgreSQL)")
        return cls(settings.database_url, settings.db_schema, load_master_key(settings.home))

    def _ensure(self) -> None:
        if self._ensured:
            return
        with self.engine.begin() as conn:
            create_tables(conn, self.schema, self.table)
            # a table made before the index existed gets it here (create_tables skips the
            # indexes of an existing table); under create_tables' advisory lock
            try:
                with conn.begin_nested():
                    conn.execute(sa.text(
                        f'CREATE UNIQUE INDEX IF NOT EXISTS "{LIVE_KEY_INDEX}" ON '
                        f'"{self.schema}".subject_keys (subject_id) WHERE wrapped IS NOT NULL'))
            except sa.exc.IntegrityError as exc:
                raise KeyringError(
                    f"{self.schema}.subject_keys holds more than one live data key for a "
                    "subject, which this version does not allow; keep the newest live key "
                    "of each subject (or erase the subject) and start again") from exc
        self._ensured = True

    def _wrap(self, key: bytes, key_id: str) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._master.encrypt(nonce, key, key_id.encode())

    def _unwrap(self, wrapped: bytes, key_id: str) -> bytes:
        try:
            return self._master.decrypt(wrapped[:12], wrapped[12:], key_id.encode())
        except Exception as exc:  # InvalidTag: wrong master key or tampering
            raise KeyringError(f"data key {key_id} does not unwrap with this master key "
                               "(BELIEFSTORE_MASTER_KEY changed?)") from exc

    def data_key(self, subject_id: str, now_ms: int) -> tuple[str, bytes]:
        """The subject's current data key ``(key_id, key)``, created if it has none alive
        (:meth:`data_keys` for one subject)."""
        return self.data_keys([subject_id], now_ms)[subject_id]

    def data_keys(self, subject_ids: Iterable[str], now_ms: int) -> dict[str, tuple[str, bytes]]:
        """The current data keys of many subjects at once, ``{subject_id: (key_id, key)}``;
        a subject without a live key gets a new one, committed (durable) before this
        returns, so nothing is ever sealed with a key the database could lose.

        One statement, one round trip, in the usual case: an ``INSERT ... ON CONFLICT DO
        NOTHING`` of a fresh key for each subject without a live key in this process's
        cache (the unique partial index :data:`LIVE_KEY_INDEX` allows one live key per
        subject, so concurrent callers, in this process or another, cannot give a subject
        two), in subject order (concurrent callers cannot deadlock), and in the same
        statement the live keys of every wanted subject. A cached key is thereby checked
        too: one destroyed by another process (the projector folding an erasure) is
        dropped and replaced, so a new observation is never sealed with a destroyed key
        (it would be unreadable, its 201 a silent loss). A subject whose key another
        caller committed after the statement's snapshot is asked again.

        Raises:
            KeyringError: a stored key does not unwrap with the master key, or a subject
                still has no key after several attempts.
            sqlalchemy.exc.OperationalError: the database is unreachable.
        """
        wanted = sorted(set(subject_ids))
        result: dict[str, tuple[str, bytes]] = {}
        self._ensure()
        pending = wanted
        for _ in range(_DATA_KEY_ATTEMPTS):
            with self._lock:
                cached = {s: self._active[s] for s in pending if s in self._active}
            fresh = {s: (str(uuid.uuid4()), AESGCM.generate_key(bit_length=256))
                     for s in pending if s not in cached}
            # autocommit: the statement is its own transaction, committed before its
            # rows come back (no BEGIN and COMMIT round trips)
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") \
                    as conn:
                rows = conn.execute(self._keys_sql, {
                    "now": now_ms, "wanted": pending,
                    "subjects": list(fresh), "key_ids": [k for k, _ in fresh.values()],
                    "wrapped": [self._wrap(key, key_id) for key_id, key in fresh.values()],
                }).all()
            # a key created here wins over one the snapshot saw alive (destroyed since)
            live = {row.subject_id: fresh[row.subject_id] for row in rows if row.created}
            for row in rows:
                if not row.created and row.subject_id not in live:
                    known = cached.get(row.subject_id)
                    live[row.subject_id] = (known if known is not None and known[0] == row.key_id
                                            else (row.key_id, self._unwrap(row.wrapped,
                                                                           row.key_id)))
            with self._lock:
                for subject in pending:
                    if subject in live:
                        self._active[subject] = live[subject]
                        self._cache[live[subject][0]] = live[subject][1]
                    else:
                        self._active.pop(subject, None)
            result.update(live)
            pending = [s for s in pending if s not in live]
            if not pending:
                return result
        raise KeyringError(f"no data key could be created for {len(pending)} subject(s) "
                           f"(e.g. {pending[0]!r}) in {_DATA_KEY_ATTEMPTS} attempts: another "
                           "process keeps creating and destroying them; retry")

    def prefetch(self, key_ids: Iterable[str]) -> None:
        """Load the data keys ``key_ids`` into the cache with one query (destroyed keys
        are cached as destroyed); unknown ids are left for :meth:`key` to report."""
        with self._lock:
            missing = sorted({k for k in key_ids if k not in self._cache})
        if not missing:
            return
        self._ensure()
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.table.c.key_id, self.table.c.wrapped).where(
                self.table.c.key_id.in_(missing))).all()
        loaded = {row.key_id: self._unwrap(row.wrapped, row.key_id) if row.wrapped else None
                  for row in rows}
        with self._lock:
            self._cache.update(loaded)

    def key(self, key_id: str) -> bytes | None:
        """The data key ``key_id``, or ``None`` if it was destroyed.

        Raises:
            KeyringError: no such key here: the keyring points at another database or
                schema than the producers' (a silent skip would lose events).
        """
        with self._lock:
            if key_id in self._cache:
                return self._cache[key_id]
        self._ensure()
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.table.c.wrapped).where(
                self.table.c.key_id == key_id)).first()
        if row is None:
            raise KeyringError(
                f"data key {key_id} is unknown in {self.schema}.subject_keys: DATABASE_URL / "
                "BELIEFSTORE_DB_SCHEMA must be the ones the producers used")
        key = self._unwrap(row.wrapped, key_id) if row.wrapped else None
        with self._lock:
            self._cache[key_id] = key
        return key

    def destroy(self, subject_id: str, up_to_ms: int, now_ms: int,
                conn: sa.Connection | None = None) -> int:
        """Destroy the subject's data keys created at or before ``up_to_ms``; return how
        many. Runs in ``conn``'s transaction when given (the projector's batch)."""
        self._ensure()
        t = self.table
        stmt = t.update().where(t.c.subject_id == subject_id, t.c.created_at <= up_to_ms,
                                t.c.wrapped.is_not(None)).values(wrapped=None,
                                                                 destroyed_at=now_ms)
        if conn is None:
            with self.engine.begin() as own:
                count = own.execute(stmt).rowcount
        else:
            count = conn.execute(stmt).rowcount
        with self._lock:
            self._active.pop(subject_id, None)
            self._cache.clear()
        return count

    def dispose(self) -> None:
        """Close the keyring's database connections."""
        self.engine.dispose()
