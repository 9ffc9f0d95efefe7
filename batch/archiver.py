"""The archiver (``lambdalake ingest``): every message of every source topic lands exactly once either in the
master dataset (valid) or in the dead-letter topic (invalid).

Positions come from the master dataset itself: on start the archiver asks :func:`lambdalake.layout.archived_positions`
where each partition's files end and seeks there. Kafka's committed group offsets are written after each file, for
lag monitoring only, and never read. It reads the log with librdkafka (confluent-kafka) through the one log session
of every reader (:mod:`lambdalake.session`); dead letters are written with a librdkafka producer too
(:func:`lambdalake.clients.librdkafka_producer`).

Per partition the archiver buffers consumed messages; the buffer covers the contiguous offsets ``[start, end)``
(valid *and* invalid ones, so the files tile the offset space without gaps). A buffer is *rolled* into a file when
it reaches ``max_rows`` rows, ``max_bytes`` message bytes or ``max_seconds`` of age
(:class:`batch.partition_buffer.RollPolicy`), and when the archiver stops.

Roll protocol (one file, :meth:`Archiver._roll`; docs/design.md, "Master heads") — the swap of the partition's
head in step 3 is the commit point:

1. Dead-letter the range's invalid messages that the DLQ does not hold yet (source offset above the partition's
   DLQ high-water mark) in one Kafka transaction of the partition's fenced producer, and commit it. A failure
   stops here: nothing written, and a restart re-reads the range. Then put the range's *rejected file*
   (:mod:`batch.master`) under a name no other writer uses.
2. Put the valid rows as one master file under a name no other writer uses.
3. Swap the partition's head (:class:`lambdalake.heads.PartitionHead`) to one that lists both files.
4. Advance the in-memory position and DLQ high-water mark; commit ``end`` to Kafka (monitoring only).

A crash (kill -9) before step 3 leaves files no head lists (garbage, deleted by the next claim): the restart
re-reads ``[start, end)`` and step 1 skips the invalid messages already dead-lettered, because the DLQ high-water
mark is re-read from the last committed record of the DLQ partition after its producer fenced every earlier one
(:class:`batch.dead_letters.DeadLetters`). A crash after step 3 resumes at ``end``. Hence: no gap, no duplicate row,
no duplicate DLQ record. Before archiving a partition the archiver claims its head (a new epoch): an earlier writer
of it that still runs loses its next swap and stops (:class:`lambdalake.heads.Fenced`).

Workers: every step above is per partition (files, DLQ partition ``p`` for source partition ``p``, high-water marks,
the head), so the archiver scales out by partition. A daemon (``lambdalake ingest`` without ``--until-caught-up``,
``--share`` or ``--partitions``) is a member of the consumer group ``lambdalake-archiver.<pipeline>.<lake tag>``
(:meth:`lambdalake.config.Settings.group_id`): Kafka assigns it partitions, and moves them when a member joins,
leaves or dies (cooperative rebalancing: only the partitions that must move). On assignment it claims each
partition's head; on revocation it finishes the partition's roll first (bounded: a roll that cannot finish is left
to the next owner); a lost partition (this member missed its session) is dropped unwritten. Start as many daemons as
you like, on as many machines. ``--until-caught-up`` runs and ``--share i/N`` / ``--partitions`` pin partitions
statically, each held with ``checkpoints/archiver/partitions/<topic>-<p>.lock`` on this machine. Whatever the
assignment says, a writer whose head epoch is no longer the partition's cannot list anything there: it stops
archiving the partition (:class:`lambdalake.heads.Fenced`). """

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field

from batch.dead_letters import DeadLetters
from batch.exceptions import ArchiverLocked, DeadLetterError
from batch.master import master_table, parquet_bytes, rejected_table, remove_temp_files
from batch.partition_buffer import PartitionBuffer, RollPolicy
from lambdalake.clients import ensure_topics
from lambdalake.config import Settings
from lambdalake.exceptions import ConfigError, InvariantViolation, LambdalakeError
from lambdalake.heads import Fenced, HeadFile, PartitionHead, file_key, writer_id
from lambdalake.layout import Layout
from lambdalake.locks import group_presence
from lambdalake.ownership import PartitionLocks, Share
from lambdalake.pipeline import Pipeline
from lambdalake.runtime import streaming_runtime
from lambdalake.session import LogSession, connect, stop_on_signals
from lambdalake.validation import Validator

log = logging.getLogger(__name__)

# A group member: cooperative rebalancing (a rebalance moves only the partitions that must move), and a session short
# enough that a dead member's partitions move within seconds (the broker's minimum is 6 s by default).
GROUP_CONFIG = {"partition.assignment.strategy": "cooperative-sticky", "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 1500, "max.poll.interval.ms": 300_000}


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
    HANDOVER_S = 120.0  # a revocation's last rolls get this long in all (librdkafka's max.poll.interval.ms: 300 s)
    MAX_BACKOFF_S = 30.0
    REFRESH_PARTITIONS_S = 30.0

    def __init__(self, settings: Settings, pipeline: Pipeline, policy: RollPolicy | None = None, *,
                 until_caught_up: bool = False, on_progress: Callable[[ArchiveReport], None] | None = None,
                 share: Share | None = None, group: bool = False):
        if group and (until_caught_up or not (share or Share()).everything):
            raise ConfigError("group membership is for a daemon taking what the group assigns: not with "
                              "--until-caught-up, --share or --partitions (those pin partitions statically)")
        self.group = group
        self.settings = settings
        self.share = share or Share()
        self.pipeline = pipeline
        self.layout = Layout.of(settings.home, settings.lake)
        self.policy = policy or RollPolicy.from_env()
        self.until_caught_up = until_caught_up
        self.on_progress = on_progress
        self.report = ArchiveReport()
        self._stop = threading.Event()
        self._buffers: dict[tuple[str, int], PartitionBuffer] = {}
        self._targets: dict[tuple[str, int], int] = {}
        self._validators = {s.topic: Validator(s) for s in pipeline.sources}
        self._sources = {s.topic: s for s in pipeline.sources}
        self.group_id = settings.group_id("archiver", pipeline.name)
        self.writer = writer_id()
        self._heads: dict[tuple[str, int], PartitionHead] = {}
        self._fenced: set[tuple[str, int]] = set()  # partitions another writer claimed since this one did
        self._handing_over = False  # inside a revoke: a roll gives up instead of retrying for ever
        self._handover_deadline = 0.0  # when a revocation's last rolls must be done (HANDOVER_S)

    # control ------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the run loop to finish the current files and return (safe from a signal handler)."""
        self._stop.set()

    # the run --------------------------------------------------------------------------------------------------
    def run(self) -> ArchiveReport:
        """Archive until stopped (daemon) or until the end offsets seen at start (``until_caught_up``)."""
        from batch.compact import recover_compactions

        t0 = time.monotonic()
        with archiver_locks(self.layout) as self._locks, self._group_presence(), streaming_runtime():
            recover_compactions(self.layout, self.pipeline)
            ensure_topics(self.settings, self.pipeline)
            session = LogSession(connect(self.settings, group_id=self.group_id, client="librdkafka",
                                         **(GROUP_CONFIG if self.group else {})),
                                 [s.topic for s in self.pipeline.sources], bootstrap=self.settings.bootstrap,
                                 reader="the archiver", lost_means="they are lost to the master dataset",
                                 notify=self._warn, share=self.share)
            dlq = DeadLetters(self.settings, self.pipeline)
            try:
                if self.until_caught_up:  # the end offsets seen at start (read before fetching starts)
                    self._targets = session.end_offsets(session.partitions())
                if self.group:  # the group assigns partitions from the first poll on (module docstring)
                    session.subscribe(lambda keys: self._assigned(session, dlq, keys),
                                      lambda keys: self._revoked(session, dlq, keys), self._lost)
                else:
                    self._assign(session)
                    dlq.load_high_water(self._partitions())
                self._loop(session, dlq)
                # SIGTERM or caught up: finish what is buffered (roll protocol), nothing is left behind
                for buf in list(self._buffers.values()):
                    self._roll(buf, session, dlq)
                session.commit({key: buf.start for key, buf in self._buffers.items()}, wait=True)
                self.report.positions = {}
                for (topic, p), buf in sorted(self._buffers.items()):
                    self.report.positions.setdefault(self._sources[topic].name, {})[p] = buf.end
            finally:
                dlq.close()
                session.close()  # a group member leaves its group here (its partitions go to the others at once)
        self.report.seconds = time.monotonic() - t0
        return self.report

    def _group_presence(self):
        """Group members hold ``checkpoints/archiver/group.lock`` shared while they run; a pinned run (Airflow's
        catch-up, ``--share``) refuses to start next to them with :class:`ArchiverLocked` (the DAG then waits for
        the members to catch up): its claims would fence them from their own partitions."""
        return group_presence(self.layout.checkpoints("archiver") / "group.lock", self.group,
                              "the archiver group lock", lambda: ArchiverLocked(
                                  f"archiver daemons (members of the group {self.group_id}) run on "
                                  f"{self.layout.home}; a pinned run would take their partitions from them: stop "
                                  "them first, or let them archive"))

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
        keys = [k for k in session.partitions() if k not in self._fenced]
        new = [k for k in keys if k not in self._buffers]
        if not new:
            return []
        # Own them first (lock, then a new epoch in each head); only then clean up after a crashed writer of these
        # partitions (never another worker's).
        self._locks.acquire(new)
        remove_temp_files(self.layout, self.pipeline.sources, new)
        for topic, p in new:
            self._heads[(topic, p)] = PartitionHead.claim(self.layout, self._sources[topic].name, p, self.writer)
        wanted = {k: b.end for k, b in self._buffers.items()}
        wanted.update({k: self._heads[k].end for k in new if self._heads[k].end is not None})
        starts = session.assign(wanted, partitions=keys)
        for key in new:
            # The files must tile the offsets: a range deleted by retention is covered by the first file (empty).
            self._buffers[key] = PartitionBuffer(self._sources[key[0]], key[1], wanted.get(key, starts[key]))
        return new

    # group membership -------------------------------------------------------------------------------------------
    def _assigned(self, session: LogSession, dlq: DeadLetters, keys: list[tuple[str, int]]) -> dict:
        """The group gave this member ``keys``: claim each head (a new epoch fences the previous owner, whatever it
        still runs), read the DLQ high-water mark, start at the head's end."""
        remove_temp_files(self.layout, self.pipeline.sources, keys)
        for key in keys:
            self._fenced.discard(key)
            self._heads[key] = PartitionHead.claim(self.layout, self._sources[key[0]].name, key[1], self.writer)
        starts = session.starts(keys, {k: self._heads[k].end for k in keys if self._heads[k].end is not None})
        for key in keys:
            self._buffers[key] = PartitionBuffer(self._sources[key[0]], key[1], starts[key])
        by_topic: dict[str, list[int]] = {}
        for topic, p in keys:
            by_topic.setdefault(topic, []).append(p)
        dlq.load_high_water(by_topic)  # one short read of the DLQ tails for all of them
        dlq.claimed(keys, self._sources)  # fences every earlier writer of their dead letters (batch.dead_letters)
        log.info("assigned %s", ", ".join(f"{t}[{p}]@{starts[(t, p)]}" for t, p in sorted(keys)))
        return starts

    def _revoked(self, session: LogSession, dlq: DeadLetters, keys: list[tuple[str, int]]) -> None:
        """Hand ``keys`` over: finish each one's roll (bounded: a roll that cannot finish is left to the next
        owner, which reads its range again), then forget it."""
        self._handing_over = True
        self._handover_deadline = time.monotonic() + self.HANDOVER_S
        try:
            for key in keys:
                buf = self._buffers.get(key)
                if buf is not None and key not in self._fenced:
                    try:
                        self._roll(buf, session, dlq)
                    except (LambdalakeError, OSError) as exc:
                        self._warn(f"handing over {key[0]}[{key[1]}]: its last roll did not finish ({exc}); the "
                                   "next owner archives that range")
                self._forget(key)
        finally:
            self._handing_over = False
        log.info("revoked %s", ", ".join(f"{t}[{p}]" for t, p in sorted(keys)))

    def _lost(self, keys: list[tuple[str, int]]) -> None:
        """``keys`` already belong to another member (this one missed its session): drop them unwritten."""
        for key in keys:
            self._forget(key)
        self._warn(f"lost {', '.join(f'{t}[{p}]' for t, p in sorted(keys))} to another archiver (this one was "
                   "out of its group's session); their buffered messages are the new owner's to archive")

    def _forget(self, key: tuple[str, int]) -> None:
        self._buffers.pop(key, None)
        self._heads.pop(key, None)
        self._fenced.discard(key)

    def _loop(self, session: LogSession, dlq: DeadLetters) -> None:
        last_refresh = time.monotonic()
        last_progress = 0.0
        while not self._stop.is_set():
            if self.until_caught_up and self._caught_up(session):
                return
            runs = session.poll(self.POLL_S, self.POLL_RECORDS)
            now_us = time.time_ns() // 1000
            for key, offsets, values, records in runs:
                buf = self._buffers.get(key)
                if buf is None:  # fenced since this poll's fetch
                    continue
                i = 0
                while i < len(offsets) and key not in self._fenced:
                    i = self._append(buf, offsets, values, records, i, now_us, session)
                    if self._full(buf):
                        self._roll(buf, session, dlq)
            now = time.monotonic()
            for buf in list(self._buffers.values()):
                if not buf.empty and now - buf.opened >= self.policy.max_seconds:
                    self._roll(buf, session, dlq)
            if not self.until_caught_up and not self.group and now - last_refresh >= self.REFRESH_PARTITIONS_S:
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
            buf = self._buffers.get(key)
            if buf is None:  # fenced: no longer this archiver's to finish
                continue
            if buf.end >= target:
                continue
            if session.reached(key, target):
                buf.end = target  # only control markers / compacted-away offsets remain before the target
                continue
            done = False
        return done

    def _append(self, buf: PartitionBuffer, offsets: list[int], values: list, records: list, i: int, now_us: int,
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

    def _full(self, buf: PartitionBuffer) -> bool:
        return buf.rows >= self.policy.max_rows or buf.nbytes >= self.policy.max_bytes

    def _roll(self, buf: PartitionBuffer, session: LogSession, dlq: DeadLetters) -> None:
        """Turn the buffer into one master file (the numbered roll protocol in the module docstring)."""
        if buf.empty:
            return
        src, p = buf.source, buf.partition
        head = self._heads[(src.topic, p)]
        # 1. dead-letter the invalid messages of [start, end) not yet in the DLQ, in one transaction (not if this
        # writer is fenced already: the new owner dead-letters them; fenced meanwhile, its commit fails)
        if buf.invalid:
            try:
                head.check_epoch()
            except Fenced as exc:
                self._drop(session, (src.topic, p), exc)
                return
        try:
            sent, skipped = self._send_dead_letters(buf, dlq)
        except Fenced as exc:  # a newer writer initialised the partition's dead-letter transactions
            self._drop(session, (src.topic, p), exc)
            return
        self.report.dead_lettered += sent
        self.report.dlq_skipped += skipped
        rejected = None
        if buf.invalid:
            table = rejected_table(src, p, [r.offset for r, _ in buf.invalid], [r.value for r, _ in buf.invalid],
                                   [reason for _, reason in buf.invalid], time.time_ns() // 1000)
            rejected = self._put("rejected", head, buf, table)
        # 2. the valid rows under a name no other writer uses
        master = self._put("master", head, buf, master_table(src, buf.columns, p, buf.offsets, buf.ingest))
        # 3. the head lists them: the commit point (Fenced if another writer claimed the partition since)
        try:
            head.commit(buf.start, buf.end, master, rejected)
        except Fenced as exc:
            self._drop(session, (src.topic, p), exc)
            return
        self.report.bytes += master.bytes or 0
        self.report.files += 1
        log.info("archived %s rows of %s[%s] offsets [%s, %s) -> %s", buf.rows, src.topic, p, buf.start, buf.end,
                 master.name)
        # 4. advance; tell Kafka for lag monitoring only (never read back)
        end = buf.end
        buf.reset(end)
        session.commit({(src.topic, p): end})

    def _drop(self, session: LogSession, key: tuple[str, int], exc: Fenced) -> None:
        """Stop archiving a partition another writer claimed: its buffer is that writer's to read again."""
        self._warn(f"stopped archiving {key[0]}[{key[1]}]: {exc}")
        self._fenced.add(key)
        self._buffers.pop(key, None)
        self._heads.pop(key, None)
        session.pause(key)

    def _put(self, dataset: str, head: PartitionHead, buf: PartitionBuffer, table) -> HeadFile:
        """Steps 1-2: one file of the roll, whole, under a new name of this writer's epoch."""
        name = head.new_name(buf.start, buf.end)
        data = parquet_bytes(table)
        self.layout.store.put(file_key(dataset, buf.source.name, buf.partition, name), data)
        return HeadFile(name=name, start=buf.start, end=buf.end, rows=table.num_rows, bytes=len(data))

    def _send_dead_letters(self, buf: PartitionBuffer, dlq: DeadLetters) -> tuple[int, int]:
        """Step 1 with retries: after a failure the producer is dropped and the partition's DLQ high-water mark is
        re-read from the broker (exactly what a restart does), so a retry never duplicates a DLQ record.

        A daemon retries with backoff (the broker may be restarting); ``--until-caught-up`` and a stopping daemon
        give up after a few attempts with a :class:`DeadLetterError` (no file written; rerun resumes); a member
        handing partitions over tries once, within what is left of :attr:`HANDOVER_S` (the next owner reads the
        range again).
        """
        attempt = 0
        while True:
            try:
                if attempt:
                    dlq.reload_high_water(buf.source, buf.partition)
                if not self._handing_over:
                    return dlq.send_range(buf)
                left = self._handover_deadline - time.monotonic()
                if left <= 0:
                    raise DeadLetterError("out of time to hand the partition over")
                return dlq.send_range(buf, timeout=left)
            except DeadLetterError as exc:
                attempt += 1
                if self._handing_over or attempt >= self.MAX_DLQ_ATTEMPTS and (self.until_caught_up
                                                                               or self._stop.is_set()):
                    raise
                delay = min(self.MAX_BACKOFF_S, 0.5 * 2 ** attempt)
                log.warning("dead-letter write failed (%s); retrying in %.1fs (attempt %d)", exc, delay, attempt)
                dlq.reset()
                time.sleep(delay)


def ingest(settings: Settings, pipeline: Pipeline, *, until_caught_up: bool = False,
           policy: RollPolicy | None = None, handle_signals: bool = False,
           on_progress: Callable[[ArchiveReport], None] | None = None, share: Share | None = None,
           group: bool = False) -> ArchiveReport:
    """Run the archiver once (importable entry point for the CLI, Airflow and the demo); ``share``: this worker's
    partitions (default all); ``group``: take the partitions the archivers' consumer group assigns instead."""
    archiver = Archiver(settings, pipeline, policy, until_caught_up=until_caught_up, on_progress=on_progress,
                        share=share, group=group)
    if not handle_signals:
        return archiver.run()
    with stop_on_signals(archiver.stop):
        return archiver.run()

