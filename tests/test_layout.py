"""The code's layout holds: no import cycle among beliefstore's own modules, the CLI's
command modules independent of each other, access control below the API, and the
Alembic migrations in step with ``projector/tables.py``."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import tomllib
from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from beliefstore.projector import tables

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> list[str]:
    """Every module and package under ``beliefstore``: the packages pyproject.toml
    installs (the card's folders are mapped there, so they are not under
    ``beliefstore.__path__``) and their modules."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = config["tool"]["setuptools"]["packages"]
    names = set(packages)
    for package in packages:
        module = importlib.import_module(package)
        names.update(m.name for m in pkgutil.iter_modules(module.__path__, f"{package}."))
    return sorted(names)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str) -> set[str]:
    """The beliefstore modules ``name`` imports anywhere (in functions too), except in
    ``if TYPE_CHECKING:`` blocks, which never run."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, name
    tree = ast.parse(open(spec.origin, encoding="utf-8").read(), spec.origin)
    is_package = spec.submodule_search_locations is not None
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if _is_module(sub) else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m == "beliefstore" or m.startswith("beliefstore.")} - {name}


def _graph() -> dict[str, set[str]]:
    return {name: _imports(name) for name in _modules()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, 1972)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_walk_sees_function_level_imports():
    graph = _graph()
    # cli.services imports the runtime inside its commands, not at the top.
    assert "beliefstore.runtime.startup" in graph["beliefstore.cli.services"]
    assert len(graph) > 50


def test_no_import_cycle_among_beliefstore_modules():
    assert _cycles(_graph()) == []


def test_no_cli_command_module_imports_another():
    graph = _graph()
    commands = {m for m in graph if m.startswith("beliefstore.cli.") and m != "beliefstore.cli.common"}
    assert len(commands) >= 7
    for module in sorted(commands):
        assert not (graph[module] & commands), (module, graph[module] & commands)
    # and nothing outside the CLI imports it (beliefstore.client is not the CLI)
    def in_cli(m: str) -> bool:
        return m == "beliefstore.cli" or m.startswith("beliefstore.cli.")

    for module, imported in graph.items():
        if not in_cli(module):
            assert not any(in_cli(m) for m in imported), module


def test_access_control_sits_below_the_api():
    graph = _graph()
    access = [m for m in graph if m.startswith("beliefstore.access")]
    assert {"beliefstore.access.keys", "beliefstore.access.scopes", "beliefstore.access.ratelimit",
            "beliefstore.access.datakeys", "beliefstore.access.accesslog"} <= set(access)
    for module in access:
        assert not any(m.startswith(("beliefstore.api", "beliefstore.cli")) for m in graph[module])
    assert "beliefstore.access.keys" in graph["beliefstore.api.deps"]


def test_migrations_produce_the_tables_of_projector_tables(engine: sa.Engine):
    """``alembic upgrade head`` (run by the catalog for this test's projection) gives the
    columns, types and indexes of :mod:`beliefstore.projector.tables`."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, tables.metadata)
        migrated = set(sa.inspect(conn).get_table_names())
    assert set(tables.metadata.tables) <= migrated
    assert diff == []


def test_the_drift_check_sees_a_missing_index(engine: sa.Engine):
    metadata = sa.MetaData()
    for table in tables.metadata.tables.values():
        table.to_metadata(metadata)
    sa.Index("ix_drift_probe", metadata.tables["beliefs"].c.updated_at)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                metadata)
    assert [d[0] for d in diff] == ["add_index"]
