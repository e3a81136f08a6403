"""Replay: rebuild a projection from offset 0 of every partition, and check it.

The rebuild goes into a fresh projection (its own schema, registered in the
:class:`~beliefstore.projector.catalog.ProjectionCatalog`), so the live one keeps
serving (blue/green). The result is compared row by row with the live projection
and with the pure fold of every event on the log.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import sqlalchemy as sa
from kafka import KafkaConsumer, TopicPartition

from beliefstore.errors import PoisonEvent
from beliefstore.events.model import Event
from beliefstore.events.sealing import EventShredded
from beliefstore.events.serde import AvroSerde
from beliefstore.projector.catalog import ProjectionCatalog, ProjectionInfo
from beliefstore.projector.fold import Belief, FoldSettings, Key, fold
from beliefstore.projector.tables import beliefs
from beliefstore.projector.worker import ProjectorWorker, WorkerStats
from beliefstore.settings import Settings

TOLERANCE = 1e-9
"""Largest confidence difference counted as equal (floating-point noise only)."""


@dataclass(frozen=True)
class BeliefRow:
    """The comparable part of a belief: value, confidence, alternatives, support."""

    value: str
    confidence: float
    alternatives: dict[str, float]
    support: tuple[str, ...]

    @classmethod
    def of(cls, b: Belief) -> BeliefRow:
        return cls(b.value, b.confidence, dict(b.alternatives), tuple(b.support))

    def same_as(self, other: BeliefRow) -> bool:
        return (
            self.value == other.value
            and self.support == other.support
            and math.isclose(self.confidence, other.confidence, abs_tol=TOLERANCE)
            and self.alternatives.keys() == other.alternatives.keys()
            and all(math.isclose(v, other.alternatives[k], abs_tol=TOLERANCE)
                    for k, v in self.alternatives.items())
        )


@dataclass(frozen=True)
class Difference:
    """One key where two read models disagree (``None``: the key is missing there)."""

    key: Key
    left: BeliefRow | None
    right: BeliefRow | None


def read_beliefs(engine: sa.Engine) -> dict[Key, BeliefRow]:
    """Every belief of the projection behind ``engine``."""
    with engine.connect() as conn:
        return {
            (r.subject_id, r.context, r.attribute): BeliefRow(
                r.value, r.confidence, dict(r.alternatives), tuple(r.support))
            for r in conn.execute(sa.select(beliefs))
        }


def compare(left: dict[Key, BeliefRow], right: dict[Key, BeliefRow]) -> list[Difference]:
    """The keys where ``left`` and ``right`` differ, sorted."""
    out = []
    for key in sorted(left.keys() | right.keys()):
        a, b = left.get(key), right.get(key)
        if a is None or b is None or not a.same_as(b):
            out.append(Difference(key, a, b))
    return out


def read_log(settings: Settings, serde: AvroSerde | None = None,
             timeout_s: float = 30.0,
             until: dict[int, int] | None = None) -> tuple[list[Event], int]:
    """Every valid event on the topic from offset 0 to an end offset, and the number of
    poison messages skipped (sealed observations of erased subjects are skipped silently,
    as the projector does).

    ``until`` maps partition → end offset (exclusive), e.g. a projection's stored
    offsets, so the fold covers exactly the events that projection applied even while
    agents keep writing; a partition it does not name is read to the highest high
    watermark its fetches reported (as is every partition when ``until`` is ``None``),
    confirmed by one more fetch once reached: Tansu 0.6.0 can answer a fetch with a stale,
    lower high watermark (see ``LOG_END_CONFIRM_S`` in the projector's worker), which
    alone would end the read before acknowledged events.
    """
    serde = serde or AvroSerde.for_settings(settings)
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                             group_id=None, enable_auto_commit=False,
                             max_poll_records=5000, auto_offset_reset="none",
                             **settings.kafka_client_config())
    try:
        parts = consumer.partitions_for_topic(settings.topic) or set()
        tps = [TopicPartition(settings.topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        events: list[Event] = []
        poison = 0
        fixed: dict[TopicPartition, int] = {
            tp: until[tp.partition] for tp in tps if until and tp.partition in until}
        ends = dict(fixed)
        confirming = False
        deadline = time.monotonic() + timeout_s
        while True:
            polled = consumer.poll(timeout_ms=200)
            for records in polled.values():
                for record in records:
                    if record.offset >= fixed.get(TopicPartition(record.topic, record.partition),
                                                  1 << 62):
                        continue
                    try:
                        events.append(serde.decode(record.value).event)
                    except PoisonEvent:
                        poison += 1
                    except EventShredded:
                        pass  # erased subject: its sealed fields are gone for good
            for tp in tps:
                hw = consumer.highwater(tp)
                if hw is not None and tp not in fixed:
                    ends[tp] = max(ends.get(tp, 0), hw)
            if len(ends) == len(tps) and all(consumer.position(tp) >= ends[tp] for tp in tps):
                if confirming or len(fixed) == len(tps):
                    return events, poison
                confirming = True  # one more fetch: a stale high watermark ends nothing
                continue
            confirming = False
            if polled:
                deadline = time.monotonic() + timeout_s
            elif time.monotonic() > deadline:
                raise TimeoutError(f"reading {settings.topic} stalled for {timeout_s} s")
    finally:
        consumer.close()


@dataclass
class ReplayReport:
    """What a replay did and found.

    Attributes:
        projection: the rebuilt projection.
        stats: the replay worker's counters (events, poison, batches).
        seconds: wall time of the rebuild (not the checks), seconds.
        live: the projection that was active when the replay started.
        vs_live: differences rebuilt ↔ live (the live one may be behind: lag).
        vs_fold: differences rebuilt ↔ pure fold of the log (``None`` when skipped).
        switched: whether the rebuilt projection was made active.
    """

    projection: ProjectionInfo
    stats: WorkerStats
    seconds: float
    live: ProjectionInfo
    vs_live: list[Difference] = field(default_factory=list)
    vs_fold: list[Difference] | None = None
    switched: bool = False

    @property
    def rate(self) -> float:
        """Messages replayed per second."""
        return (self.stats.events + self.stats.poison) / max(self.seconds, 1e-9)


def replay(
    settings: Settings,
    catalog: ProjectionCatalog,
    name: str,
    *,
    serde: AvroSerde | None = None,
    check_fold: bool = True,
    switch: bool = False,
    on_progress: Callable[[int, int | None], None] | None = None,
    bulk: bool = True,
    workers: int | None = None,
) -> ReplayReport:
    """Rebuild projection ``name`` from offset 0, compare it, optionally switch to it.

    With ``bulk`` (the default) the fresh projection is loaded in one transaction
    (:meth:`ProjectorWorker.rebuild`: large polls, the marks and beliefs computed in
    memory, every table filled with ``COPY``); without it, batch by batch as the live
    projector does (:meth:`ProjectorWorker.run`). Both give the same rows. ``workers``:
    the bulk path's decoding processes (see :meth:`ProjectorWorker.rebuild`; ``None``:
    one per CPU for a large log, ``0``: none).

    ``on_progress(done, total)`` is called after every batch (``total`` is ``None``
    until every partition's high watermark is known). The switch happens only when
    the rebuilt projection equals the pure fold (or the fold check is skipped).

    Raises:
        CatalogError: ``name`` is invalid or taken.
        LogResetError, KafkaError, SQLAlchemyError: as the projector.
    """
    live = catalog.active()
    serde = serde or AvroSerde.for_settings(settings)  # the keyring is in the base schema
    info = catalog.create(name)
    engine = catalog.engine(info.schema)
    replay_settings = replace(settings, db_schema=info.schema, projection=info.name)
    started = time.monotonic()
    with ProjectorWorker(replay_settings, engine, serde=serde) as worker:
        if bulk:

            def loaded(stats: WorkerStats, total: int | None) -> None:
                if on_progress is not None:
                    on_progress(stats.events + stats.poison + stats.shredded, total)

            stats = worker.rebuild(loaded, workers=workers)
        else:

            def progress(stats: WorkerStats) -> None:
                if on_progress is not None:
                    done = stats.events + stats.poison
                    lag = worker.lag()
                    on_progress(done, None if lag is None else done + lag)

            stats = worker.run(until_caught_up=True, on_batch=progress)
    seconds = time.monotonic() - started
    catalog.mark(name, "built")
    report = ReplayReport(catalog.get(name), stats, seconds, live)
    rebuilt = read_beliefs(engine)
    report.vs_live = compare(rebuilt, read_beliefs(catalog.engine(live.schema)))
    if check_fold:
        # the fold covers the same offsets as the rebuild: agents may write meanwhile
        events, _ = read_log(settings, serde,
                             until=worker.recorder.stored_offsets(settings.topic))
        fold_settings: FoldSettings = settings.fold_settings
        report.vs_fold = compare(rebuilt, {b.key: BeliefRow.of(b) for b in fold(events, fold_settings)})
    if switch and not report.vs_fold:
        report.projection = catalog.switch(name)
        report.switched = True
    return report
