"""The speed layer's run loop (``lambdalake speed``).

Per message of every source topic, in offset order per partition:

1. validate (:class:`lambdalake.validation.Validator`; invalid messages are counted — the archiver owns the DLQ);
2. dedup with the partition's :class:`lambdalake.dedup.DedupWindow` (first occurrence wins);
3. if the offset is at or above the partition's handed-off watermark, update every view of the source in the
   open block ``(partition, block_start)`` (:mod:`speed.state`); below it only the dedup window is filled.

Every ``checkpoint_interval`` seconds (and at shutdown) the state is checkpointed and published
(:mod:`speed.checkpoint`). Published batch versions are watched between polls and pruned as soon as they are
visible (:mod:`speed.batch_watch`).

Where it starts: from the last checkpoint's positions (``seek``; Kafka's committed offsets are never read). Without
a checkpoint but with a published batch version of watermark ``W``, from ``max(0, W[p] - dedup_span)`` — offsets
below ``W[p]`` only fill the dedup window, so ids the batch side already counted are still recognised. Otherwise
from the beginning of the log.

Definitions change: the checkpoint records the fingerprint of every view's rows. Views whose declared definition
differs (or that are new) are rebuilt by replaying the log (:mod:`speed.rebuild`) while the others continue; views
no longer declared are dropped. The pipeline file is re-read when it changes (every ``pipeline_check_interval``
seconds), so an edit applies without a restart (:meth:`SpeedLayer.apply_pipeline`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from lambdalake.config import Settings, fix_handoff_block
from lambdalake.contracts import SNAPSHOT_FORMAT, Positions, SpeedSnapshotMeta, SpeedView, utc_now_iso
from lambdalake.dedup import DedupWindow
from lambdalake.erasure import ErasureWatch
from lambdalake.exceptions import LambdalakeError
from lambdalake.layout import SPEED_COMPONENT, Layout
from lambdalake.ownership import PartitionLocks, Share
from lambdalake.pipeline import Pipeline, load_pipeline
from lambdalake.runtime import streaming_runtime
from lambdalake.session import LogSession, connect, stop_on_signals
from lambdalake.validation import Validator
from speed import snapshot as snapshots
from speed.batch_watch import NO_BATCH, BatchVersion, BatchWatcher, published_batch
from speed.checkpoint import FORMAT as CHECKPOINT_FORMAT
from speed.checkpoint import TP, Capture, Checkpoint, CheckpointStore
from speed.exceptions import CheckpointFailed, SpeedAlreadyRunning, SpeedConfigError
from speed.rebuild import Rebuild, replay_start
from speed.state import SourceState, apply_records, build_states, prune_table

log = logging.getLogger(__name__)

MIN_EXACT_DEDUP = 10_000  # the floor: at least the last 10,000 offsets of a partition dedup exactly
BROKER_CHECK_SECONDS = 5.0  # how long without records before checking that a broker connection is up


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


@dataclass
class KeptRows:
    """A view's rows made by some definition (``fingerprint``; ``""`` and no table for none), exact for the offsets
    ``[pruned_to, covers)``: what a checkpoint restores, and what a view being rebuilt keeps meanwhile."""

    fingerprint: str
    table: pa.Table | None
    covers: Positions | None


class SpeedLayer:
    """One running speed layer over one lake. ``run()`` blocks until stopped (signal, :meth:`stop`) or caught up."""

    def __init__(self, settings: Settings, pipeline: Pipeline, options: SpeedOptions | None = None,
                 notify: Callable[[str], None] | None = None):
        self.settings = settings
        self.pipeline = pipeline
        self.options = options or SpeedOptions()
        self.options.validate()
        self.block = settings.handoff_block
        self.share = self.options.share
        self.worker = self.share.worker
        self.layout = Layout(settings.home).for_speed_worker(self.worker)  # this worker's snapshots, checkpoints
        self.locks = PartitionLocks(Layout(settings.home), SPEED_COMPONENT, lambda key, holder: SpeedAlreadyRunning(
            f"another speed worker (pid {holder}) owns partition {key[1]} of {key[0]!r} in {settings.home}; stop "
            "it first, or give each speed worker its own partitions (--share I/N or --partitions)"))
        self.epochs: dict[TP, int] = {}  # ownership epoch of each partition this worker holds
        self._published_epochs: dict[TP, int] = {}
        fix_handoff_block(settings.home, self.block)  # batch and speed must agree on it for the life of the lake
        self.store = CheckpointStore(self.layout, pipeline, keep_snapshots=self.options.keep_snapshots,
                                     keep_snapshot_seconds=self.options.keep_snapshot_seconds)
        self.notify = notify or (lambda msg: log.warning("%s", msg))
        self.group_id = self.options.group_id or f"lambdalake-speed-{pipeline.name}"
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
        self._dirty = True
        self._session: LogSession | None = None
        self._seq = 0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speed-commit")
        self._inflight: Future[Checkpoint] | None = None
        self._inflight_t0 = 0.0
        self._full_dedup = False  # set when the windows were rebuilt: the next checkpoint writes them whole
        self._last_records = self._broker_checked = time.monotonic()
        self._broker_down_since: float | None = None
        self._pipeline_stamp = self._pipeline_file_stamp()
        self.erasures = ErasureWatch(self.layout, pipeline)  # forgotten subjects: skipped, their views rebuilt

    # lifecycle ----------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the run loop to write a final checkpoint and return (thread-safe, signal-safe)."""
        self._stop.set()

    def run(self, until_caught_up: bool = False) -> Stats:
        """Consume, checkpoint and publish until stopped; with ``until_caught_up`` stop at the end offsets seen at
        start-up. Always ends with a final checkpoint (unless killed)."""
        with stop_on_signals(self._stop.set), streaming_runtime():
            self.store.lock()
            try:
                self._session = self._connect()
                try:
                    self._own(self._session.partitions())
                    self._recover()
                    self._assign()
                    targets = self._session.end_offsets() if until_caught_up else None
                    if self.rebuild is not None or (self.last is not None and self._dirty):
                        self.checkpoint_now()  # publish which views are being rebuilt (or dropped) before replaying
                    self._loop(targets)
                    self.checkpoint_now()
                    self._session.commit(self.last.positions, wait=True)
                finally:
                    if self._inflight is not None:  # never leave a commit half-way when an error ends the run
                        futures.wait([self._inflight])
                    self._session.close()
                    self._session = None
            finally:
                self.locks.release()
                self.store.unlock()
        return self.stats

    # start-up -----------------------------------------------------------------------------------------------------
    def _own(self, keys: list[TP]) -> None:
        """Take the owner lock of ``keys`` (this worker's partitions) and note the highest ownership epoch any
        published snapshot holds for each: a partition this worker takes over gets one more
        (:mod:`lambdalake.speedset`)."""
        from lambdalake.speedset import best_epochs, worker_snapshots

        self.locks.acquire(keys)
        for attempt in range(5):
            try:
                self._published_epochs = best_epochs(worker_snapshots(self.layout))
                break
            except FileNotFoundError:  # another worker pruned a snapshot meanwhile: read again
                if attempt == 4:
                    raise

    def _claim(self, keys) -> None:
        for key in keys:
            if key not in self.epochs:
                self.epochs[key] = self._published_epochs.get(key, -1) + 1

    def _recover(self) -> None:
        """Load the last checkpoint, or start fresh from the published batch version (module docstring). A checkpoint
        holding a partition that another worker took over since (a higher published epoch) is outdated: the worker
        starts fresh from the batch version instead, like a new worker."""
        restored = self.store.load(self.block)
        self.batch = published_batch(self.layout, self.block)
        owned = set(self.locks.held)
        if restored is not None:
            cp = restored.checkpoint
            mine = {tp: (cp.epochs.get(tp, 0) if tp in cp.positions else -1) for tp in owned}
            moved = sorted(tp for tp in owned if self._published_epochs.get(tp, -1) > mine[tp])
            if moved:
                self.notify(f"partitions {moved} were taken over by another speed worker after checkpoint {cp.id}; "
                            "starting this worker from the published batch version instead")
                restored = None
        if restored is None:
            self.epochs = {}
            self._claim(owned)
            self._start_from(self.batch)
            self._seq = self.store.next_seq()
            return
        self.epochs = {tp: mine[tp] for tp in owned}
        cp = restored.checkpoint
        self.last = cp
        self.positions = {tp: n for tp, n in cp.positions.items() if tp[0] in self.sources and self.share.owns(tp[1])}
        self.pruned_to = {tp: n for tp, n in cp.pruned_to.items() if tp[0] in self.sources and self.share.owns(tp[1])}
        for t, c in cp.counters.items():
            if t in self.counters:
                self.counters[t].update(c)
        span = self.options.dedup_span
        self.windows = {tp: (w if w.span == span else DedupWindow.from_items(span, w.items()))
                        for tp, w in restored.windows.items() if tp[0] in self.sources}
        if any(tp[0] not in self.sources for tp in cp.positions):
            self._full_dedup = True  # a source was removed: no dedup chunk of its topics may be carried on
        if cp.format < 2:
            self.notify(f"speed checkpoint {cp.id} was written by lambdalake 0.1 (no view fingerprints): rebuilding "
                        "every view once from the log")
        self._adopt({name: KeptRows(sv.fingerprint, restored.tables[name],
                                    cp.positions if sv.positions is None else sv.positions)
                     for name, sv in cp.views.items() if sv.fingerprint})
        self._seq = self.store.next_seq()
        self._dirty = self.rebuild is not None or set(cp.views) != set(self.fingerprints)

    def _adopt(self, have: dict[str, KeptRows], force: Iterable[str] = ()) -> None:
        """Take over the rows ``have`` ({view: (fingerprint, rows)}, at the current positions) for the declared
        pipeline: views of the declared definition continue, changed and added ones are rebuilt from the log
        (the old rows are kept, frozen, until then), views no longer declared are dropped."""
        fps = self.fingerprints
        current = [n for n, fp in fps.items() if n in have and have[n].fingerprint == fp and n not in force]
        changed = [v for v in self.pipeline.views if v.name not in current]
        self.states = build_states(self.pipeline, self.block, current)
        for topic, st in self.states.items():
            st.restore({vs.view.name: have[vs.view.name].table for vs in st.views},
                       {p: n for (t, p), n in self.positions.items() if t == topic})
        self.frozen = {v.name: have.get(v.name, KeptRows("", None, None)) for v in changed}
        self._cancel_rebuild()
        if changed:
            self.rebuild = Rebuild(self.settings, self.pipeline, changed, self.block, self.options.dedup_span,
                                   self.options.max_records)
            self.notify("rebuilding " + ", ".join(
                f"{v.name} ({'new view' if not have.get(v.name) else 'definition changed'})" for v in changed)
                + " from the log; the other views continue")
        dropped = sorted(set(have) - set(fps))
        if dropped:
            self.notify(f"dropped views no longer declared: {', '.join(dropped)}")

    def _cancel_rebuild(self) -> None:
        if self.rebuild is not None:
            self.rebuild.close()
            self.rebuild = None

    def _start_from(self, batch: BatchVersion) -> None:
        """Empty state positioned just below the batch watermark (dedup fill only below it): every declared view is
        built from there, so nothing is left to rebuild."""
        self._cancel_rebuild()
        self.frozen = {}
        self.states = build_states(self.pipeline, self.block)
        self.windows.clear()
        self.new_ids.clear()
        self.positions = {tp: replay_start(w, self.options.dedup_span) for tp, w in batch.watermark.items()
                          if tp[0] in self.sources and self.share.owns(tp[1])}
        self.pruned_to = {tp: w for tp, w in batch.watermark.items()
                          if tp[0] in self.sources and self.share.owns(tp[1])}
        for c in self.counters.values():
            c.update(valid=0, invalid=0, duplicates=0)
        self._full_dedup = True  # older dedup chunks hold ids above the new positions: never reuse them
        self._dirty = True

    def _connect(self) -> LogSession:
        """The log session: a consumer, retrying with backoff while Kafka is unreachable (up to broker_timeout)."""
        consumer = connect(self.settings, group_id=self.group_id, timeout=self.options.broker_timeout,
                           stop=self._stop, notify=self.notify, fetch_max_wait_ms=100,
                           max_poll_records=self.options.max_records, check_crcs=False)
        return LogSession(consumer, self.sources, bootstrap=self.settings.bootstrap, reader="the speed layer",
                          lost_means="they stay missing until a batch version covers them", notify=self.notify,
                          share=self.share)

    def _assign(self) -> None:
        """Every partition of the sources' topics, each at its position (new partitions: the log start)."""
        session = self._session
        session.topics = list(self.sources)
        keys = session.partitions()
        if any(k not in self.locks.held for k in keys):  # partitions added while running: own them first
            self._own([k for k in keys if k not in self.locks.held])
        self._claim(keys)
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
        consumer = self._session.consumer
        backoff = 0.5
        while not self._stop.is_set():
            try:
                # While a rebuild replays the log, its poll is the one that may wait.
                polled = consumer.poll(timeout_ms=0 if self.rebuild is not None else opts.poll_timeout_ms,
                                       max_records=opts.max_records)
                if self.rebuild is not None:
                    self._rebuild_step()
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
                    self._last_records = now
            if polled and self._broker_down_since is not None:
                self.notify(f"reconnected to Kafka after {now - self._broker_down_since:.0f}s")
                self._broker_down_since = None
            if now - self._last_records >= BROKER_CHECK_SECONDS and now - self._broker_checked >= BROKER_CHECK_SECONDS:
                self._watch_broker(now)
            if now - last_batch_check >= opts.batch_check_interval:
                last_batch_check = now
                newer = watcher.poll()
                if newer is not None:
                    self._handoff(newer)
            if self._inflight is not None:
                self._reap()
            if now - last_cp >= opts.checkpoint_interval and self._checkpoint():
                last_cp = now
            if now - self._partitions_checked >= opts.partition_check_interval:
                self._check_new_partitions()
            if now - last_pipeline_check >= opts.pipeline_check_interval:
                last_pipeline_check = now
                self._watch_pipeline()
            if forgotten := self.erasures.poll(self.pipeline, rebuilding=self.rebuild is not None):
                self.apply_pipeline(self.pipeline, rebuild=forgotten)  # lambdalake.erasure: replay without them
            if targets is not None and self.rebuild is None and self._caught_up(targets):
                self.stats.caught_up = True
                break

    def _watch_broker(self, now: float) -> None:
        """While nothing arrives, tell the user once when no broker connection is up (kafka-python keeps reconnecting
        with exponential backoff by itself) and again when it is back. The published snapshot stays valid meanwhile."""
        self._broker_checked = now
        try:  # kafka-python has no public connectivity API; read its client state, never depend on it
            client = self._session.consumer._client
            up = any(client.connected(b.node_id) for b in client.cluster.brokers())
        except Exception:  # noqa: BLE001
            return
        if not up and self._broker_down_since is None:
            self._broker_down_since = now
            self.notify(f"lost the connection to Kafka at {self.settings.bootstrap}; reconnecting with backoff "
                        f"(the published snapshot {self.last.id if self.last else '-'} stays valid)")
        elif up and self._broker_down_since is not None:
            self.notify(f"reconnected to Kafka after {now - self._broker_down_since:.0f}s")
            self._broker_down_since = None

    def _caught_up(self, targets: dict[TP, int]) -> bool:
        for key, end in targets.items():
            if key not in self._session.tps:  # a source no longer declared (the pipeline changed while running)
                continue
            if self.positions.get(key, 0) < end and not self._session.reached(key, end):
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
        self._dirty = True

    def _check_new_partitions(self) -> None:
        self._partitions_checked = time.monotonic()
        new = self._session.new_partitions()
        if new:
            self.notify(f"new partitions {sorted(new)}; assigning them")
            self._assign()

    # handoff ------------------------------------------------------------------------------------------------------
    def _handoff(self, batch: BatchVersion) -> None:
        """A new batch version is published: drop exactly the blocks it covers, then publish at once."""
        rollback = [tp for tp, w in self.pruned_to.items() if batch.watermark.get(tp, 0) < w]
        if rollback:
            # The speed state no longer holds what an older batch version leaves uncovered: rebuild from just below
            # the new (lower) watermark. Never exact-by-luck: the lost blocks are recomputed from Kafka.
            self.notify(f"batch version {batch.version} has a lower watermark than the one already handed off "
                        f"for {rollback}; rebuilding the speed state from there")
            self._start_from(batch)
            self.batch = batch
            self._assign()
            self._checkpoint(force=True)
            return
        dropped = 0
        for tp, w in batch.watermark.items():
            if tp[0] not in self.states or w <= self.pruned_to.get(tp, 0) or tp not in self.positions:
                continue
            dropped += self.states[tp[0]].prune(tp[1], w)
            if self.rebuild is not None:
                self.rebuild.prune(tp, w)
            for name, kept in self.frozen.items():
                if kept.table is not None and self.pipeline.source_of(self.pipeline.view(name)).topic == tp[0]:
                    kept.table = prune_table(kept.table, tp[1], w, self.block)
            self.pruned_to[tp] = w
        self.stats.pruned_rows += dropped
        self.batch = batch
        self._checkpoint(force=True)

    # checkpoint ---------------------------------------------------------------------------------------------------
    def checkpoint_now(self) -> None:
        """Checkpoint the current state (also if unchanged when none exists yet) and wait until it is committed."""
        self._reap(wait=True)
        if self._dirty or self.last is None:
            self._checkpoint(force=True)
        self._reap(wait=True)

    def _checkpoint(self, force: bool = False) -> bool:
        """Start a checkpoint if the state changed (or ``force``); returns whether one was started.

        Step 1 of the commit protocol (:meth:`speed.checkpoint.CheckpointStore.commit`) runs here
        (:meth:`_capture`); the other steps run in the single writer thread while this thread keeps consuming, at
        most one commit in flight. ``force`` (handoff, shutdown) waits for the one in flight first.
        """
        self._reap(wait=force)
        if not (self._dirty or force) or self._inflight is not None:
            return False
        t0 = time.monotonic()
        capture = self._capture()
        self._inflight = self._writer.submit(self.store.commit, capture)
        self._inflight_t0 = t0
        if not self.options.background_commit:
            self._reap(wait=True)
        return True

    def _capture(self) -> Capture:
        """Step 1: the snapshot's tables (immutable Arrow), positions, counters, fingerprints, dedup rows."""
        now = time.time()
        cid = snapshots.snapshot_id(self._seq)
        tables, views = self._view_files(cid)
        counters = {t: dict(c) for t, c in self.counters.items()}
        cp = Checkpoint(checkpoint=cid, snapshot=cid, pipeline=self.pipeline.name, positions=Positions(self.positions),
                        pruned_to=Positions(self.pruned_to), counters=counters, dedup_span=self.options.dedup_span,
                        block=self.block, batch_version=self.batch.version, created_at=now, views=views,
                        format=CHECKPOINT_FORMAT,
                        epochs=Positions({tp: e for tp, e in self.epochs.items() if tp in self.positions}))
        meta = SpeedSnapshotMeta(pipeline=self.pipeline.name, positions=cp.positions, pruned_to=cp.pruned_to,
                                 block=self.block, created_at=utc_now_iso(), created_at_unix=now,
                                 batch_version=self.batch.version, counters=counters,
                                 rows={name: vf.rows for name, vf in tables.items()}, views=views,
                                 format=SNAPSHOT_FORMAT, worker=self.worker, epochs=cp.epochs)
        full = self._full_dedup or self.store.needs_full_dedup(self.last, cp.positions, cp.dedup_span)
        delta, self.new_ids = self.new_ids, {k: [] for k in self.new_ids}
        dedup_rows = {tp: w.items() for tp, w in self.windows.items()} if full else delta
        self._full_dedup = False
        self._seq += 1
        self._dirty = False
        return Capture(cp, tables, meta, dedup_rows, full, self.last)

    def _view_files(self, snap: str) -> tuple[dict[str, snapshots.ViewFiles], dict[str, SpeedView]]:
        """Every view's files in snapshot ``snap`` (what changed since the last committed one, see
        :mod:`speed.snapshot`) and the definition that made its rows."""
        previous = None if self.last is None else self.last.snapshot
        tables: dict[str, snapshots.ViewFiles] = {}
        for st in self.states.values():
            tables.update(st.view_files(snap, previous))
        views: dict[str, SpeedView] = {}
        progress = None if self.rebuild is None else round(self.rebuild.progress(self.positions), 4)
        for name, fp in self.fingerprints.items():
            if name in tables:
                views[name] = SpeedView(fp, rows=tables[name].rows)
                continue
            kept = self.frozen[name]  # being rebuilt: the old definition's rows, labelled as such, written whole
            if kept.table is not None:
                tables[name] = snapshots.ViewFiles(kept.table, rows=kept.table.num_rows)
            topic = self.pipeline.source_of(self.pipeline.view(name)).topic
            views[name] = SpeedView(kept.fingerprint, rows=0 if kept.table is None else kept.table.num_rows,
                                    target=fp, progress=progress,
                                    positions=None if kept.covers is None else Positions(
                                        {tp: n for tp, n in kept.covers.items() if tp[0] == topic}))
        return tables, views

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
        if self._session is not None:
            self._session.commit(cp.positions)

    # rebuilding changed views (speed.rebuild) -----------------------------------------------------------------------
    def _rebuild_step(self) -> None:
        """Advance the rebuild; when it is close, finish it while the live positions hold still (the live consumer
        is not polled meanwhile, at most a few seconds), then swap the rebuilt views in."""
        rb = self.rebuild
        if rb.backlog(self.positions) <= self.options.max_records:
            deadline = time.monotonic() + 5.0
            while not rb.done(self.positions) and time.monotonic() < deadline and not self._stop.is_set():
                rb.step(self.positions, self.pruned_to, timeout_ms=self.options.poll_timeout_ms)
        else:
            rb.step(self.positions, self.pruned_to, timeout_ms=self.options.poll_timeout_ms)
        if rb.done(self.positions):
            self._finish_rebuild()

    def _finish_rebuild(self) -> None:
        """Swap the rebuilt views in, at once, at the live positions (``R == S``), and checkpoint right away."""
        rb = self.rebuild
        for topic, rebuilt in rb.states.items():
            live = self.states[topic]
            tables = {**live.view_tables(), **rebuilt.view_tables()}
            src = self.sources[topic]
            merged = SourceState(src, [v for v in self.pipeline.views_of(src) if v.name in tables], self.block)
            merged.restore(tables, {p: n for (t, p), n in self.positions.items() if t == topic})
            self.states[topic] = merged
            if not live.views:
                # Every view of the source was rebuilt (always so when its fields or validation rules changed):
                # the replay's dedup windows and counters are those of the declared validation.
                for key, window in rb.windows.items():
                    if key[0] == topic:
                        self.windows[key] = window
                        self.new_ids[key] = []
                self.counters[topic] = dict(rb.counters[topic])
                self._full_dedup = True
        for name in rb.targets:
            self.frozen.pop(name, None)
        self.notify(f"rebuilt {', '.join(rb.targets)} for the declared definition ({rb.messages:,} messages "
                    "replayed)")
        self._cancel_rebuild()
        self._dirty = True
        self._checkpoint(force=True)

    # the pipeline changing while running --------------------------------------------------------------------------
    def _pipeline_file_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.settings.pipeline)
        except (OSError, TypeError, ValueError):
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _watch_pipeline(self) -> None:
        """Apply an edited pipeline file while running (a module path is not watched). A pipeline that fails to
        load or validate, renames the pipeline or reads a topic that does not exist is reported and ignored: the
        running one continues."""
        stamp = self._pipeline_file_stamp()
        if stamp is None or stamp == self._pipeline_stamp:
            return
        self._pipeline_stamp = stamp
        spec = self.settings.pipeline
        try:
            new = load_pipeline(spec, fresh=True)
        except LambdalakeError as exc:
            self.notify(f"the pipeline file {spec} changed but cannot be used ({exc}); still running the previous "
                        "definition")
            return
        if new == self.pipeline:
            return
        if new.name != self.pipeline.name:
            self.notify(f"the pipeline file {spec} now declares pipeline {new.name!r}, not {self.pipeline.name!r}; "
                        "ignored (a different pipeline needs its own --home)")
            return
        for s in new.sources:
            if s.topic not in self.sources and not self._session.consumer.partitions_for_topic(s.topic):
                self.notify(f"the pipeline file {spec} changed but topic {s.topic!r} of source {s.name!r} does not "
                            "exist; ignored (create it with `lambdalake topics`)")
                return
        self.notify(f"the pipeline file {spec} changed; applying it")
        self.apply_pipeline(new)

    def apply_pipeline(self, new: Pipeline, rebuild: Iterable[str] = ()) -> None:
        """Run ``new`` from here on: unchanged views continue, changed and added ones are rebuilt from the log,
        removed ones are dropped (as on a restart with ``new``, without stopping)."""
        have: dict[str, KeptRows] = {}
        now = Positions(self.positions)
        for st in self.states.values():
            for name, table in st.view_tables().items():
                have[name] = KeptRows(self.fingerprints[name], table, now)
        for name, kept in self.frozen.items():
            if kept.table is not None:
                have[name] = kept
        topics_before = set(self.sources)
        self.pipeline = self.store.pipeline = new
        self.fingerprints = new.fingerprints
        self.sources = {s.topic: s for s in new.sources}
        self.validators = {s.topic: Validator(s) for s in new.sources}
        for t in self.sources:
            self.counters.setdefault(t, {"valid": 0, "invalid": 0, "duplicates": 0})
        for d in (self.positions, self.pruned_to, self.windows, self.new_ids):
            for tp in [tp for tp in d if tp[0] not in self.sources]:
                del d[tp]
        for t in [t for t in self.counters if t not in self.sources]:
            del self.counters[t]
        self._adopt(have, force=rebuild)
        if set(self.sources) != topics_before and self._session is not None:
            self._assign()
        self._full_dedup = True
        self._dirty = True
        self._checkpoint(force=True)

    # introspection ------------------------------------------------------------------------------------------------
    def state_rows(self) -> int:
        return sum(st.rows() for st in self.states.values())


def run_speed_workers(settings: Settings, pipeline: Pipeline, options: SpeedOptions, workers: int, *,
                      until_caught_up: bool = False) -> list[tuple[str, int, int, str]]:
    """``lambdalake speed --workers N``: N worker processes with shares ``0/N .. N-1/N`` (each a
    :class:`SpeedLayer`), until they all stop; (share, messages, checkpoints, last snapshot) per worker."""
    import dataclasses

    from lambdalake.procs import run_workers

    calls = [(settings, pipeline, dataclasses.replace(options, share=share), until_caught_up)
             for share in Share.split(workers)]
    return run_workers(_run_worker, calls)


def _run_worker(settings: Settings, pipeline: Pipeline, options: SpeedOptions,
                until_caught_up: bool) -> tuple[str, int, int, str]:
    import sys

    label = options.share.label
    layer = SpeedLayer(settings, pipeline, options,
                       notify=lambda msg: print(f"speed worker {label}: {msg}", file=sys.stderr, flush=True))
    stats = layer.run(until_caught_up=until_caught_up)
    return label, stats.messages, stats.checkpoints, layer.last.id if layer.last else "-"
