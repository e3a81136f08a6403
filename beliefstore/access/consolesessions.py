"""The web console's one-time login links and sessions, stored in PostgreSQL.

The console authenticates a browser without ever putting an API key in a URL:

* a **login link** is made by someone who holds a key (``beliefstore console`` posts to
  ``POST /console/login-links`` with ``Authorization: Bearer <key>``); the row maps a
  random token to the key id of the key that was *verified* when the link was made (the
  server-side proof), is single use and expires after :data:`LINK_TTL_S` (5 minutes);
* redeeming the link (or logging in with the key in the console's form) opens a
  **session**: a random token in an HTTP-only, ``SameSite=Strict`` cookie, mapped to the
  key id server side, valid for :data:`SESSION_TTL_S` (8 hours) after it is opened.

Both tables live in the catalog's base schema next to ``api_keys``; only SHA-256 digests
of the tokens are stored, so a database dump does not hand out sessions. Sessions are
rows, not process memory: several API processes share them. Every request made with a
session still loads the key (:class:`~beliefstore.access.keys.KeyStore`), so revoking the
key ends its sessions at once, and its scopes apply exactly as with the bearer header.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from beliefstore.db import BaseSchemaStore

LINK_TTL_S = 300
"""A login link expires this many seconds after it is made (5 minutes)."""
SESSION_TTL_S = 8 * 3600
"""A console session lasts this many seconds after login (8 hours)."""
COOKIE_NAME = "beliefstore_console"
"""The name of the session cookie."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _seconds(ttl_s: float) -> sa.ColumnElement:
    return sa.literal(timedelta(seconds=ttl_s), sa.Interval)


def _tables(base_schema: str) -> tuple[sa.Table, sa.Table]:
    md = sa.MetaData(schema=base_schema)
    links = sa.Table(
        "console_login_links", md,
        sa.Column("token_hash", sa.LargeBinary, primary_key=True, doc="SHA-256 of the token."),
        sa.Column("key_id", sa.Text, nullable=False, doc="The API key verified when made."),
        sa.Column("subject_id", sa.Text, nullable=True, doc="The subject the link opens."),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
    )
    sessions = sa.Table(
        "console_sessions", md,
        sa.Column("token_hash", sa.LargeBinary, primary_key=True, doc="SHA-256 of the cookie."),
        sa.Column("key_id", sa.Text, nullable=False, index=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    return links, sessions


@dataclass(frozen=True)
class LoginLink:
    """A freshly made login link: ``token`` is its only copy (it goes in the URL).

    Attributes:
        token: 43 URL-safe characters (256 random bits).
        key_id: the API key the link logs in as.
        subject_id: the subject the console opens after login, or ``None``.
        expires_at: when it stops working, UTC.
    """

    token: str
    key_id: str
    subject_id: str | None
    expires_at: datetime


@dataclass(frozen=True)
class Redeemed:
    """What a redeemed login link was for: the key id and the subject to open."""

    key_id: str
    subject_id: str | None


class ConsoleSessions(BaseSchemaStore):
    """Makes and redeems login links; opens, resolves and ends console sessions.

    Args:
        engine: an engine on the database (tables are schema-qualified).
        base_schema: the catalog's base schema (``BELIEFSTORE_DB_SCHEMA``).
    """

    def __init__(self, engine: sa.Engine, base_schema: str = "public"):
        super().__init__(engine, base_schema)
        self.links, self.sessions = _tables(self.base_schema)

    def tables(self) -> tuple[sa.Table, ...]:
        return (self.links, self.sessions)

    def create_link(self, key_id: str, subject_id: str | None = None,
                    ttl_s: float = LINK_TTL_S) -> LoginLink:
        """A single-use login link for ``key_id`` (whose key the caller has verified),
        valid for ``ttl_s`` seconds."""
        self.ensure()
        token = secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            expires_at = conn.execute(sa.insert(self.links).values(
                token_hash=_digest(token), key_id=key_id, subject_id=subject_id,
                expires_at=sa.func.now() + _seconds(ttl_s),
            ).returning(self.links.c.expires_at)).scalar_one()
        return LoginLink(token, key_id, subject_id, expires_at)

    def redeem_link(self, token: str) -> Redeemed | None:
        """Use the link ``token`` up: its key id and subject, or ``None`` if it is unknown,
        expired or was used already (one atomic UPDATE: two redemptions cannot both win)."""
        self.ensure()
        t = self.links
        with self.engine.begin() as conn:
            row = conn.execute(t.update().where(
                t.c.token_hash == _digest(token), t.c.used_at.is_(None),
                t.c.expires_at > sa.func.now(),
            ).values(used_at=sa.func.now()).returning(t.c.key_id, t.c.subject_id)).first()
            # Expired links are of no use to anyone: clear them on the way.
            conn.execute(t.delete().where(t.c.expires_at < sa.func.now() - sa.text(
                "interval '1 day'")))
        return Redeemed(row.key_id, row.subject_id) if row is not None else None

    def open_session(self, key_id: str, ttl_s: float = SESSION_TTL_S) -> str:
        """A new session of ``key_id``; returns the cookie value (its only copy)."""
        self.ensure()
        token = secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(sa.insert(self.sessions).values(
                token_hash=_digest(token), key_id=key_id,
                expires_at=sa.func.now() + _seconds(ttl_s)))
            conn.execute(self.sessions.delete().where(
                self.sessions.c.expires_at < sa.func.now()))
        return token

    def session_key(self, token: str) -> str | None:
        """The key id of the live session ``token``, or ``None`` (unknown or expired)."""
        self.ensure()
        s = self.sessions
        with self.engine.connect() as conn:
            return conn.execute(sa.select(s.c.key_id).where(
                s.c.token_hash == _digest(token), s.c.expires_at > sa.func.now())).scalar()

    def end_session(self, token: str) -> bool:
        """Log out: delete the session ``token``; returns whether it existed."""
        self.ensure()
        with self.engine.begin() as conn:
            gone = conn.execute(self.sessions.delete().where(
                self.sessions.c.token_hash == _digest(token)
            ).returning(self.sessions.c.key_id)).first()
        return gone is not None


__all__ = ["COOKIE_NAME", "LINK_TTL_S", "SESSION_TTL_S", "ConsoleSessions", "LoginLink",
           "Redeemed"]
