"""Reading the log back for the audit: source partitions up to given offsets, dead-letter topics to their end.

Plain kafka-python through :func:`lambdalake.clients.consumer` (no group, nothing committed). A partition is read
from its first offset still in the log (retention may have deleted older ones: :attr:`PartitionLog.first`) up to
a target offset, bounded by the partition's end offset at the start of the read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import orjson

from lambdalake.clients import consumer as make_consumer
from lambdalake.config import Settings
from lambdalake.exceptions import BrokerError
from lambdalake.fields import Source

TP = tuple[str, int]


@dataclass
class PartitionLog:
    """The messages of one partition in ``[first, stop)``; ``end`` is the partition's end offset when read."""

    first: int
    end: int
    stop: int
    offsets: list[int] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)
    nbytes: int = 0


@dataclass
class DeadLetters:
    """Source offsets recorded in one source's DLQ, per source partition, with the records that did not parse."""

    offsets: dict[int, list[int]] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    records: int = 0
    nbytes: int = 0


def _poll_until(c, tps: list, stops: dict, timeout: float, what: str, on_record) -> None:
    """Poll the assigned ``tps`` until each one's position reaches its stop offset."""
    todo = {tp for tp in tps if stops[tp] > 0}
    for tp in tps:
        if tp not in todo:
            c.pause(tp)
    deadline = time.monotonic() + timeout
    while todo:
        if time.monotonic() > deadline:
            left = ", ".join(f"{tp.topic}[{tp.partition}] at {c.position(tp)} of {stops[tp]}" for tp in sorted(todo))
            raise BrokerError(f"could not read {what} within {timeout:.0f}s ({left}); is the broker healthy?")
        for tp, recs in c.poll(timeout_ms=500, max_records=20_000).items():
            for r in recs:
                if r.offset < stops[tp]:
                    on_record(tp, r)
        for tp in list(todo):
            if c.position(tp) >= stops[tp]:
                todo.discard(tp)
                c.pause(tp)


def read_source(settings: Settings, source: Source, targets: dict[int, int], timeout: float = 300.0
                ) -> dict[int, PartitionLog]:
    """Every partition of ``source``'s topic from its first offset to ``min(targets[p], end)``.

    A partition missing from ``targets`` is still listed (first/end offsets), with nothing read.
    """
    from kafka import TopicPartition

    c = make_consumer(settings, check_crcs=True)
    try:
        parts = c.partitions_for_topic(source.topic)
        if not parts:
            raise BrokerError(f"topic {source.topic!r} of source {source.name!r} does not exist at "
                              f"{settings.bootstrap}")
        tps = [TopicPartition(source.topic, p) for p in sorted(parts)]
        firsts, ends = c.beginning_offsets(tps), c.end_offsets(tps)
        out = {tp.partition: PartitionLog(firsts[tp], ends[tp], max(firsts[tp], min(targets.get(tp.partition, 0),
                                                                                    ends[tp])))
               for tp in tps}
        stops = {tp: out[tp.partition].stop for tp in tps}
        c.assign(tps)
        for tp in tps:
            c.seek(tp, firsts[tp])

        def keep(tp, r) -> None:
            log = out[tp.partition]
            log.offsets.append(r.offset)
            log.values.append(r.value)
            log.nbytes += 0 if r.value is None else len(r.value)

        _poll_until(c, tps, {tp: stops[tp] if stops[tp] > firsts[tp] else 0 for tp in tps}, timeout,
                    f"topic {source.topic!r}", keep)
        return out
    finally:
        c.close()


def read_dead_letters(settings: Settings, source: Source, timeout: float = 300.0) -> DeadLetters:
    """The source offsets of every record of ``<topic>.dlq`` (:class:`batch.archiver.DeadLetters` writes
    ``{"partition": p, "offset": o, ...}`` into DLQ partition p)."""
    from kafka import TopicPartition

    out = DeadLetters()
    c = make_consumer(settings)
    try:
        parts = c.partitions_for_topic(source.dlq_topic) or set()
        tps = [TopicPartition(source.dlq_topic, p) for p in sorted(parts)]
        if not tps:
            return out
        ends = c.end_offsets(tps)
        c.assign(tps)
        c.seek_to_beginning(*tps)

        def keep(tp, r) -> None:
            out.records += 1
            out.nbytes += 0 if r.value is None else len(r.value)
            try:
                doc = orjson.loads(r.value)
                p, o = int(doc["partition"]), int(doc["offset"])
            except (ValueError, KeyError, TypeError):
                out.unreadable.append(f"{tp.topic}[{tp.partition}]@{r.offset}")
                return
            out.offsets.setdefault(p, []).append(o)

        _poll_until(c, tps, dict(ends), timeout, f"dead-letter topic {source.dlq_topic!r}", keep)
        return out
    finally:
        c.close()
