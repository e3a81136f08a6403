"""API keys and restricted contexts, stored in PostgreSQL.

Every agent that uses the HTTP API presents an API key, ``Authorization: Bearer
bsk_<key id>_<secret>``. Keys are made by an operator with ``beliefstore keys create``
(which prints the key once) and live in the table ``<base schema>.api_keys`` next to
the projection catalog, as a salted scrypt hash only: the key id finds the row, and the
secret is compared in constant time with the hash of the presented one.

A key carries:

* ``agent`` — the agent's id; observations posted with the key must have it as their
  ``source``;
* ``read`` / ``write`` — the contexts it may read / write, ``*`` for every context that
  is not restricted;
* ``admin`` — may use the admin endpoints (``GET /v1/admin/keys``).

Restricted contexts (``beliefstore contexts restrict CONTEXT``) are kept in
``<base schema>.restricted_contexts`` by the same store; what a scope covers is
:mod:`beliefstore.access.scopes`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY

from beliefstore.access.scopes import KeyStoreError, Principal, check_agent, check_context, parse_scope
from beliefstore.db import BaseSchemaStore

KEY_PREFIX = "bsk"
_KEY = re.compile(r"^bsk_(?P<key_id>[0-9a-f]{16})_(?P<secret>[0-9a-f]{48})$")

_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
# scrypt parameters (RFC 7914): N=2^14, r=8, p=1 needs 16 MiB and ~50 ms per hash.
SCRYPT_N = 2 ** 14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_LEN = 32
_VERIFIED_CACHE_SIZE = 10_000

CHANNEL = "beliefstore_access"
"""The NOTIFY channel of key and restriction changes: payload ``<base schema> key <key id>``
or ``<base schema> restricted``, sent in the changing transaction (so at its commit).
API processes LISTEN to it and drop what they cached (:mod:`beliefstore.api.live`)."""


def _notify(conn: sa.Connection, payload: str) -> None:
    conn.execute(sa.select(sa.func.pg_notify(CHANNEL, payload)))


class AuthError(Exception):
    """A presented API key is missing, malformed, unknown, wrong or revoked (HTTP 401).

    Attributes:
        reason: ``missing``, ``malformed``, ``invalid`` or ``revoked``.
    """

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class ApiKey:
    """A stored key, without its secret."""

    key_id: str
    agent: str
    read: frozenset[str]
    write: frozenset[str]
    admin: bool
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def principal(self) -> Principal:
        return Principal(self.agent, self.key_id, self.read, self.write, self.admin)


@dataclass(frozen=True)
class NewKey:
    """A freshly created key: ``token`` is the only copy of the secret."""

    key: ApiKey
    token: str = field(repr=False)


def split_token(token: str) -> tuple[str, str]:
    """``bsk_<key id>_<secret>`` → ``(key_id, secret)``.

    Raises:
        AuthError: not of that form.
    """
    match = _KEY.match(token.strip())
    if not match:
        raise AuthError("malformed", "malformed API key: expected bsk_<16 hex key id>_<48 hex "
                        "secret>, as printed by `beliefstore keys create`")
    return match["key_id"], match["secret"]


def _kdf_name() -> str:
    return f"scrypt:n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P},len={SCRYPT_LEN}"


@functools.cache
def _return_large_buffers_to_the_os() -> None:
    """Fix glibc's mmap threshold at its default 128 KiB (once per process).

    scrypt allocates 128·N·r bytes (16 MiB) per hash. After such a buffer is freed, glibc
    raises its mmap threshold, so later ones come from the calling thread's malloc arena
    and stay resident after free: with the API's 40 worker threads verifying keys that is
    about 300 MiB that never goes back (measured: 17 → 308 MiB RSS after 600 hashes on 40
    threads; 19 MiB with the threshold fixed). With a fixed threshold each buffer is
    mmapped and returned on free. A no-op where ``mallopt`` does not exist (not glibc).
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def _derive(secret: str, salt: bytes, kdf: str) -> bytes:
    name, _, params = kdf.partition(":")
    if name != "scrypt":
        raise AuthError("invalid", f"unsupported key hash {name!r}")
    p = dict(item.split("=", 1) for item in params.split(","))
    _return_large_buffers_to_the_os()
    return hashlib.scrypt(secret.encode("ascii"), salt=salt, n=int(p["n"]), r=int(p["r"]),
                          p=int(p["p"]), dklen=int(p["len"]), maxmem=64 * 1024 * 1024)


def check_secret(secret: str, salt: bytes, kdf: str, stored: bytes) -> bool:
    """Whether ``secret`` hashes (scrypt with ``salt`` and the ``kdf`` parameters) to
    ``stored``; constant-time comparison. About 50 ms of CPU: run it off the event loop.

    Raises:
        AuthError: ``kdf`` names an unsupported hash.
    """
    return hmac.compare_digest(_derive(secret, salt, kdf), stored)


def burn_unknown_key(secret: str) -> None:
    """Spend the time of a scrypt check on a key id that does not exist, so that key ids
    cannot be probed by timing."""
    _derive(secret, b"\0" * 16, _kdf_name())


def invalid_key() -> AuthError:
    """The 401 error of a key that is unknown or whose secret is wrong."""
    return AuthError("invalid", "invalid API key: no active key has this id and secret; check "
                     "the Authorization header (or BELIEFSTORE_API_KEY), or ask an admin for a "
                     "key (`beliefstore keys create --agent NAME --read CONTEXTS`)")


def revoked_key(key: ApiKey) -> AuthError:
    """The 401 error of a revoked key."""
    return AuthError("revoked", f"API key {key.key_id} of agent {key.agent!r} was revoked at "
                     f"{key.revoked_at:%Y-%m-%d %H:%M:%S %Z}; ask an admin for a new one "
                     "(`beliefstore keys create`)")


def key_of_row(row) -> ApiKey:
    """An ``api_keys`` row (any object with its column names as attributes) → :class:`ApiKey`."""
    return ApiKey(row.key_id, row.agent, frozenset(row.read_contexts),
                  frozenset(row.write_contexts), row.admin, row.created_at, row.revoked_at)


def _tables(base_schema: str) -> tuple[sa.Table, sa.Table]:
    md = sa.MetaData(schema=base_schema)
    keys = sa.Table(
        "api_keys", md,
        sa.Column("key_id", sa.Text, primary_key=True),
        sa.Column("agent", sa.Text, nullable=False, index=True),
        sa.Column("secret_hash", sa.LargeBinary, nullable=False,
                  doc="scrypt(secret, salt) — never the secret itself."),
        sa.Column("salt", sa.LargeBinary, nullable=False),
        sa.Column("kdf", sa.Text, nullable=False, doc="e.g. scrypt:n=16384,r=8,p=1,len=32"),
        sa.Column("read_contexts", ARRAY(sa.Text), nullable=False),
        sa.Column("write_contexts", ARRAY(sa.Text), nullable=False),
        sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    restricted = sa.Table(
        "restricted_contexts", md,
        sa.Column("context", sa.Text, primary_key=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("restricted_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
    )
    return keys, restricted


class KeyStore(BaseSchemaStore):
    """Creates, lists, revokes and verifies API keys; marks contexts restricted.

    Args:
        engine: an engine on the database (any search_path; tables are qualified).
        base_schema: the catalog's base schema (``BELIEFSTORE_DB_SCHEMA``).
    """

    def __init__(self, engine: sa.Engine, base_schema: str = "public"):
        super().__init__(engine, base_schema)
        self.keys, self.restricted_table = _tables(self.base_schema)
        # key_id -> (stored hash, sha256 of a secret that verified against it)
        self._verified: dict[str, tuple[bytes, bytes]] = {}

    def tables(self) -> tuple[sa.Table, ...]:
        return (self.keys, self.restricted_table)

    # -- keys ------------------------------------------------------------------------------

    def create(self, agent: str, read: Iterable[str] | str = (), write: Iterable[str] | str = (),
               admin: bool = False) -> NewKey:
        """Make a key for ``agent``; the returned token is the only copy of its secret.

        Raises:
            KeyStoreError: an invalid agent or context name.
        """
        check_agent(agent)
        read_scope, write_scope = parse_scope(read), parse_scope(write)
        self.ensure()
        key_id = secrets.token_hex(8)
        secret = secrets.token_hex(24)
        salt = secrets.token_bytes(16)
        kdf = _kdf_name()
        digest = _derive(secret, salt, kdf)
        with self.engine.begin() as conn:
            row = conn.execute(self.keys.insert().values(
                key_id=key_id, agent=agent, secret_hash=digest, salt=salt, kdf=kdf,
                read_contexts=sorted(read_scope), write_contexts=sorted(write_scope), admin=admin,
            ).returning(*self.keys.c)).one()
            _notify(conn, f"{self.base_schema} key {key_id}")
        return NewKey(self._key(row), f"{KEY_PREFIX}_{key_id}_{secret}")

    def create_first_admin_key(self) -> NewKey | None:
        """An admin key (agent ``admin``, reads and writes ``*``) if no key exists at all,
        else ``None`` (``up``'s first start)."""
        if self.count():
            return None
        return self.create("admin", "*", "*", admin=True)

    def list_keys(self, include_revoked: bool = True) -> list[ApiKey]:
        """Every key, oldest first (secrets are not stored, so none is shown)."""
        self.ensure()
        query = sa.select(self.keys).order_by(self.keys.c.created_at, self.keys.c.key_id)
        if not include_revoked:
            query = query.where(self.keys.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [self._key(r) for r in conn.execute(query)]

    def count(self) -> int:
        """How many keys exist, revoked ones included."""
        self.ensure()
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(self.keys)).scalar_one()

    def get(self, key_id: str) -> ApiKey:
        """The key ``key_id``.

        Raises:
            KeyStoreError: no such key.
        """
        self.ensure()
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.keys).where(self.keys.c.key_id == key_id)).first()
        if row is None:
            raise KeyStoreError(f"no API key {key_id!r}; see `beliefstore keys list`")
        return self._key(row)

    def revoke(self, key_id: str) -> tuple[ApiKey, bool]:
        """Revoke ``key_id`` (effective for the next request). Returns the key and whether
        it was active before.

        Raises:
            KeyStoreError: no such key.
        """
        self.ensure()
        with self.engine.begin() as conn:
            row = conn.execute(self.keys.update().where(
                self.keys.c.key_id == key_id, self.keys.c.revoked_at.is_(None)
            ).values(revoked_at=sa.func.now()).returning(*self.keys.c)).first()
            _notify(conn, f"{self.base_schema} key {key_id}")
        with self._lock:
            self._verified.pop(key_id, None)
        if row is not None:
            return self._key(row), True
        return self.get(key_id), False

    def authenticate(self, token: str) -> ApiKey:
        """The active key ``token`` names, once its secret matched the stored hash.

        A secret that verified once is remembered (its SHA-256, in memory) so later
        requests skip scrypt; the row is still read on every call, so a revocation or a
        scope change applies to the next request.

        Raises:
            AuthError: malformed, unknown, wrong secret, or revoked.
        """
        key_id, secret = split_token(token)
        self.ensure()
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.keys).where(self.keys.c.key_id == key_id)).first()
        if row is None:
            burn_unknown_key(secret)
            raise self._invalid()
        stored = bytes(row.secret_hash)
        presented = hashlib.sha256(secret.encode("ascii")).digest()
        cached = self._verified.get(key_id)
        if cached is not None and hmac.compare_digest(cached[0], stored) \
                and hmac.compare_digest(cached[1], presented):
            ok = True
        else:
            ok = hmac.compare_digest(_derive(secret, bytes(row.salt), row.kdf), stored)
            if ok:
                with self._lock:
                    if len(self._verified) >= _VERIFIED_CACHE_SIZE:
                        self._verified.clear()
                    self._verified[key_id] = (stored, presented)
        if not ok:
            raise self._invalid()
        key = self._key(row)
        if not key.active:
            raise revoked_key(key)
        return key

    @staticmethod
    def _invalid() -> AuthError:
        return invalid_key()

    @staticmethod
    def _key(row: sa.Row) -> ApiKey:
        return key_of_row(row)

    # -- restricted contexts -----------------------------------------------------------------

    def restricted(self) -> frozenset[str]:
        """The restricted contexts."""
        self.ensure()
        with self.engine.connect() as conn:
            return frozenset(conn.execute(sa.select(self.restricted_table.c.context)).scalars())

    def restricted_list(self) -> list[sa.Row]:
        """Every restricted context with its reason and time, by name."""
        self.ensure()
        t = self.restricted_table
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(t).order_by(t.c.context)))

    def restrict(self, context: str, reason: str | None = None) -> bool:
        """Mark ``context`` restricted; returns False if it already was."""
        check_context(context)
        self.ensure()
        from sqlalchemy.dialects.postgresql import insert

        with self.engine.begin() as conn:
            added = conn.execute(insert(self.restricted_table).values(
                context=context, reason=reason).on_conflict_do_nothing()
                .returning(self.restricted_table.c.context)).first()
            _notify(conn, f"{self.base_schema} restricted")
        return added is not None

    def unrestrict(self, context: str) -> bool:
        """Lift the restriction of ``context``; returns False if it was not restricted."""
        check_context(context)
        self.ensure()
        with self.engine.begin() as conn:
            removed = conn.execute(self.restricted_table.delete().where(
                self.restricted_table.c.context == context)
                .returning(self.restricted_table.c.context)).first()
            _notify(conn, f"{self.base_schema} restricted")
        return removed is not None


__all__ = ["CHANNEL", "ApiKey", "AuthError", "KeyStore", "KeyStoreError", "NewKey", "burn_unknown_key",
           "check_secret", "invalid_key", "key_of_row", "revoked_key", "split_token"]
