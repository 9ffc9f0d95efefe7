"""Batch versions: the publish protocol the Spark job and Kappa replay share (a staged prefix, then one
compare-and-swap of the pointer), rollback, retention.

A batch version is every view of the pipeline at one watermark: ``manifest.json`` and ``<view>/*.parquet`` under
the key prefix its run staged it in (``views/batch/run-<pid>-<hex>/``: no other writer uses that name). What
is served is whatever ``views/batch/CURRENT`` (:class:`~lambdalake.contracts.BatchPointer`) names; the pointer also
maps every kept version to its prefix. Nothing else about the tree matters to readers, and nothing is renamed,
locked or listed to decide what is valid: the pointer is replaced by :meth:`lambdalake.storage.base.Store.swap`
(compare-and-swap on its ETag) alone.

Publish protocol (:func:`publish`), mirrored by numbered comments in the code:

1. The run has written its files in full under its own prefix; fsync them (the local backend: Spark writes plain
   files).
2. Read the pointer and its ETag. A pointer of the first release (``{"version": ...}``, versions in
   ``views/batch/<version>/``) is read as one whose kept versions are the version directories that layout holds.
3. Paranoid check: the new watermark is not below the published one in any partition (the speed layer may already
   have pruned what the published version covers; going back would lose those events from serving).
4. The version id is the next after the highest one the pointer read gave out (``last``); stamp it,
   ``published_at`` and each newly computed view's ``computed_in`` into the
   :class:`~lambdalake.contracts.BatchManifest` and put it as ``<prefix>/manifest.json``.
5. Compare-and-swap the pointer from the ETag read in 2 to the new body: the new version and its prefix, the kept
   versions (newest first; those beyond ``keep`` dropped, never the current one nor the one before it), ``last``,
   this writer's id and the read body's ``seq`` + 1 — the commit point: from here on new queries read the new
   version. A lost swap (another publisher, rollback or retention got there first) goes back to 2 with the new
   pointer: the number is decided by the swap that wins. A swap whose answer was lost (an error, or "precondition
   failed" from a retried request that had succeeded) is decided by the pointer read in 2 again: this writer's
   ``seq`` there, or its prefix among the kept or recently retired ones, is its own success.
6. Delete the prefixes the winning swap dropped from the kept list (:func:`retire_versions` does the same alone).

A run killed before step 5 changes nothing that is served: its prefix is referenced by no pointer and is removed by
the next run once its process is gone (:func:`new_staging_dir`), with prefixes a killed step 6 left behind.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

import msgspec
import psutil

from lambdalake import contracts
from lambdalake.config import env_int
from lambdalake.contracts import BatchManifest, BatchPointer, BatchVersionRef
from lambdalake.exceptions import ConfigError, InvariantViolation, PublishError
from lambdalake.layout import (
    BATCH_POINTER_KEY,
    BATCH_PREFIX,
    BATCH_VERSION_DIR,
    Layout,
    batch_prefix,
    batch_refs,
    fsync_dir,
    read_batch_pointer,
    read_contract,
)
from lambdalake.runtime import crash_point
from lambdalake.servingcopy import write_serving_copy
from lambdalake.speedset import current_speed_snapshot
from lambdalake.storage.base import ObjectMissing, StorageError
from lambdalake.storage.files import data_files
from lambdalake.storage.local import LocalStore

log = logging.getLogger(__name__)
STAGING = re.compile(r"^(?:run|\.staging)-(\d+)-[0-9a-f]+$")  # .staging-: the name before 0.2
TRASH_PREFIX = ".trash-"  # the first release's half-deleted versions
DEFAULT_KEEP = 5
POINTER_FORMAT = 2
RETIRED_REMEMBERED = 32  # prefixes the pointer remembers as retired, so a publisher can recognise a late success
MAX_SWAPS = 200  # attempts of one publish, rollback or retention against concurrent writers
FAULT_ENV = "LAMBDALAKE_BATCH_FAULT"  # crash tests: "swap" SIGKILLs a publish right before its swap


def default_keep() -> int:
    """Versions to keep: ``LAMBDALAKE_BATCH_KEEP`` or 5 (at least 2: the current and the previous one)."""
    return env_int("LAMBDALAKE_BATCH_KEEP", DEFAULT_KEEP, minimum=2, why=" (the current and the previous version)")


def version_id(n: int) -> str:
    return f"v{n:06d}"


def _number(version: str) -> int:
    return int(version[1:])


def _writer_id() -> str:
    """This writer, unique per call: host, pid and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def new_staging_dir(layout: Layout) -> Path:
    """A fresh staging directory (the prefix the run's version will live in); first removes the garbage of runs
    whose process is gone (:func:`collect_garbage`)."""
    layout.batch_views.mkdir(parents=True, exist_ok=True)
    collect_garbage(layout)
    staging = layout.batch_views / f"run-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    return staging


def collect_garbage(layout: Layout) -> list[str]:
    """Delete the prefixes under ``views/batch/`` no pointer references and no live process may still publish:
    staging prefixes of dead processes, the first release's ``.trash-`` directories and, once the pointer has the
    new shape, version directories it no longer keeps. The only place that lists ``views/batch/``. Returns the
    names removed."""
    if not isinstance(layout.store, LocalStore):
        return _collect_remote_garbage(layout)
    names = _prefix_names(layout)
    candidates = [n for n in names if n.startswith(TRASH_PREFIX) or BATCH_VERSION_DIR.match(n)
                  or ((m := STAGING.match(n)) and not _alive(int(m.group(1))))]
    if not candidates:
        return []
    ptr = read_batch_pointer(layout)  # after the liveness check: a dead writer's successful swap is visible now
    referenced = {r.prefix for r in ptr.kept} if ptr is not None else set()
    legacy_valid = ptr is None or ptr.format < POINTER_FORMAT  # the first release's layout: its directories count
    removed = []
    for name in candidates:
        if f"{BATCH_PREFIX}/{name}" in referenced or (legacy_valid and BATCH_VERSION_DIR.match(name)):
            continue
        _delete_prefix(layout, f"{BATCH_PREFIX}/{name}")
        removed.append(name)
    return removed


def _collect_remote_garbage(layout: Layout) -> list[str]:
    """:func:`collect_garbage` on object storage, where a run's pid says nothing (it may run on another machine):
    a prefix the pointer does not keep is deleted once its newest object is older than the grace period
    (:data:`lambdalake.heads.GC_GRACE_ENV`, the master's: longer than any pause a publisher may wake from). This
    machine's own local staging directories of dead runs go at once."""
    from lambdalake.heads import gc_grace

    if layout.batch_views.is_dir():
        for d in layout.batch_views.iterdir():
            if (m := STAGING.match(d.name)) and not _alive(int(m.group(1))):
                shutil.rmtree(d, ignore_errors=True)
    keys = layout.store.list(BATCH_PREFIX + "/")
    by_prefix: dict[str, list[str]] = {}
    for key in keys:
        if key.count("/") >= 3:
            by_prefix.setdefault("/".join(key.split("/")[:3]), []).append(key)
    ptr = read_batch_pointer(layout)
    referenced = {r.prefix for r in ptr.kept} if ptr is not None else set()
    grace, now, removed = gc_grace(), time.time(), []
    for prefix, members in by_prefix.items():
        if prefix in referenced or not STAGING.match(prefix.rsplit("/", 1)[1]):
            continue
        newest = max((_modified(layout, k) for k in members), default=0.0)
        again = read_batch_pointer(layout)  # a publish that swapped meanwhile keeps its prefix
        if now - newest >= grace and (again is None or prefix not in {r.prefix for r in again.kept}):
            _delete_prefix(layout, prefix)
            removed.append(prefix.rsplit("/", 1)[1])
    try:  # a crashed run's s3a (or pyarrow) parts; best effort: a run must not fail on its predecessors' garbage
        aborted = layout.store.abort_stale_uploads("", grace)
    except StorageError as exc:  # e.g. credentials without s3:ListBucketMultipartUploads
        log.warning("incomplete multipart uploads not aborted (lambdalake compact retries): %s", exc)
        aborted = []
    for key in aborted:
        log.info("aborted the incomplete multipart upload of %s (started more than %.0f s ago)", key, grace)
    return removed


def _modified(layout: Layout, key: str) -> float:
    """When ``key`` was written; 0 for a key listed without an object (a directory marker ``<key>/`` Spark's s3a
    connector left, or an object deleted meanwhile): it holds nothing a publish could still need."""
    try:
        return layout.store.modified(key)
    except ObjectMissing:
        return 0.0


def _prefix_names(layout: Layout) -> set[str]:
    """The names directly under ``views/batch/`` (garbage collection only): on the local backend its directory
    entries (an empty staging directory holds no object), elsewhere the third segment of every key listed."""
    if isinstance(layout.store, LocalStore):
        base = layout.batch_views
        return {d.name for d in base.iterdir() if d.is_dir() and not d.is_symlink()} if base.is_dir() else set()
    return {k.split("/")[2] for k in layout.store.list(BATCH_PREFIX) if k.count("/") >= 3}


def _delete_prefix(layout: Layout, prefix: str) -> None:
    """Delete every object under ``prefix`` (no longer referenced by the pointer, so never read as a version)."""
    if isinstance(layout.store, LocalStore):
        shutil.rmtree(layout.home / prefix, ignore_errors=True)
        return
    data_files(layout.store).delete_prefix(prefix)  # with the directory markers Spark's s3a leaves


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# the pointer ------------------------------------------------------------------------------------------------------
def _read(layout: Layout) -> tuple[BatchPointer | None, str | None]:
    """The pointer in the current shape, and the ETag to swap from (None: no pointer yet). A first-release pointer
    gets its kept versions and ``last`` from the version directories of that layout (once: the first swap writes
    the new shape)."""
    try:
        got = layout.store.get_versioned(BATCH_POINTER_KEY)
    except ObjectMissing:
        names = _legacy_names(layout, complete=False)
        if not names:
            return None, None
        return BatchPointer("", last=version_id(max(map(_number, names))), format=POINTER_FORMAT), None
    ptr = contracts.decode(got.data, BatchPointer, str(layout.batch_pointer))
    if ptr.format < POINTER_FORMAT:
        kept = {r.version: r for r in batch_refs(layout, ptr)}
        kept.setdefault(ptr.version, BatchVersionRef(ptr.version, f"{BATCH_PREFIX}/{ptr.version}"))
        numbers = [_number(v) for v in (*_legacy_names(layout, complete=False), ptr.version)]
        ptr = BatchPointer(ptr.version, f"{BATCH_PREFIX}/{ptr.version}", _newest_first(kept.values()),
                           version_id(max(numbers)), format=POINTER_FORMAT)
    return ptr, got.etag


def _legacy_names(layout: Layout, complete: bool) -> list[str]:
    return [r.version for r in batch_refs(layout, BatchPointer("", format=1), complete=complete)]


def _newest_first(refs) -> list[BatchVersionRef]:
    return sorted(refs, key=lambda r: _number(r.version), reverse=True)


def _swap(layout: Layout, body: BatchPointer, etag: str | None) -> bool:
    """One compare-and-swap of the pointer from ``etag`` to ``body``: whether it won. A lost swap or one without an
    answer is decided by reading the pointer again: ``body``'s writer and seq there are its own success (a retried
    conditional write whose first attempt succeeded answers "precondition failed")."""
    try:
        if layout.store.swap(BATCH_POINTER_KEY, contracts.encode(body), etag) is not None:
            return True
    except (StorageError, OSError):
        pass
    ptr, _ = _read(layout)
    return ptr is not None and ptr.writer == body.writer and ptr.seq == body.seq


def _retain(kept: list[BatchVersionRef], current: str, keep: int) -> tuple[list[BatchVersionRef], list[str]]:
    """(the kept versions after retention, newest first; the prefixes dropped): the newest ``keep``, the current
    one and the newest older than it."""
    if keep < 2:
        raise ConfigError(f"keep={keep} must be >= 2 (the current and the previous version)")
    kept = _newest_first(kept)
    protected = {r.version for r in kept[:keep]} | {current}
    older = [r.version for r in kept if _number(r.version) < _number(current)]
    protected |= set(older[:1])
    return [r for r in kept if r.version in protected], [r.prefix for r in kept if r.version not in protected]


# publish ----------------------------------------------------------------------------------------------------------
def publish(layout: Layout, staging: Path, manifest: BatchManifest, keep: int = DEFAULT_KEEP, *,
            staged_in_store: bool = False) -> BatchManifest:
    """Publish a fully written and validated staging directory (see the module docstring). Returns the manifest
    as published: ``version``, ``published_at`` and every view's ``computed_in`` filled in.

    ``staging`` is the local directory of the run's prefix; on object storage its files are uploaded, unless
    ``staged_in_store``: the run wrote them into the store's prefix itself (Spark's executors write through
    ``s3a://``) — no serving copy is built then (it would mean fetching every file to this machine)."""
    if staging.parent.resolve() != layout.batch_views.resolve() or not STAGING.match(staging.name):
        raise InvariantViolation(f"{staging} is not a staging directory of {layout.batch_views}")
    prefix = f"{BATCH_PREFIX}/{staging.name}"
    remote = not isinstance(layout.store, LocalStore)
    if not (remote and staged_in_store):
        write_serving_copy(staging, manifest.row_counts)  # serving's native copy, staged with the version (optional)
    # 1. the staged files durable before anything can point at them (on object storage: uploaded, each whole)
    if not remote:
        _fsync_tree(staging)
    elif not staged_in_store:
        for path in sorted(p for p in staging.rglob("*") if p.is_file() and not p.name.startswith(".")):
            layout.store.put(f"{prefix}/{path.relative_to(staging).as_posix()}", path.read_bytes())
    writer = _writer_id()
    attempts: dict[str, tuple[BatchManifest, list[str]]] = {}  # version tried -> (its manifest, prefixes dropped)
    first: str | None = None
    for attempt in range(MAX_SWAPS):
        # 2. the pointer as it is now
        ptr, etag = _read(layout)
        done = _own_publish(ptr, prefix, attempts)
        if done is not None:  # an earlier swap of ours won though its answer was lost
            return _finish(layout, *done, staging=staging)
        current = ptr.version if ptr is not None and ptr.version else None
        first = current if attempt == 0 else first
        # 3. never move the watermark backwards
        if current is not None:
            _check_not_behind(layout, ptr, manifest, None if current == first else current)
        # 4. the next version id after the highest given out; the manifest under our prefix
        version = version_id(_number(ptr.last) + 1 if ptr is not None and ptr.last else 1)
        stamped = _stamp(manifest, version)
        layout.store.put(f"{prefix}/manifest.json", contracts.encode(stamped))
        kept, dropped = _retain([BatchVersionRef(version, prefix), *(ptr.kept if ptr else [])], version, keep)
        attempts[version] = (stamped, dropped)
        body = _body(ptr, writer, dropped, version=version, prefix=prefix, kept=kept, last=version)
        crash_point(FAULT_ENV, "swap")  # crash tests: staged and stamped, not published
        # 5. the commit point (a lost swap goes back to 2, where a late success of ours is recognised too)
        if _swap(layout, body, etag):
            return _finish(layout, stamped, dropped, staging=staging)
        time.sleep(min(0.002 * attempt, 0.05))
    raise PublishError(f"could not publish {prefix}: the batch pointer changed under {MAX_SWAPS} attempts in a row")


def _own_publish(ptr: BatchPointer | None, prefix: str,
                 attempts: dict[str, tuple[BatchManifest, list[str]]]) -> tuple[BatchManifest, list[str]] | None:
    """What an earlier swap of ours published, if the pointer shows our prefix kept or retired since."""
    if ptr is None or not attempts:
        return None
    for r in ptr.kept:
        if r.prefix == prefix:
            return attempts[r.version]
    for r in ptr.retired:
        if r.prefix == prefix and r.version in attempts:
            return attempts[r.version]
    return None


def _finish(layout: Layout, manifest: BatchManifest, dropped: list[str], staging: Path | None = None
            ) -> BatchManifest:
    # 6. the prefixes the winning swap dropped; on object storage the local staging directory (uploaded)
    for prefix in dropped:
        _delete_prefix(layout, prefix)
    if staging is not None and not isinstance(layout.store, LocalStore):
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _body(ptr: BatchPointer | None, writer: str, dropped: list[str], **changes) -> BatchPointer:
    """The next pointer body: ``changes`` applied, this writer, ``seq`` + 1, the dropped prefixes remembered as
    retired (with the version each held), the new shape."""
    base = ptr or BatchPointer("", format=POINTER_FORMAT)
    gone = [r for r in base.kept if r.prefix in dropped]
    retired = gone + [r for r in base.retired if r.prefix not in dropped]
    return msgspec.structs.replace(base, writer=writer, seq=base.seq + 1, format=POINTER_FORMAT,
                                   retired=retired[:RETIRED_REMEMBERED], **changes)


def _stamp(manifest: BatchManifest, version: str) -> BatchManifest:
    views = {name: meta if meta.computed_in is not None else msgspec.structs.replace(meta, computed_in=version)
             for name, meta in manifest.views.items()}
    return msgspec.structs.replace(manifest, version=version, views=views, published_at=contracts.utc_now_iso())


def _check_not_behind(layout: Layout, ptr: BatchPointer, manifest: BatchManifest, raced: str | None) -> None:
    old = _read_manifest(layout, ptr, ptr.version).watermark
    new = manifest.watermark
    behind = {k: (w, new.at(*k)) for k, w in old.items() if new.at(*k) < w}
    if behind:
        (t, p), (w_old, w_new) = next(iter(behind.items()))
        why = (f"version {raced} was published meanwhile by another run;" if raced is not None
               else "the master dataset lost data?")
        raise InvariantViolation(
            f"new batch watermark is below the published one for {t}[{p}] ({w_new} < {w_old}, "
            f"{len(behind)} partitions behind); {why} nothing was published")


def _read_manifest(layout: Layout, ptr: BatchPointer, version: str) -> BatchManifest:
    key = f"{batch_prefix(ptr, version)}/manifest.json"
    try:
        return read_contract(layout, key, BatchManifest)
    except OSError as exc:
        raise InvariantViolation(f"batch version {version} has no readable manifest {key}: {exc}") from exc


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory, deepest first (their entries)."""
    dirs = []
    for dirpath, _, filenames in os.walk(root):
        dirs.append(dirpath)
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        fsync_dir(Path(d))


# rollback and retention ---------------------------------------------------------------------------------------------
def rollback(home: Path, *, force: bool = False, layout: Layout | None = None) -> tuple[str, str]:
    """Re-point ``CURRENT`` to the newest kept version older than the current one. Returns (from, to).

    The previous version has a lower watermark. That is only exact while the speed layer still holds the
    positions between the two watermarks; if the published speed snapshot says it pruned beyond the previous
    watermark (:attr:`lambdalake.contracts.SpeedSnapshotMeta.pruned_to`), rollback refuses unless ``force``.
    One compare-and-swap; if another writer moved the pointer to another version meanwhile, it refuses.
    """
    layout = layout or Layout(home)
    writer, start = _writer_id(), None
    for attempt in range(MAX_SWAPS):
        ptr, etag = _read(layout)
        if ptr is None or not ptr.version:
            raise PublishError("nothing is published yet, so there is nothing to roll back; run `lambdalake batch`")
        current = ptr.version
        if start is not None and current != start:
            raise PublishError(f"batch version {current} was published while rolling back from {start}; "
                               "nothing was rolled back (check `lambdalake status`, then retry)")
        start = current
        older = [r for r in ptr.kept if _number(r.version) < _number(current)]
        if not older:
            raise PublishError(f"batch version {current} has no older version left to roll back to "
                               f"(kept: {[r.version for r in reversed(ptr.kept)]})")
        target = older[0]
        if not force:
            _check_speed_covers(layout, _read_manifest(layout, ptr, target.version))
        body = _body(ptr, writer, [], version=target.version, prefix=target.prefix)
        if _swap(layout, body, etag):
            return current, target.version
        time.sleep(min(0.002 * attempt, 0.05))
    raise PublishError(f"could not roll back from {start}: the batch pointer changed under {MAX_SWAPS} attempts")


def _check_speed_covers(layout: Layout, manifest: BatchManifest) -> None:
    try:
        snap = current_speed_snapshot(layout)
    except InvariantViolation:
        snap = None
    if snap is None:
        return
    wm = manifest.watermark
    for (topic, p), off in snap.pruned_to.items():
        if off > wm.at(topic, p):
            raise PublishError(
                f"the speed layer already pruned {topic}[{p}] below offset {off}, but version "
                f"{manifest.version} covers only < {wm.at(topic, p)}; rolling back would drop "
                "those events from serving. Re-run `lambdalake batch` instead, or pass --force")


def retire_versions(home: Path, keep: int = DEFAULT_KEEP, layout: Layout | None = None) -> list[str]:
    """Drop all but the newest ``keep`` versions from the pointer's kept list (never the current one nor the one
    before it) by one compare-and-swap, then delete their prefixes. Returns the versions dropped, oldest first."""
    layout = layout or Layout(home)
    writer, tried = _writer_id(), set()
    for attempt in range(MAX_SWAPS):
        ptr, etag = _read(layout)
        if ptr is None or not ptr.version:
            return []
        kept, dropped = _retain(ptr.kept, ptr.version, keep)
        referenced = {r.prefix for r in ptr.kept}
        for prefix in tried - referenced:  # dropped by an earlier swap of ours whose answer was lost
            _delete_prefix(layout, prefix)
        if not dropped:
            return []
        tried |= set(dropped)
        names = [r.version for r in reversed(ptr.kept) if r.prefix in dropped]
        if _swap(layout, _body(ptr, writer, dropped, kept=kept), etag):
            for prefix in dropped:
                _delete_prefix(layout, prefix)
            return names
        time.sleep(min(0.002 * attempt, 0.05))
    raise PublishError(f"could not retire batch versions: the pointer changed under {MAX_SWAPS} attempts in a row")
