"""Reading the log back for the audit: source partitions up to given offsets, dead-letter topics to their end.

A kafka-python :class:`lambdalake.session.LogSession` (no group, nothing committed), read with
:meth:`~lambdalake.session.LogSession.read_until`. A partition is read from its first offset still in the log
(retention may have deleted older ones: :attr:`PartitionLog.first`) up to a target offset, bounded by the
partition's end offset at the start of the read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from lambdalake.config import Settings
from lambdalake.exceptions import BrokerError
from lambdalake.fields import Source
from lambdalake.session import LogSession, TopicMissing, connect

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


def _session(settings: Settings, topic: str, **overrides) -> LogSession:
    client = connect(settings, group_id=None, **overrides)
    return LogSession(client, [topic], bootstrap=settings.bootstrap, reader="the audit", lost_means="", notify=None)


def read_source(settings: Settings, source: Source, targets: dict[int, int], timeout: float = 300.0
                ) -> dict[int, PartitionLog]:
    """Every partition of ``source``'s topic from its first offset to ``min(targets[p], end)``.

    A partition missing from ``targets`` is still listed (first/end offsets), with nothing read.
    """
    session = _session(settings, source.topic, check_crcs=True)
    try:
        try:
            keys = session.partitions()
        except TopicMissing:
            raise BrokerError(f"topic {source.topic!r} of source {source.name!r} does not exist at "
                              f"{settings.bootstrap}") from None
        ends = session.end_offsets(keys)
        firsts = session.assign({}, partitions=keys)  # no positions: every partition from its log start
        out = {p: PartitionLog(firsts[(t, p)], ends[(t, p)], max(firsts[(t, p)], min(targets.get(p, 0), ends[(t, p)])))
               for t, p in keys}

        def keep(key: TP, offsets: list[int], values: list) -> None:
            log = out[key[1]]
            log.offsets += offsets
            log.values += values
            log.nbytes += sum(0 if v is None else len(v) for v in values)

        session.read_until(firsts, {(t, p): out[p].stop for t, p in keys}, timeout, f"topic {source.topic!r}", keep)
        return out
    finally:
        session.close()


def read_dead_letters(settings: Settings, source: Source, timeout: float = 300.0) -> DeadLetters:
    """The source offsets of every record of ``<topic>.dlq`` (the archiver's dead-letter writer puts
    ``{"partition": p, "offset": o, ...}`` into DLQ partition p)."""
    out = DeadLetters()
    # committed records only: a fenced archiver's aborted dead letters are not dead letters (batch.dead_letters)
    session = _session(settings, source.dlq_topic, client="librdkafka", **{"isolation.level": "read_committed"})
    try:
        try:
            keys = session.partitions()
        except TopicMissing:
            return out
        ends = session.end_offsets(keys)
        firsts = session.assign({}, partitions=keys)

        def keep(key: TP, offsets: list[int], values: list) -> None:
            for offset, value in zip(offsets, values, strict=True):
                out.records += 1
                out.nbytes += 0 if value is None else len(value)
                try:
                    doc = orjson.loads(value)
                    p, o = int(doc["partition"]), int(doc["offset"])
                except (ValueError, KeyError, TypeError):
                    out.unreadable.append(f"{key[0]}[{key[1]}]@{offset}")
                    continue
                out.offsets.setdefault(p, []).append(o)

        session.read_until(firsts, ends, timeout, f"dead-letter topic {source.dlq_topic!r}", keep)
        return out
    finally:
        session.close()
