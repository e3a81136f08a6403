"""The projection catalog: the read models in the database and which one is served.

Every projection lives in its own PostgreSQL schema, ``<base>_<name>`` where
``<base>`` is ``BELIEFSTORE_DB_SCHEMA``: the default one is ``<base>_self_model``.
Blue/green rebuilds: ``beliefstore replay`` builds another projection from offset 0,
and ``--switch`` makes it the *active* one in one transaction. The API and the live
projector follow the active projection; the old one stays until
``beliefstore projections drop NAME``.

The catalog itself is one table, ``<base>.projections``, created on first use; each
projection's tables are created by the Alembic migrations in its own schema.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from beliefstore.db import check_schema_name, create_tables, make_engine, migrate

DEFAULT_PROJECTION = "self_model"
CHANNEL = "beliefstore_catalog"
"""The NOTIFY channel of projection switches: payload ``<base schema>``, sent in the
switch's transaction; API processes then re-read the active projection."""
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")


class CatalogError(ValueError):
    """A projection name is invalid, unknown, already taken, or active (cannot be dropped)."""


@dataclass(frozen=True)
class ProjectionInfo:
    """One read model.

    Attributes:
        name: the projection's name (``self_model`` for the default one).
        schema: the PostgreSQL schema holding its tables.
        active: whether the API serves it.
        status: ``live``, ``building`` or ``built``.
        created_at: when it was registered.
        switched_at: when it last became active, or ``None``.
    """

    name: str
    schema: str
    active: bool
    status: str
    created_at: datetime
    switched_at: datetime | None


def _table(base_schema: str) -> sa.Table:
    return sa.Table(
        "projections", sa.MetaData(schema=base_schema),
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("schema_name", sa.Text, nullable=False, unique=True),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("status", sa.Text, nullable=False, server_default="live"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("switched_at", sa.DateTime(timezone=True), nullable=True),
        # At most one active projection.
        sa.Index("projections_one_active", "active", unique=True,
                 postgresql_where=sa.text("active")),
    )


def _checked_out(engine: sa.Engine) -> int:
    """Connections of ``engine``'s pool in use now (0 for a pool that does not count)."""
    count = getattr(engine.pool, "checkedout", None)
    return int(count()) if callable(count) else 0


class ProjectionCatalog:
    """Lists, registers, switches and drops projections; hands out one engine per schema.

    Args:
        database_url: the PostgreSQL URL.
        base_schema: the schema of the default projection and of the catalog.
        cache_s: how long :meth:`active` may answer from memory, seconds.
    """

    def __init__(self, database_url: str, base_schema: str = "public", *, cache_s: float = 1.0):
        self.database_url = database_url
        self.base_schema = check_schema_name(base_schema)
        self.table = _table(base_schema)
        self.cache_s = cache_s
        self._engines: dict[str, sa.Engine] = {}
        self._lock = threading.Lock()
        self._active: tuple[float, ProjectionInfo] | None = None
        self._active_schema: str | None = None  # the active schema last read
        self._retired: set[str] = set()  # schemas that were active here and no longer are

    @classmethod
    def from_settings(cls, settings) -> ProjectionCatalog:
        """The catalog of ``settings.database_url`` with base schema ``settings.db_schema``.

        Raises:
            ValueError: DATABASE_URL is not set.
        """
        if not settings.database_url:
            raise ValueError("DATABASE_URL is not set")
        return cls(settings.database_url, settings.db_schema)

    # -- engines -----------------------------------------------------------------------

    def engine(self, schema: str | None = None) -> sa.Engine:
        """The (cached) engine whose search_path is ``schema`` (default: the base schema)."""
        schema = schema or self.base_schema
        with self._lock:
            if schema not in self._engines:
                self._engines[schema] = make_engine(self.database_url, schema)
            return self._engines[schema]

    def engine_schemas(self) -> list[str]:
        """The schemas this catalog holds an engine (and so maybe pooled connections) for."""
        with self._lock:
            return sorted(self._engines)

    def release_retired(self) -> list[str]:
        """Close the engines of *retired* schemas: projections this catalog saw active that
        a switch has replaced since. Each held a pool of connections whose backends keep
        their relation and plan caches (and the projector's, its temporary-table buffers)
        for as long as they live; after a ``replay --switch`` nothing reads the old schema
        any more. An engine with a connection checked out (a request still reading the old
        projection) is left for a later call. Called by :meth:`active` whenever it reads
        the catalog (at most every ``cache_s`` seconds) and by :meth:`refresh`.

        Returns the retired schemas whose engines are still open (busy).
        """
        with self._lock:
            idle = [s for s in self._retired
                    if s in self._engines and _checked_out(self._engines[s]) == 0]
            engines = [self._engines.pop(s) for s in idle]
            busy = sorted(s for s in self._retired if s in self._engines)
        for engine in engines:
            engine.dispose()
        return busy

    def refresh(self) -> ProjectionInfo:
        """The active projection read afresh (not from the ``cache_s`` cache); closes the
        retired schemas' engines (:meth:`release_retired`).

        Raises:
            CatalogError: the catalog is empty.
        """
        self._active = None
        return self.active()

    def retire_projections(self, active_schema: str) -> list[str]:
        """After a switch notification, in a process that reads only the active projection
        (the API), which it learnt as ``active_schema`` by a query of its own: forget the
        cached active projection and retire every engine but the base schema's and
        ``active_schema``'s; then :meth:`release_retired`. Returns the retired schemas whose
        engines are still in use."""
        self._active = None
        with self._lock:
            self._retired.update(s for s in self._engines
                                 if s not in (self.base_schema, active_schema))
            self._retired.discard(active_schema)
            self._active_schema = active_schema
        return self.release_retired()

    def dispose(self) -> None:
        """Close every engine's connections."""
        with self._lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines.clear()

    # -- catalog -----------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the catalog if needed, register and migrate the default projection
        (active) when the catalog is empty, and migrate the active projection's schema."""
        engine = self.engine()
        with engine.begin() as conn:
            create_tables(conn, self.base_schema, self.table)
            if not conn.execute(sa.select(sa.func.count()).select_from(self.table)).scalar_one():
                conn.execute(self.table.insert().values(
                    name=DEFAULT_PROJECTION, schema_name=self.schema_for(DEFAULT_PROJECTION),
                    active=True, status="live", switched_at=sa.func.now(),
                ))
        self._active = None
        active = self.active()
        migrate(self.engine(active.schema), active.schema)

    def list(self) -> list[ProjectionInfo]:
        """Every registered projection, oldest first."""
        with self.engine().connect() as conn:
            rows = conn.execute(sa.select(self.table).order_by(self.table.c.created_at))
            return [self._info(r) for r in rows]

    def get(self, name: str) -> ProjectionInfo:
        """The projection called ``name``.

        Raises:
            CatalogError: no such projection.
        """
        with self.engine().connect() as conn:
            row = conn.execute(sa.select(self.table).where(self.table.c.name == name)).first()
        if row is None:
            raise CatalogError(f"no projection named {name!r}; see `beliefstore projections list`")
        return self._info(row)

    def active(self) -> ProjectionInfo:
        """The projection the API serves (cached for ``cache_s`` seconds). When the catalog
        is read and another projection has become active since the last read, the engine of
        the one before is closed (:meth:`release_retired`).

        Raises:
            CatalogError: the catalog is empty (run ``beliefstore migrate``).
        """
        now = time.monotonic()
        cached = self._active
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        with self.engine().connect() as conn:
            row = conn.execute(sa.select(self.table).where(self.table.c.active)).first()
        if row is None:
            raise CatalogError("no active projection: run `beliefstore migrate` first")
        info = self._info(row)
        self._active = (now, info)
        with self._lock:
            before = self._active_schema
            if before is not None and before != info.schema:
                self._retired.add(before)
            self._retired.discard(info.schema)  # switched back to it
            self._active_schema = info.schema
        self.release_retired()
        return info

    def schema_for(self, name: str) -> str:
        """The schema a projection called ``name`` gets (``<base>_<name>``)."""
        if not _NAME.match(name):
            raise CatalogError(
                f"projection name {name!r} must match [a-z][a-z0-9_]{{0,30}}"
            )
        return check_schema_name(f"{self.base_schema}_{name}"[:63])

    def create(self, name: str) -> ProjectionInfo:
        """Register a new, inactive projection (status ``building``) and migrate its schema.

        Raises:
            CatalogError: bad or taken name.
        """
        schema = self.schema_for(name)
        with self.engine().begin() as conn:
            taken = conn.execute(sa.select(self.table.c.name).where(
                (self.table.c.name == name) | (self.table.c.schema_name == schema))).first()
            if taken:
                raise CatalogError(f"a projection named {name!r} exists; pick another --name "
                                   "or `beliefstore projections drop` it")
            conn.execute(self.table.insert().values(name=name, schema_name=schema,
                                                    active=False, status="building"))
        migrate(self.engine(schema), schema)
        return self.get(name)

    def mark(self, name: str, status: str) -> None:
        """Set a projection's status (``building`` → ``built``)."""
        with self.engine().begin() as conn:
            conn.execute(self.table.update().where(self.table.c.name == name)
                         .values(status=status))

    def switch(self, name: str) -> ProjectionInfo:
        """Make ``name`` the active projection, atomically (one transaction).

        Raises:
            CatalogError: no such projection.
        """
        self.get(name)
        with self.engine().begin() as conn:
            conn.execute(self.table.update().where(self.table.c.active).values(active=False))
            conn.execute(self.table.update().where(self.table.c.name == name)
                         .values(active=True, switched_at=sa.func.now()))
            conn.execute(sa.select(sa.func.pg_notify(CHANNEL, self.base_schema)))
        self._active = None
        return self.get(name)

    def drop(self, name: str) -> None:
        """Drop an inactive projection's schema and unregister it.

        Raises:
            CatalogError: unknown or active.
        """
        info = self.get(name)
        if info.active:
            raise CatalogError(f"{name!r} is the active projection; switch to another first")
        engine = self.engine(info.schema)
        engine.dispose()
        with self._lock:
            self._engines.pop(info.schema, None)
        with self.engine().begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{info.schema}" CASCADE'))
            conn.execute(self.table.delete().where(self.table.c.name == name))

    @staticmethod
    def _info(row: sa.Row) -> ProjectionInfo:
        return ProjectionInfo(row.name, row.schema_name, row.active, row.status,
                              row.created_at, row.switched_at)
