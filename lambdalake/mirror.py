"""A local, read-only mirror of what a lake on object storage publishes, for the readers that read local files:
serving (``lambdalake sql``, ``connect()``, ``lambdalake catalog``) on a machine whose disk holds no lake.

DuckDB has no S3 reader offline (its ``httpfs`` extension is downloaded on first use), and the serving lock-down
lets DuckDB read one local directory only. So a serving machine keeps the *published views* in that directory,
laid out exactly like a lake (``<work dir>/mirror``, :func:`lambdalake.config.work_dir`), and the existing,
locked-down serving code reads it as it reads a local lake. What is mirrored, each sync (:func:`sync`):

- ``views/batch/CURRENT`` and, of the version it names, the view files its manifest lists, the serving copy if it
  has one, and the manifest (fetched once: a published prefix never changes; the event-id index is not mirrored);
- ``views/speed/CURRENT`` of every speed worker, that snapshot's ``snapshot.json`` and the files it lists
  (fetched once: every speed object has a key no later write reuses);
- the master heads (``master/<source>/p=<p>/HEAD``: which master files count) — not the master files: they stay in
  the bucket, and ``master.<source>`` reads them through pyarrow's S3 file system per query
  (:func:`serving.datasets.master_dataset`);
- the forget requests (``checkpoints/erasures/``: serving hides forgotten subjects) and ``lake.json``.

Order makes the mirror consistent for any reader, also another process: the remote pointers are read first, the
immutable objects they name fetched next, and the pointers written into the mirror last (each an atomic local
put). An object that vanishes between the read of its pointer and its fetch (a snapshot retired meanwhile) makes
the sync start again. Syncs of one mirror are serialised by a lock file; what the pointers no longer name is
removed after :data:`GRACE_S` (a reader that opened it keeps it that long).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from lambdalake import contracts
from lambdalake.contracts import BatchManifest, BatchPointer, SpeedPointer, SpeedSnapshotMeta
from lambdalake.exceptions import InvariantViolation
from lambdalake.layout import BATCH_POINTER_KEY, PARTITION_DIR, SPEED_SNAPSHOT_DIR, Layout, batch_prefix
from lambdalake.locks import flock
from lambdalake.servingcopy import COPY_NAME
from lambdalake.storage.base import ObjectMissing, Store
from lambdalake.storage.local import LocalStore

log = logging.getLogger(__name__)

GRACE_S = 600.0  # a mirrored snapshot or version no pointer names any more is removed after this long
ATTEMPTS = 5


def mirror_dir(work: Path) -> Path:
    """Where a machine working on an object-storage lake keeps its mirror (``work``: its work directory)."""
    return Path(work) / "mirror"


def sync(remote: Store, dest: Path) -> Path:
    """Bring the mirror ``dest`` up to date with what ``remote`` publishes now (module docstring); returns
    ``dest``. Raises :class:`lambdalake.storage.StorageError` (one line) when the store cannot be read."""
    dest.mkdir(parents=True, exist_ok=True)
    local = LocalStore(dest)
    with flock(dest / ".sync.lock", what="the mirror's sync lock"):
        last: Exception | None = None
        for _ in range(ATTEMPTS):
            try:
                t0 = time.monotonic()
                fetched = _sync_once(remote, local)
                log.info("mirror of %s synced into %s: %d objects fetched in %.2fs", remote.url, dest, fetched,
                         time.monotonic() - t0)
                return dest
            except ObjectMissing as exc:  # retired between its pointer's read and its fetch: again
                last = exc
        raise InvariantViolation(f"published objects of {remote.url} kept vanishing while mirroring them: {last}")


def _sync_once(remote: Store, local: LocalStore) -> int:
    fetched = 0
    pointers: dict[str, bytes] = {}  # written last

    def fetch(key: str) -> None:  # an immutable object, once
        nonlocal fetched
        if not local.exists(key):
            local.put(key, remote.get(key))
            fetched += 1

    # 1. the batch version the pointer names
    keep: set[str] = set()
    try:
        data = remote.get(BATCH_POINTER_KEY)
    except ObjectMissing:
        data = None
    if data is not None:
        ptr = contracts.decode(data, BatchPointer, BATCH_POINTER_KEY)
        prefix = batch_prefix(ptr, ptr.version)
        if not local.exists(f"{prefix}/manifest.json"):
            # what the manifest lists (never a listing of the prefix), the optional serving copy, the manifest last
            manifest_data = remote.get(f"{prefix}/manifest.json")
            manifest = contracts.decode(manifest_data, BatchManifest, f"{prefix}/manifest.json")
            for view, meta in sorted(manifest.views.items()):
                for name in meta.files:
                    fetch(f"{prefix}/{view}/{name}")
            try:
                fetch(f"{prefix}/{COPY_NAME}")
            except ObjectMissing:
                pass
            local.put(f"{prefix}/manifest.json", manifest_data)
        keep.add(prefix)
        pointers[BATCH_POINTER_KEY] = data
    # 2. the visible snapshot of every speed worker and the files it lists
    root = Layout(Path("/"), store=remote)
    for worker in root.speed_workers():
        wl = root.for_speed_worker(worker)
        try:
            data = remote.get(f"{wl.speed_prefix}/CURRENT")
        except ObjectMissing:
            continue
        snap = contracts.decode(data, SpeedPointer, f"{wl.speed_prefix}/CURRENT").snapshot
        meta_key = f"{wl.speed_prefix}/{snap}/snapshot.json"
        meta_data = local.get(meta_key) if local.exists(meta_key) else remote.get(meta_key)
        meta = contracts.decode(meta_data, SpeedSnapshotMeta, meta_key)
        for view in set(meta.views) | set(meta.rows):
            listed = view in meta.views and bool(meta.views[view].files)
            for entry in meta.files_of(view):
                key = wl.speed_file_key(snap, entry)
                keep.add(key.rsplit("/", 1)[0])
                try:
                    fetch(key)
                except ObjectMissing:
                    if listed:  # (the implicit <view>.parquet of a format-1/2 view without rows may be absent)
                        raise
        if not local.exists(meta_key):
            local.put(meta_key, meta_data)
        keep.add(f"{wl.speed_prefix}/{snap}")
        pointers[f"{wl.speed_prefix}/CURRENT"] = data
    # 3. small mutable objects: master heads, forget requests, lake.json
    for source in remote.children("master/"):  # (not a LIST of every master file: one per source)
        for part in remote.children(f"master/{source}/"):
            if PARTITION_DIR.match(part):
                try:
                    local.put(f"master/{source}/{part}/HEAD", remote.get(f"master/{source}/{part}/HEAD"))
                except ObjectMissing:  # a partition not claimed by a head-writing archiver yet
                    continue
    wanted = set()
    for key in remote.list("checkpoints/erasures/"):
        local.put(key, remote.get(key))
        wanted.add(key)
    for key in local.list("checkpoints/erasures/"):
        if key not in wanted:
            local.delete(key)
    try:
        local.put("lake.json", remote.get("lake.json"))
    except ObjectMissing:
        pass
    # 4. the pointers, last
    for key, data in pointers.items():
        local.put(key, data)
    _prune(local, keep)
    return fetched


def _prune(local: LocalStore, keep: set[str]) -> None:
    """Remove mirrored batch versions and speed snapshots no pointer names, once older than :data:`GRACE_S`."""
    now = time.time()
    dirs = [local.root / "views" / "batch"]
    speed = local.root / "views" / "speed"
    dirs += [speed, *((speed / "workers").iterdir() if (speed / "workers").is_dir() else [])]
    for base in dirs:
        if not base.is_dir():
            continue
        for d in base.iterdir():
            if not d.is_dir() or (base.name != "batch" and not SPEED_SNAPSHOT_DIR.match(d.name)):
                continue
            rel = d.relative_to(local.root).as_posix()
            if rel in keep:
                continue
            try:
                if now - d.stat().st_mtime < GRACE_S:
                    continue
            except FileNotFoundError:
                continue
            shutil.rmtree(d, ignore_errors=True)

