"""Operators' and auditors' commands for access control: ``keys``, ``contexts`` and
``access-log``.

These commands talk to PostgreSQL (keys, restricted contexts) or Kafka (the access
log) directly, like ``replay`` and ``export``: whoever runs them with the database's
credentials is trusted. Untrusted agents get an API key and use the HTTP API.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from beliefstore.cli.common import console, describe_new_key, err, fail, load_settings

if TYPE_CHECKING:
    from beliefstore.access.keys import ApiKey, KeyStore
    from beliefstore.settings import Settings

keys_app = typer.Typer(
    name="keys",
    help="Make, list and revoke the API keys agents present to the HTTP API (stored as salted "
    "scrypt hashes in PostgreSQL; a key is shown only once, when made).",
    no_args_is_help=True,
    add_completion=False,
)
contexts_app = typer.Typer(
    name="contexts",
    help="Restrict contexts: a restricted context is read and written only by keys that name "
    "it; `*` does not cover it.",
    no_args_is_help=True,
    add_completion=False,
)


def register(app: typer.Typer) -> None:
    """Add the access-control commands to the ``beliefstore`` app."""
    app.add_typer(keys_app, name="keys")
    app.add_typer(contexts_app, name="contexts")
    app.command("access-log")(access_log)


def _store(settings: Settings | None = None) -> KeyStore:
    """The key store of BELIEFSTORE_DB_SCHEMA (its tables created if needed; the read
    model's migrations are not needed for keys)."""
    from beliefstore.access.keys import KeyStore
    from beliefstore.db import make_engine

    settings = settings or load_settings()
    if not settings.database_url:
        raise fail("DATABASE_URL is not set and no `beliefstore up` runs here", 2)
    store = KeyStore(make_engine(settings.database_url, settings.db_schema), settings.db_schema)
    store.ensure()
    return store


def _scope_text(scope) -> str:
    from beliefstore.access.scopes import format_scope

    return format_scope(scope)


def key_json(key: ApiKey) -> dict:
    """A key's metadata as JSON (never a secret: none is stored)."""
    return {"key_id": key.key_id, "agent": key.agent, "read": sorted(key.read),
            "write": sorted(key.write), "admin": key.admin,
            "created_at": key.created_at.isoformat(),
            "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None}


# -- keys --------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    agent: Annotated[str, typer.Option(help="The agent's id: observations posted with the key "
                                            "must have it as their source.")],
    read: Annotated[list[str] | None, typer.Option(
        help="Contexts it may read, comma-separated or repeated; * = every unrestricted "
        "context.", metavar="CONTEXTS")] = None,
    write: Annotated[list[str] | None, typer.Option(
        help="Contexts it may write (POST /v1/observations); * as for --read.",
        metavar="CONTEXTS")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="May use the admin endpoints "
                                                        "(GET /v1/admin/keys).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the key and its metadata as "
                                                         "JSON.")] = False,
) -> None:
    """Make an API key and print it, once: only a salted hash is stored. The key alone goes
    to stdout (KEY=$(beliefstore keys create ...)), the description to stderr."""
    from beliefstore.access.scopes import WILDCARD, KeyStoreError, check_agent, parse_scope

    try:
        check_agent(agent)
    except KeyStoreError as exc:
        raise typer.BadParameter(str(exc), param_hint="--agent") from None
    try:
        read_scope, write_scope = parse_scope(read), parse_scope(write)
    except KeyStoreError as exc:
        raise typer.BadParameter(str(exc), param_hint="--read/--write") from None
    if not (read_scope or write_scope or admin):
        raise typer.BadParameter("give the key --read and/or --write contexts (or --admin)",
                                 param_hint="--read/--write")
    store = _store()
    try:
        new = store.create(agent, read_scope, write_scope, admin)
    except KeyStoreError as exc:
        raise fail(str(exc), 2) from None
    if as_json:
        sys.stdout.write(json.dumps({**key_json(new.key), "key": new.token}, indent=2) + "\n")
    else:
        sys.stdout.write(new.token + "\n")
    err.print(f"created {describe_new_key(new)}")
    restricted = store.restricted()
    if restricted and (WILDCARD in read_scope or WILDCARD in write_scope):
        uncovered = sorted(restricted - read_scope - write_scope)
        if uncovered:
            err.print(f"note: * does not cover the restricted context(s) {', '.join(uncovered)}; "
                      "name them in --read/--write to grant them")
    err.print("This is the only time the key is shown: give it to the agent now "
              "(Authorization: Bearer <key>, or BELIEFSTORE_API_KEY for the CLI).")


@keys_app.command("list")
def keys_list(
    active: Annotated[bool, typer.Option("--active", help="Only keys not revoked.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON array.")] = False,
) -> None:
    """Show every key: id, agent, scopes, admin, created and revoked times (never a secret)."""

    keys = _store().list_keys(include_revoked=not active)
    if as_json:
        sys.stdout.write(json.dumps([key_json(k) for k in keys], indent=2) + "\n")
        return
    table = Table(title=f"{len(keys)} API key(s)", title_justify="left")
    for column in ("key_id", "agent", "read", "write", "admin", "created_at", "status"):
        table.add_column(column)
    for k in keys:
        status = "active" if k.active else f"revoked {k.revoked_at:%Y-%m-%d %H:%M:%S}"
        table.add_row(k.key_id, k.agent, _scope_text(k.read), _scope_text(k.write),
                      "yes" if k.admin else "", f"{k.created_at:%Y-%m-%d %H:%M:%S}", status)
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (see `keys list`).")]
                ) -> None:
    """Revoke a key: the API refuses it (401) from the next request on."""
    from beliefstore.access.keys import KeyStoreError

    try:
        key, was_active = _store().revoke(key_id)
    except KeyStoreError as exc:
        raise fail(str(exc)) from None
    if was_active:
        console.print(f"revoked API key {key.key_id} of agent {key.agent!r}")
    else:
        console.print(f"API key {key.key_id} of agent {key.agent!r} was already revoked at "
                      f"{key.revoked_at:%Y-%m-%d %H:%M:%S %Z}")


# -- contexts ----------------------------------------------------------------------------


@contexts_app.command("restrict")
def contexts_restrict(
    context: Annotated[str, typer.Argument(help="The context, e.g. health.")],
    reason: Annotated[str | None, typer.Option(help="Why (kept with the restriction).")] = None,
) -> None:
    """Restrict a context: from the next request on, only keys that name it may read or
    write it (`*` no longer covers it)."""
    from beliefstore.access.keys import KeyStoreError

    try:
        changed = _store().restrict(context, reason)
    except KeyStoreError as exc:
        raise fail(str(exc), 2) from None
    console.print(f"context {context!r} is {'now' if changed else 'already'} restricted: only "
                  "keys that name it may read or write it")


@contexts_app.command("unrestrict")
def contexts_unrestrict(context: Annotated[str, typer.Argument(help="The context.")]) -> None:
    """Lift a restriction: `*` covers the context again."""
    from beliefstore.access.keys import KeyStoreError

    try:
        changed = _store().unrestrict(context)
    except KeyStoreError as exc:
        raise fail(str(exc), 2) from None
    console.print(f"context {context!r} {'is no longer' if changed else 'was not'} restricted")


@contexts_app.command("list")
def contexts_list() -> None:
    """Show the restricted contexts."""

    rows = _store().restricted_list()
    table = Table(title=f"{len(rows)} restricted context(s)", title_justify="left")
    for column in ("context", "restricted_at", "reason"):
        table.add_column(column)
    for r in rows:
        table.add_row(r.context, f"{r.restricted_at:%Y-%m-%d %H:%M:%S}", r.reason or "")
    console.print(table)


# -- access log --------------------------------------------------------------------------


def access_log(
    subject: Annotated[str, typer.Option("--subject", "-s", help="The subject (person) id.")],
    agent: Annotated[str | None, typer.Option(help="Only reads by this agent.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines, one record a line.")] = False,
) -> None:
    """Who looked at a subject: every read of its self-model, beliefs, history or trace
    through the API (agent, key, endpoint, contexts returned, time), from the access-log
    topic (BELIEFSTORE_ACCESS_TOPIC). Exit 1 if there is none."""
    from beliefstore.access.accesslog import AccessLogError, read_access_log
    from beliefstore.timefmt import iso

    settings = load_settings()
    try:
        records, skipped = read_access_log(settings, subject)
    except AccessLogError as exc:
        raise fail(str(exc)) from None
    if agent is not None:
        records = [r for r in records if r.agent == agent]
    if skipped:
        err.print(f"[yellow]{skipped} message(s) of {settings.access_topic} were not access "
                  "records (skipped)[/]")
    if as_json:
        for r in records:
            sys.stdout.write(json.dumps({**r.to_json(), "partition": r.partition,
                                         "offset": r.offset}) + "\n")
    else:
        table = Table(title=f"reads of {subject} ({settings.access_topic})", title_justify="left")
        for column in ("at", "agent", "key_id", "endpoint", "contexts", "attribute", "as_of",
                       "count"):
            table.add_column(column)
        for r in records:
            table.add_row(iso(r.at)[:23], r.agent, r.key_id or "", r.endpoint,
                          ", ".join(r.contexts) or "(none)", r.attribute or "", r.as_of or "",
                          "" if r.count is None else str(r.count))
        console.print(table)
    agents = sorted({r.agent for r in records})
    err.print(f"{len(records)} read(s) of {subject} by {len(agents)} agent(s)"
              f"{': ' + ', '.join(agents) if agents else ''}")
    if not records:
        raise typer.Exit(1)


__all__ = ["key_json", "register"]
