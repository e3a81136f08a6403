"""Rows of the bulk rebuild as PostgreSQL ``COPY`` text lines, built without a connection.

The bulk rebuild (:class:`~beliefstore.projector.store.FreshLoad`) formats its rows here,
in the worker processes of :mod:`beliefstore.projector.rebuild_pool` or in the replaying
process, and writes the bytes to ``COPY … FROM STDIN`` (text format) unchanged. The format
is PostgreSQL's (documentation, "COPY", section "Text Format"): one line per row, columns
separated by a tab, ``\\N`` for NULL, and backslash, tab, newline and carriage return
escaped with a backslash. Times are ISO 8601 with an explicit UTC offset, floats their
shortest round-trip ``repr`` (read back exactly by PostgreSQL's ``float8`` input), JSON
columns JSON text.

"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

import orjson

from beliefstore.projector.fold import Belief, Counting

NULL = "\\N"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_MAX_MS = 253_402_300_800_000
"""10000-01-01T00:00:00Z in epoch milliseconds: :func:`millis`' fast path ends before it."""


def text(s: str) -> str:
    """``s`` escaped for a ``COPY`` text column."""
    if "\\" in s or "\t" in s or "\n" in s or "\r" in s:
        return (s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
                .replace("\r", "\\r"))
    return s


def opt(s: str | None) -> str:
    """:func:`text` of ``s``, or ``\\N`` for ``None``."""
    return NULL if s is None else text(s)


_DAYS: dict[int, str] = {}
"""Day number since the epoch → its ``YYYY-MM-DD`` (the dates :func:`millis` has met)."""


def millis(ms: int) -> str:
    """Epoch milliseconds as a ``timestamptz`` literal in UTC (exact to the millisecond):
    ``datetime.isoformat`` of that instant in UTC, written without building a
    ``datetime`` for times in 0..9999-12-31 (the date cached per day)."""
    if not 0 <= ms < _MAX_MS:
        return (_EPOCH + ms * _MS).isoformat()
    day, rest = divmod(ms, 86_400_000)
    date = _DAYS.get(day)
    if date is None:
        if len(_DAYS) >= 100_000:
            _DAYS.clear()
        date = _DAYS[day] = (_EPOCH + timedelta(days=day)).date().isoformat()
    seconds, milli = divmod(rest, 1000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    if milli:
        return f"{date}T{hour:02d}:{minute:02d}:{second:02d}.{milli:03d}000+00:00"
    return f"{date}T{hour:02d}:{minute:02d}:{second:02d}+00:00"


def opt_millis(ms: int | None) -> str:
    """:func:`millis` of ``ms``, or ``\\N`` for ``None``."""
    return NULL if ms is None else millis(ms)


def jsonb(value: object) -> str:
    """``value`` as an escaped JSON text column (orjson: compact, UTF-8; ``jsonb`` stores
    the same value as from :func:`json.dumps`)."""
    return text(orjson.dumps(value).decode("utf-8"))


def line(columns: list[str]) -> bytes:
    """One ``COPY`` text line (UTF-8) of already formatted columns."""
    return ("\t".join(columns) + "\n").encode("utf-8")


def observation(event_id: str, subject_id: str, context: str, attribute: str, value: str,
                confidence: float, source: str, occurred_at: int, evidence: str | None,
                metadata: Mapping[str, str] | None, topic: str, partition: int, offset: int,
                recorded_at: int | None, fingerprint: str) -> bytes:
    """The :data:`~beliefstore.projector.bulk.OBS_COLUMNS` line of an observation
    (times in epoch ms)."""
    return (f"{event_id}\t{text(subject_id)}\t{text(context)}\t{text(attribute)}\t"
            f"{text(value)}\t{confidence!r}\t{text(source)}\t{millis(occurred_at)}\t"
            f"{NULL if evidence is None else text(evidence)}\t"
            f"{NULL if metadata is None else ('{}' if not metadata else jsonb(dict(metadata)))}"
            f"\t{text(topic)}\t{partition}\t{offset}\t"
            f"{NULL if recorded_at is None else millis(recorded_at)}\t{fingerprint}\n"
            ).encode()


def retraction(event_id: str, subject_id: str, source: str, occurred_at: int,
               retracted_event_id: str, reason: str | None, topic: str, partition: int,
               offset: int, recorded_at: int | None, fingerprint: str) -> bytes:
    """The :data:`~beliefstore.projector.bulk.RETRACTION_COLUMNS` line of a retraction."""
    return line([event_id, text(subject_id), text(source), millis(occurred_at),
                 retracted_event_id, opt(reason), text(topic), str(partition), str(offset),
                 opt_millis(recorded_at), fingerprint])


def erasure(event_id: str, subject_id: str, source: str, occurred_at: int,
            reason: str | None, topic: str, partition: int, offset: int,
            recorded_at: int | None, fingerprint: str) -> bytes:
    """The :data:`~beliefstore.projector.bulk.ERASURE_COLUMNS` line of an erasure."""
    return line([event_id, text(subject_id), text(source), millis(occurred_at), opt(reason),
                 text(topic), str(partition), str(offset),
                 opt_millis(recorded_at), fingerprint])


def sources(counting: Iterable[Counting]) -> bytes:
    """The :data:`~beliefstore.projector.bulk.SOURCE_COLUMNS` lines of the counting
    observations ``counting``, joined (one encoding for all)."""
    return "".join([
        f"{text(c[0])}\t{text(c[1])}\t{text(c[2])}\t{text(c[3])}\t{c[4]}\t{millis(c[5])}\t"
        f"{text(c[6])}\t{c[7]!r}\n" for c in counting]).encode("utf-8")


def beliefs_and_changes(beliefs: Iterable[Belief], where: Mapping[str, tuple[int, int]]
                        ) -> tuple[bytes, bytes]:
    """The :data:`~beliefstore.projector.bulk.BELIEF_COLUMNS` lines and the
    ``belief_changes`` lines (columns ``subject_id, context, attribute, value,
    confidence, alternatives, sources, kafka_partition, kafka_offset``; ``where``:
    subject → its latest ``(partition, offset)``, else NULLs) of ``beliefs``, each
    joined: the columns they share formatted once."""
    lines: list[str] = []
    changes: list[str] = []
    for b in beliefs:
        head = (f"{text(b.subject_id)}\t{text(b.context)}\t{text(b.attribute)}\t"
                f"{text(b.value)}\t{b.confidence!r}")
        alternatives = jsonb(b.alternatives) if b.alternatives else "{}"
        sources = jsonb(b.sources)
        lines.append(f"{head}\t{b.score!r}\t{alternatives}\t{jsonb(b.support)}\t{sources}\t"
                     f"{b.source_count}\t{millis(b.last_observed_at)}\n")
        at = where.get(b.subject_id)
        changes.append(f"{head}\t{alternatives}\t{sources}\t{NULL}\t{NULL}\n" if at is None
                       else f"{head}\t{alternatives}\t{sources}\t{at[0]}\t{at[1]}\n")
    return "".join(lines).encode("utf-8"), "".join(changes).encode("utf-8")
