"""Auditors' commands on read models: ``replay`` and ``projections list|switch|drop``.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from beliefstore.cli.common import (
    console,
    err,
    fail,
    load_settings,
    open_catalog,
    require_services,
    setup_logging,
)
from beliefstore.errors import BeliefstoreError


def _print_differences(title: str, diffs: list[Any], limit: int = 20) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("subject_id", "context", "attribute", "rebuilt", "other", "differs in"):
        table.add_column(column)

    def show(row: Any) -> str:
        return "—" if row is None else (f"{row.value} {row.confidence:.6f} "
                                        f"support {len(row.support)}")

    for d in diffs[:limit]:
        table.add_row(*d.key, show(d.left), show(d.right), d.detail())
    console.print(table)
    if len(diffs) > limit:
        console.print(f"... and {len(diffs) - limit} more")


def replay(
    name: Annotated[str | None, typer.Option(
        help="Name of the rebuilt projection: lowercase letters, digits and _; "
        "default replay_<UTC time>.")] = None,
    switch: Annotated[bool, typer.Option(
        help="Make the API (and the live projector) use the rebuilt projection, atomically, "
        "if it equals the pure fold of the log.")] = False,
    fold_check: Annotated[bool, typer.Option(
        help="Also fold every event of the log in memory and compare.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Rebuild the read model from offset 0 of every partition into a fresh projection
    (its own schema; the live one keeps serving), with progress; then compare it row by
    row with the live projection and with the pure fold of the log, and print the
    differences (with the fields that differ, and whether the live projection had
    applied the same offsets). Exit 1 if the rebuild differs from the pure fold."""
    import time as _time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from beliefstore.projector.catalog import CatalogError
    from beliefstore.projector.replay import replay as run_replay

    setup_logging(verbose)
    settings = load_settings()
    require_services(settings)
    catalog = open_catalog(settings)
    name = name or _time.strftime("replay_%Y%m%d_%H%M%S", _time.gmtime())
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TextColumn("{task.fields[rate]:>8.0f} events/s"),
                  TimeRemainingColumn(), console=err) as progress:
        task = progress.add_task(f"replaying {settings.topic} into {name}", total=None, rate=0.0)
        started = _time.monotonic()

        def on_progress(done: int, total: int | None) -> None:
            rate = done / max(_time.monotonic() - started, 1e-9)
            progress.update(task, completed=done, total=total, rate=rate)

        try:
            report = run_replay(settings, catalog, name, check_fold=fold_check, switch=switch,
                                on_progress=on_progress)
        except (CatalogError, BeliefstoreError) as exc:
            raise fail(str(exc)) from None
    console.print(f"rebuilt projection [bold]{report.projection.name}[/] (schema "
                  f"{report.projection.schema}): {report.stats.events} events, "
                  f"{report.stats.poison} poison, {report.seconds:.1f} s, "
                  f"{report.rate:.0f} events/s")
    if report.vs_live:
        lead = report.live_lead
        if report.same_offsets:
            why = "both had applied the same offsets: not lag"
        elif lead >= 0:
            why = (f"it had applied {lead} event(s) more than the rebuild: agents wrote "
                   "meanwhile")
        else:
            why = f"it was {-lead} event(s) behind the rebuild"
        _print_differences(f"{len(report.vs_live)} difference(s) with the live projection "
                           f"{report.live.name!r} ({why})", report.vs_live)
    else:
        console.print(f"identical to the live projection {report.live.name!r}")
    if report.vs_fold is None:
        console.print("pure-fold check skipped (--no-fold-check)")
    elif report.vs_fold:
        _print_differences(f"{len(report.vs_fold)} difference(s) with the pure fold of the log",
                           report.vs_fold)
    else:
        console.print("identical to the pure fold of every event on the log")
    if report.switched:
        console.print(f"the API now serves {report.projection.name!r}; the old projection "
                      f"{report.live.name!r} stays until `beliefstore projections drop "
                      f"{report.live.name}`")
    elif switch:
        console.print("[red]not switched[/]: the rebuild differs from the pure fold")
    if report.vs_fold:
        raise typer.Exit(1)


def projections_list() -> None:
    """Show every projection, which one is active, and its schema."""
    catalog = open_catalog(load_settings())
    table = Table()
    for column in ("name", "schema", "active", "status", "created_at", "switched_at"):
        table.add_column(column)
    for info in catalog.list():
        table.add_row(info.name, info.schema, "yes" if info.active else "", info.status,
                      info.created_at.isoformat(timespec="seconds"),
                      info.switched_at.isoformat(timespec="seconds") if info.switched_at else "")
    console.print(table)


def projections_switch(name: Annotated[str, typer.Argument(help="Projection to serve.")]) -> None:
    """Make NAME the active projection (e.g. to roll back a switch)."""
    from beliefstore.projector.catalog import CatalogError

    try:
        info = open_catalog(load_settings()).switch(name)
    except CatalogError as exc:
        raise fail(str(exc)) from None
    console.print(f"the API now serves {info.name!r} (schema {info.schema})")


def projections_drop(name: Annotated[str, typer.Argument(help="Projection to drop.")]) -> None:
    """Drop an inactive projection and its schema."""
    from beliefstore.projector.catalog import CatalogError

    try:
        open_catalog(load_settings()).drop(name)
    except CatalogError as exc:
        raise fail(str(exc)) from None
    console.print(f"dropped projection {name!r}")


def register(app: typer.Typer) -> None:
    """Add ``replay`` and the ``projections`` group to ``app``."""
    projections_app = typer.Typer(help="List, switch and drop projections (read models built "
                                  "by `replay`; the API serves the active one).",
                                  no_args_is_help=True)
    projections_app.command("list")(projections_list)
    projections_app.command("switch")(projections_switch)
    projections_app.command("drop")(projections_drop)
    app.command()(replay)
    app.add_typer(projections_app, name="projections")
