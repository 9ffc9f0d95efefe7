"""Forgetting a subject (``lambdalake forget``; docs/design.md, "Forgetting a subject"): the records, and how every
reader learns what is erased.

A *subject* is a value of a source's key field (e.g. a ``user_id``). ``lambdalake forget --source S V...`` works in
resumable steps (the master rewrite itself is :mod:`batch.erase`, through :mod:`batch.rewrite`):

1. **received** — the request (:class:`lambdalake.contracts.ErasureRequest`) is produced to the compacted topic
   ``lambdalake.erasures`` (key ``<source>/<subject>``) and written to ``checkpoints/erasures/<source>/<id>.json``
   before anything else. From then on every reader skips the subject: the speed layer where records are applied
   (:func:`speed.state.apply_records`), every replay and rebuild, the batch job and its checks, the audit, and serving
   (rows of views keyed by the source's key field, and ``master.<source>``).
2. **master rewritten** — every master file and rejected file holding a message of the subject is rewritten without
   it, atomically, under the master readers lock, each rewrite recorded in ``master/_log/<utc>-erase-...json``
   (like compaction). The offsets removed are accounted as *erased* (:func:`erased_offsets`).
3. **batch corrected** — derived: the published batch version read none of the master files as they were before
   the rewrite (its manifest's inputs checksums), so its aggregates no longer include the subject.
4. **speed corrected** — the speed layer rebuilt the views of the source from the log without the subject and
   committed a checkpoint of that state (:class:`ErasureWatch`).
5. **complete** — both.

Events of an erased subject produced *after* the request are skipped too (the subject stays forgotten); running
``forget`` again for the same subject rewrites the master files that archived them since.

The log itself keeps the raw messages until its retention deletes them: :func:`retention` reads it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from lambdalake import contracts
from lambdalake.contracts import (
    ERASURE_STAGES,
    REWRITE_DONE,
    REWRITE_STARTED,
    BatchManifest,
    ErasureRecord,
    ErasureRequest,
    utc_now_iso,
)
from lambdalake.exceptions import InvariantViolation
from lambdalake.layout import Layout, rewrite_dir, rewrite_records
from lambdalake.storage.base import ObjectMissing

log = logging.getLogger(__name__)

ERASURES_TOPIC = "lambdalake.erasures"
COMPONENT = "erasures"  # checkpoints/erasures/<source>/<id>.json
SPEED = "speed"  # the speed layer's checkpoints component (lambdalake.layout.SPEED_COMPONENT)
RECEIVED, MASTER_REWRITTEN, BATCH_CORRECTED, SPEED_CORRECTED, COMPLETE = ERASURE_STAGES


# --- requests ---------------------------------------------------------------------------------------------------------
def request_id(source: str, subject: str) -> str:
    """A stable file name for (source, subject): the subject never appears in a path."""
    return hashlib.sha256(f"{source}\0{subject}".encode()).hexdigest()[:24]


def requests_dir(layout: Layout, source: str) -> Path:
    return layout.checkpoints(COMPONENT) / source


def request_path(layout: Layout, source: str, subject: str) -> Path:
    return requests_dir(layout, source) / f"{request_id(source, subject)}.json"


def request_key(source: str, subject: str) -> str:
    """The object of the request for (source, subject) in the lake's store."""
    return f"checkpoints/{COMPONENT}/{source}/{request_id(source, subject)}.json"


def read_requests(layout: Layout, source: str | None = None) -> list[ErasureRequest]:
    """Every recorded request (of ``source``), oldest first (through the lake's store)."""
    prefix = f"checkpoints/{COMPONENT}/" + (f"{source}/" if source else "")
    out = []
    for key in layout.store.list(prefix):
        if key.endswith(".json") and key.count("/") == 3:
            try:
                out.append(contracts.decode(layout.store.get(key), ErasureRequest, key))
            except ObjectMissing:  # removed meanwhile
                continue
    out.sort(key=lambda r: (r.requested_at_unix, r.source, r.subject))
    return out


def read_request(path: Path) -> ErasureRequest:
    return contracts.read(path, ErasureRequest)


def stored_request(layout: Layout, source: str, subject: str) -> ErasureRequest | None:
    """The recorded request for (source, subject) in the lake's store, or None."""
    key = request_key(source, subject)
    try:
        return contracts.decode(layout.store.get(key), ErasureRequest, key)
    except ObjectMissing:
        return None


def write_request(layout: Layout, req: ErasureRequest) -> None:
    layout.store.put(request_key(req.source, req.subject), contracts.encode(req))


def _update_request(layout: Layout, req: ErasureRequest, change: Callable[[ErasureRequest], bool]) -> bool:
    """Apply ``change`` to the stored request by compare-and-swap (several speed workers mark one request at once);
    False when ``change`` found nothing to do or the request is gone."""
    key = request_key(req.source, req.subject)
    for _ in range(100):
        try:
            got = layout.store.get_versioned(key)
        except ObjectMissing:
            return False
        current = contracts.decode(got.data, ErasureRequest, key)
        if not change(current):
            return False
        if layout.store.swap(key, contracts.encode(current), got.etag) is not None:
            return True
    raise InvariantViolation(f"erasure request {key}: 100 concurrent updates in a row; giving up")


def new_request(source: str, subject: str) -> ErasureRequest:
    return ErasureRequest(id=request_id(source, subject), source=source, subject=subject,
                          requested_at=utc_now_iso(), requested_at_unix=time.time())


def erased_subjects(layout: Layout, source: str) -> frozenset[str]:
    """The subjects of ``source`` a forget request was recorded for (from stage *received* on): skipped by every
    reader."""
    return frozenset(r.subject for r in read_requests(layout, source))


def subject_of(value: bytes | None, key: str) -> str | None:
    """The subject of a raw log message (also an invalid one): its ``key`` field if it is a JSON object holding a
    string there, else None (a message that names no subject cannot be attributed)."""
    if not value:
        return None
    try:
        doc = msgspec.json.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    if isinstance(doc, dict):
        got = doc.get(key)
        return got if isinstance(got, str) else None
    return None


def not_erased_sql(column_sql: str, subjects: Iterable[str]) -> str:
    """A SQL predicate (DuckDB): ``column_sql`` is none of ``subjects`` (TRUE when there are none; NULL keys kept)."""
    subjects = sorted(subjects)
    if not subjects:
        return "TRUE"
    values = ", ".join("'" + s.replace("'", "''") + "'" for s in subjects)
    return f"({column_sql} IS NULL OR {column_sql} NOT IN ({values}))"


# --- rewrite records (master/_log/*-erase-*.json, written by batch.erase through batch.rewrite) -------------------
def erase_records(layout: Layout) -> list[tuple[Path, ErasureRecord]]:
    """The erasure rewrite records under ``master/_log/``, oldest first."""
    return rewrite_records(layout, ErasureRecord)


def record_file(layout: Layout, rec: ErasureRecord) -> Path:
    """The file an erasure record rewrote (``master/...`` or ``rejected/...``)."""
    return rewrite_dir(layout, rec) / rec.name


def erased_offsets(layout: Layout, source: str) -> dict[int, frozenset[int]]:
    """{partition: offsets} whose message an erasure removed from master or a rejected file (accounted *erased*)."""
    out: dict[int, set[int]] = {}
    for _, rec in erase_records(layout):
        if rec.source != source or not _in_effect(layout, rec):
            continue
        out.setdefault(int(rec.partition), set()).update(int(o) for o in rec.offsets)
    return {p: frozenset(s) for p, s in out.items()}


def _in_effect(layout: Layout, rec: ErasureRecord) -> bool:
    if rec.status == REWRITE_DONE:
        return True
    if rec.status != REWRITE_STARTED:
        return False
    if rec.replaced_names():  # a version of its own name (object storage): in effect from the head swap on
        from lambdalake.heads import stored_head

        head, _ = stored_head(layout, rec.source, int(rec.partition))
        return head is not None and rec.new_name() in {f.name for f in head.listed(rec.dataset)}
    path = record_file(layout, rec)
    return path.exists() and _sha256(path) == rec.new_sha256()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(4 * 1024 * 1024):
            h.update(block)
    return h.hexdigest()


# --- stages -----------------------------------------------------------------------------------------------------------
def replaced_inputs(layout: Layout, req: ErasureRequest) -> set[tuple[str, str]]:
    """(path relative to the lake, sha256) of every file version the erasure of ``req`` replaced."""
    out = set()
    for _, rec in erase_records(layout):
        if req.id in rec.requests and rec.status == REWRITE_DONE:
            rel = layout.key(record_file(layout, rec))
            out.add((rel, rec.old.sha256))
    return out


def batch_corrected(layout: Layout, req: ErasureRequest, manifest: BatchManifest | None) -> bool:
    """The published batch version counts nothing of the subject: master was rewritten and the version read no
    file as it was before (no batch version at all: nothing to correct)."""
    if req.master_rewritten_at is None:
        return False
    if manifest is None:
        return True
    old = replaced_inputs(layout, req)
    read = {(i.path, i.sha256) for i in [*manifest.inputs, *manifest.rejected_inputs]}
    return not (old & read)


def stage(layout: Layout, req: ErasureRequest, manifest: BatchManifest | None) -> str:
    """The request's stage now (module docstring)."""
    if req.master_rewritten_at is None:
        return RECEIVED
    b, s = batch_corrected(layout, req, manifest), speed_corrected(layout, req)
    return COMPLETE if b and s else BATCH_CORRECTED if b else SPEED_CORRECTED if s else MASTER_REWRITTEN


def speed_workers(layout: Layout) -> list[str]:
    """The speed workers that keep a checkpoint ("" = the one owning every partition): each must correct."""
    if not hasattr(layout, "speed_workers"):  # a layout without speed workers: the one speed layer
        return [""] if (layout.checkpoints(SPEED) / "CURRENT").exists() else []
    return [w for w in layout.speed_workers() if _has_checkpoint(layout, w)]


def _has_checkpoint(layout: Layout, worker: str) -> bool:
    """Whether speed worker ``worker`` committed a checkpoint (its ``CURRENT`` names one: a worker that claimed its
    pointer and died before committing holds no state to correct)."""
    try:
        data = layout.store.get(f"{layout.for_speed_worker(worker).checkpoints_prefix(SPEED)}/CURRENT")
    except ObjectMissing:
        return False
    try:
        return bool(msgspec.json.decode(data).get("checkpoint"))
    except (msgspec.DecodeError, AttributeError):
        return True  # unreadable: the speed layer itself reports it; count the worker


def speed_corrected(layout: Layout, req: ErasureRequest, workers: list[str] | None = None) -> bool:
    """Every speed worker committed state rebuilt without the subject (no speed layer at all: nothing to do)."""
    workers = speed_workers(layout) if workers is None else workers
    return all(w in req.speed_workers_corrected for w in workers)


def mark_speed_corrected(layout: Layout, ids: Iterable[str], worker: str = "") -> list[ErasureRequest]:
    """Record that speed worker ``worker`` committed state rebuilt without the subjects of requests ``ids``."""
    want, done = set(ids), []
    now = utc_now_iso()
    workers = speed_workers(layout)
    def mark(req: ErasureRequest) -> bool:
        if worker in req.speed_workers_corrected:
            return False
        req.speed_workers_corrected[worker] = now
        if speed_corrected(layout, req, workers):
            req.speed_corrected_at = now
        return True

    for req in read_requests(layout):
        if req.id in want and _update_request(layout, req, mark):
            done.append(req)
    return done


class ErasureWatch:
    """The speed layer's view of the erasures (kept small: the speed layer calls it at three seams).

    - :meth:`subjects` — the erased subjects of a topic, skipped where records are applied (refreshed at most once a
      second by :meth:`poll`);
    - :meth:`poll` — the views to rebuild from the log for requests the speed state does not reflect yet (none while
      a rebuild runs);
    - :meth:`committed` — a checkpoint was committed: when it holds those views rebuilt (not being rebuilt, written
      after the rebuild began), the requests are *speed corrected*. A crash before that: the restart rebuilds again.
    """

    def __init__(self, layout: Layout, pipeline: Any, refresh_seconds: float = 1.0):
        self.layout = layout
        self.worker: str = getattr(layout, "speed_worker", "")  # each speed worker rebuilds its own partitions' state
        self.pipeline = pipeline
        self.refresh_seconds = refresh_seconds
        self._subjects: dict[str, frozenset[str]] = {}
        self._pending: dict[str, ErasureRequest] = {}
        self._checked = -1e9
        self._started: dict[str, float] = {}  # request id -> when its rebuild began
        self._views: set[str] = set()
        self.refresh()
        self._checked = -1e9  # the first poll looks at once (a restart resumes a rebuild a crash interrupted)

    def refresh(self) -> None:
        self._checked = time.monotonic()
        subjects: dict[str, set[str]] = {}
        pending = {}
        for req in read_requests(self.layout):
            subjects.setdefault(req.source, set()).add(req.subject)
            if self.worker not in req.speed_workers_corrected:
                pending[req.id] = req
        self._subjects = {s.topic: frozenset(subjects.get(s.name, ())) for s in self.pipeline.sources}
        self._pending = pending

    def subjects(self, topic: str) -> frozenset[str]:
        return self._subjects.get(topic, frozenset())

    def poll(self, pipeline: Any, rebuilding: bool) -> list[str]:
        """Views to rebuild now (empty: nothing new, or a rebuild is running: asked again later)."""
        self.pipeline = pipeline
        if time.monotonic() - self._checked < self.refresh_seconds:
            return []
        self.refresh()
        if rebuilding:
            return []
        new = [r for i, r in self._pending.items() if i not in self._started]
        if not new:
            return []
        now = time.time()
        views = []
        for req in new:
            self._started[req.id] = now
            views += [v.name for v in pipeline.views if v.source == req.source]
        self._views |= set(views)
        if not views:  # nothing of the speed state derives from these sources
            mark_speed_corrected(self.layout, [r.id for r in new], self.worker)
        return sorted(set(views))

    def committed(self, checkpoint: Any) -> None:
        """A checkpoint (``speed.checkpoint.Checkpoint``) was committed."""
        if not self._started:
            return
        views = getattr(checkpoint, "views", {}) or {}
        if any(name in views and views[name].target is not None for name in self._views):
            return
        done = [i for i, t in self._started.items() if checkpoint.created_at >= t]
        if done:
            mark_speed_corrected(self.layout, done, self.worker)
            for i in done:
                self._started.pop(i, None)
                self._pending.pop(i, None)
            if not self._started:
                self._views.clear()


# --- the log: the compacted request topic, and how long the raw messages stay ---------------------------------------
def publish(settings: Any, requests: Iterable[ErasureRequest]) -> None:
    """Produce ``requests`` to the compacted topic ``lambdalake.erasures`` (created if missing) and wait for acks."""
    from kafka.errors import KafkaError

    from lambdalake.clients import producer
    from lambdalake.exceptions import BrokerError

    ensure_erasures_topic(settings)
    prod = producer(settings)
    try:
        futures = [prod.send(ERASURES_TOPIC, key=f"{r.source}/{r.subject}".encode(), value=contracts.encode(r))
                   for r in requests]
        prod.flush(timeout=30)
        for f in futures:
            f.get(timeout=30)
    except KafkaError as exc:
        raise BrokerError(f"could not record the erasure request in topic {ERASURES_TOPIC!r} "
                          f"({type(exc).__name__}: {exc}); nothing was erased, run `lambdalake forget` again") from exc
    finally:
        prod.close()


def ensure_erasures_topic(settings: Any) -> None:
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from lambdalake.clients import _replication, admin_client

    admin = admin_client(settings)
    try:
        if ERASURES_TOPIC in set(admin.list_topics()):
            return
        try:
            admin.create_topics([NewTopic(ERASURES_TOPIC, 1, 1 if settings.bootstrap_is_embedded else
                                          _replication(admin), topic_configs={"cleanup.policy": "compact"})])
        except TopicAlreadyExistsError:
            pass
    finally:
        admin.close()


def retention(settings: Any, topics: Iterable[str]) -> dict[str, dict[str, int | None]]:
    """{topic: {"retention.ms": ms or None (kept forever), "segment.ms": ms}} as the broker applies them."""
    from kafka.admin import ConfigResource, ConfigResourceType

    from lambdalake.clients import admin_client

    topics = list(topics)
    admin = admin_client(settings)
    try:
        got = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics],
                                     config_filter="all")
    finally:
        admin.close()
    out: dict[str, dict[str, int | None]] = {}
    for t in topics:
        conf = _topic_configs(got, t)
        if "retention.ms" not in conf:  # never claim "kept forever" from an answer we could not read
            raise ValueError(f"the broker's describe_configs answer has no retention.ms for topic {t!r}")
        ms = _int(conf.get("retention.ms"))
        out[t] = {"retention.ms": None if ms is None or ms < 0 else ms, "segment.ms": _int(conf.get("segment.ms"))}
    return out


def _topic_configs(got: Any, topic: str) -> dict[str, Any]:
    """Config values of ``topic`` from a kafka-python ``describe_configs`` answer (shapes differ by version)."""
    if isinstance(got, dict):
        for by_name in got.values():
            if isinstance(by_name, dict) and topic in by_name:
                return {k: (v.get("value") if isinstance(v, dict) else v) for k, v in by_name[topic].items()}
    out: dict[str, Any] = {}
    for resp in got if isinstance(got, list) else []:
        for res in getattr(resp, "resources", []):
            if res[3] == topic:
                for entry in res[4]:
                    out[entry[0]] = entry[1]
    return out


def _int(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def log_dropped_by(conf: dict[str, int | None], now: datetime | None = None) -> datetime | None:
    """The date by which the log has deleted every message older than ``now`` (retention + one segment roll), or
    None when the topic keeps messages forever."""
    ms = conf.get("retention.ms")
    if ms is None:
        return None
    now = now or datetime.now(UTC)
    return now + timedelta(milliseconds=ms + (conf.get("segment.ms") or 0))

