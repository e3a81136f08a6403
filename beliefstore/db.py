"""PostgreSQL connections and migrations for the read model."""

from __future__ import annotations

import re
import threading
from typing import Any, Self

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def sqlalchemy_url(url: str) -> str:
    """Normalise a PostgreSQL URL to SQLAlchemy's psycopg 3 driver (``postgresql+psycopg://``).

    Accepts ``postgres://``, ``postgresql://`` and ``postgresql+psycopg://`` URLs.

    Raises:
        ValueError: not a PostgreSQL URL.
    """
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    raise ValueError(
        f"DATABASE_URL {url!r} is not a PostgreSQL URL; expected postgresql://user@host:port/db"
    )


def psycopg_conninfo(url: str) -> str:
    """A PostgreSQL URL as plain libpq connection string for psycopg itself (the
    ``+psycopg`` driver suffix of SQLAlchemy URLs removed).

    Raises:
        ValueError: not a PostgreSQL URL.
    """
    return "postgresql://" + sqlalchemy_url(url)[len("postgresql+psycopg://"):]


def check_schema_name(schema: str) -> str:
    """Return ``schema`` if it is a plain lowercase identifier, else raise ``ValueError``."""
    if not _SCHEMA.match(schema):
        raise ValueError(
            f"BELIEFSTORE_DB_SCHEMA {schema!r} must be a lowercase identifier ([a-z_][a-z0-9_]*)"
        )
    return schema


def make_engine(url: str, schema: str = "public", **kwargs) -> sa.Engine:
    """An engine whose connections use ``schema`` (then ``public``) as ``search_path``.

    ``kwargs`` go to :func:`sqlalchemy.create_engine` (e.g. ``pool_size``).
    """
    check_schema_name(schema)
    return sa.create_engine(
        sqlalchemy_url(url),
        connect_args={"options": f"-csearch_path={schema},public"},
        pool_pre_ping=True,
        **kwargs,
    )


def migrate(engine: sa.Engine, schema: str = "public") -> None:
    """Create ``schema`` if needed and upgrade its tables to the newest Alembic revision.

    Safe to run concurrently from several processes: a transaction-level advisory
    lock serialises them.
    """
    check_schema_name(schema)
    config = Config()
    config.set_main_option("script_location", "beliefstore.projector:migrations")
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:s))"), {"s": schema})
        conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        config.attributes["connection"] = conn
        config.attributes["schema"] = schema
        command.upgrade(config, "head")


def create_tables(conn: sa.Connection, schema: str, *tables: sa.Table) -> None:
    """In ``conn``'s transaction: serialise with other processes doing the same (an
    advisory lock on ``schema``), create ``schema`` and each of ``tables`` if missing.

    For the few tables outside the projections' Alembic migrations (the projection
    catalog, API keys, data keys), which live in the base schema.
    """
    check_schema_name(schema)
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:s))"), {"s": f"base:{schema}"})
    conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    for table in tables:
        table.create(conn, checkfirst=True)


class BaseSchemaStore:
    """A store whose tables live in the projection catalog's base schema, outside the
    projections' Alembic migrations (API keys, console sessions), created on first use.

    Subclasses set their ``sa.Table`` objects in ``__init__`` and list them in
    :meth:`tables`.

    Args:
        engine: an engine on the database (tables are schema-qualified).
        base_schema: the catalog's base schema (``BELIEFSTORE_DB_SCHEMA``).

    Raises:
        ValueError: ``base_schema`` is not a lowercase identifier.
    """

    def __init__(self, engine: sa.Engine, base_schema: str = "public"):
        self.engine = engine
        self.base_schema = check_schema_name(base_schema)
        self._ensured = False
        self._lock = threading.Lock()

    @classmethod
    def of_catalog(cls, catalog: Any) -> Self:
        """The store next to a :class:`~beliefstore.projector.catalog.ProjectionCatalog`."""
        return cls(catalog.engine(), catalog.base_schema)

    def tables(self) -> tuple[sa.Table, ...]:
        """The tables :meth:`ensure` creates."""
        raise NotImplementedError

    def ensure(self) -> None:
        """Create the tables if needed (idempotent, safe from several processes)."""
        if self._ensured:
            return
        with self._lock:
            if self._ensured:
                return
            with self.engine.begin() as conn:
                create_tables(conn, self.base_schema, *self.tables())
            self._ensured = True
