"""The storage layout of the lake and atomic file operations. Every path the layers use is built here.

::

    <home>/
      master/<source>/p=<partition>/<start>-<end>.parquet   immutable; offsets [start, end) of one partition,
                                                             20-digit zero-padded; valid events only (the
                                                             invalid ones of the range went to the DLQ)
      master/_log/                                            maintenance records (compaction, erasure)
      views/batch/<prefix>/manifest.json                     one batch version = every view at one watermark, in
      views/batch/<prefix>/<view>/*.parquet                  the prefix its run staged it in (run-<pid>-<hex>;
                                                             views/batch/<version> for the first release's)
      views/batch/CURRENT                                    BatchPointer: current version, kept versions and
                                                             their prefixes; one compare-and-swap = publish
      views/speed/<snapshot>/snapshot.json                   speed positions S[p] of the snapshot, the files
      views/speed/<snapshot>/<view>[.<snapshot>].parquet     of each view (some in earlier snapshots' prefixes)
      views/speed/CURRENT                                    {"snapshot": ...}; replaced atomically
      views/speed/workers/<worker>/...                       the same, per speed worker owning a share of the
                                                             partitions (lambdalake.ownership); the root above
                                                             is the worker owning every partition
      checkpoints/<component>/                                consumers' durable state (speed workers:
                                                             checkpoints/speed/workers/<worker>/)
      kafka/                                                  the embedded broker (data, log, pid, state)

Master file columns: the source's declared fields (timestamps as ``timestamp[us, UTC]``), then ``_partition``
(int32), ``_offset`` (int64), ``_ingest_time`` (``timestamp[us, UTC]``).

Batch view columns: keys, ``window_start`` (``timestamp[us, UTC]``), the view's stored aggregates (int64 for
count/sum; field type for min/max).

Speed view columns: ``_partition`` (int32), ``_block_start`` (int64), then the same as a batch view.

Atomicity: files are written to a temporary name in the same directory, fsync'd, renamed, and the directory
fsync'd (:func:`atomic_write_bytes`, :func:`atomic_publish_dir`); a pointer switch is an atomic rename of a small
JSON file (:func:`write_pointer`). The batch pointer is read and swapped through the storage seam
(:attr:`Layout.store`, :mod:`lambdalake.versions`): which batch versions exist, and where, is read from it alone;
the speed layer's snapshots and checkpoints are written and read through it too (:mod:`speed.snapshot`).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import uuid
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lambdalake import contracts
from lambdalake.contracts import (
    BatchManifest,
    BatchPointer,
    BatchVersionRef,
    MasterRewriteRecord,
    SpeedPointer,
    SpeedSnapshotMeta,
)
from lambdalake.exceptions import InvariantViolation
from lambdalake.storage.base import ObjectMissing, Store, check_key

C = TypeVar("C")
R = TypeVar("R", bound=MasterRewriteRecord)

SPEED_COMPONENT = "speed"  # checkpoints/speed/: the speed layer's checkpoints and its LOCK
# <start>-<end>.parquet (first release, compaction) or <start>-<end>-e<epoch>-<hex>.parquet (lambdalake.heads)
MASTER_FILE = re.compile(r"^(\d{20})-(\d{20})(?:-e(\d+)-([0-9a-f]+))?\.parquet$")
PARTITION_DIR = re.compile(r"^p=(\d+)$")
BATCH_VERSION_DIR = re.compile(r"^v(\d{6,})$")  # views/batch/v000042 (the first release's version directories)
BATCH_PREFIX = "views/batch"
BATCH_POINTER_KEY = "views/batch/CURRENT"
SPEED_SNAPSHOT_DIR = re.compile(r"^(\d{12})$")  # views/speed/000000000042
# views/speed/workers/1-of-4, p0-2-5, g-<host>-<i> (a group member, speed.group)
SPEED_WORKER_DIR = re.compile(r"^[0-9]+-of-[0-9]+$|^p[0-9]+(-[0-9]+)*$|^g-[A-Za-z0-9.-]+-[0-9]+$")


@dataclass(frozen=True)
class MasterFile:
    """One immutable master file: offsets [start, end) of ``partition`` of ``source``."""

    path: Path
    source: str
    partition: int
    start: int
    end: int


_STORES: dict[str, Store] = {}  # one client per object-storage lake and process (Layout.of)


class Layout:
    """Paths of one lake rooted at ``home``. ``speed_worker`` scopes the speed layer's paths (snapshots, pointer,
    checkpoints) to one worker (``""``: the worker owning every partition, at the root)."""

    def __init__(self, home: Path, speed_worker: str = "", store: Store | None = None):
        self.home = Path(home)
        self.speed_worker = speed_worker
        self._store = store
        self._real_home: Path | None = None  # home with symlinks resolved, once (inside() runs per file)

    @classmethod
    def of(cls, home: Path, lake: str = "") -> Layout:
        """The layout of a lake: the local directory ``home``, or the object-storage lake ``lake`` (``s3://...``;
        ``home`` is then the machine's work directory, :func:`lambdalake.config.work_dir`)."""
        if not lake:
            return cls(home)
        store = _STORES.get(lake)
        if store is None:
            from lambdalake.storage import open_store

            store = _STORES[lake] = open_store(lake)
        return cls(home, store=store)

    def root(self) -> Layout:  # the whole lake (no speed worker's scope), on the same store
        return Layout(self.home, "", self._store)

    def key(self, path: Path) -> str:
        """The store key of ``path``, a path built by this layout (``<home>/master/x`` is ``master/x``)."""
        return path.relative_to(self.home).as_posix()

    def for_speed_worker(self, worker: str) -> Layout:
        return Layout(self.home, worker, self._store)

    @property
    def store(self) -> Store:  # the storage seam of the lake (lambdalake.storage): a bucket, or the directory home
        if self._store is None:
            from lambdalake.storage.local import LocalStore

            self._store = LocalStore(self.home)
        return self._store

    def speed_workers(self) -> list[str]:
        """Every speed worker with a directory on disk: ``""`` (the root) first, then those under
        ``views/speed/workers/`` or ``checkpoints/speed/workers/``."""
        names: set[str] = set()
        for base in ("views/speed/workers", f"checkpoints/{SPEED_COMPONENT}/workers"):
            names.update(d for d in self.store.children(base) if SPEED_WORKER_DIR.match(d))
        return ["", *sorted(names)]

    def inside(self, path: Path) -> Path:
        """``path`` with symlinks resolved, if that lies inside the lake; else InvariantViolation naming both.

        THE rule for readers: nothing placed in the lake (a symlinked master file, ``CURRENT``, version directory
        or snapshot file) may make them read outside it."""
        if self._real_home is None:
            self._real_home = self.home.resolve()
        home, real = self._real_home, Path(os.path.realpath(path))
        if real != home and home not in real.parents:
            raise InvariantViolation(f"{path} resolves to {real}, outside the lake {home}; refusing to read it "
                                     "(replace the symlink with the file itself)")
        return real

    def inside_all(self, paths: Iterable[Path]) -> list[Path]:
        """:meth:`inside` of many files, each directory resolved once: a file that is not a symlink resolves to its
        directory's real path plus its name (an ``lstat``, not every component resolved again)."""
        dirs: dict[Path, Path] = {}
        out = []
        for path in paths:
            if path.name in ("", ".", "..") or os.path.islink(path):
                out.append(self.inside(path))
                continue
            real_dir = dirs.get(path.parent)
            if real_dir is None:
                real_dir = dirs[path.parent] = self.inside(path.parent)
            out.append(real_dir / path.name)
        return out

    # master dataset ---------------------------------------------------------------------------------------
    @property
    def master(self) -> Path:
        return self.home / "master"

    def master_source(self, source: str) -> Path:
        return self.master / source

    def master_partition(self, source: str, partition: int) -> Path:
        return self.master / source / f"p={partition}"

    def master_file(self, source: str, partition: int, start: int, end: int) -> Path:
        if not 0 <= start < end:
            raise InvariantViolation(f"master file range [{start}, {end}) is empty or negative")
        return self.master_partition(source, partition) / f"{start:020d}-{end:020d}.parquet"

    def master_files_on_disk(self, source: str) -> list[MasterFile]:
        """Every master file name of a source on disk, sorted by (partition, start); temporary files ignored.

        Readers want :meth:`master_files` instead: during an interrupted compaction both a merged file and the
        files it replaces are on disk.
        """
        return _range_files(self.master_source(source), source)

    # rejected messages: the invalid messages of each archived range, kept for re-validation ---------------------
    @property
    def rejected(self) -> Path:
        return self.home / "rejected"

    def rejected_file(self, source: str, partition: int, start: int, end: int) -> Path:
        """``rejected/<source>/p=<p>/<start>-<end>.parquet``: the invalid messages of master range [start, end)."""
        return self.rejected / source / self.master_file(source, partition, start, end).relative_to(
            self.master_source(source))

    def rejected_files_on_disk(self, source: str) -> list[MasterFile]:
        return _range_files(self.rejected / source, source)

    def master_log(self) -> Path:
        return self.master / "_log"

    # views ------------------------------------------------------------------------------------------------
    @property
    def batch_views(self) -> Path:
        return self.home / "views" / "batch"

    def batch_version(self, version: str) -> Path:
        """The directory of batch version ``version``: the prefix ``CURRENT`` maps it to (``views/batch/<version>``
        for a version of the first release's layout, or one no longer kept)."""
        return self.home / batch_prefix(read_batch_pointer(self), version)

    @property
    def batch_pointer(self) -> Path:
        return self.batch_views / "CURRENT"

    @property
    def speed_views(self) -> Path:
        return self.home / self.speed_prefix

    @property
    def speed_prefix(self) -> str:
        """The key prefix of this speed worker's snapshots and pointer: ``views/speed`` or
        ``views/speed/workers/<worker>``."""
        return f"views/speed/workers/{self.speed_worker}" if self.speed_worker else "views/speed"

    def speed_file_key(self, snapshot: str, entry: str) -> str:
        """The key of a file a speed snapshot lists (:attr:`lambdalake.contracts.SpeedView.files`): ``<name>`` is in
        the snapshot's own prefix, ``<other snapshot>/<name>`` a part file written by an earlier snapshot of the same
        worker and referenced, not copied (format 4: no hard links)."""
        return f"{self.speed_prefix}/{entry}" if "/" in entry else f"{self.speed_prefix}/{snapshot}/{entry}"

    def speed_file(self, snapshot: str, entry: str) -> Path:
        """The local file of :meth:`speed_file_key` (a lake in a local directory)."""
        return self.home / self.speed_file_key(snapshot, entry)

    def speed_snapshot(self, snapshot: str) -> Path:
        return self.speed_views / snapshot

    @property
    def speed_pointer(self) -> Path:
        return self.speed_views / "CURRENT"

    def batch_versions(self, complete: bool = True) -> list[str]:
        """The kept batch versions, oldest first (:func:`batch_refs`); ``complete``: only those with their
        manifest."""
        return [r.version for r in reversed(batch_refs(self, complete=complete))]

    def speed_snapshots(self, complete: bool = True) -> list[str]:
        """Speed snapshot directories on disk, oldest first (staging directories never match); ``complete``: only
        those with their ``snapshot.json`` (an interrupted removal may leave a directory without it)."""
        found = sorted((int(m.group(1)), name) for name in self.store.children(self.speed_prefix)
                       if (m := SPEED_SNAPSHOT_DIR.match(name)))
        return [name for _, name in found
                if not complete or self.store.exists(f"{self.speed_prefix}/{name}/snapshot.json")]

    def checkpoints(self, component: str) -> Path:
        return self.home / self.checkpoints_prefix(component)

    def checkpoints_prefix(self, component: str) -> str:
        base = f"checkpoints/{component}"
        return f"{base}/workers/{self.speed_worker}" if self.speed_worker and component == SPEED_COMPONENT else base

    # kafka ------------------------------------------------------------------------------------------------
    @property
    def kafka(self) -> Path:
        return self.home / "kafka"


def _range_files(base: Path, source: str) -> list[MasterFile]:
    """Files named ``p=<p>/<start>-<end>.parquet`` under ``base``, sorted by (partition, start)."""
    out: list[MasterFile] = []
    if not base.is_dir():
        return out
    for pdir in base.iterdir():
        pm = PARTITION_DIR.match(pdir.name)
        if not pm or not pdir.is_dir():
            continue
        p = int(pm.group(1))
        for f in pdir.iterdir():
            fm = MASTER_FILE.match(f.name)
            if fm:
                out.append(MasterFile(f, source, p, int(fm.group(1)), int(fm.group(2))))
    out.sort(key=lambda m: (m.partition, m.start))
    return out


def _numbered_dirs(base: Path, pattern: re.Pattern, contract: str | None) -> list[str]:
    if not base.is_dir():
        return []
    found = [(int(m.group(1)), d.name) for d in base.iterdir()
             if (m := pattern.match(d.name)) and d.is_dir() and (contract is None or (d / contract).is_file())]
    return [name for _, name in sorted(found)]


def rewrite_records(layout: Layout, kind: type[R]) -> list[tuple[Path, R]]:
    """The journal records of one kind of master rewrite under ``master/_log/`` (``<utc>-<kind>-...json``, by
    :mod:`batch.rewrite`: a :class:`~lambdalake.contracts.CompactionRecord` or ``ErasureRecord``), oldest first."""
    out = []
    for key in layout.store.list("master/_log/"):
        name = key.rsplit("/", 1)[-1]
        if key.count("/") != 2 or not fnmatch.fnmatchcase(name, f"*-{kind.KIND}-*.json"):
            continue
        try:
            out.append((layout.master_log() / name, contracts.decode(layout.store.get(key), kind, key)))
        except (ObjectMissing, InvariantViolation) as exc:
            raise InvariantViolation(f"{kind.WHAT} record {key} is unreadable: {exc}") from exc
    return out


def rewrite_dir(layout: Layout, rec: MasterRewriteRecord) -> Path:
    """The partition directory whose files a rewrite record names (``master/...`` or ``rejected/...``)."""
    base = layout.master if rec.dataset == "master" else layout.rejected
    return base / rec.source / f"p={int(rec.partition)}"


# atomic file operations ---------------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(final: Path) -> Path:
    """A temporary sibling name that readers ignore (starts with '.', ends with '.tmp')."""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")


def remove_temp_entries(directory: Path) -> list[str]:
    """Remove what crashed writers left in ``directory``: entries named like :func:`tmp_name` (a file of
    :func:`atomic_write_bytes` killed before its rename, or a staging directory). Only for a directory whose one
    writer holds its lock (a live writer's temp entry would be taken from under it). Returns the names removed."""
    removed: list[str] = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def atomic_write_bytes(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` so readers see either the old file or the complete new one."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(final)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def atomic_publish_dir(staging: Path, final: Path, durable: Collection[str] = ()) -> None:
    """Rename a fully written staging directory to its final name, every file fsync'd first but those named in
    ``durable`` (hard links of files fsync'd when first written). ``final`` must not exist."""
    if final.exists():
        raise InvariantViolation(f"refusing to overwrite published directory {final}")
    for f in staging.rglob("*"):
        if f.is_file() and f.name not in durable:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(staging)  # its entries (links included) before it becomes visible
    os.rename(staging, final)
    fsync_dir(final.parent)


def write_contract(final: Path, contract: object) -> None:
    """Atomically write a contract file (:mod:`lambdalake.contracts`)."""
    atomic_write_bytes(final, contracts.encode(contract))


def write_pointer(pointer: Path, target: BatchPointer | SpeedPointer) -> None:
    """Atomically switch a pointer file (CURRENT): the commit point of a publish."""
    write_contract(pointer, target)


def _read_optional(path: Path, cls: type[C]) -> C | None:
    try:
        return contracts.read(path, cls)
    except FileNotFoundError:
        return None


def read_batch_pointer(layout: Layout) -> BatchPointer | None:
    """``views/batch/CURRENT`` through the storage seam, or None before the first publish."""
    try:
        data = layout.store.get(BATCH_POINTER_KEY)
    except ObjectMissing:
        return None
    return contracts.decode(data, BatchPointer, str(layout.batch_pointer))


def batch_prefix(ptr: BatchPointer | None, version: str) -> str:
    """The key prefix holding ``version``: from the pointer (format 2), else the first release's
    ``views/batch/<version>``. A prefix outside ``views/batch/`` is refused."""
    prefix = f"{BATCH_PREFIX}/{version}"
    if ptr is not None and ptr.format >= 2:
        prefix = ptr.prefix if ptr.version == version and ptr.prefix else next(
            (r.prefix for r in ptr.kept if r.version == version), prefix)
    parts = check_key(prefix).split("/")
    if len(parts) != 3 or "/".join(parts[:2]) != BATCH_PREFIX or parts[2] == "CURRENT":
        raise InvariantViolation(f"views/batch/CURRENT maps {version} to {prefix!r}, not a prefix under "
                                 f"{BATCH_PREFIX}/; refusing to read it")
    return prefix


def batch_refs(layout: Layout, ptr: BatchPointer | None = None, complete: bool = True) -> list[BatchVersionRef]:
    """The kept batch versions, newest first, with their prefixes: the pointer's kept list (format 2); for a lake
    of the first release's layout (format 1, or no pointer) its ``views/batch/v<n>`` directories."""
    ptr = read_batch_pointer(layout) if ptr is None else ptr
    if ptr is not None and ptr.format >= 2:
        refs = [BatchVersionRef(r.version, batch_prefix(ptr, r.version)) for r in ptr.kept]
        return [r for r in refs if not complete or layout.store.exists(f"{r.prefix}/manifest.json")]
    names = _numbered_dirs(layout.batch_views, BATCH_VERSION_DIR, "manifest.json" if complete else None)
    return [BatchVersionRef(v, f"{BATCH_PREFIX}/{v}") for v in reversed(names)]


def batch_pointer(layout: Layout) -> str | None:
    """The published batch version (``views/batch/CURRENT``), or None before the first publish."""
    ptr = read_batch_pointer(layout)
    return None if ptr is None else ptr.version


def speed_pointer(layout: Layout) -> str | None:
    """The visible speed snapshot (``views/speed/CURRENT``), or None before the first one."""
    try:
        data = layout.store.get(f"{layout.speed_prefix}/CURRENT")
    except ObjectMissing:
        return None
    return contracts.decode(data, SpeedPointer, str(layout.speed_pointer)).snapshot


def read_batch_manifest(layout: Layout, version: str) -> BatchManifest:
    """The manifest of batch version ``version`` (FileNotFoundError if the version is gone)."""
    return read_contract(layout, f"{batch_prefix(read_batch_pointer(layout), version)}/manifest.json", BatchManifest)


def read_contract(layout: Layout, key: str, cls: type[C]) -> C:
    """The contract object ``key`` of the lake through its store (FileNotFoundError if there is none)."""
    try:
        data = layout.store.get(key)
    except ObjectMissing as exc:
        raise FileNotFoundError(str(exc)) from None
    return contracts.decode(data, cls, key)


def read_speed_snapshot_meta(layout: Layout, snapshot: str) -> SpeedSnapshotMeta:
    """``snapshot.json`` of speed snapshot ``snapshot`` (FileNotFoundError if it is gone)."""
    return read_contract(layout, f"{layout.speed_prefix}/{snapshot}/snapshot.json", SpeedSnapshotMeta)


def kept_batch_versions(layout: Layout) -> list[tuple[str, BatchManifest]]:
    """Every kept batch version (:func:`batch_refs`) with its manifest, newest first; one pruned meanwhile or
    unreadable is skipped (never served)."""
    prefixes = {r.version: r.prefix for r in batch_refs(layout)}
    return _kept(list(reversed(prefixes)), lambda v: read_contract(layout, f"{prefixes[v]}/manifest.json",
                                                                  BatchManifest))


def kept_speed_snapshots(layout: Layout) -> list[tuple[str, SpeedSnapshotMeta]]:
    """Every speed snapshot still on disk with its meta, newest first (skipped as in :func:`kept_batch_versions`)."""
    return _kept(layout.speed_snapshots(), lambda s: read_speed_snapshot_meta(layout, s))


def _kept(names: list[str], read: Callable[[str], C]) -> list[tuple[str, C]]:
    out = []
    for name in reversed(names):
        try:
            out.append((name, read(name)))
        except (FileNotFoundError, InvariantViolation):
            continue
    return out


# reading published state (every layer and `lambdalake status` use these) -----------------------------------------
def current_batch_manifest(layout: Layout) -> BatchManifest | None:
    """Manifest of the published batch version (``views/batch/CURRENT``), or None before the first publish."""
    ptr = read_batch_pointer(layout)
    if ptr is None:
        return None
    version = ptr.version
    try:
        return read_contract(layout, f"{batch_prefix(ptr, version)}/manifest.json", BatchManifest)
    except OSError as exc:
        raise InvariantViolation(f"published batch version {version} has no readable manifest: {exc}") from exc

