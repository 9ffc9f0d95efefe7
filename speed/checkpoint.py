"""The speed layer's durable checkpoint and its commit protocol.

A checkpoint is three things that must agree: the aggregates (stored as the published speed snapshot, see
:mod:`speed.snapshot`), the positions ``S[(topic, p)]`` (next offset to read) and the dedup windows. As objects of
the lake's store (:mod:`lambdalake.storage`; a speed worker's under ``checkpoints/speed/workers/<worker>/``)::

    checkpoints/speed/LOCK                       flock'ed by the one running `lambdalake speed`
    checkpoints/speed/CURRENT                    {"checkpoint": "<id>"}  <- the commit point
    checkpoints/speed/<id>/checkpoint.json       positions, pruned_to, counters, snapshot id, dedup chunk list
    checkpoints/speed/<id>/dedup.parquet         event ids first seen since the previous checkpoint (a delta),
                                                 or the whole windows when the chunk list was compacted

The commit protocol is :meth:`CheckpointStore.commit` (its docstring lists the numbered steps; the code mirrors
them in comments and in the ``LAMBDALAKE_SPEED_FAULT`` crash points).

Recovery (:meth:`CheckpointStore.load`) reads ``CURRENT``, the checkpoint, its snapshot and dedup chunks, checks
they agree, removes orphans of a crashed commit, and redoes step 6. The consumer then seeks to the positions, so a
``kill -9`` at any instant followed by a restart gives exactly the state of an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from lambdalake import contracts
from lambdalake.contracts import Positions, SpeedPointer, SpeedSnapshotMeta, SpeedView
from lambdalake.dedup import DedupWindow
from lambdalake.exceptions import InvariantViolation
from lambdalake.heads import writer_id
from lambdalake.layout import (
    SPEED_COMPONENT,
    Layout,
    read_speed_snapshot_meta,
    remove_temp_entries,
)
from lambdalake.locks import PidLock
from lambdalake.pipeline import Pipeline
from lambdalake.storage.base import ObjectMissing, StorageError
from speed import snapshot as snapshots
from speed.exceptions import CheckpointCorrupt, SpeedAlreadyRunning, SpeedFenced

log = logging.getLogger(__name__)

COMPONENT = SPEED_COMPONENT
FORMAT = 2  # 1: lambdalake 0.1 (no per-view fingerprints: every view is rebuilt once after an upgrade)
DEDUP_SCHEMA = pa.schema([("topic", pa.string()), ("partition", pa.int32()), ("offset", pa.int64()),
                          ("event_id", pa.string())])
# Past this many dedup chunks a checkpoint writes the whole windows instead of a delta (bounds recovery work).
MAX_DEDUP_CHUNKS = 32
MAX_SWAPS = 100  # claims of one worker's pointer racing at once before giving up
TP = tuple[str, int]


def fault(step: int | str) -> None:
    """Fault injection for the crash tests: ``LAMBDALAKE_SPEED_FAULT=<step>:<n>`` SIGKILLs this process right before
    commit step ``<step>`` of its ``<n>``-th checkpoint (so every step boundary can be crashed deterministically);
    ``rebuild:<n>``: before the ``<n>``-th batch of records a rebuild applies (:mod:`speed.rebuild`)."""
    spec = os.environ.get("LAMBDALAKE_SPEED_FAULT")
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != str(step):
        return
    _FAULT_HITS[step] = _FAULT_HITS.get(step, 0) + 1
    if _FAULT_HITS[step] >= int(nth or 1):
        os.kill(os.getpid(), 9)


_FAULT_HITS: dict[int | str, int] = {}


class DedupChunk(msgspec.Struct):
    """A dedup chunk file (in checkpoint directory ``checkpoint``) and the largest offset it holds per partition."""

    checkpoint: str
    max_offset: Positions

    def needed(self, positions: Mapping[TP, int], span: int) -> bool:
        """Still needed while any of its ids can be within ``span`` offsets of a partition's next offset."""
        return any(o >= positions.get(tp, 0) - span - 1 for tp, o in self.max_offset.items())


class CheckpointPointer(msgspec.Struct):
    """``checkpoints/speed/CURRENT``: the commit point, and the writer that holds it (:meth:`CheckpointStore.claim`;
    ``checkpoint`` is ``""`` when that writer has committed nothing yet). ``writer`` and ``seq`` make every body
    unique, so an ETag is never repeated (no ABA) and a swap whose answer was lost recognises its own body."""

    checkpoint: str
    writer: str = ""
    seq: int = 0


class Checkpoint(msgspec.Struct, kw_only=True):
    """``checkpoints/speed/<id>/checkpoint.json``: what a restart resumes from (speed-internal, not a published
    contract). ``views`` records the definition fingerprint of every view's rows in the snapshot (format 2)."""

    checkpoint: str
    snapshot: str = ""
    pipeline: str = ""
    positions: Positions
    pruned_to: Positions = msgspec.field(default_factory=Positions)
    counters: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    dedup_span: int
    block: int
    batch_version: str | None = None
    created_at: float = 0.0
    dedup_chunks: list[DedupChunk] = msgspec.field(default_factory=list)
    views: dict[str, SpeedView] = msgspec.field(default_factory=dict)
    format: int = 1
    epochs: Positions = msgspec.field(default_factory=Positions)  # ownership epoch per partition (lambdalake.speedset)

    @property
    def id(self) -> str:
        return self.checkpoint

    @property
    def seq(self) -> int:
        return int(self.checkpoint)


@dataclass(frozen=True)
class Capture:
    """Step 1 of the commit protocol: everything the writer thread needs, captured from the in-memory state.

    ``dedup_rows``: ids first seen since ``previous`` (the delta), or — with ``full_dedup`` (see
    :meth:`CheckpointStore.needs_full_dedup`) — every id of the windows. Nothing in it may change afterwards.
    """

    checkpoint: Checkpoint
    tables: dict[str, snapshots.ViewFiles]
    snapshot_meta: SpeedSnapshotMeta
    dedup_rows: dict[TP, list[tuple[int, str]]]
    full_dedup: bool
    previous: Checkpoint | None


@dataclass
class Restored:
    """A loaded checkpoint: the checkpoint, its snapshot's view tables and the rebuilt dedup windows."""

    checkpoint: Checkpoint
    tables: dict[str, pa.Table]
    windows: dict[TP, DedupWindow]


class CheckpointStore:
    """Reads and commits the speed checkpoint of one lake (see the module docstring for the protocol)."""

    def __init__(self, layout: Layout, pipeline: Pipeline, keep_snapshots: int = 20,
                 keep_snapshot_seconds: float = 5.0, keep_checkpoints: int = 3):
        self.layout = layout
        self.pipeline = pipeline
        self.dir = layout.checkpoints(COMPONENT)  # for messages, and the local LOCK file
        self.prefix = layout.checkpoints_prefix(COMPONENT)
        self._metas: dict = {}  # snapshot metas by name, for retention (immutable once written)
        self.writer = writer_id()
        self._seq = 0
        self._claimed: str | None = None  # ETag of CURRENT as this writer last swapped it (None: not claimed)
        self._visible: str | None = None  # ETag of views/speed/CURRENT as this writer last saw or wrote it
        self._took_over = False  # the claim replaced another writer's (next_seq skips the id it may be writing)
        self.keep_snapshots = keep_snapshots
        self.keep_snapshot_seconds = keep_snapshot_seconds
        self.keep_checkpoints = keep_checkpoints
        self._lock = PidLock(self.dir / "LOCK", lambda other: SpeedAlreadyRunning(
            f"another `lambdalake speed` (pid {other}) is running on {layout.home}; "
            "stop it first (two speed writers would corrupt the checkpoint)"))

    @property
    def pointer(self) -> Path:
        return self.dir / "CURRENT"

    # single writer ------------------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the lake's speed lock (released by the OS even on kill -9) or raise SpeedAlreadyRunning."""
        self._lock.acquire()

    def unlock(self) -> None:
        """Release the lock; the pid is cleared so status tools do not report a stopped process as running."""
        self._lock.release()

    # fencing ------------------------------------------------------------------------------------------------------
    def _pointer(self) -> tuple[CheckpointPointer | None, str | None]:
        try:
            got = self.layout.store.get_versioned(f"{self.prefix}/CURRENT")
        except ObjectMissing:
            return None, None
        try:
            return contracts.decode(got.data, CheckpointPointer, str(self.pointer)), got.etag
        except InvariantViolation as exc:
            raise CheckpointCorrupt(f"{exc}; remove {self.dir} to rebuild the speed layer from Kafka") from exc

    def claim(self) -> None:
        """Make this writer the worker's only one: swap this writer's name into ``CURRENT`` (same checkpoint). Any
        earlier writer of the worker — a paused process that wakes up, the same worker started on another machine —
        then loses its next commit's swap (:class:`SpeedFenced`) and its next pointer switch, whatever it wrote
        before. On a local lake the LOCK file already keeps a second process out; the swap is the same protocol."""
        for _ in range(MAX_SWAPS):
            ptr, etag = self._pointer()
            self._took_over = ptr is not None
            self._seq = max(self._seq, ptr.seq if ptr else 0) + 1
            body = CheckpointPointer(ptr.checkpoint if ptr else "", self.writer, self._seq)
            got = self._swap(f"{self.prefix}/CURRENT", body, etag)
            if got is not None:
                self._claimed = got
                break
        else:
            raise SpeedFenced(f"{self.pointer}: {MAX_SWAPS} writers claimed it at once; start one speed worker")
        try:
            self._visible = self.layout.store.get_versioned(f"{self.layout.speed_prefix}/CURRENT").etag
        except ObjectMissing:
            self._visible = None

    def _swap(self, key: str, body: msgspec.Struct, expected: str | None) -> str | None:
        """One compare-and-swap of a pointer; a swap whose answer was lost (StorageError) is decided by reading the
        pointer again: this writer's body there (writer id and sequence are unique) means it succeeded."""
        data = contracts.encode(body)
        try:
            return self.layout.store.swap(key, data, expected)
        except StorageError:
            try:
                got = self.layout.store.get_versioned(key)
            except (ObjectMissing, StorageError):
                raise
            if got.data == data:
                return got.etag
            raise

    def _fenced(self, what: str) -> SpeedFenced:
        ptr, _ = self._pointer()
        by = ptr.writer if ptr else "nobody"
        return SpeedFenced(f"speed worker {self.layout.speed_worker or '(all partitions)'}: {what} lost its swap — "
                           f"{by} claimed the worker's checkpoint since this process did ({self.writer}); this process "
                           "stops, the other one serves")

    def _switch_visible(self, snap: str) -> None:
        """Step 6: ``views/speed/CURRENT`` -> ``snap``, only if it is still what this writer last saw or wrote."""
        body = SpeedPointer(snap, self.writer, self._seq)
        got = self._swap(f"{self.layout.speed_prefix}/CURRENT", body, self._visible)
        if got is None:
            raise self._fenced("the switch of the visible snapshot")
        self._visible = got

    # recovery -----------------------------------------------------------------------------------------------------
    def current_id(self) -> str | None:
        ptr, _ = self._pointer()
        return ptr.checkpoint if ptr is not None and ptr.checkpoint else None

    def next_seq(self) -> int:
        """A sequence number above every snapshot/checkpoint in the store (ids are never reused). After taking the
        worker over from another writer (:meth:`claim`) one number is skipped: that writer, if it still runs, may
        be writing the objects of the one commit after its last (at most one is in flight, and its swap fails), and
        those keys must not be this writer's."""
        seqs = [snapshots.seq_of(n) for n in self.layout.speed_snapshots(complete=False)]
        seqs += [snapshots.seq_of(n) for n in self.layout.store.children(self.prefix)]
        committed = self.current_id()
        if committed is not None:
            seqs.append(int(committed))
        return max([s for s in seqs if s is not None], default=0) + (2 if self._took_over else 1)

    def load(self, block: int) -> Restored | None:
        """The last committed checkpoint, or None if there is none. Cleans up a crashed commit's orphans.

        The restored tables are those of the views the checkpoint has rows for (``views`` with a fingerprint);
        a format-1 checkpoint (lambdalake 0.1) records no fingerprints, so none of its tables is trusted.
        """
        snapshots.remove_staging(self.layout)
        self._remove_staging()
        self.claim()
        restored = self.peek(block)
        if restored is None:
            return None
        cp = restored.checkpoint
        # Orphans of a commit that crashed before step 5 (never visible, never referenced).
        removed = snapshots.remove_after(self.layout, cp.seq)
        for name in self.layout.store.children(self.prefix):
            s = snapshots.seq_of(name)
            if s is not None and s > cp.seq:
                snapshots.remove_prefix(self.layout, f"{self.prefix}/{name}")
                removed.append(name)
        if removed:
            log.info("removed %d orphan(s) of an interrupted checkpoint commit: %s", len(removed), removed)
        # 6 (redo): the visible snapshot is the committed one.
        if snapshots.visible_snapshot(self.layout) != cp.snapshot:
            self._switch_visible(cp.snapshot)
        return restored

    def peek(self, block: int) -> Restored | None:
        """The last committed checkpoint, read only (no clean-up): also another worker's, whose partition a group
        member takes over (:mod:`speed.adoption`). None if there is none; :class:`CheckpointCorrupt` if
        unreadable."""
        cid = self.current_id()
        if cid is None:
            return None
        cdir = self.dir / cid
        try:
            cp = contracts.decode(self.layout.store.get(f"{self.prefix}/{cid}/checkpoint.json"), Checkpoint,
                                  str(cdir / "checkpoint.json"))
        except (OSError, ObjectMissing, InvariantViolation) as exc:
            raise CheckpointCorrupt(f"speed checkpoint {cdir} is unreadable ({exc}); remove {self.dir} to rebuild "
                                    "the speed layer from Kafka") from exc
        if cp.format > FORMAT or cp.pipeline != self.pipeline.name:
            raise CheckpointCorrupt(f"speed checkpoint {cdir} is for pipeline {cp.pipeline!r} (format "
                                    f"{cp.format}), not {self.pipeline.name!r}; use another --home or remove "
                                    f"{self.dir}")
        if cp.block != block:
            raise CheckpointCorrupt(f"speed checkpoint {cdir} was written with handoff block {cp.block}, but "
                                    f"LAMBDALAKE_HANDOFF_BLOCK is {block}; the speed state cannot be re-split. Set it "
                                    f"back or remove {self.dir} to rebuild")
        meta, tables = snapshots.read_snapshot(self.layout, cp.snapshot,
                                             [n for n, v in cp.views.items() if v.fingerprint])
        if meta.positions != cp.positions:  # paranoid: the two halves of one commit
            raise CheckpointCorrupt(f"speed checkpoint {cid} and its snapshot disagree on positions; remove "
                                    f"{self.dir} to rebuild")
        return Restored(cp, tables, self._load_dedup(cp))

    def _load_dedup(self, cp: Checkpoint) -> dict[TP, DedupWindow]:
        items: dict[TP, list[tuple[int, str]]] = {tp: [] for tp in cp.positions}
        for chunk in cp.dedup_chunks:
            path = self.dir / chunk.checkpoint / "dedup.parquet"
            try:
                t = snapshots.read_table(self.layout, f"{self.prefix}/{chunk.checkpoint}/dedup.parquet")
            except (OSError, ObjectMissing, pa.ArrowException) as exc:
                raise CheckpointCorrupt(f"dedup chunk {path} of speed checkpoint {cp.id} is unreadable ({exc}); "
                                        f"remove {self.dir} to rebuild") from exc
            for topic, p, o, eid in zip(*(t.column(i).to_pylist() for i in range(4)), strict=True):
                lst = items.setdefault((topic, p), [])
                if (lst and o <= lst[-1][0]) or o >= cp.positions.get((topic, p), 0):
                    raise CheckpointCorrupt(f"dedup chunk {path}: offset {o} of {topic}[{p}] is out of order or "
                                            f"not below the checkpoint's position; remove {self.dir} to rebuild")
                lst.append((o, eid))
        windows = {}
        for tp, lst in items.items():
            horizon = cp.positions.get(tp, 0) - cp.dedup_span - 1
            windows[tp] = DedupWindow.from_items(cp.dedup_span, [x for x in lst if x[0] >= horizon])
        return windows

    def _remove_staging(self) -> None:
        """A crashed commit's temp entries: staging directories and a ``CURRENT`` switch killed before its rename
        (this process holds the checkpoint LOCK: no other writer)."""
        removed = remove_temp_entries(self.dir)
        remove_stale = getattr(self.layout.store, "remove_stale_temps", None)
        if remove_stale is not None and remove_stale(self.prefix, older_than=0.0):
            removed.append("temporary files")
        if removed:
            log.info("removed temp entries of an interrupted checkpoint commit: %s", removed)

    # commit -------------------------------------------------------------------------------------------------------
    def needs_full_dedup(self, previous: Checkpoint | None, positions: dict[TP, int], span: int) -> bool:
        """Whether the next checkpoint must write the whole dedup windows instead of a delta: no previous
        checkpoint, a changed span, or too many chunks still needed (compaction)."""
        if previous is None or previous.dedup_span != span:
            return True
        return sum(c.needed(positions, span) for c in previous.dedup_chunks) >= MAX_DEDUP_CHUNKS

    def commit(self, capture: Capture) -> Checkpoint:
        """THE commit protocol of a speed checkpoint; numbered comments (and ``LAMBDALAKE_SPEED_FAULT`` crash
        points) mirror the steps:

        1. Capture — on the consumer thread, before this call (:func:`speed.capture.capture`): the
           snapshot's tables (immutable Arrow), positions, counters, per-view fingerprints and the dedup rows, as
           ``capture``; the state may change right after. This method then runs in the single writer thread
           (``concurrent.futures``), at most one commit in flight, while the consumer keeps consuming.
        2. Write the snapshot's objects under ``views/speed/<id>/``, its ``snapshot.json`` last. Not visible.
        3. Write the checkpoint's objects under ``checkpoints/speed/<id>/``: the dedup chunk (the delta since the
           previous checkpoint, or the whole windows when compacting), then ``checkpoint.json``.
        4. Paranoid check: the snapshot and checkpoint exist and agree on positions.
        5. Switch ``checkpoints/speed/CURRENT`` to ``<id>`` — the commit point. A crash before it leaves the
           previous checkpoint in force; what steps 2-3 wrote is an orphan that recovery deletes.
        6. Switch ``views/speed/CURRENT`` to ``<id>`` — the snapshot becomes visible. Visible state is therefore
           never ahead of durable state; recovery redoes this step if a crash fell between 5 and 6.
        7. Report the positions to Kafka's consumer group (lag monitoring only; never read back). kafka-python
           clients are not thread-safe, so the consumer thread does it when it takes this method's result
           (``Future.result()`` in :meth:`speed.consumer.SpeedLayer._reap`).
        8. Garbage-collect old snapshots (:func:`speed.snapshot.retain`) and the checkpoint directories no kept
           checkpoint references.

        Returns the committed checkpoint (its ``dedup_chunks`` are computed in step 3).
        """
        cp, previous = capture.checkpoint, capture.previous
        # 2. The snapshot, every object written, snapshot.json last; not yet visible.
        fault(2)
        snapshots.write_snapshot(self.layout, cp.id, capture.tables, capture.snapshot_meta)
        # 3. The checkpoint directory: dedup chunk (delta, or everything when compacting) + checkpoint.json.
        fault(3)
        chunks = [] if capture.full_dedup or previous is None else [
            c for c in previous.dedup_chunks if c.needed(cp.positions, cp.dedup_span)]
        chunk_max = {tp: lst[-1][0] for tp, lst in capture.dedup_rows.items() if lst}
        if chunk_max:
            chunks.append(DedupChunk(cp.id, Positions(chunk_max)))
        cp.dedup_chunks = chunks
        sink = pa.BufferOutputStream()
        pq.write_table(_dedup_table(capture.dedup_rows), sink, compression="lz4")
        self.layout.store.put(f"{self.prefix}/{cp.id}/dedup.parquet", sink.getvalue().to_pybytes())
        self.layout.store.put(f"{self.prefix}/{cp.id}/checkpoint.json", contracts.encode(cp))  # last: complete
        # 4. Paranoid: both halves exist and agree before anything points at them.
        fault(4)
        if read_speed_snapshot_meta(self.layout, cp.snapshot).positions != cp.positions:
            raise CheckpointCorrupt(f"snapshot {cp.snapshot} does not hold the positions of checkpoint {cp.id}")
        # 5. The commit point.
        fault(5)
        if self._claimed is None:  # a store used without load() (tests, tools): claim now
            self.claim()
        body = CheckpointPointer(cp.id, self.writer, self._seq + 1)
        got = self._swap(f"{self.prefix}/CURRENT", body, self._claimed)
        if got is None:
            raise self._fenced(f"checkpoint {cp.id}")
        self._seq, self._claimed = body.seq, got
        # 6. Visible to the serving layer.
        fault(6)
        self._switch_visible(cp.id)
        # 7. Kafka lag commit: by the consumer thread when it takes this result (see the docstring).
        fault(7)
        # 8. Garbage collection.
        self._gc(cp)
        return cp

    def _gc(self, cp: Checkpoint) -> None:
        snapshots.retain(self.layout, self.keep_snapshots, self.keep_snapshot_seconds, protect={cp.id},
                         metas=self._metas)
        cps = sorted(n for n in self.layout.store.children(self.prefix) if snapshots.seq_of(n) is not None)
        kept = set(cps[-self.keep_checkpoints:])
        referenced = set(kept)
        for name in kept:
            try:
                kept_cp = contracts.decode(self.layout.store.get(f"{self.prefix}/{name}/checkpoint.json"),
                                           Checkpoint, name)
            except (ObjectMissing, InvariantViolation):
                continue
            referenced.update(c.checkpoint for c in kept_cp.dedup_chunks)
        for name in cps:
            if name not in referenced:
                snapshots.remove_prefix(self.layout, f"{self.prefix}/{name}")


def _dedup_table(rows: dict[TP, Iterable[tuple[int, str]]]) -> pa.Table:
    topics: list[str] = []
    parts: list[int] = []
    offsets: list[int] = []
    ids: list[str] = []
    for (t, p), lst in sorted(rows.items()):
        lst = list(lst)
        topics += [t] * len(lst)
        parts += [p] * len(lst)
        offsets += [o for o, _ in lst]
        ids += [e for _, e in lst]
    return pa.Table.from_arrays([pa.array(topics, pa.string()), pa.array(parts, pa.int32()),
                                 pa.array(offsets, pa.int64()), pa.array(ids, pa.string())], schema=DEDUP_SCHEMA)
