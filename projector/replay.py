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
from beliefstore.projector.tables import beliefs, projection_offsets
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


    def differing(self, other: BeliefRow) -> tuple[str, ...]:
        """The names of the fields where this row and ``other`` differ (as
        :meth:`same_as` compares them), in the order value, confidence, alternatives,
        support."""
        out = []
        if self.value != other.value:
            out.append("value")
        if not math.isclose(self.confidence, other.confidence, abs_tol=TOLERANCE):
            out.append("confidence")
        if self.alternatives.keys() != other.alternatives.keys() or not all(
                math.isclose(v, other.alternatives[k], abs_tol=TOLERANCE)
                for k, v in self.alternatives.items()):
            out.append("alternatives")
        if self.support != other.support:
            out.append("support")
        return tuple(out)


@dataclass(frozen=True)
class Difference:
    """One key where two read models disagree (``None``: the key is missing there)."""

    key: Key
    left: BeliefRow | None
    right: BeliefRow | None

    @property
    def fields(self) -> tuple[str, ...]:
        """Which fields differ (``("missing",)`` when one side has no belief)."""
        if self.left is None or self.right is None:
            return ("missing",)
        return self.left.differing(self.right)

    def detail(self) -> str:
        """What differs, for a report: each differing field with both sides (support as
        the event ids only one side counts), e.g. ``support: rebuilt only [id1], other
        only [id2]``."""
        if self.left is None or self.right is None:
            return "missing in the " + ("rebuilt" if self.left is None else "other")
        a, b = self.left, self.right
        parts = []
        for name in self.fields:
            if name == "support":
                parts.append(f"support: rebuilt only {sorted(set(a.support) - set(b.support))}"
                             f", other only {sorted(set(b.support) - set(a.support))}")
            elif name == "alternatives":
                parts.append(f"alternatives: rebuilt {_rounded(a.alternatives)}, other "
                             f"{_rounded(b.alternatives)}")
            elif name == "confidence":
                parts.append(f"confidence: rebuilt {a.confidence!r}, other {b.confidence!r}")
            else:
                parts.append(f"value: rebuilt {a.value!r}, other {b.value!r}")
        return "; ".join(parts)


def _rounded(alternatives: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 9) for k, v in sorted(alternatives.items())}


def read_beliefs(engine: sa.Engine) -> dict[Key, BeliefRow]:
    """Every belief of the projection behind ``engine``."""
    with engine.connect() as conn:
        return {
            (r.subject_id, r.context, r.attribute): BeliefRow(
                r.value, r.confidence, dict(r.alternatives), tuple(r.support))
            for r in conn.execute(sa.select(beliefs))
        }


def read_projection(engine: sa.Engine, projection: str, topic: str
                    ) -> tuple[dict[Key, BeliefRow], dict[int, int]]:
    """Every belief of the projection behind ``engine`` and its stored offsets
    (partition → next offset of ``topic``), read in one snapshot (``REPEATABLE READ``),
    so the beliefs are exactly those of the events before those offsets."""
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        with conn.begin():
            found = {
                (r.subject_id, r.context, r.attribute): BeliefRow(
                    r.value, r.confidence, dict(r.alternatives), tuple(r.support))
                for r in conn.execute(sa.select(beliefs))
            }
            offsets = {r.partition: r.next_offset for r in conn.execute(
                sa.select(projection_offsets.c.partition, projection_offsets.c.next_offset)
                .where(projection_offsets.c.projection == projection,
                       projection_offsets.c.topic == topic))}
    return found, offsets


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
        rebuilt_offsets, live_offsets: partition → next offset of each projection when
            they were compared (read with its beliefs, in one snapshot).
        phases: seconds of each phase of a bulk rebuild (see
            :meth:`ProjectorWorker.rebuild`), empty for the batch-by-batch path.
    """

    projection: ProjectionInfo
    stats: WorkerStats
    seconds: float
    live: ProjectionInfo
    vs_live: list[Difference] = field(default_factory=list)
    vs_fold: list[Difference] | None = None
    switched: bool = False
    rebuilt_offsets: dict[int, int] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    live_offsets: dict[int, int] = field(default_factory=dict)

    @property
    def live_lead(self) -> int:
        """Events the live projection had applied beyond the rebuild when they were
        compared (negative: it was behind; 0: both applied the same offsets, so any
        difference ``vs_live`` is not lag)."""
        return (sum(self.live_offsets.values()) - sum(self.rebuilt_offsets.values()))

    @property
    def same_offsets(self) -> bool:
        """Whether the live projection and the rebuild had applied exactly the same
        offsets of every partition when they were compared."""
        return self.live_offsets == self.rebuilt_offsets

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
    report = ReplayReport(catalog.get(name), stats, seconds, live,
                          phases=dict(getattr(worker, "rebuild_timings", {})))
    rebuilt, report.rebuilt_offsets = read_projection(engine, info.name, settings.topic)
    live_beliefs, report.live_offsets = read_projection(catalog.engine(live.schema), live.name,
                                                        settings.topic)
    report.vs_live = compare(rebuilt, live_beliefs)
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
