"""Auditors' commands on the raw event log (``events get``, ``export``).

``beliefstore events get PARTITION OFFSET`` reads one message straight from Kafka, so a
trace line (``p1@42``, writer fingerprint) can be checked against the log itself.
``beliefstore export --subject S`` writes every event about one subject as JSON Lines,
from the read model or (``--from-log``) from the log, ready for ``beliefstore fold``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from beliefstore.cli.common import err, fail, load_settings

if TYPE_CHECKING:
    import sqlalchemy as sa

    from beliefstore.events.eventlog import RawMessage
    from beliefstore.events.model import Event
    from beliefstore.settings import Settings

HEAD_BYTES = 64
"""How many bytes of a poison message ``events get`` shows as a hex dump."""

events_app = typer.Typer(
    name="events",
    help="Read the raw event log (Kafka), independent of any projection.",
    no_args_is_help=True,
    add_completion=False,
)


def register(app: typer.Typer) -> None:
    """Add the audit commands to the ``beliefstore`` app."""
    app.add_typer(events_app, name="events")
    app.command("export")(export)


# -- helpers -----------------------------------------------------------------------------


def _kafka(settings: Settings) -> str:

    if not settings.kafka_bootstrap_servers:
        raise fail("KAFKA_BOOTSTRAP_SERVERS not set and no `beliefstore up` is running in this "
                    "directory: set it, or run `beliefstore up` first", 2)
    return settings.kafka_bootstrap_servers


def hexdump(data: bytes, limit: int = HEAD_BYTES) -> str:
    """``offset  hex bytes  |ascii|`` lines (16 bytes each) of the first ``limit`` bytes."""
    lines = []
    for start in range(0, min(len(data), limit), 16):
        chunk = data[start:min(start + 16, limit)]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{start:04x}  {chunk.hex(' '):<47}  |{text}|")
    return "\n".join(lines)


def _header_text(value: bytes) -> str:
    return value.decode("utf-8", errors="backslashreplace")


def message_to_json(message: RawMessage) -> dict[str, Any]:
    """The ``events get --json`` body of a message."""
    from beliefstore.events.jsonl import to_dict
    from beliefstore.timefmt import iso

    value = message.value or b""
    decoded, error = message.decoded, message.error
    return {
        "topic": message.topic,
        "partition": message.partition,
        "offset": message.offset,
        "timestamp": message.timestamp,
        "timestamp_iso": iso(message.timestamp) if message.timestamp is not None else None,
        "key": message.key_text,
        "headers": [{"name": n, "value": _header_text(v)} for n, v in message.headers],
        "size": len(value),
        "writer": None if decoded is None else {
            "name": decoded.writer.name,
            "version": decoded.writer.version,
            "fingerprint": decoded.writer.fingerprint.hex(),
        },
        "event": None if decoded is None else to_dict(decoded.event),
        "error": None if error is None else {"kind": error.kind, "reason": error.reason},
        "value_head_hex": value[:HEAD_BYTES].hex(),
    }


def _print_message(message: RawMessage) -> None:
    from beliefstore.events.jsonl import dumps
    from beliefstore.timefmt import iso

    value = message.value or b""
    rows = [
        ("topic", message.topic),
        ("partition", str(message.partition)),
        ("offset", str(message.offset)),
        ("timestamp", "unknown" if message.timestamp is None
         else f"{iso(message.timestamp)} ({message.timestamp} ms, broker time)"),
        ("key", "(none)" if message.key is None else str(message.key_text)),
        ("size", f"{len(value)} bytes"),
    ]
    if message.decoded is not None:
        w = message.decoded.writer
        rows.append(("writer", f"{w.name} v{w.version}, fingerprint {w.fingerprint.hex()}"))
    rows.append(("headers", "(none)" if not message.headers else ""))
    out = [f"{label:<10} {text}".rstrip() for label, text in rows]
    out += [f"  {name}: {_header_text(v)}" for name, v in message.headers]
    if message.decoded is not None:
        out.append(f"{'event':<10} {dumps(message.decoded.event)}")
    elif message.error is not None:
        out.append(f"{'poison':<10} {message.error.kind}: {message.error.reason}")
        shown = min(len(value), HEAD_BYTES)
        out.append(f"{'bytes':<10} first {shown} of {len(value)}:")
        out += ["  " + line for line in hexdump(value).splitlines()]
    sys.stdout.write("\n".join(out) + "\n")


# -- events get --------------------------------------------------------------------------


@events_app.command("get")
def events_get(
    partition: Annotated[int, typer.Argument(
        help="Partition number (a trace's pN@…).", min=0, metavar="PARTITION")],
    offset: Annotated[int, typer.Argument(
        help="Offset in the partition (a trace's …@OFFSET).", min=0, metavar="OFFSET")],
    topic: Annotated[str | None, typer.Option(
        help="Topic to read (default BELIEFSTORE_TOPIC, beliefstore.events).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Fetch and decode one raw message of the event log, to check a trace line against it.

    Reads PARTITION at OFFSET straight from Kafka (KAFKA_BOOTSTRAP_SERVERS; no database)
    and prints the topic, partition and offset, the broker's timestamp, the key, the
    writer schema (name, version and CRC-64-AVRO fingerprint, as in a trace), the headers
    and the event in the JSON Lines event format. A message that cannot be decoded shows
    its poison kind and reason (what the projector sends to the dead-letter queue) and a
    hex dump of its first bytes. Exits 1 when the partition does not exist or the offset
    is at or past the partition's log end (the message names the log end).
    """
    from beliefstore.events.eventlog import LogReadError, MessageNotFound, fetch_message
    from beliefstore.events.serde import AvroSerde

    settings = load_settings()
    bootstrap = _kafka(settings)
    try:
        message = fetch_message(bootstrap, topic or settings.topic, partition, offset,
                                serde=AvroSerde.for_settings(settings),
                                client_config=settings.kafka_client_config())
    except MessageNotFound as exc:
        raise fail(str(exc), 1) from None
    except LogReadError as exc:
        raise fail(str(exc), 2) from None
    if as_json:
        sys.stdout.write(json.dumps(message_to_json(message), indent=2, ensure_ascii=False) + "\n")
    else:
        _print_message(message)


# -- export ------------------------------------------------------------------------------


def _read_model_rows(conn: sa.Connection, subject: str) -> Iterator[Event]:
    import sqlalchemy as sa

    from beliefstore.events.model import ObservationRecorded, ObservationRetracted, SubjectErased
    from beliefstore.projector.tables import erasures, observations, retractions
    from beliefstore.timefmt import to_millis

    o, r, e = observations, retractions, erasures
    for row in conn.execute(sa.select(e).where(e.c.subject_id == subject)):
        yield SubjectErased(event_id=str(row.event_id), subject_id=row.subject_id,
                            source=row.source, occurred_at=to_millis(row.occurred_at),
                            reason=row.reason)
    for row in conn.execute(sa.select(r).where(r.c.subject_id == subject)):
        yield ObservationRetracted(event_id=str(row.event_id), subject_id=row.subject_id,
                                   source=row.source, occurred_at=to_millis(row.occurred_at),
                                   retracted_event_id=str(row.retracted_event_id),
                                   reason=row.reason)
    for row in conn.execute(sa.select(o).where(o.c.subject_id == subject,
                                               o.c.erased_by.is_(None))):
        yield ObservationRecorded(event_id=str(row.event_id), subject_id=row.subject_id,
                                  source=row.source, occurred_at=to_millis(row.occurred_at),
                                  context=row.context, attribute=row.attribute,
                                  value=row.value, confidence=row.confidence,
                                  evidence=row.evidence, metadata=dict(row.metadata or {}))


def read_model_events(engine: sa.Engine, subject: str) -> list[Event]:
    """Every event about ``subject`` in a projection's read model, ordered by
    ``(occurred_at, event_id)``: its observations (except those an erasure wiped), its
    retractions (own-source or not) and its erasures."""
    from beliefstore.events.model import ObservationRecorded, SubjectErased

    with engine.connect() as conn:
        events = list(_read_model_rows(conn, subject))
    # The projector wipes what an erasure covers; never hand out a value it would have wiped
    # (e.g. a row not yet redacted because it was read in the same instant).
    erased_until = max((ev.occurred_at for ev in events if isinstance(ev, SubjectErased)),
                       default=None)
    if erased_until is not None:
        events = [ev for ev in events if not (isinstance(ev, ObservationRecorded)
                                              and ev.occurred_at <= erased_until)]
    return sorted(events, key=lambda ev: (ev.occurred_at, ev.event_id))


def export(
    subject: Annotated[str, typer.Option("--subject", "-s", help="The subject id to export.")],
    from_log: Annotated[bool, typer.Option(
        "--from-log", help="Scan the event log (Kafka) instead of reading the read model.")] = False,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", dir_okay=False, writable=True,
        help="Write to this file instead of stdout.")] = None,
) -> None:
    """Export every event about one subject as JSON Lines (the event format of `produce`
    and `fold`), to stdout or --output, with a progress bar on stderr.

    By default the events come from the read model (the active projection in PostgreSQL):
    the subject's observations, retractions and erasures ordered by occurred_at then
    event_id; observations wiped by an erasure are left out, the erasure itself is kept.
    With --from-log they come from the event log instead: the subject's partition is
    scanned from offset 0 to its log end, keeping events keyed by the subject in log order
    (each event_id once; poison messages are skipped and reported). `beliefstore fold` of
    the export rebuilds the subject's self-model. Exits 1 if no event is about the subject.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from beliefstore.events.jsonl import dumps

    settings = load_settings()
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err, transient=False) as progress:
        if from_log:
            events, source = _from_log(settings, subject, progress)
        else:
            events, source = _from_read_model(settings, subject, progress)
    if not events:
        raise fail(f"no events about subject {subject!r} in {source}", 1)
    text = "".join(dumps(ev) + "\n" for ev in events)
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        where = "stdout"
    else:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise fail(f"cannot write {output}: {exc}", 1) from None
        where = str(output)
    err.print(f"exported {len(events)} event(s) about {subject} from {source} to {where}",
              markup=False, highlight=False)


def _from_read_model(settings: Settings, subject: str, progress: Any) -> tuple[list[Event], str]:
    import sqlalchemy as sa

    from beliefstore.projector.catalog import CatalogError, ProjectionCatalog

    if not settings.database_url:
        raise fail("DATABASE_URL not set and no `beliefstore up` is running in this directory: "
                    "set it, or run `beliefstore up` first (or export --from-log)", 2)
    task = progress.add_task("reading the read model", total=None)
    catalog = ProjectionCatalog.from_settings(settings)
    try:
        info = catalog.active()
        events = read_model_events(catalog.engine(info.schema), subject)
    except CatalogError as exc:
        raise fail(str(exc), 2) from None
    except sa.exc.ProgrammingError as exc:
        raise fail(f"the read model in schema {settings.db_schema!r} is not set up "
                    f"({exc.orig}): run `beliefstore migrate`", 2) from None
    except sa.exc.OperationalError as exc:
        raise fail(f"cannot reach PostgreSQL: {exc.orig}", 2) from None
    finally:
        catalog.dispose()
    progress.update(task, total=len(events), completed=len(events))
    return events, f"the read model (projection {info.name}, schema {info.schema})"


def _from_log(settings: Settings, subject: str, progress: Any) -> tuple[list[Event], str]:
    from beliefstore.events.eventlog import LogReadError, MessageNotFound, iter_subject_events
    from beliefstore.events.serde import AvroSerde

    bootstrap = _kafka(settings)
    task = progress.add_task(f"scanning {settings.topic}", total=None)

    def advance(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    events: list[Event] = []
    seen: set[str] = set()
    duplicates = 0
    scan = iter_subject_events(bootstrap, settings.topic, subject, progress=advance,
                               serde=AvroSerde.for_settings(settings),
                               client_config=settings.kafka_client_config())
    try:
        for message in scan:
            assert message.decoded is not None
            event = message.decoded.event
            if event.event_id in seen:
                duplicates += 1
                continue
            seen.add(event.event_id)
            events.append(event)
    except MessageNotFound as exc:
        raise fail(str(exc), 1) from None
    except LogReadError as exc:
        raise fail(str(exc), 2) from None
    for bad in scan.poison:
        assert bad.error is not None
        progress.console.print(
            f"skipped poison message {bad.topic}[{bad.partition}]@{bad.offset}: "
            f"{bad.error.kind}: {bad.error.reason}", markup=False, highlight=False)
    end = scan.end_offset or 0
    span = f"offsets 0..{end - 1}" if end else "empty"
    source = (f"the log ({settings.topic} partition {scan.partition}, {span}: "
              f"{scan.scanned} message(s) scanned, {duplicates} duplicate(s) dropped, "
              f"{len(scan.poison)} poison message(s) skipped)")
    return events, source
