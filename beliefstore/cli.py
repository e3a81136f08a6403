"""The ``beliefstore`` command line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from beliefstore.errors import BeliefstoreError, ValidationError
from beliefstore.settings import Settings, SettingsError, parse_pairs, state_path, write_state

app = typer.Typer(
    help="beliefstore: an event-sourced store of what AI agents believe about the people "
    "they serve. Observations are Avro events on Kafka; a projector folds them into a "
    "self-model in PostgreSQL; an HTTP API serves it. Configure with KAFKA_BOOTSTRAP_SERVERS "
    "and DATABASE_URL; when unset, `up` and `demo` start embedded services under "
    "./.beliefstore/.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Tables stay readable when the output is piped or logged (rich would assume 80 columns).
console = Console(width=None if sys.stdout.isatty() else 150)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 150)
log = logging.getLogger("beliefstore")


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("kafka", "alembic", "uvicorn.error", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _settings(*, use_running: bool = True) -> Settings:
    try:
        return Settings.from_env(use_running=use_running)
    except SettingsError as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(2) from None


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/] {message}")
    return typer.Exit(code)


def _require_services(settings: Settings) -> None:
    missing = [name for name, value in (("KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers),
                                        ("DATABASE_URL", settings.database_url)) if not value]
    if missing:
        raise _fail(f"{' and '.join(missing)} not set and no `beliefstore up` is running in "
                    "this directory: set them, or run `beliefstore up` first", 2)


# -- services ----------------------------------------------------------------------------


@app.command()
def up(
    api_port: Annotated[int | None, typer.Option(help="API port (default BELIEFSTORE_API_PORT "
                                                      "or 8000).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Start everything in the foreground: embedded Kafka and PostgreSQL where none is
    configured (data under ./.beliefstore/, kept across restarts), migrations, topics, the
    projector and the API. Ctrl-C stops it all cleanly."""
    from beliefstore.runtime import prepare, start_missing_services
    from beliefstore.serve import ApiServer, ProjectorThread

    _logging(verbose)
    settings = _settings(use_running=False)
    if api_port:
        settings = replace(settings, api_port=api_port, api_url=f"http://{settings.api_host}:{api_port}")
    with contextlib.ExitStack() as stack:
        try:
            settings = start_missing_services(settings, stack, durable=True)
            catalog = prepare(settings)
            first_key = _first_admin_key(catalog) if settings.auth else None
        except (BeliefstoreError, RuntimeError, OSError) as exc:
            raise _fail(str(exc)) from None
        projector = ProjectorThread(settings, catalog)
        projector.start()
        stack.callback(projector.stop)
        api = ApiServer(settings, settings.api_host, settings.api_port, catalog=catalog)
        path = write_state(settings.home, {
            "pid": os.getpid(),
            "kafka_bootstrap_servers": settings.kafka_bootstrap_servers,
            "database_url": settings.database_url,
            "api_url": api.url,
        })
        stack.callback(lambda: path.unlink(missing_ok=True))
        console.print(f"[bold]beliefstore is up[/] (addresses recorded in {path})")
        console.print(f"  Kafka       {settings.kafka_bootstrap_servers}  topic {settings.topic}")
        console.print(f"  PostgreSQL  {_redact(settings.database_url)}  schema {settings.db_schema}")
        console.print(f"  API         {api.url}  (OpenAPI at {api.url}/docs)")
        if not settings.auth:
            console.print("  [yellow]authentication is off (BELIEFSTORE_AUTH=off): anyone who "
                          "reaches the API may read and write everything[/]")
        elif first_key is not None:
            from beliefstore.security_cli import describe_new_key

            console.print(f"  [bold]first start: created {describe_new_key(first_key)}.[/]\n"
                          "  It is shown only this once; store it now, and make agents their own "
                          "keys with `beliefstore keys create`:\n"
                          f"    export BELIEFSTORE_API_KEY={first_key.token}")
        console.print("Press Ctrl-C to stop.")
        api.run()
        console.print("stopping: finishing the projector's batch, then the services")


def _first_admin_key(catalog):
    from beliefstore.auth import KeyStore
    from beliefstore.security_cli import create_first_admin_key

    store = KeyStore.of_catalog(catalog)
    store.ensure()
    return create_first_admin_key(store)


def _redact(url: str | None) -> str:
    if not url:
        return ""
    import sqlalchemy as sa

    return sa.make_url(url).render_as_string(hide_password=True)


@app.command()
def projector(
    until_caught_up: Annotated[bool, typer.Option(
        help="Exit 0 once every partition is projected up to its high watermark.")] = False,
    group: Annotated[str | None, typer.Option(
        help="Join this consumer group (Kafka spreads the partitions over its members); "
        "run one process per member, or use --workers.")] = None,
    workers: Annotated[int, typer.Option(
        min=1, help="Run N worker processes in one consumer group (default group "
        "`beliefstore-projector`) and supervise them.")] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the projector: consume the event topic, fold each batch into the read model in
    one transaction with the offsets. It follows the active projection (see `replay
    --switch`). Alone it owns every partition; with --group/--workers the members of a
    consumer group share them, each fenced off from partitions it lost. SIGTERM or
    Ctrl-C finishes the current batch, commits and exits 0."""
    from beliefstore.projector.catalog import ProjectionCatalog
    from beliefstore.serve import run_active_projection

    _logging(verbose)
    settings = _settings()
    _require_services(settings)
    if workers > 1:
        raise typer.Exit(_supervise_workers(workers, group or "beliefstore-projector",
                                            until_caught_up, verbose))
    catalog = ProjectionCatalog.from_settings(settings)
    catalog.ensure()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stats = run_active_projection(settings, catalog, stop, until_caught_up=until_caught_up,
                                      group=group)
    except BeliefstoreError as exc:
        raise _fail(str(exc)) from None
    log.info("projector stopped: %d events, %d poison in %d batches", stats.events,
             stats.poison, stats.batches)


def _supervise_workers(count: int, group: str, until_caught_up: bool, verbose: bool) -> int:
    """Run ``count`` `projector --group` processes; forward SIGTERM/SIGINT; return the
    first non-zero exit code (0 when all exit cleanly)."""
    import subprocess

    command = [sys.argv[0], "projector", "--group", group]
    command += ["--until-caught-up"] if until_caught_up else []
    command += ["--verbose"] if verbose else []
    children = [subprocess.Popen(command) for _ in range(count)]
    log.info("started %d projector workers in group %r: pids %s", count, group,
             [c.pid for c in children])

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    return next((c for c in codes if c != 0), 0)


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (BELIEFSTORE_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (BELIEFSTORE_API_PORT).")] = None,
) -> None:
    """Serve the HTTP API (self-model, beliefs, trace, POST /v1/observations, /docs)."""
    from beliefstore.projector.catalog import ProjectionCatalog
    from beliefstore.serve import ApiServer

    _logging()
    settings = _settings()
    _require_services(settings)
    catalog = ProjectionCatalog.from_settings(settings)
    catalog.ensure()
    if not settings.auth:
        log.warning("authentication is off (BELIEFSTORE_AUTH=off): anyone who reaches the API "
                    "may read and write everything")
    else:
        from beliefstore.auth import KeyStore

        keys = KeyStore.of_catalog(catalog)
        if not keys.count():
            log.warning("no API key exists yet, so every request will get 401: make one with "
                        "`beliefstore keys create --agent NAME --read CONTEXTS --write CONTEXTS "
                        "[--admin]`")
    ApiServer(settings, host or settings.api_host, port or settings.api_port,
              catalog=catalog).run()


@app.command()
def migrate() -> None:
    """Create or upgrade the read model's tables (Alembic) in BELIEFSTORE_DB_SCHEMA and every
    registered projection's schema."""
    from beliefstore.db import migrate as run_migrations
    from beliefstore.projector.catalog import ProjectionCatalog

    settings = _settings()
    if not settings.database_url:
        raise _fail("DATABASE_URL is not set and no `beliefstore up` runs here", 2)
    catalog = ProjectionCatalog.from_settings(settings)
    catalog.ensure()
    for info in catalog.list():
        run_migrations(catalog.engine(info.schema), info.schema)
        console.print(f"projection {info.name}: schema {info.schema} migrated")


# -- events ------------------------------------------------------------------------------


@app.command()
def produce(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSON Lines events.")],
    batch: Annotated[int, typer.Option(help="Events per acknowledged batch.")] = 500,
) -> None:
    """Produce events from a JSON Lines file (DESIGN.md's event format) with a progress
    bar. Invalid lines are refused and reported with their line number; the others are
    produced. Exits 1 if any line was refused."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from beliefstore.events.jsonl import iter_lines
    from beliefstore.events.producer import BeliefProducer

    settings = _settings()
    try:
        producer = BeliefProducer.from_settings(settings)
    except BeliefstoreError as exc:
        raise _fail(str(exc), 2) from None
    with file.open(encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip())
    refused = produced = 0
    pending: list[Any] = []
    with producer, file.open(encoding="utf-8") as f, Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=err,
    ) as progress:
        task = progress.add_task(f"producing to {settings.topic}", total=total)
        for number, item in iter_lines(f):
            if isinstance(item, ValidationError):
                refused += 1
                progress.console.print(f"[yellow]line {number} refused:[/] {item}")
                progress.advance(task)
                continue
            pending.append(item)
            if len(pending) >= batch:
                produced += len(producer.send_many(pending))
                progress.advance(task, len(pending))
                pending = []
        if pending:
            produced += len(producer.send_many(pending))
            progress.advance(task, len(pending))
    console.print(f"produced {produced} event(s) to {settings.topic}; refused {refused} line(s)")
    if refused:
        raise typer.Exit(1)


@app.command()
def simulate(
    events: Annotated[int, typer.Option(help="Number of events (duplicates included).")] = 10000,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same events.")] = 7,
    subjects: Annotated[int | None, typer.Option(help="Number of subjects (default events/10).")] = None,
    output: Annotated[Path | None, typer.Option(help="Write JSON Lines here (default stdout).")] = None,
) -> None:
    """Generate a deterministic synthetic workload as JSON Lines: agents observing people
    with Zipf-distributed activity, supersessions, own- and other-source retractions,
    erasures and duplicate deliveries. Feed it to `produce` or `fold`."""
    from beliefstore.events.jsonl import dumps
    from beliefstore.workload import generate

    lines = (dumps(e) + "\n" for e in generate(events, seed=seed, subjects=subjects))
    if output is None:
        sys.stdout.writelines(lines)
    else:
        with output.open("w", encoding="utf-8") as f:
            f.writelines(lines)
        err.print(f"wrote {events} events to {output}")


def _pairs(values: list[str], option: str) -> dict[str, float]:
    try:
        return parse_pairs(",".join(values), option)
    except SettingsError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def fold(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                         help="JSON Lines events (or a JSON array).")],
    default_half_life: Annotated[float | None, typer.Option(
        help="Half-life of contexts without their own, seconds (default 2592000 = 30 days).")] = None,
    half_life: Annotated[list[str] | None, typer.Option(
        help="CONTEXT=SECONDS, repeatable.", metavar="CONTEXT=S")] = None,
    trust: Annotated[list[str] | None, typer.Option(
        help="SOURCE=WEIGHT, repeatable (default 1.0).", metavar="SOURCE=W")] = None,
) -> None:
    """Fold events offline, with no services, and print the beliefs as a JSON array of
    {subject_id, context, attribute, value, confidence, alternatives, support}."""
    from beliefstore.events.jsonl import read_events
    from beliefstore.projector.fold import DEFAULT_HALF_LIFE_S, FoldSettings
    from beliefstore.projector.fold import fold as run_fold

    if default_half_life is not None and default_half_life <= 0:
        raise typer.BadParameter("must be > 0 seconds", param_hint="--default-half-life")
    settings = FoldSettings(
        default_half_life_s=default_half_life or DEFAULT_HALF_LIFE_S,
        half_lives=_pairs(half_life or [], "--half-life"),
        trust=_pairs(trust or [], "--trust"),
    )
    if any(v <= 0 for v in settings.half_lives.values()):
        raise typer.BadParameter("every half-life must be > 0 seconds", param_hint="--half-life")
    try:
        events = read_events(file)
    except (ValidationError, ValueError) as exc:
        raise _fail(f"{file}: {exc}") from None
    beliefs = [
        {
            "subject_id": b.subject_id, "context": b.context, "attribute": b.attribute,
            "value": b.value, "confidence": b.confidence, "alternatives": b.alternatives,
            "support": list(b.support),
        }
        for b in run_fold(events, settings)
    ]
    sys.stdout.write(json.dumps(beliefs, indent=2, ensure_ascii=False) + "\n")


# -- reads -------------------------------------------------------------------------------


def _get(path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    settings = _settings()
    url = settings.api_url + path
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    try:
        response = httpx.get(url, params=params, timeout=10, headers=headers)
    except httpx.TransportError as exc:
        raise _fail(f"cannot reach the API at {settings.api_url} ({exc}): run `beliefstore up`, "
                    "or set BELIEFSTORE_API_URL", 2) from None
    if response.status_code == 404:
        raise _fail(response.json().get("detail", "not found"))
    if response.status_code in (401, 403, 429):
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        hint = ("; set BELIEFSTORE_API_KEY to an API key (`beliefstore keys create`, or the "
                "admin key `beliefstore up` printed on its first start)"
                if response.status_code == 401 and not settings.api_key else "")
        raise _fail(f"the API refused the request ({response.status_code}): {detail}{hint}")
    response.raise_for_status()
    return response.json()


def _fmt_alternatives(alternatives: dict[str, float]) -> str:
    return ", ".join(f"{v} {c:.2f}" for v, c in sorted(alternatives.items(), key=lambda x: -x[1]))


def print_self_model(model: dict[str, Any], out: Console = console) -> None:
    """Print a ``GET /v1/subjects/{id}/self-model`` body as a table."""
    when = f" as of {model['as_of']} ({model['time']})" if model.get("as_of") else ""
    table = Table(title=f"self-model of {model['subject_id']}{when}", title_justify="left")
    for column in ("context", "attribute", "value", "confidence", "alternatives", "sources"):
        table.add_column(column, justify="right" if column == "confidence" else "left")
    for context, beliefs in model["contexts"].items():
        for b in beliefs:
            table.add_row(context, b["attribute"], b["value"], f"{b['confidence']:.3f}",
                          _fmt_alternatives(b["alternatives"]), ", ".join(b["sources"]))
    out.print(table)


def print_trace(trace: dict[str, Any], out: Console = console) -> None:
    """Print a trace body as a table."""
    belief = trace["belief"]
    head = (f"{belief['value']} ({belief['confidence']:.3f})" if belief else "no belief")
    table = Table(title=f"trace of {trace['subject_id']} {trace['context']}/{trace['attribute']}"
                  f": {head}; half-life {trace['half_life_s']:.0f} s", title_justify="left")
    for column in ("occurred_at", "source", "type", "value", "conf", "status", "weight",
                   "kafka", "why"):
        table.add_column(column)
    for e in trace["events"]:
        table.add_row(
            e["occurred_at"][:19], e["source"], e["type"], e["value"] or "",
            "" if e["confidence"] is None else f"{e['confidence']:.2f}", e["status"],
            "" if e["weight"] is None else f"{e['weight']:+.3f}",
            f"p{e['kafka']['partition']}@{e['kafka']['offset']}", e["reason"] or "",
        )
    out.print(table)


@app.command("self-model")
def self_model(
    subject: Annotated[str, typer.Argument(help="Subject id.")],
    as_of: Annotated[str | None, typer.Option(
        help="A past instant, ISO 8601 with timezone (e.g. 2026-01-05T12:00Z): what was "
        "believed then.")] = None,
    time: Annotated[str, typer.Option(
        help="Time axis of --as-of: recorded (appended to the log by then) or occurred "
        "(observed by then).")] = "recorded",
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Print a subject's self-model, now or as of a past instant (through the API at
    BELIEFSTORE_API_URL, or the one `beliefstore up` runs here)."""
    params: dict[str, Any] = {}
    if as_of is not None:
        from datetime import datetime

        try:
            instant = datetime.fromisoformat(as_of)
        except ValueError:
            raise typer.BadParameter("not ISO 8601, e.g. 2026-01-05T12:00Z",
                                     param_hint="--as-of") from None
        if instant.tzinfo is None:
            raise typer.BadParameter("needs a timezone, e.g. 2026-01-05T12:00Z",
                                     param_hint="--as-of")
        if time not in ("recorded", "occurred"):
            raise typer.BadParameter("must be recorded or occurred", param_hint="--time")
        params = {"as_of": instant.isoformat(), "time": time}
    model = _get(f"/v1/subjects/{subject}/self-model", params)
    if as_json:
        sys.stdout.write(json.dumps(model, indent=2) + "\n")
    else:
        print_self_model(model)


@app.command()
def trace(
    subject: Annotated[str, typer.Argument(help="Subject id.")],
    context: Annotated[str, typer.Argument(help="Context, e.g. support.")],
    attribute: Annotated[str, typer.Argument(help="Attribute, e.g. emotional_state.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Print every event behind one belief, counting or not and why, with Kafka positions."""
    body = _get(f"/v1/subjects/{subject}/beliefs/{context}/{attribute}/trace")
    if as_json:
        sys.stdout.write(json.dumps(body, indent=2) + "\n")
    else:
        print_trace(body)


@app.command()
def history(
    subject: Annotated[str, typer.Argument(help="Subject id.")],
    context: Annotated[str, typer.Argument(help="Context, e.g. support.")],
    attribute: Annotated[str, typer.Argument(help="Attribute, e.g. emotional_state.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Print how one belief evolved: value and confidence after each event that changed it."""
    body = _get(f"/v1/subjects/{subject}/beliefs/{context}/{attribute}/history")
    if as_json:
        sys.stdout.write(json.dumps(body, indent=2) + "\n")
        return
    table = Table(title=f"history of {subject} {context}/{attribute}", title_justify="left")
    for column in ("recorded_at", "value", "confidence", "event", "source", "kafka"):
        table.add_column(column)
    for c in body["changes"]:
        table.add_row(c["recorded_at"][:23], c["value"] or "(no belief)",
                      "" if c["confidence"] is None else f"{c['confidence']:.3f}",
                      f"{c['event_type']} {c['event_id'][:8]}…", c["source"],
                      f"p{c['kafka_partition']}@{c['kafka_offset']}")
    console.print(table)


@app.command()
def demo(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the seed scenario end to end: a triage agent and a sentiment agent record what
    they learned in a support conversation (one via the SDK to Kafka, one via the HTTP
    API), one observation is retracted, the projector folds them into PostgreSQL, and the
    billing agent's read of the self-model and one belief's trace are printed, both read
    through the API."""
    from beliefstore.demo import run_demo

    _logging(verbose)
    settings = _settings()
    try:
        run_demo(settings, console)
    except (BeliefstoreError, RuntimeError, OSError, httpx.HTTPError) as exc:
        raise _fail(str(exc)) from None


# -- auditors: replay and projections ------------------------------------------------

projections_app = typer.Typer(help="List, switch and drop projections (read models built "
                              "by `replay`; the API serves the active one).",
                              no_args_is_help=True)
app.add_typer(projections_app, name="projections")


def _catalog(settings: Settings):
    from beliefstore.projector.catalog import ProjectionCatalog

    if not settings.database_url:
        raise _fail("DATABASE_URL is not set and no `beliefstore up` runs here", 2)
    catalog = ProjectionCatalog.from_settings(settings)
    catalog.ensure()
    return catalog


def _print_differences(title: str, diffs: list, limit: int = 20) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("subject_id", "context", "attribute", "rebuilt", "other"):
        table.add_column(column)

    def show(row) -> str:
        return "—" if row is None else (f"{row.value} {row.confidence:.6f} "
                                        f"support {len(row.support)}")

    for d in diffs[:limit]:
        table.add_row(*d.key, show(d.left), show(d.right))
    console.print(table)
    if len(diffs) > limit:
        console.print(f"... and {len(diffs) - limit} more")


@app.command()
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
    differences. Exit 1 if the rebuild differs from the pure fold."""
    import time as _time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from beliefstore.projector.catalog import CatalogError
    from beliefstore.projector.replay import replay as run_replay

    _logging(verbose)
    settings = _settings()
    _require_services(settings)
    catalog = _catalog(settings)
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
            raise _fail(str(exc)) from None
    console.print(f"rebuilt projection [bold]{report.projection.name}[/] (schema "
                  f"{report.projection.schema}): {report.stats.events} events, "
                  f"{report.stats.poison} poison, {report.seconds:.1f} s, "
                  f"{report.rate:.0f} events/s")
    if report.vs_live:
        _print_differences(f"{len(report.vs_live)} difference(s) with the live projection "
                           f"{report.live.name!r} (it may simply be behind)", report.vs_live)
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


@projections_app.command("list")
def projections_list() -> None:
    """Show every projection, which one is active, and its schema."""
    catalog = _catalog(_settings())
    table = Table()
    for column in ("name", "schema", "active", "status", "created_at", "switched_at"):
        table.add_column(column)
    for info in catalog.list():
        table.add_row(info.name, info.schema, "yes" if info.active else "", info.status,
                      info.created_at.isoformat(timespec="seconds"),
                      info.switched_at.isoformat(timespec="seconds") if info.switched_at else "")
    console.print(table)


@projections_app.command("switch")
def projections_switch(name: Annotated[str, typer.Argument(help="Projection to serve.")]) -> None:
    """Make NAME the active projection (e.g. to roll back a switch)."""
    from beliefstore.projector.catalog import CatalogError

    try:
        info = _catalog(_settings()).switch(name)
    except CatalogError as exc:
        raise _fail(str(exc)) from None
    console.print(f"the API now serves {info.name!r} (schema {info.schema})")


@projections_app.command("drop")
def projections_drop(name: Annotated[str, typer.Argument(help="Projection to drop.")]) -> None:
    """Drop an inactive projection and its schema."""
    from beliefstore.projector.catalog import CatalogError

    try:
        _catalog(_settings()).drop(name)
    except CatalogError as exc:
        raise _fail(str(exc)) from None
    console.print(f"dropped projection {name!r}")


def main() -> None:
    """Entry point of the ``beliefstore`` script."""
    app()


__all__ = ["app", "main", "print_self_model", "print_trace", "state_path"]


def _register_audit_commands() -> None:
    from beliefstore.audit_cli import register

    register(app)
    from beliefstore.calibrate_cli import register as register_calibrate

    register_calibrate(app)


_register_audit_commands()


def _register_security_commands() -> None:
    from beliefstore.security_cli import register

    register(app)


_register_security_commands()
