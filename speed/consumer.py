"""The speed layer's run loop (``lambdalake speed``).

Per message of every source topic, in offset order per partition:

1. validate (:class:`lambdalake.validation.Validator`; invalid messages are counted — the archiver owns the DLQ);
2. dedup with the partition's :class:`lambdalake.dedup.DedupWindow` (first occurrence wins);
3. if the offset is at or above the partition's handed-off watermark, update every view of the source in the
   open block ``(partition, block_start)`` (:mod:`speed.state`); below it only the dedup window is filled.

Every ``checkpoint_interval`` seconds (and at shutdown) the state is checkpointed and published
(:mod:`speed.checkpoint`). Published batch versions are watched between polls and pruned as soon as they are
visible (:mod:`speed.prune`).

Where it starts: from the last checkpoint's positions (``seek``; Kafka's committed offsets are never read). Without
a checkpoint but with a published batch version of watermark ``W``, from ``max(0, W[p] - dedup_span)`` — offsets
below ``W[p]`` only fill the dedup window, so ids the batch side already counted are still recognised. Otherwise
from the beginning of the log.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from lambdalake.config import Settings, fix_handoff_block
from lambdalake.contracts import SNAPSHOT_FORMAT, Positions, SpeedSnapshotMeta, SpeedView, utc_now_iso
from lambdalake.dedup import DedupWindow
from lambdalake.exceptions import BrokerError, LambdalakeError
from lambdalake.layout import Layout
from lambdalake.pipeline import Pipeline
from lambdalake.validation import Validator
from speed import snapshot as snapshots
from speed.checkpoint import FORMAT as CHECKPOINT_FORMAT
from speed.checkpoint import TP, Capture, Checkpoint, CheckpointStore
from speed.exceptions import BrokerUnreachable, CheckpointFailed, SpeedConfigError, SpeedError
from speed.prune import NO_BATCH, BatchVersion, BatchWatcher, published_batch
from speed.state import SourceState, build_states

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
    partition_check_interval: float = 30.0
    background_commit: bool = True  # steps 2-8 of a checkpoint overlap with consuming

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


class SpeedLayer:
    """One running speed layer over one lake. ``run()`` blocks until stopped (signal, :meth:`stop`) or caught up."""

    def __init__(self, settings: Settings, pipeline: Pipeline, options: SpeedOptions | None = None,
                 notify: Callable[[str], None] | None = None):
        self.settings = settings
        self.pipeline = pipeline
        self.options = options or SpeedOptions()
        self.options.validate()
        self.block = settings.handoff_block
        self.layout = Layout(settings.home)
        fix_handoff_block(settings.home, self.block)  # batch and speed must agree on it for the life of the lake
        self.store = CheckpointStore(self.layout, pipeline, keep_snapshots=self.options.keep_snapshots,
                                     keep_snapshot_seconds=self.options.keep_snapshot_seconds)
        self.notify = notify or (lambda msg: log.warning("%s", msg))
        self.group_id = self.options.group_id or f"lambdalake-speed-{pipeline.name}"
        self.sources = {s.topic: s for s in pipeline.sources}
        self.validators = {s.topic: Validator(s) for s in pipeline.sources}
        self.states: dict[str, SourceState] = build_states(pipeline, self.block)
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
        self._consumer = None
        self._seq = 0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speed-commit")
        self._inflight: Future[Checkpoint] | None = None
        self._inflight_t0 = 0.0
        self._full_dedup = False  # set when the windows were rebuilt: the next checkpoint writes them whole
        self._last_records = self._broker_checked = time.monotonic()
        self._broker_down_since: float | None = None

    # lifecycle ----------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the run loop to write a final checkpoint and return (thread-safe, signal-safe)."""
        self._stop.set()

    def run(self, until_caught_up: bool = False) -> Stats:
        """Consume, checkpoint and publish until stopped; with ``until_caught_up`` stop at the end offsets seen at
        start-up. Always ends with a final checkpoint (unless killed)."""
        restore = self._install_signal_handlers()
        self.store.lock()
        try:
            self._recover()
            self._consumer = self._connect()
            try:
                self._assign()
                targets = self._end_offsets() if until_caught_up else None
                self._loop(targets)
                self.checkpoint_now()
                self._kafka_commit(self.last.positions, wait=True)
            finally:
                if self._inflight is not None:  # never leave a commit half-way when an error ends the run
                    futures.wait([self._inflight])
                self._consumer.close(autocommit=False)
                self._consumer = None
        finally:
            self.store.unlock()
            restore()
        return self.stats

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, lambda *_: self._stop.set())

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h)

        return restore

    # start-up -----------------------------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Load the last checkpoint, or start fresh from the published batch version (module docstring)."""
        restored = self.store.load(self.block)
        self.batch = published_batch(self.layout, self.block)
        if restored is None:
            self._start_from(self.batch)
            self._seq = self.store.next_seq()
            return
        cp = restored.checkpoint
        self.last = cp
        self.positions = dict(cp.positions)
        self.pruned_to = dict(cp.pruned_to)
        for t, c in cp.counters.items():
            if t in self.counters:
                self.counters[t].update(c)
        span = self.options.dedup_span
        self.windows = {tp: (w if w.span == span else DedupWindow.from_items(span, w.items()))
                        for tp, w in restored.windows.items()}
        for topic, st in self.states.items():
            st.restore({v.view.name: restored.tables[v.view.name] for v in st.views},
                       {p: s for (t, p), s in self.positions.items() if t == topic})
        self._seq = self.store.next_seq()
        self._dirty = False

    def _start_from(self, batch: BatchVersion) -> None:
        """Empty state positioned just below the batch watermark (dedup fill only below it)."""
        for st in self.states.values():
            st.clear()
        self.windows.clear()
        self.new_ids.clear()
        self.positions = {tp: max(0, w - self.options.dedup_span) for tp, w in batch.watermark.items()
                          if tp[0] in self.sources}
        self.pruned_to = {tp: w for tp, w in batch.watermark.items() if tp[0] in self.sources}
        for c in self.counters.values():
            c.update(valid=0, invalid=0, duplicates=0)
        self._full_dedup = True  # older dedup chunks hold ids above the new positions: never reuse them
        self._dirty = True

    def _connect(self):
        """A consumer, retrying with exponential backoff while Kafka is unreachable (up to ``broker_timeout``)."""
        from lambdalake.kafka import consumer

        deadline = time.monotonic() + self.options.broker_timeout
        delay, attempt = 0.5, 0
        while True:
            attempt += 1
            per_attempt_ms = int(1000 * min(5.0, max(1.0, (deadline - time.monotonic()) / 2)))
            try:
                return consumer(self.settings, group_id=self.group_id, fetch_max_wait_ms=100,
                                max_poll_records=self.options.max_records, check_crcs=False,
                                bootstrap_timeout_ms=per_attempt_ms)
            except BrokerError as exc:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    raise BrokerUnreachable(f"{exc} (gave up after {attempt} attempt(s) in "
                                            f"{self.options.broker_timeout:.0f}s; raise --broker-timeout to wait "
                                            "longer)") from exc
                wait = min(delay, left)
                self.notify(f"Kafka at {self.settings.bootstrap} is unreachable (attempt {attempt}); retrying in "
                            f"{wait:.1f}s")
                self._stop.wait(wait)
                delay = min(delay * 2, 30.0)

    def _partitions(self) -> dict[str, list[int]]:
        out = {}
        for topic in self.sources:
            parts = self._consumer.partitions_for_topic(topic)
            if not parts:
                raise SpeedError(f"topic {topic!r} of pipeline {self.pipeline.name!r} does not exist at "
                                 f"{self.settings.bootstrap}; create it with `lambdalake topics`")
            out[topic] = sorted(parts)
        return out

    def _assign(self) -> None:
        from kafka import TopicPartition

        tps = [TopicPartition(t, p) for t, parts in self._partitions().items() for p in parts]
        for tp in tps:
            key = (tp.topic, tp.partition)
            self.positions.setdefault(key, 0)
            self.windows.setdefault(key, DedupWindow(self.options.dedup_span))
            self.new_ids.setdefault(key, [])
        self._consumer.assign(tps)
        begins = self._consumer.beginning_offsets(tps)
        for tp in tps:
            key = (tp.topic, tp.partition)
            first = begins.get(tp, 0)
            if self.positions[key] < first:
                covered = self.pruned_to.get(key, 0)
                if covered < first:
                    self.notify(f"{tp.topic}[{tp.partition}]: offsets [{max(covered, self.positions[key])}, {first}) "
                                "were deleted by Kafka retention before the speed layer read them; they stay "
                                "missing until a batch version covers them")
                self.positions[key] = first
            self._consumer.seek(tp, self.positions[key])
        self._tps = {(tp.topic, tp.partition): tp for tp in tps}
        self._partitions_checked = time.monotonic()

    def _end_offsets(self) -> dict[TP, int]:
        ends = self._consumer.end_offsets(list(self._tps.values()))
        return {(tp.topic, tp.partition): off for tp, off in ends.items()}

    # the loop -----------------------------------------------------------------------------------------------------
    def _loop(self, targets: dict[TP, int] | None) -> None:
        from kafka.errors import KafkaError

        opts = self.options
        watcher = BatchWatcher(self.layout, self.block)
        # What the state is already handed off to; the first poll compares it with what is published now, so a
        # batch version published while the speed layer was down is pruned right away.
        watcher.current = BatchVersion(self.batch.version if self.last is None else self.last.batch_version,
                                       Positions(self.pruned_to))
        last_cp = time.monotonic()
        last_batch_check = 0.0
        consumer = self._consumer
        backoff = 0.5
        while not self._stop.is_set():
            try:
                polled = consumer.poll(timeout_ms=opts.poll_timeout_ms, max_records=opts.max_records)
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
            if targets is not None and self._caught_up(targets):
                self.stats.caught_up = True
                break

    def _watch_broker(self, now: float) -> None:
        """While nothing arrives, tell the user once when no broker connection is up (kafka-python keeps reconnecting
        with exponential backoff by itself) and again when it is back. The published snapshot stays valid meanwhile."""
        self._broker_checked = now
        try:  # kafka-python has no public connectivity API; read its client state, never depend on it
            client = self._consumer._client
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
            if self.positions.get(key, 0) < end:
                # Transaction markers occupy offsets without records: trust the consumer's own position then.
                if self._consumer.position(self._tps[key]) < end:
                    return False
        return True

    def _apply(self, topic: str, partition: int, records: list) -> None:
        """The hot loop: validate, dedup, aggregate one partition's batch of records (in offset order)."""
        key = (topic, partition)
        state = self.states[topic]
        validate = self.validators[topic]
        window = self.windows[key]
        seen = window.seen
        pending = self.new_ids[key].append
        eid_field = self.sources[topic].event_id
        floor = self.pruned_to.get(key, 0)
        update = state.update
        block = self.block
        pos = self.positions[key]
        rows = None
        cur_bs = -1
        valid = invalid = dups = 0
        for r in records:
            o = r.offset
            if o < pos:  # paranoid: a record we already applied must never be applied twice
                continue
            v = validate(r.value)
            if not v.ok:
                if o >= floor:
                    invalid += 1
                continue
            rec = v.record
            eid = rec[eid_field]
            if seen(eid, o):
                if o >= floor:
                    dups += 1
                continue
            pending((o, eid))
            if o < floor:
                continue  # the published batch version counts it; only the dedup window needed it
            valid += 1
            bs = o - o % block
            if bs != cur_bs:
                rows = state.rows_for(partition, o)
                cur_bs = bs
            update(rec, rows)
        self.positions[key] = records[-1].offset + 1
        c = self.counters[topic]
        c["valid"] += valid
        c["invalid"] += invalid
        c["duplicates"] += dups
        self.stats.messages += len(records)
        self._dirty = True

    def _check_new_partitions(self) -> None:
        self._partitions_checked = time.monotonic()
        try:
            current = {(t, p) for t, parts in self._partitions().items() for p in parts}
        except SpeedError:
            return
        if current - set(self._tps):
            self.notify(f"new partitions {sorted(current - set(self._tps))}; assigning them")
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
            if tp[0] not in self.states or w <= self.pruned_to.get(tp, 0):
                continue
            dropped += self.states[tp[0]].prune(tp[1], w)
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
        tables, views = self._view_tables()
        counters = {t: dict(c) for t, c in self.counters.items()}
        cp = Checkpoint(checkpoint=cid, snapshot=cid, pipeline=self.pipeline.name, positions=Positions(self.positions),
                        pruned_to=Positions(self.pruned_to), counters=counters, dedup_span=self.options.dedup_span,
                        block=self.block, batch_version=self.batch.version, created_at=now, views=views,
                        format=CHECKPOINT_FORMAT)
        meta = SpeedSnapshotMeta(pipeline=self.pipeline.name, positions=cp.positions, pruned_to=cp.pruned_to,
                                 block=self.block, created_at=utc_now_iso(), created_at_unix=now,
                                 batch_version=self.batch.version, counters=counters,
                                 rows={name: t.num_rows for name, t in tables.items()}, views=views,
                                 format=SNAPSHOT_FORMAT)
        full = self._full_dedup or self.store.needs_full_dedup(self.last, cp.positions, cp.dedup_span)
        delta, self.new_ids = self.new_ids, {k: [] for k in self.new_ids}
        dedup_rows = {tp: w.items() for tp, w in self.windows.items()} if full else delta
        self._full_dedup = False
        self._seq += 1
        self._dirty = False
        return Capture(cp, tables, meta, dedup_rows, full, self.last)

    def _view_tables(self) -> tuple[dict[str, pa.Table], dict[str, SpeedView]]:
        """Every view's rows and the definition that made them."""
        tables: dict[str, pa.Table] = {}
        for st in self.states.values():
            tables.update(st.view_tables())
        views = {name: SpeedView(self.pipeline.fingerprint(name), rows=t.num_rows) for name, t in tables.items()}
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
        self.stats.checkpoints += 1
        self.stats.last_checkpoint_seconds = time.monotonic() - self._inflight_t0
        # 7. Lag monitoring only.
        self._kafka_commit(cp.positions)

    def _kafka_commit(self, positions: dict[TP, int], wait: bool = False) -> None:
        """Step 7: committed group offsets, for lag monitoring tools only (never read back by lambdalake).
        Asynchronous while running; ``wait`` (at shutdown) so the last positions reach Kafka before close."""
        from kafka.structs import OffsetAndMetadata

        if self._consumer is None:
            return
        offsets = {self._tps[k]: OffsetAndMetadata(s, "", -1) for k, s in positions.items() if k in self._tps}
        try:
            if wait:
                self._consumer.commit(offsets, timeout_ms=3000)
            else:
                self._consumer.commit_async(offsets)
        except Exception as exc:  # noqa: BLE001 - monitoring only; never let it stop the speed layer
            log.debug("lag-monitoring commit failed: %s", exc)

    # introspection ------------------------------------------------------------------------------------------------
    def state_rows(self) -> int:
        return sum(st.rows() for st in self.states.values())
