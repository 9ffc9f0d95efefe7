"""``lambdalake status``: where every layer stands, per source, partition and view (reads only the core's published
contracts and Kafka end offsets, so it belongs to no layer).

Per view: the declared definition's fingerprint, the batch and speed fingerprints, and the state — ``current`` or
``rebuilding`` (batch pending / speed rebuild progress).

Per partition: Kafka end offset, archiver position (end of the master dataset), speed position ``S`` (of the published
snapshot), batch watermark ``W`` (of the published version), speed lag (``end - S``), DLQ messages, plus the
published batch version and the freshness (age) of the published speed snapshot. Every number is read from the
published state (pointers and manifests), never from a running process, so it is what a query would see.

Per master partition: its head (:mod:`lambdalake.heads`) — owner, epoch, archived end, files, generation — or none
yet (a partition written by release 0.2, read by that release's rule until the archiver claims it).

Owners (docs/design.md, "Ownership is per partition"): per partition, the archiver that last claimed it (the head's
owner and epoch, and how long ago the head last changed) and the speed worker whose snapshot serving takes it from
(its epoch and how long ago that snapshot was published). A partition is *stalled* when a layer that runs on this
lake is behind the log on it and has not moved for longer than ``LAMBDALAKE_STALL_SECONDS`` (default 300): its
owner is dead, paused or stuck, and no other took it over. ``lambdalake status --check`` and the maintenance DAG
fail on stalled partitions.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import psutil

from lambdalake.config import Settings, env_float
from lambdalake.contracts import BatchManifest, Positions, SpeedSnapshotMeta
from lambdalake.definitions import definitions
from lambdalake.exceptions import BrokerError, InvariantViolation
from lambdalake.heads import archived_positions, head_key, partitions, stored_head
from lambdalake.layout import (
    SPEED_COMPONENT,
    Layout,
    current_batch_manifest,
)
from lambdalake.pipeline import Pipeline
from lambdalake.speedset import current_speed_snapshot, epoch_of, read_speed_set
from lambdalake.storage.base import ObjectMissing


@dataclass
class PartitionStatus:
    source: str
    topic: str
    partition: int
    end_offset: int | None
    archived: int | None
    speed_position: int | None
    batch_watermark: int | None
    lag: int | None  # end_offset - speed_position
    visible_lag: int | None  # end_offset - max(speed_position, batch_watermark): not yet in any query
    dlq: int | None  # messages in the same-numbered partition of the source's DLQ topic
    archiver_owner: str | None = None  # the head's owner (host-pid-id of the archiver that last claimed it)
    archiver_epoch: int | None = None
    archiver_idle_seconds: float | None = None  # since the head last changed
    speed_worker: str | None = None  # the speed worker whose snapshot serving takes the partition from
    speed_epoch: int | None = None
    speed_idle_seconds: float | None = None  # since that snapshot was published
    stalled: list[str] = field(default_factory=list)  # why the partition is stalled (module docstring)


@dataclass
class ViewStatus:
    """Which definition each side holds of one declared view (docs/design.md, "Definitions change")."""

    view: str
    declared: str  # fingerprint of the declared definition
    batch: str | None  # fingerprint of the view in the published batch version (None: no version, or not in it)
    speed: str | None  # fingerprint of the rows in the published speed snapshot ("" = none yet)
    speed_target: str | None  # the definition the speed layer is rebuilding the view for
    speed_progress: float | None  # 0..1 while it does
    state: str  # "current" or "rebuilding"
    detail: str  # e.g. "batch pending, speed 63%"


def view_status(pipeline: Pipeline, manifest: BatchManifest | None, snap: SpeedSnapshotMeta | None) -> list[ViewStatus]:
    """Per declared view: declared, batch and speed fingerprints and whether both sides are of the declared one."""
    out = []
    for v in pipeline.views:
        d = definitions(pipeline, v, manifest, snap)
        sv = None if snap is None else snap.views.get(v.name)
        out.append(ViewStatus(
            view=v.name, declared=d.declared, batch=d.batch, speed=None if sv is None else sv.fingerprint,
            speed_target=None if sv is None else sv.target, speed_progress=None if sv is None else sv.progress,
            state="current" if d.current else "rebuilding", detail=d.pending))
    return out


@dataclass
class ErasureStatus:
    """One ``lambdalake forget`` request and its stage (:mod:`lambdalake.erasure`)."""

    id: str
    source: str
    subject: str
    requested_at: str
    stage: str  # received, master rewritten, batch corrected, speed corrected, complete
    messages_erased: int


def erasure_status(layout: Layout, manifest: BatchManifest | None) -> list[ErasureStatus]:
    from lambdalake.erasure import read_requests, stage

    return [ErasureStatus(r.id, r.source, r.subject, r.requested_at, stage(layout, r, manifest), r.messages_erased)
            for r in read_requests(layout)]


@dataclass
class HeadStatus:
    """One master partition's head (docs/design.md, "Master heads"); ``owner`` None: the partition has no head yet
    (release 0.2 files, read by that release's rule until the archiver claims it) and the other fields are None."""

    source: str
    partition: int
    owner: str | None
    epoch: int | None
    end: int | None  # archived end (None: nothing archived)
    files: int | None  # master files the head lists
    rejected: int | None  # rejected files the head lists
    generation: int | None  # compactions and erasure rewrites of the partition


def head_status(layout: Layout, pipeline: Pipeline, errors: list[str]) -> list[HeadStatus]:
    out = []
    for src in pipeline.sources:
        for p in partitions(layout, src.name):
            try:
                h, _ = stored_head(layout, src.name, p)
            except InvariantViolation as exc:
                errors.append(f"master head of {src.name}[{p}]: {exc}")
                continue
            out.append(HeadStatus(src.name, p, None, None, None, None, None, None) if h is None else
                       HeadStatus(src.name, p, h.owner, h.epoch, h.end, len(h.files), len(h.rejected), h.generation))
    return out


@dataclass
class Status:
    pipeline: str
    bootstrap: str
    kafka_error: str | None
    batch_version: str | None
    batch_published_at: str | None
    speed_snapshot: str | None
    speed_created_at: str | None
    speed_freshness_seconds: float | None
    speed_running_pid: int | None
    partitions: list[PartitionStatus]
    views: list[ViewStatus]
    dlq_total: dict[str, int | None]
    errors: list[str]
    erasures: list[ErasureStatus] = field(default_factory=list)  # lambdalake forget requests, oldest first
    heads: list[HeadStatus] = field(default_factory=list)  # per source and master partition
    stall_seconds: float = 300.0

    @property
    def stalled(self) -> list[str]:
        return [f"{p.topic}[{p.partition}]: {why}" for p in self.partitions for why in p.stalled]

    def to_json(self) -> dict:
        return asdict(self)


def speed_pid(layout: Layout) -> int | None:
    """Pid of a running ``lambdalake speed`` (any worker) of this lake, if any (from the lock files; checked to be
    alive: the pid is cleared on a clean exit, kill -9 may leave it)."""
    root = layout.root()  # (on object storage: the lock files of this machine's work directory)
    for worker in root.speed_workers():
        lock = root.for_speed_worker(worker).checkpoints(SPEED_COMPONENT) / "LOCK"
        try:
            pid = int(lock.read_text().strip())
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return pid
        except (OSError, ValueError, psutil.Error):
            pass
    return None


def stall_seconds() -> float:
    """``LAMBDALAKE_STALL_SECONDS`` (default 300): how long a layer behind the log may stand still on a partition."""
    return env_float("LAMBDALAKE_STALL_SECONDS", 300.0, minimum=1.0)


def _owners(layout: Layout, pipeline: Pipeline, rows: list[PartitionStatus], threshold: float,
            errors: list[str]) -> None:
    """Fill each row's owners and stalls (module docstring)."""
    now = time.time()
    try:
        found = read_speed_set(layout)
    except (InvariantViolation, FileNotFoundError) as exc:
        found, _ = None, errors.append(f"speed snapshots: {exc}")
    holder = {} if found is None else {key: part for part in found.parts for key in part.partitions}
    names = {s.topic: s.name for s in pipeline.sources}
    any_head = False
    for row in rows:
        key = (row.topic, row.partition)
        try:
            head, _ = stored_head(layout, names[row.topic], row.partition)
            if head is not None:
                any_head = True
                row.archiver_owner, row.archiver_epoch = head.owner, head.epoch
                row.archiver_idle_seconds = max(0.0, now - layout.store.modified(
                    head_key(names[row.topic], row.partition)))
        except (InvariantViolation, ObjectMissing):
            pass
        part = holder.get(key)
        if part is not None:
            row.speed_worker, row.speed_epoch = part.worker or "(all partitions)", epoch_of(part.meta, key)
            created = part.meta.created_time
            row.speed_idle_seconds = None if created is None else max(0.0, now - created.timestamp())
    for row in rows:
        if row.end_offset is None:
            continue
        if any_head and row.end_offset > (row.archived or 0):
            if row.archiver_owner is None:
                row.stalled.append("no archiver has claimed it")
            elif (row.archiver_idle_seconds or 0) > threshold:
                row.stalled.append(f"archiver {row.archiver_owner} (epoch {row.archiver_epoch}) is "
                                   f"{row.end_offset - (row.archived or 0):,} behind and has not archived for "
                                   f"{row.archiver_idle_seconds:.0f}s")
        if holder and row.end_offset > max(row.speed_position or 0, row.batch_watermark or 0):
            if row.speed_worker is None:
                row.stalled.append("no speed worker holds it")
            elif (row.speed_idle_seconds or 0) > threshold:
                row.stalled.append(f"speed worker {row.speed_worker} (epoch {row.speed_epoch}) is "
                                   f"{row.lag or 0:,} behind and has not published for {row.speed_idle_seconds:.0f}s")


def collect(settings: Settings, pipeline: Pipeline, threshold: float | None = None) -> Status:
    """Gather the status; Kafka being down or a broken layer shows as an error field, not an exception."""
    from lambdalake.clients import committed_counts, end_offsets

    layout = Layout.of(settings.home, settings.lake)  # a local lake, or a bucket read through the storage seam
    errors: list[str] = []
    kafka_error = None
    ends: dict[tuple[str, int], int] = {}
    dlq: dict[tuple[str, int], int] = {}
    try:
        ends = end_offsets(settings, [s.topic for s in pipeline.sources])
        dlq = committed_counts(settings, [s.dlq_topic for s in pipeline.sources])  # records, not offsets
    except BrokerError as exc:
        kafka_error = str(exc)
    try:
        manifest = current_batch_manifest(layout)
    except InvariantViolation as exc:
        manifest, _ = None, errors.append(str(exc))
    try:
        snap = current_speed_snapshot(layout)
    except InvariantViolation as exc:
        snap, _ = None, errors.append(str(exc))
    watermark = Positions() if manifest is None else manifest.watermark
    speed_pos = Positions() if snap is None else snap.positions
    rows: list[PartitionStatus] = []
    dlq_total: dict[str, int | None] = {}
    for src in pipeline.sources:
        try:
            archived = archived_positions(layout, src.name)
        except InvariantViolation as exc:
            archived = {}
            errors.append(f"master dataset of {src.name}: {exc}")
        parts = {p for (t, p) in ends if t == src.topic} | {p for (t, p) in speed_pos if t == src.topic}
        parts |= {p for (t, p) in watermark if t == src.topic} | set(archived)
        for p in sorted(parts):
            end = ends.get((src.topic, p))
            s = speed_pos.get((src.topic, p))
            w = watermark.get((src.topic, p))
            rows.append(PartitionStatus(
                source=src.name, topic=src.topic, partition=p, end_offset=end, archived=archived.get(p),
                speed_position=s, batch_watermark=w,
                lag=None if end is None or s is None else max(0, end - s),
                visible_lag=None if end is None else max(0, end - max(s or 0, w or 0)),
                dlq=dlq.get((src.dlq_topic, p)) if kafka_error is None else None))
        dlq_total[src.dlq_topic] = (sum(n for (t, _), n in dlq.items() if t == src.dlq_topic)
                                    if kafka_error is None else None)
    threshold = stall_seconds() if threshold is None else threshold
    _owners(layout, pipeline, rows, threshold, errors)
    created = None if snap is None else snap.created_time
    published = None if manifest is None else manifest.published_time
    return Status(
        pipeline=pipeline.name, bootstrap=settings.bootstrap, kafka_error=kafka_error,
        batch_version=None if manifest is None else manifest.version,
        batch_published_at=None if published is None else published.isoformat(),
        speed_snapshot=None if snap is None else snap.snapshot,
        speed_created_at=None if snap is None else snap.created_at,
        speed_freshness_seconds=None if created is None else max(0.0, time.time() - created.timestamp()),
        speed_running_pid=speed_pid(layout), partitions=rows, views=view_status(pipeline, manifest, snap),
        dlq_total=dlq_total, errors=errors, erasures=erasure_status(layout, manifest),
        heads=head_status(layout, pipeline, errors), stall_seconds=threshold)
