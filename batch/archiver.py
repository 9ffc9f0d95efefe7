"""The archiver (``lambdalake ingest``): every message of every source topic lands exactly once either in the
master dataset (valid) or in the dead-letter topic (invalid).

Positions come from the master dataset itself: on start the archiver asks :func:`lambdalake.layout.archived_positions`
where each partition's files end and seeks there. Kafka's committed group offsets are written after each file, for
lag monitoring only, and never read. It reads the log with librdkafka (confluent-kafka) through the one log session
of every reader (:mod:`lambdalake.session`); dead letters are written with a librdkafka producer too
(:func:`lambdalake.clients.librdkafka_producer`).

Per partition the archiver buffers consumed messages; the buffer covers the contiguous offsets ``[start, end)``
(valid *and* invalid ones, so the files tile the offset space without gaps). A buffer is *rolled* into a file when
it reaches ``max_rows`` rows, ``max_bytes`` message bytes or ``max_seconds`` of age (:class:`RollPolicy`), and when
the archiver stops.

Roll protocol (one file, :meth:`Archiver._roll`) — the rename in step 3 is the commit point:

1. Dead-letter the range's invalid messages that the DLQ does not hold yet (source offset above the partition's
   DLQ high-water mark), flush the producer and check every record was acknowledged. A failure stops here: no file,
   and a restart re-reads the range. Then keep the range's invalid messages in the lake too, atomically: the
   *rejected file* ``rejected/<source>/p=<p>/<start>-<end>.parquet`` (:mod:`batch.master`), which counts only once
   step 3 made the range archived; a crash before that leaves it beyond the archived end, and the restart removes
   it before re-reading the range.
2. Write the valid rows to a temporary file in the partition directory and fsync it.
3. Rename it to ``<start>-<end>.parquet`` and fsync the directory.
4. Advance the in-memory position and DLQ high-water mark; commit ``end`` to Kafka (monitoring only).

A crash (kill -9) before step 3 leaves no visible file: the restart re-reads ``[start, end)`` and step 1 skips the
invalid messages already dead-lettered, because the DLQ high-water mark is re-read from the last record of each DLQ
partition on start (:class:`DeadLetters`). A crash after step 3 resumes at ``end``. Hence: no gap, no duplicate row,
no duplicate DLQ record.

Workers: every step above is per partition (files, DLQ partition ``p`` for source partition ``p``, high-water
marks), so the archiver scales out by partition (:mod:`lambdalake.ownership`): ``lambdalake ingest --workers N``
starts N processes with shares ``0/N .. N-1/N`` (:func:`ingest_workers`), and ``--share i/N`` / ``--partitions``
run one worker, e.g. one per machine on a shared lake. Each partition has exactly one writer at a time: a worker
holds ``checkpoints/archiver/partitions/<topic>-<p>.lock`` for every partition it archives and cleans up only after
its own partitions. A partition that changes owner continues from its files on disk, like any restart.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from batch.exceptions import ArchiverLocked, DeadLetterError
from batch.master import (
    master_table,
    rejected_table,
    remove_temp_files,
    remove_uncommitted_rejected,
    write_parquet_atomic,
)
from lambdalake.clients import consumer as make_consumer
from lambdalake.clients import ensure_topics, librdkafka_producer
from lambdalake.config import Settings, env_float, env_int
from lambdalake.exceptions import BrokerError, ConfigError, InvariantViolation
from lambdalake.fields import Source
from lambdalake.layout import Layout, archived_positions
from lambdalake.ownership import PartitionLocks, Share
from lambdalake.pipeline import Pipeline
from lambdalake.runtime import streaming_runtime
from lambdalake.session import LogRecord, LogSession, connect, stop_on_signals
from lambdalake.validation import Validator

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 120.0  # a roll's dead letters must be acknowledged within this (and message.timeout.ms)
DLQ_MAX_ORIGINAL_BYTES = 1024 * 1024  # original bytes kept in a DLQ record (base64 grows it by 4/3)
DLQ_SCHEMA = 1


@dataclass(frozen=True)
class RollPolicy:
    """When a partition buffer becomes a master file. Whichever limit is reached first rolls the file.

    Environment: ``LAMBDALAKE_ARCHIVE_ROLL_ROWS``, ``LAMBDALAKE_ARCHIVE_ROLL_BYTES``,
    ``LAMBDALAKE_ARCHIVE_ROLL_SECONDS``.
    """

    max_rows: int = 500_000
    max_bytes: int = 128 * 1024 * 1024
    max_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_bytes < 1 or self.max_seconds <= 0:
            raise ConfigError(f"roll policy {self} must have positive limits (rows >= 1, bytes >= 1, seconds > 0)")

    @classmethod
    def from_env(cls, **overrides: Any) -> RollPolicy:
        d = cls()
        values = dict(max_rows=env_int("LAMBDALAKE_ARCHIVE_ROLL_ROWS", d.max_rows),
                      max_bytes=env_int("LAMBDALAKE_ARCHIVE_ROLL_BYTES", d.max_bytes),
                      max_seconds=env_float("LAMBDALAKE_ARCHIVE_ROLL_SECONDS", d.max_seconds, minimum=0.001))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class ArchiveReport:
    """What one archiver run did."""

    messages: int = 0
    valid: int = 0
    invalid: int = 0
    dead_lettered: int = 0
    dlq_skipped: int = 0  # invalid messages already in the DLQ from a run that crashed before its rename
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    positions: dict[str, dict[int, int]] = field(default_factory=dict)  # source -> partition -> end
    warnings: list[str] = field(default_factory=list)

    @property
    def events_per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


class _Buffer:
    """Consumed-but-not-yet-archived messages of one partition: offsets ``[start, end)``."""

    __slots__ = ("source", "partition", "start", "end", "columns", "appenders", "offsets", "ingest", "invalid",
                 "nbytes", "opened")

    def __init__(self, source: Source, partition: int, start: int):
        self.source = source
        self.partition = partition
        self.start = start
        self.end = start
        self.reset(start)

    def reset(self, start: int) -> None:
        self.start = self.end = start
        self.columns: dict[str, list] = {f.name: [] for f in self.source.fields}  # the valid messages' values
        self.appenders = [(name, col.append) for name, col in self.columns.items()]
        self.offsets: list[int] = []
        self.ingest: list[int] = []
        self.invalid: list[tuple[LogRecord, str]] = []  # (record, reason)
        self.nbytes = 0
        self.opened = time.monotonic()

    @property
    def rows(self) -> int:
        return len(self.offsets)

    @property
    def empty(self) -> bool:
        return self.end == self.start


class DeadLetters:
    """Writer of the dead-letter topics, exactly once per source position.

    A DLQ record goes to partition ``p`` of ``<topic>.dlq`` for a message of partition ``p`` of ``<topic>``; its
    value is JSON::

        {"schema": 1, "reason": "...", "source": "pageviews", "topic": "...", "partition": 3, "offset": 1234,
         "timestamp_ms": ..., "key_b64": "..."|null, "value_b64": "..."|null, "value_bytes": 57,
         "value_truncated": false, "headers": [["name", "<base64>"], ...]}

    Records are written in source-offset order, so the last record of a DLQ partition names the highest source
    offset dead-lettered so far (the *high-water mark*); :meth:`load_high_water` reads it on start.
    """

    def __init__(self, settings: Settings, pipeline: Pipeline):
        self.settings = settings
        self.pipeline = pipeline
        self.high: dict[tuple[str, int], int] = {}  # (source topic, partition) -> highest offset dead-lettered
        self._producer = None
        self._failed: list = []  # errors of the records of the current send that were not delivered

    def load_high_water(self, partitions: dict[str, list[int]], timeout: float = 30.0) -> None:
        """Read the last record of every DLQ partition; check DLQ partitions match the source partitions."""
        from kafka import TopicPartition

        c = make_consumer(self.settings)
        try:
            for src in self.pipeline.sources:
                dlq_parts = c.partitions_for_topic(src.dlq_topic) or set()
                missing = [p for p in partitions.get(src.topic, []) if p not in dlq_parts]
                if missing:
                    raise DeadLetterError(f"dead-letter topic {src.dlq_topic!r} has partitions {sorted(dlq_parts)} "
                                          f"but source partitions {missing} need one each; add partitions to the "
                                          f"DLQ topic so it has at least as many as {src.topic!r}")
                tps = [TopicPartition(src.dlq_topic, p) for p in sorted(dlq_parts)]
                ends = c.end_offsets(tps) if tps else {}
                for tp in tps:
                    self.high[(src.topic, tp.partition)] = self._last_source_offset(c, tp, ends[tp], timeout)
        finally:
            c.close()

    @staticmethod
    def _last_source_offset(c, tp, end: int, timeout: float) -> int:
        if end == 0:
            return -1
        c.assign([tp])
        c.seek(tp, max(0, end - 16))  # a few records back, in case the tail holds control markers
        best = -1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            recs = c.poll(timeout_ms=500).get(tp, [])
            for r in recs:
                try:
                    best = max(best, int(orjson.loads(r.value)["offset"]))
                except (ValueError, KeyError, TypeError):
                    log.warning("DLQ record %s@%s is not an archiver record; ignored", tp, r.offset)
            if c.position(tp) >= end:
                return best
        raise DeadLetterError(f"could not read the tail of dead-letter partition {tp.topic}[{tp.partition}] "
                              f"within {timeout:.0f}s; is the broker healthy?")

    @property
    def producer(self):
        """The librdkafka producer of the dead letters (idempotent, acks=all;
        :func:`lambdalake.clients.producer_config`),
        opened on first use and again after :meth:`reset`."""
        if self._producer is None:
            try:
                self._producer = librdkafka_producer(self.settings, **{
                    "client.id": "lambdalake-archiver-dlq", "linger.ms": 5,
                    "delivery.report.only.error": True, "on_delivery": self._delivery_failed})
            except BrokerError as exc:  # the broker is away: the roll is retried like any failed send
                raise DeadLetterError(str(exc)) from exc
        return self._producer

    def _delivery_failed(self, err: object, msg: object) -> None:  # noqa: ARG002 (librdkafka's callback)
        self._failed.append(err)

    def send_range(self, buf: _Buffer) -> tuple[int, int]:
        """Steps 1 of the roll protocol for one buffer: send what is missing, flush, verify. (sent, skipped)."""
        from confluent_kafka import KafkaException

        src, p = buf.source, buf.partition
        high = self.high.get((src.topic, p), -1)
        todo = [(r, reason) for r, reason in buf.invalid if r.offset > high]
        if not todo:
            return 0, len(buf.invalid)
        producer = self.producer
        self._failed.clear()  # delivery reports of failed records only (delivery.report.only.error)
        try:
            for r, reason in todo:
                value = self.record_value(src, r, reason)
                headers = [("lambdalake.reason", reason[:200].encode())]
                while True:
                    try:
                        producer.produce(src.dlq_topic, value, r.key, partition=p, headers=headers)
                        break
                    except BufferError:  # the local queue is full: let the producer send some
                        producer.poll(0.05)
            left = producer.flush(FLUSH_TIMEOUT_S)
        except KafkaException as exc:
            raise DeadLetterError(f"dead-letter topic {src.dlq_topic!r} refused a record ({exc}); the master range "
                                  f"[{buf.start}, {buf.end}) of partition {p} was not written, rerun ingest") from exc
        if left:  # not acknowledged in time: no file gets written, the roll is retried or the run stops
            raise DeadLetterError(f"dead-letter topic {src.dlq_topic!r} did not acknowledge {left} of {len(todo)} "
                                  f"records within {FLUSH_TIMEOUT_S:.0f}s; the master range [{buf.start}, {buf.end}) "
                                  f"of partition {p} was not written, rerun ingest")
        if self._failed:
            raise DeadLetterError(f"dead-letter record for {src.topic}[{p}] was rejected: {self._failed[0]}; "
                                  f"the master range [{buf.start}, {buf.end}) was not written, rerun ingest")
        self.high[(src.topic, p)] = todo[-1][0].offset
        return len(todo), len(buf.invalid) - len(todo)

    @staticmethod
    def record_value(src: Source, r: Any, reason: str) -> bytes:
        value = r.value
        truncated = value is not None and len(value) > DLQ_MAX_ORIGINAL_BYTES
        kept = value[:DLQ_MAX_ORIGINAL_BYTES] if truncated else value
        return orjson.dumps({
            "schema": DLQ_SCHEMA, "reason": reason, "source": src.name, "topic": src.topic,
            "partition": r.partition, "offset": r.offset, "timestamp_ms": r.timestamp,
            "key_b64": None if r.key is None else base64.b64encode(r.key).decode(),
            "value_b64": None if kept is None else base64.b64encode(kept).decode(),
            "value_bytes": None if value is None else len(value), "value_truncated": truncated,
            "headers": [[k, None if v is None else base64.b64encode(v).decode()] for k, v in (r.headers or [])],
        })

    def reload_high_water(self, src: Source, partition: int, timeout: float = 15.0) -> None:
        """Re-read one DLQ partition's high-water mark from the broker (after a failed send)."""
        from kafka import TopicPartition

        try:
            c = make_consumer(self.settings)
        except BrokerError as exc:
            raise DeadLetterError(str(exc)) from exc
        try:
            tp = TopicPartition(src.dlq_topic, partition)
            try:
                end = c.end_offsets([tp], timeout_ms=int(timeout * 1000))[tp]
            except Exception as exc:  # KafkaTimeoutError while the broker is away
                raise DeadLetterError(f"cannot read the end of {src.dlq_topic}[{partition}]: {exc}") from exc
            self.high[(src.topic, partition)] = self._last_source_offset(c, tp, end, timeout)
        finally:
            c.close()

    def reset(self) -> None:
        """Drop the producer and whatever it still buffers (after a failed flush)."""
        if self._producer is not None:
            try:
                self._producer.purge()
                self._producer.flush(0)  # serve the purged records' delivery reports
            except Exception:  # noqa: BLE001 - it is being discarded
                pass
            self._producer = None

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None


def archiver_locks(layout: Layout) -> PartitionLocks:
    """The per-partition writer locks of one archiver worker (released by the OS if it dies)."""
    return PartitionLocks(layout, "archiver", lambda key, holder: ArchiverLocked(
        f"another archiver (pid {holder}) is writing partition {key[1]} of {key[0]!r} in {layout.home}; stop it "
        "first, or give each archiver worker its own partitions (--share I/N or --partitions)"))


class Archiver:
    """Kafka -> master dataset + DLQ, exactly once (see the module docstring for the protocol)."""

    POLL_S = 0.2
    POLL_RECORDS = 10_000
    MAX_DLQ_ATTEMPTS = 5
    MAX_BACKOFF_S = 30.0
    REFRESH_PARTITIONS_S = 30.0

    def __init__(self, settings: Settings, pipeline: Pipeline, policy: RollPolicy | None = None, *,
                 until_caught_up: bool = False, on_progress: Callable[[ArchiveReport], None] | None = None,
                 share: Share | None = None):
        self.settings = settings
        self.share = share or Share()
        self.pipeline = pipeline
        self.layout = Layout(settings.home)
        self.policy = policy or RollPolicy.from_env()
        self.until_caught_up = until_caught_up
        self.on_progress = on_progress
        self.report = ArchiveReport()
        self._stop = threading.Event()
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        self._targets: dict[tuple[str, int], int] = {}
        self._validators = {s.topic: Validator(s) for s in pipeline.sources}
        self._sources = {s.topic: s for s in pipeline.sources}
        self.group_id = f"lambdalake-archiver.{pipeline.name}"

    # control ------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the run loop to finish the current files and return (safe from a signal handler)."""
        self._stop.set()

    # the run --------------------------------------------------------------------------------------------------
    def run(self) -> ArchiveReport:
        """Archive until stopped (daemon) or until the end offsets seen at start (``until_caught_up``)."""
        from batch.compact import recover_compactions

        t0 = time.monotonic()
        with archiver_locks(self.layout) as self._locks, streaming_runtime():
            recover_compactions(self.layout, self.pipeline)
            ensure_topics(self.settings, self.pipeline)
            session = LogSession(connect(self.settings, group_id=self.group_id, client="librdkafka"),
                                 [s.topic for s in self.pipeline.sources], bootstrap=self.settings.bootstrap,
                                 reader="the archiver", lost_means="they are lost to the master dataset",
                                 notify=self._warn, share=self.share)
            dlq = DeadLetters(self.settings, self.pipeline)
            try:
                if self.until_caught_up:  # the end offsets seen at start (read before fetching starts)
                    self._targets = session.end_offsets(session.partitions())
                self._assign(session)
                dlq.load_high_water(self._partitions())
                self._loop(session, dlq)
                # SIGTERM or caught up: finish what is buffered (roll protocol), nothing is left behind
                for buf in list(self._buffers.values()):
                    self._roll(buf, session, dlq)
                session.commit({key: buf.start for key, buf in self._buffers.items()}, wait=True)
            finally:
                dlq.close()
                session.close()
        self.report.seconds = time.monotonic() - t0
        self.report.positions = {}
        for (topic, p), buf in sorted(self._buffers.items()):
            self.report.positions.setdefault(self._sources[topic].name, {})[p] = buf.end
        return self.report

    def _partitions(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for topic, p in sorted(self._buffers):
            out.setdefault(topic, []).append(p)
        return out

    def _warn(self, msg: str) -> None:
        log.error(msg)
        self.report.warnings.append(msg)

    def _assign(self, session: LogSession) -> list:
        """Assign every partition of every source topic, each at the end of its master files (new partitions: at
        the end of their files on disk, or the log start). Returns the partitions new to this run."""
        keys = session.partitions()
        new = [k for k in keys if k not in self._buffers]
        if not new:
            return []
        # Own them first; only then clean up after a crashed writer of these partitions (never another worker's).
        self._locks.acquire(new)
        remove_temp_files(self.layout, self.pipeline.sources, new)
        remove_uncommitted_rejected(self.layout, self.pipeline.sources, new)
        archived = {s.topic: archived_positions(self.layout, s.name) for s in self.pipeline.sources
                    if any(t == s.topic for t, _ in new)}
        wanted = {k: b.end for k, b in self._buffers.items()}
        wanted.update({(t, p): archived[t][p] for t, p in new if p in archived[t]})
        starts = session.assign(wanted, partitions=keys)
        for key in new:
            # The files must tile the offsets: a range deleted by retention is covered by the first file (empty).
            self._buffers[key] = _Buffer(self._sources[key[0]], key[1], wanted.get(key, starts[key]))
        return new

    def _loop(self, session: LogSession, dlq: DeadLetters) -> None:
        last_refresh = time.monotonic()
        last_progress = 0.0
        while not self._stop.is_set():
            if self.until_caught_up and self._caught_up(session):
                return
            runs = session.poll(self.POLL_S, self.POLL_RECORDS)
            now_us = time.time_ns() // 1000
            for key, offsets, values, records in runs:
                buf = self._buffers[key]
                i = 0
                while i < len(offsets):
                    i = self._append(buf, offsets, values, records, i, now_us, session)
                    if self._full(buf):
                        self._roll(buf, session, dlq)
            now = time.monotonic()
            for buf in self._buffers.values():
                if not buf.empty and now - buf.opened >= self.policy.max_seconds:
                    self._roll(buf, session, dlq)
            if not self.until_caught_up and now - last_refresh >= self.REFRESH_PARTITIONS_S:
                last_refresh = now
                if session.new_partitions():
                    for topic, p in self._assign(session):  # partitions added to a topic while running
                        dlq.reload_high_water(self._sources[topic], p)
                    dlq.close()  # its producer knows the old DLQ partitions only: the next roll opens a new one
            if self.on_progress is not None and now - last_progress >= 0.5:
                last_progress = now
                self.on_progress(self.report)

    def _caught_up(self, session: LogSession) -> bool:
        done = True
        for key, target in self._targets.items():
            buf = self._buffers[key]
            if buf.end >= target:
                continue
            if session.reached(key, target):
                buf.end = target  # only control markers / compacted-away offsets remain before the target
                continue
            done = False
        return done

    def _append(self, buf: _Buffer, offsets: list[int], values: list, records: list, i: int, now_us: int,
                session: LogSession) -> int:
        """Validate and buffer one polled run of the buffer's partition from index ``i`` until the buffer is full;
        returns the index to continue from. The per-message work is the validator plus a few list operations."""
        validate = self._validators[buf.source.topic]
        key = (buf.source.topic, buf.partition)
        n = stop = len(offsets)
        target = self._targets.get(key) if self.until_caught_up else None
        if target is not None and offsets[-1] >= target:
            stop = bisect_left(offsets, target, i)  # records from the target on are the next run's
        room = self.policy.max_rows - len(buf.offsets)
        max_bytes = self.policy.max_bytes
        appenders, keep_offset, invalid = buf.appenders, buf.offsets.append, buf.invalid
        end, nbytes, first, rejected = buf.end, buf.nbytes, i, 0
        while i < stop:
            offset = offsets[i]
            value = values[i]
            i += 1
            if offset < end:
                raise InvariantViolation(f"{key[0]}[{key[1]}]: consumer returned offset {offset} below the archived "
                                         f"position {end}; refusing to write it twice")
            verdict = validate(value)
            if verdict.ok:
                rec = verdict.record
                for name, append in appenders:
                    append(rec[name])
                keep_offset(offset)
                room -= 1
            else:
                invalid.append((session.record(records[i - 1]), verdict.reason))
                rejected += 1
            if value is not None:
                nbytes += len(value)
            end = offset + 1
            if room <= 0 or nbytes >= max_bytes:
                break
        buf.end, buf.nbytes = end, nbytes
        done = i - first
        buf.ingest += [now_us] * (done - rejected)
        report = self.report
        report.messages += done
        report.valid += done - rejected
        report.invalid += rejected
        if i == stop < n:
            session.pause(key)  # caught up on this partition; later records are the next run's
            buf.end = max(end, target)  # offsets skipped before the target held no records
            return n
        return i

    def _full(self, buf: _Buffer) -> bool:
        return buf.rows >= self.policy.max_rows or buf.nbytes >= self.policy.max_bytes

    def _roll(self, buf: _Buffer, session: LogSession, dlq: DeadLetters) -> None:
        """Turn the buffer into one master file (the numbered roll protocol in the module docstring)."""
        if buf.empty:
            return
        src, p = buf.source, buf.partition
        # 1. dead-letter the invalid messages of [start, end) not yet in the DLQ; flush; verify acks
        sent, skipped = self._send_dead_letters(buf, dlq)
        self.report.dead_lettered += sent
        self.report.dlq_skipped += skipped
        if buf.invalid:
            rejected = rejected_table(src, p, [r.offset for r, _ in buf.invalid], [r.value for r, _ in buf.invalid],
                                      [reason for _, reason in buf.invalid], time.time_ns() // 1000)
            write_parquet_atomic(rejected, self.layout.rejected_file(src.name, p, buf.start, buf.end),
                                 overwrite=True)
        # 2 + 3. temp file + fsync, then rename to the final name (the commit point) + fsync dir
        final = self.layout.master_file(src.name, p, buf.start, buf.end)
        table = master_table(src, buf.columns, p, buf.offsets, buf.ingest)
        self.report.bytes += write_parquet_atomic(table, final)
        self.report.files += 1
        log.info("archived %s rows of %s[%s] offsets [%s, %s) -> %s", buf.rows, src.topic, p, buf.start, buf.end,
                 final.name)
        # 4. advance; tell Kafka for lag monitoring only (never read back)
        end = buf.end
        buf.reset(end)
        session.commit({(src.topic, p): end})

    def _send_dead_letters(self, buf: _Buffer, dlq: DeadLetters) -> tuple[int, int]:
        """Step 1 with retries: after a failure the producer is dropped and the partition's DLQ high-water mark is
        re-read from the broker (exactly what a restart does), so a retry never duplicates a DLQ record.

        A daemon retries with backoff (the broker may be restarting); ``--until-caught-up`` and a stopping daemon
        give up after a few attempts with a :class:`DeadLetterError` (no file written; rerun resumes).
        """
        attempt = 0
        while True:
            try:
                if attempt:
                    dlq.reload_high_water(buf.source, buf.partition)
                return dlq.send_range(buf)
            except DeadLetterError as exc:
                attempt += 1
                if attempt >= self.MAX_DLQ_ATTEMPTS and (self.until_caught_up or self._stop.is_set()):
                    raise
                delay = min(self.MAX_BACKOFF_S, 0.5 * 2 ** attempt)
                log.warning("dead-letter write failed (%s); retrying in %.1fs (attempt %d)", exc, delay, attempt)
                dlq.reset()
                time.sleep(delay)


def ingest(settings: Settings, pipeline: Pipeline, *, until_caught_up: bool = False,
           policy: RollPolicy | None = None, handle_signals: bool = False,
           on_progress: Callable[[ArchiveReport], None] | None = None, share: Share | None = None) -> ArchiveReport:
    """Run the archiver once (importable entry point for the CLI, Airflow and the demo); ``share``: this worker's
    partitions (default all)."""
    archiver = Archiver(settings, pipeline, policy, until_caught_up=until_caught_up, on_progress=on_progress,
                        share=share)
    if not handle_signals:
        return archiver.run()
    with stop_on_signals(archiver.stop):
        return archiver.run()


def ingest_workers(settings: Settings, pipeline: Pipeline, workers: int, *, until_caught_up: bool = False,
                   policy: RollPolicy | None = None) -> ArchiveReport:
    """Run ``workers`` archiver processes with shares ``0/N .. N-1/N`` until they all return; one report.

    SIGTERM/SIGINT to this process are passed on to the workers, which finish their files and exit. If a worker
    fails, the others are stopped too and the first error is raised.
    """
    from lambdalake.procs import run_workers

    t0 = time.monotonic()
    reports = run_workers(_ingest_share, [(settings, pipeline, share, until_caught_up, policy)
                                          for share in Share.split(workers)])
    return merge_reports(reports, time.monotonic() - t0)


def _ingest_share(settings: Settings, pipeline: Pipeline, share: Share, until_caught_up: bool,
                  policy: RollPolicy | None) -> ArchiveReport:
    return ingest(settings, pipeline, until_caught_up=until_caught_up, policy=policy, handle_signals=True,
                  share=share)


def merge_reports(reports: list[ArchiveReport], seconds: float) -> ArchiveReport:
    """The workers' reports as one (their partitions are disjoint)."""
    out = ArchiveReport(seconds=seconds)
    for r in reports:
        for name in ("messages", "valid", "invalid", "dead_lettered", "dlq_skipped", "files", "bytes"):
            setattr(out, name, getattr(out, name) + getattr(r, name))
        for src, parts in r.positions.items():
            out.positions.setdefault(src, {}).update(parts)
        out.warnings.extend(r.warnings)
    return out
