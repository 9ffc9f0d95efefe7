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
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import psutil

from lambdalake.config import Settings
from lambdalake.contracts import BatchManifest, Positions, SpeedSnapshotMeta
from lambdalake.definitions import definitions
from lambdalake.exceptions import BrokerError, InvariantViolation
from lambdalake.heads import archived_positions, partitions, stored_head
from lambdalake.layout import (
    SPEED_COMPONENT,
    Layout,
    current_batch_manifest,
)
from lambdalake.pipeline import Pipeline
from lambdalake.speedset import current_speed_snapshot


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

    def to_json(self) -> dict:
        return asdict(self)


def speed_pid(layout: Layout) -> int | None:
    """Pid of a running ``lambdalake speed`` (any worker) of this lake, if any (from the lock files; checked to be
    alive: the pid is cleared on a clean exit, kill -9 may leave it)."""
    root = Layout(layout.home)
    for worker in root.speed_workers():
        lock = root.for_speed_worker(worker).checkpoints(SPEED_COMPONENT) / "LOCK"
        try:
            pid = int(lock.read_text().strip())
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return pid
        except (OSError, ValueError, psutil.Error):
            pass
    return None


def collect(settings: Settings, pipeline: Pipeline) -> Status:
    """Gather the status; Kafka being down or a broken layer shows as an error field, not an exception."""
    from lambdalake.clients import end_offsets

    layout = Layout(settings.home)
    errors: list[str] = []
    kafka_error = None
    ends: dict[tuple[str, int], int] = {}
    try:
        ends = end_offsets(settings, [t for s in pipeline.sources for t in (s.topic, s.dlq_topic)])
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
                dlq=ends.get((src.dlq_topic, p)) if ends else None))
        dlq_total[src.dlq_topic] = (sum(n for (t, _), n in ends.items() if t == src.dlq_topic)
                                    if kafka_error is None else None)
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
        heads=head_status(layout, pipeline, errors))
