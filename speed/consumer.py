"""The speed layer's run loop (``lambdalake speed``).

Per message of every source topic, in offset order per partition:

1. validate (:class:`lambdalake.validation.Validator`; invalid messages are counted — the archiver owns the DLQ);
2. dedup with the partition's :class:`lambdalake.dedup.DedupWindow` (first occurrence wins);
3. if the offset is at or above the partition's handed-off watermark, update every view of the source in the
   open block ``(partition, block_start)`` (:mod:`speed.state`); below it only the dedup window is filled.

Every ``checkpoint_interval`` seconds (and at shutdown) the state is checkpointed and published
(:mod:`speed.capture`, :mod:`speed.checkpoint`). Published batch versions are watched between polls and pruned as
soon as they are visible (:mod:`speed.batch_watch`, :mod:`speed.prune`).

Where it starts: from the last checkpoint's positions, or without one just below the published batch version's
watermark, or from the beginning of the log (:mod:`speed.recovery`).

Definitions change: the checkpoint records the fingerprint of every view's rows. Views whose declared definition
differs (or that are new) are rebuilt by replaying the log (:mod:`speed.rebuild`, :mod:`speed.changed_views`) while
the others continue; views no longer declared are dropped. The pipeline file is re-read when it changes (every
``pipeline_check_interval`` seconds), so an edit applies without a restart (:func:`speed.live.apply_pipeline`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from lambdalake.config import Settings, fix_handoff_block
from lambdalake.contracts import Positions
from lambdalake.dedup import DedupWindow
from lambdalake.erasure import ErasureWatch
from lambdalake.exceptions import LambdalakeError
from lambdalake.layout import Layout
from lambdalake.ownership import Share
from lambdalake.pipeline import Pipeline
from lambdalake.runtime import streaming_runtime
from lambdalake.session import LogSession, connect, stop_on_signals
from lambdalake.validation import Validator
from speed import group
from speed.batch_watch import NO_BATCH, BatchVersion, BatchWatcher
from speed.broker_watch import BrokerWatch
from speed.capture import capture
from speed.changed_views import KeptRows, rebuild_step
from speed.checkpoint import TP, Checkpoint, CheckpointStore
from speed.exceptions import CheckpointFailed, SpeedConfigError
from speed.live import PipelineWatch, apply_pipeline
from speed.partitions import OwnedPartitions
from speed.prune import hand_off_to
from speed.rebuild import Rebuild
from speed.recovery import recover
from speed.state import SourceState, apply_records, build_states

log = logging.getLogger(__name__)

REMOTE_ERASURE_POLL_S = 5.0  # how often a speed worker of an object-storage lake lists the forget requests

MIN_EXACT_DEDUP = 10_000  # the floor: at least the last 10,000 offsets of a partition dedup exactly


@dataclass
class SpeedOptions:
    """Knobs of ``lambdalake speed`` (CLI options map 1:1)."""

    checkpoint_interval: float = 0.25
    dedup_span: int = 100_000
    keep_snapshots: int = 20
    keep_snapshot_seconds: float = 5.0
    broker_timeout: float = 120.0
    group_id: str | None = None
    poll_timeout_ms: int = 100
    max_records: int = 20_000
    batch_check_interval: float = 0.1
    pipeline_check_interval: float = 2.0  # how often the pipeline file's mtime is checked (changes apply live)
    partition_check_interval: float = 30.0
    background_commit: bool = True  # steps 2-8 of a checkpoint overlap with consuming
    share: Share = field(default_factory=Share)  # the partitions this worker owns (lambdalake.ownership)
    group: bool = False  # a member of the speed workers' consumer group instead (speed.group)
    worker_name: str = ""  # a group member's name (views/speed/workers/<name>); "": the first free (speed.group)

    def validate(self) -> None:
        if not 0.001 <= self.checkpoint_interval <= 1.0:
            raise SpeedConfigError(f"--checkpoint-interval {self.checkpoint_interval} must be between 0.001 and 1 "
                                   "second (the state is persisted at least every second)")
        if self.dedup_span < MIN_EXACT_DEDUP:
            raise SpeedConfigError(f"--dedup-span {self.dedup_span} must be >= {MIN_EXACT_DEDUP} offsets")
        if self.keep_snapshots < 1:
            raise SpeedConfigError(f"--keep-snapshots {self.keep_snapshots} must be >= 1")
        if self.broker_timeout < 0:
            raise SpeedConfigError(f"--broker-timeout {self.broker_timeout} must be >= 0")
        if self.group and not self.share.everything:
            raise SpeedConfigError("a group member takes what the group assigns: not with --share or --partitions")


@dataclass
class Stats:
    """Live numbers for progress display and the exit summary."""

    started: float = field(default_factory=time.monotonic)
    messages: int = 0
    checkpoints: int = 0
    last_checkpoint_seconds: float = 0.0
    pruned_rows: int = 0
    caught_up: bool = False

    def rate(self) -> float:
        return self.messages / max(1e-9, time.monotonic() - self.started)


class SpeedLayer:
    """One running speed layer over one lake. ``run()`` blocks until stopped (signal, :meth:`stop`) or caught up.

    It holds the live state (positions, ``pruned_to``, dedup windows, views, counters, views being rebuilt) and runs
    the loop; :mod:`speed.recovery`, :mod:`speed.capture`, :mod:`speed.prune`, :mod:`speed.changed_views` and
    :mod:`speed.live` work on that state, :mod:`speed.partitions` and :mod:`speed.broker_watch` beside it.
    """

    def __init__(self, settings: Settings, pipeline: Pipeline, options: SpeedOptions | None = None,
                 notify: Callable[[str], None] | None = None):
        self.settings = settings
        self.pipeline = pipeline
        self.options = options or SpeedOptions()
        self.options.validate()
        self.block = settings.handoff_block
        self.share = self.options.share
        fix_handoff_block(settings.home, self.block, settings.lake)  # batch and speed agree on it for the lake's life
        root = Layout.of(settings.home, settings.lake)
        if self.options.group:  # a member's name, its checkpoint lock already held (speed.group.member)
            self.worker, self.layout, self.store = group.member(root, pipeline, self.options)
        else:
            self.worker = self.share.worker
            self.layout = root.for_speed_worker(self.worker)  # its snapshots, checkpoints
            self.store = CheckpointStore(self.layout, pipeline, keep_snapshots=self.options.keep_snapshots,
                                         keep_snapshot_seconds=self.options.keep_snapshot_seconds)
        self.owned = OwnedPartitions(settings.home, self.layout)
        self.notify = notify or (lambda msg: log.warning("%s", msg))
        self.group_id = self.options.group_id or (settings.group_id("speed", pipeline.name) if self.options.group
                                                  else f"lambdalake-speed-{pipeline.name}")
        self.sources = {s.topic: s for s in pipeline.sources}
        self.validators = {s.topic: Validator(s) for s in pipeline.sources}
        self.fingerprints = pipeline.fingerprints
        self.states: dict[str, SourceState] = build_states(pipeline, self.block)
        # Views whose rows are not (yet) of their declared definition: {name: (fingerprint of the kept rows or "",
        # the kept rows or None)}, rebuilt by self.rebuild (speed.rebuild).
        self.frozen: dict[str, KeptRows] = {}
        self.rebuild: Rebuild | None = None
        self.positions: dict[TP, int] = {}
        self.pruned_to: dict[TP, int] = {}
        self.windows: dict[TP, DedupWindow] = {}
        self.new_ids: dict[TP, list[tuple[int, str]]] = {}
        self.counters: dict[str, dict[str, int]] = {t: {"valid": 0, "invalid": 0, "duplicates": 0}
                                                    for t in self.sources}
        self.batch: BatchVersion = NO_BATCH
        self.last: Checkpoint | None = None
        self.stats = Stats()
        self._stop = threading.Event()
        self.dirty = True
        self.session: LogSession | None = None
        self.seq = 0
        self._partitions_checked = time.monotonic()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speed-commit")
        self._inflight: Future[Checkpoint] | None = None
        self._inflight_t0 = 0.0
        self.full_dedup = False  # set when the windows were rebuilt: the next checkpoint writes them whole
        self.broker = BrokerWatch(settings, self.notify)
        self.pipeline_watch = PipelineWatch(settings.pipeline)
        # forgotten subjects: skipped, their views rebuilt (on object storage looked for every 5 s: one LIST each)
        self.erasures = ErasureWatch(self.layout, pipeline, 1.0 if settings.lake == "" else REMOTE_ERASURE_POLL_S)

    # lifecycle ----------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the run loop to write a final checkpoint and return (thread-safe, signal-safe)."""
        self._stop.set()

    def run(self, until_caught_up: bool = False) -> Stats:
        """Consume, checkpoint and publish until stopped; with ``until_caught_up`` stop at the end offsets seen at
        start-up. Always ends with a final checkpoint (unless killed)."""
        with stop_on_signals(self._stop.set), streaming_runtime(), \
                group.presence(self.settings.home, self.options.group, self.group_id):
            if not self.options.group:  # a member holds its lock since it picked its name
                self.store.lock()
            try:
                self.session = self._connect()
                try:
                    if self.options.group:
                        if until_caught_up:
                            raise SpeedConfigError("--until-caught-up pins partitions: not with --group")
                        group.recover_group(self)
                        self.session.subscribe(lambda keys: group.take(self, keys),
                                               lambda keys: group.release(self, keys),
                                               lambda keys: group.release(self, keys))
                    else:
                        self.owned.own(self.session.partitions())
                        recover(self)
                        self.assign()
                    targets = self.session.end_offsets() if until_caught_up else None
                    if self.rebuild is not None or (self.last is not None and self.dirty):
                        self.checkpoint_now()  # publish which views are being rebuilt (or dropped) before replaying
                    self._loop(targets)
                    self.checkpoint_now()
                    self.session.commit(self.last.positions, wait=True)
                finally:
                    if self._inflight is not None:  # never leave a commit half-way when an error ends the run
                        futures.wait([self._inflight])
                    self.session.close()
                    self.session = None
            finally:
                self.owned.release()
                self.store.unlock()
        return self.stats

    # the log ------------------------------------------------------------------------------------------------------
    def _connect(self) -> LogSession:
        """The log session: a consumer, retrying with backoff while Kafka is unreachable (up to broker_timeout)."""
        consumer = connect(self.settings, group_id=self.group_id, timeout=self.options.broker_timeout,
                           stop=self._stop, notify=self.notify, fetch_max_wait_ms=100,
                           max_poll_records=self.options.max_records, check_crcs=False,
                           **(group.group_config() if self.options.group else {}))
        return LogSession(consumer, self.sources, bootstrap=self.settings.bootstrap, reader="the speed layer",
                          lost_means="they stay missing until a batch version covers them", notify=self.notify,
                          share=self.share)

    def assign(self) -> None:
        """Every partition of the sources' topics, each at its position (new partitions: the log start)."""
        session = self.session
        session.topics = list(self.sources)
        keys = session.partitions()
        if any(k not in self.owned.held for k in keys):  # partitions added while running: own them first
            self.owned.own([k for k in keys if k not in self.owned.held])
        self.owned.claim(keys)
        for key in keys:
            self.positions.setdefault(key, 0)
            self.windows.setdefault(key, DedupWindow(self.options.dedup_span))
            self.new_ids.setdefault(key, [])
        self.positions.update(session.assign(self.positions, covered=self.pruned_to, partitions=keys))
        self._partitions_checked = time.monotonic()

    # the loop -----------------------------------------------------------------------------------------------------
    def _loop(self, targets: dict[TP, int] | None) -> None:
        from kafka.errors import KafkaError

        opts = self.options
        watcher = BatchWatcher(self.layout, self.block)
        # What the state is already handed off to; the first poll compares it with what is published now, so a
        # batch version published while the speed layer was down is pruned right away.
        watcher.current = BatchVersion(self.batch.version if self.last is None else self.last.batch_version,
                                       Positions(self.pruned_to))
        last_cp = last_pipeline_check = time.monotonic()
        last_batch_check = 0.0
        consumer = self.session.consumer
        backoff = 0.5
        while not self._stop.is_set():
            try:
                # While a rebuild replays the log, its poll is the one that may wait.
                polled = consumer.poll(timeout_ms=0 if self.rebuild is not None else opts.poll_timeout_ms,
                                       max_records=opts.max_records)
                if self.options.group and self.session.rebalanced():  # assignment changes (speed.group)
                    polled = {tp: recs for tp, recs in polled.items() if (tp.topic, tp.partition) in self.session.tps}
                if self.rebuild is not None:
                    rebuild_step(self, self._stop)
                backoff = 0.5
            except KafkaError as exc:  # transient (leader moves, broker restarts): back off, never crash-loop
                self.notify(f"Kafka poll failed ({type(exc).__name__}: {exc}); retrying in {backoff:.1f}s")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            now = time.monotonic()
            for tp, records in polled.items():
                if records:
                    self._apply(tp.topic, tp.partition, records)
            self.broker.polled(polled, now, consumer, self.last)
            if now - last_batch_check >= opts.batch_check_interval:
                last_batch_check = now
                newer = watcher.poll()
                if newer is not None:
                    hand_off_to(self, newer)
            if self._inflight is not None:
                self._reap()
            if now - last_cp >= opts.checkpoint_interval and self.checkpoint():
                last_cp = now
            if self.options.group:
                if now - self._partitions_checked >= 1.0:  # frozen partitions whose new owner has published
                    self._partitions_checked = now
                    group.drop_superseded(self)
            elif now - self._partitions_checked >= opts.partition_check_interval:
                self._check_new_partitions()
            if now - last_pipeline_check >= opts.pipeline_check_interval:
                last_pipeline_check = now
                self.pipeline_watch.poll(self)
            if forgotten := self.erasures.poll(self.pipeline, rebuilding=self.rebuild is not None):
                apply_pipeline(self, self.pipeline, rebuild=forgotten)  # lambdalake.erasure: replay without them
            if targets is not None and self.rebuild is None and self._caught_up(targets):
                self.stats.caught_up = True
                break

    def _caught_up(self, targets: dict[TP, int]) -> bool:
        for key, end in targets.items():
            if key not in self.session.tps:  # a source no longer declared (the pipeline changed while running)
                continue
            if self.positions.get(key, 0) < end and not self.session.reached(key, end):
                return False
        return True

    def _apply(self, topic: str, partition: int, records: list) -> None:
        """The hot loop: validate, dedup, aggregate one partition's batch of records (in offset order)."""
        key = (topic, partition)
        got = apply_records(records, partition=partition, position=self.positions[key],
                            floor=self.pruned_to.get(key, 0), state=self.states[topic],
                            validate=self.validators[topic], window=self.windows[key],
                            pending=self.new_ids[key].append, event_id=self.sources[topic].event_id,
                            erased=self.erasures.subjects(topic))
        self.positions[key] = records[-1].offset + 1
        got.add_to(self.counters[topic])
        self.stats.messages += len(records)
        self.dirty = True

    def _check_new_partitions(self) -> None:
        self._partitions_checked = time.monotonic()
        new = self.session.new_partitions()
        if new:
            self.notify(f"new partitions {sorted(new)}; assigning them")
            self.assign()

    # checkpoint ---------------------------------------------------------------------------------------------------
    def checkpoint_now(self) -> None:
        """Checkpoint the current state (also if unchanged when none exists yet) and wait until it is committed."""
        self._reap(wait=True)
        if self.dirty or self.last is None:
            self.checkpoint(force=True)
        self._reap(wait=True)

    def checkpoint(self, force: bool = False) -> bool:
        """Start a checkpoint if the state changed (or ``force``); returns whether one was started.

        Step 1 of the commit protocol (:meth:`speed.checkpoint.CheckpointStore.commit`) runs here
        (:func:`speed.capture.capture`); the other steps run in the single writer thread while this thread keeps
        consuming, at most one commit in flight. ``force`` (handoff, shutdown) waits for the one in flight first.
        """
        self._reap(wait=force)
        if not (self.dirty or force) or self._inflight is not None:
            return False
        t0 = time.monotonic()
        captured = capture(self)
        self._inflight = self._writer.submit(self.store.commit, captured)
        self._inflight_t0 = t0
        if not self.options.background_commit:
            self._reap(wait=True)
        return True

    def _reap(self, wait: bool = False) -> None:
        """Take the result of the commit in flight (if done, or ``wait``): remember it as the last checkpoint and
        do step 7 (Kafka lag commit, on this thread: kafka-python clients are not thread-safe)."""
        fut = self._inflight
        if fut is None or (not wait and not fut.done()):
            return
        self._inflight = None
        try:
            cp = fut.result()
        except LambdalakeError:
            raise
        except BaseException as exc:
            raise CheckpointFailed(f"could not write a speed checkpoint under {self.layout.home} "
                                   f"({type(exc).__name__}: {exc}); the last committed checkpoint "
                                   f"{self.last.id if self.last else '-'} stays in force") from exc
        self.last = cp
        self.erasures.committed(cp)
        self.stats.checkpoints += 1
        self.stats.last_checkpoint_seconds = time.monotonic() - self._inflight_t0
        # 7. Lag monitoring only.
        if self.session is not None:
            self.session.commit(cp.positions)

    # introspection ------------------------------------------------------------------------------------------------
    def state_rows(self) -> int:
        return sum(st.rows() for st in self.states.values())

