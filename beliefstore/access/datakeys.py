"""Per-subject data keys for crypto-shredding, kept in PostgreSQL wrapped by a master key.

Events on Kafka are immutable, so erasure makes them unreadable instead: the personal
fields of every observation (value, evidence, metadata) are sealed with AES-256-GCM
under a data key of its subject (:mod:`beliefstore.events.sealing`). Erasing the
subject destroys its data keys; the sealed fields on the log can then never be
decrypted again, by the projector, a replay, or anyone holding a copy of the log.

Table ``<base schema>.subject_keys`` (created on first use, next to the projection
catalog): ``key_id``, ``subject_id``, the data key wrapped (AES-256-GCM) by the master
key, ``created_at``, ``destroyed_at``. A destroyed key's wrapped bytes are deleted.

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
        """The current data keys of many subjects at once, ``{subject_id: (key_id, key)}``.

        Keys cached by this process are checked against the table in one query (a key
        destroyed by another process is dropped and replaced). The subjects without a
        live cached key are looked up and, where missing, created in one transaction (the per-subject
        advisory locks taken in sorted order, so concurrent callers cannot deadlock): one
        commit for a whole group of new subjects instead of one each.
        """
        wanted = set(subject_ids)
        found: dict[str, tuple[str, bytes]] = {}
        with self._lock:
            for subject in wanted:
                if subject in self._active:
                    found[subject] = self._active[subject]
        self._ensure()
        t = self.table
        if found:
            # Another process (the projector folding an erasure) may have destroyed a
            # cached key: one query checks them all, so a new observation is never sealed
            # with a destroyed key (it would be unreadable, its 201 a silent loss).
            with self.engine.connect() as conn:
                destroyed = set(conn.execute(sa.select(t.c.subject_id).where(
                    t.c.key_id.in_([key_id for key_id, _ in found.values()]),
                    t.c.wrapped.is_(None))).scalars())
            if destroyed:
                with self._lock:
                    for subject in destroyed:
                        found.pop(subject, None)
                        self._active.pop(subject, None)
        missing = sorted(wanted - found.keys())
        if not missing:
            return found
        with self.engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(s)) "
                                 "FROM unnest(CAST(:s AS text[])) AS s ORDER BY s"),
                         {"s": [f"subject-key:{subject}" for subject in missing]})
            rows = conn.execute(sa.select(t.c.subject_id, t.c.key_id, t.c.wrapped).where(
                t.c.subject_id.in_(missing), t.c.wrapped.is_not(None))
                .order_by(t.c.subject_id, t.c.created_at.desc())).all()
            fetched: dict[str, tuple[str, bytes]] = {}
            for row in rows:
                if row.subject_id not in fetched:
                    fetched[row.subject_id] = (row.key_id, self._unwrap(row.wrapped, row.key_id))
            new_rows = []
            for subject in missing:
                if subject not in fetched:
                    key_id, key = str(uuid.uuid4()), AESGCM.generate_key(bit_length=256)
                    new_rows.append({"key_id": key_id, "subject_id": subject,
                                     "wrapped": self._wrap(key, key_id), "created_at": now_ms})
                    fetched[subject] = (key_id, key)
            if new_rows:
                conn.execute(t.insert(), new_rows)
        with self._lock:
            for subject, pair in fetched.items():
                self._active[subject] = pair
                self._cache[pair[0]] = pair[1]
        return {**found, **fetched}

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
