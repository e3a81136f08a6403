"""What every command module shares: consoles, logging, settings, errors, API reads and
tables.

No command module imports another one; they all import this.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from beliefstore.settings import Settings, SettingsError, parse_pairs

if TYPE_CHECKING:
    from beliefstore.access.keys import NewKey
    from beliefstore.projector.catalog import ProjectionCatalog

# Tables stay readable when the output is piped or logged (rich would assume 80 columns).
console = Console(width=None if sys.stdout.isatty() else 150)
"""Standard output: results (tables, JSON)."""
err = Console(stderr=True, width=None if sys.stderr.isatty() else 150)
"""Standard error: progress, warnings and errors."""
log = logging.getLogger("beliefstore")

SubjectArg = Annotated[str, typer.Argument(help="Subject id.")]
"""The ``SUBJECT`` argument of the commands that read one subject."""
ContextArg = Annotated[str, typer.Argument(help="Context, e.g. support.")]
"""The ``CONTEXT`` argument of the commands that read one belief."""
AttributeArg = Annotated[str, typer.Argument(help="Attribute, e.g. emotional_state.")]
"""The ``ATTRIBUTE`` argument of the commands that read one belief."""


class _NoKafkaTracebacks(logging.Filter):
    """Keep a kafka-python log record's message but drop its traceback: kafka-python logs
    a connection the broker dropped mid-request (``ECONNRESET``) with ``log.exception``,
    an expected failure that the command reports itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.startswith("kafka"):
            record.exc_info = record.exc_text = None
        return True


def setup_logging(verbose: bool = False) -> None:
    """Log to standard error through rich; ``verbose`` turns on debug messages (and
    kafka-python's tracebacks, which are dropped otherwise)."""
    handler = RichHandler(console=err, show_path=False, rich_tracebacks=False)
    if not verbose:
        handler.addFilter(_NoKafkaTracebacks())
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(name)s: %(message)s",
        handlers=[handler],
        force=True,
    )
    for noisy in ("kafka", "alembic", "uvicorn.error", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load_settings(*, use_running: bool = True) -> Settings:
    """The settings from the environment (and a running `up`); exit 2 naming a bad variable."""
    try:
        return Settings.from_env(use_running=use_running)
    except SettingsError as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(2) from None


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` to standard error; return the ``typer.Exit(code)`` to raise."""
    err.print(f"[red]error:[/] {message}")
    return typer.Exit(code)


def expected_failure(exc: BaseException) -> str | None:
    """One line for a failure an operator can fix (a service down or unreachable, a file
    that cannot be read, a beliefstore error), ``None`` for anything else (a bug: its
    traceback is worth showing)."""
    import sqlalchemy as sa
    from kafka.errors import KafkaError

    from beliefstore.errors import BeliefstoreError

    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, BeliefstoreError):
        return first or exc.__class__.__name__
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return (f"PostgreSQL is unreachable ({first}): is `beliefstore up` running here, and "
                "is DATABASE_URL right?")
    if isinstance(exc, KafkaError):
        return (f"the Kafka broker failed ({exc.__class__.__name__}: {first}): is `beliefstore "
                "up` running here, and is KAFKA_BOOTSTRAP_SERVERS right?")
    if isinstance(exc, httpx.TransportError):
        return f"the API is unreachable ({first}): is `beliefstore up` running here?"
    if isinstance(exc, OSError):
        return f"{exc.__class__.__name__}: {exc}"
    return None


def require_services(settings: Settings) -> None:
    """Exit 2, naming what to set, unless the broker and database addresses are known."""
    missing = [name for name, value in (("KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers),
                                        ("DATABASE_URL", settings.database_url)) if not value]
    if missing:
        raise fail(f"{' and '.join(missing)} not set and no `beliefstore up` is running in "
                    "this directory: set them, or run `beliefstore up` first", 2)


def redact(url: str | None) -> str:
    """A database URL with its password hidden, for printing."""
    if not url:
        return ""
    import sqlalchemy as sa

    return sa.make_url(url).render_as_string(hide_password=True)


def parse_pairs_option(values: list[str], option: str) -> dict[str, float]:
    """``["a=1", "b=2"]`` of a repeatable ``--option`` → ``{"a": 1.0, "b": 2.0}``."""
    try:
        return parse_pairs(",".join(values), option)
    except SettingsError as exc:
        raise typer.BadParameter(str(exc)) from None


def open_catalog(settings: Settings) -> ProjectionCatalog:
    """The projection catalog (tables created if needed); exit 2 without a database."""
    from beliefstore.projector.catalog import ProjectionCatalog

    if not settings.database_url:
        raise fail("DATABASE_URL is not set and no `beliefstore up` runs here", 2)
    catalog = ProjectionCatalog.from_settings(settings)
    catalog.ensure()
    return catalog


def api_get(path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """GET ``path`` on the API with the configured key; exit with the API's message on an error."""
    settings = load_settings()
    url = settings.api_url + path
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    try:
        response = httpx.get(url, params=params, timeout=10, headers=headers)
    except httpx.TransportError as exc:
        raise fail(f"cannot reach the API at {settings.api_url} ({exc}): run `beliefstore up`, "
                    "or set BELIEFSTORE_API_URL", 2) from None
    if response.status_code == 404:
        raise fail(response.json().get("detail", "not found"))
    if response.status_code in (401, 403, 429):
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        hint = ("; set BELIEFSTORE_API_KEY to an API key (`beliefstore keys create`, or the "
                "admin key `beliefstore up` printed on its first start)"
                if response.status_code == 401 and not settings.api_key else "")
        raise fail(f"the API refused the request ({response.status_code}): {detail}{hint}")
    response.raise_for_status()
    return response.json()


def fmt_alternatives(alternatives: dict[str, float]) -> str:
    """``{"angry": 0.18}`` → ``"angry 0.18"``, most confident first."""
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
                          fmt_alternatives(b["alternatives"]), ", ".join(b["sources"]))
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


def describe_new_key(new: NewKey) -> str:
    """One line naming a new key, its agent and its scopes (never its secret)."""
    from beliefstore.access.scopes import format_scope

    key = new.key
    return (f"API key {key.key_id} for agent {key.agent!r}: reads {format_scope(key.read)}, "
            f"writes {format_scope(key.write)}{', admin' if key.admin else ''}")



