"""The storage layout of the lake and atomic file operations. Every path the layers use is built here.

::

    <home>/
      master/<source>/p=<partition>/<start>-<end>.parquet   immutable; offsets [start, end) of one partition,
                                                             20-digit zero-padded; valid events only (the
                                                             invalid ones of the range went to the DLQ)
      master/_log/                                            maintenance records (compaction, erasure)
      views/batch/<version>/manifest.json                    one batch version = every view at one watermark
      views/batch/<version>/<view>/*.parquet
      views/batch/CURRENT                                    {"version": ...}; replaced atomically = publish
      views/speed/<snapshot>/snapshot.json                   speed positions S[p] of the snapshot
      views/speed/<snapshot>/<view>.parquet
      views/speed/CURRENT                                    {"snapshot": ...}; replaced atomically
      checkpoints/<component>/                                consumers' durable state
      kafka/                                                  the embedded broker (data, log, pid, state)

Master file columns: the source's declared fields (timestamps as ``timestamp[us, UTC]``), then ``_partition``
(int32), ``_offset`` (int64), ``_ingest_time`` (``timestamp[us, UTC]``).

Batch view columns: keys, ``window_start`` (``timestamp[us, UTC]``), the view's stored aggregates (int64 for
count/sum; field type for min/max).

Speed view columns: ``_partition`` (int32), ``_block_start`` (int64), then the same as a batch view.

Atomicity: files are written to a temporary name in the same directory, fsync'd, renamed, and the directory
fsync'd (:func:`atomic_write_bytes`, :func:`atomic_publish_dir`); a pointer switch is an atomic rename of a small
JSON file (:func:`write_pointer`).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lambdalake.exceptions import InvariantViolation

MASTER_FILE = re.compile(r"^(\d{20})-(\d{20})\.parquet$")
PARTITION_DIR = re.compile(r"^p=(\d+)$")


@dataclass(frozen=True)
class MasterFile:
    """One immutable master file: offsets [start, end) of ``partition`` of ``source``."""

    path: Path
    source: str
    partition: int
    start: int
    end: int


class Layout:
    """Paths of one lake rooted at ``home``."""

    def __init__(self, home: Path):
        self.home = Path(home)

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

    def master_files(self, source: str) -> list[MasterFile]:
        """All master files of a source, sorted by (partition, start). Ignores temporary files."""
        out: list[MasterFile] = []
        base = self.master_source(source)
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

    def master_log(self) -> Path:
        return self.master / "_log"

    # views ------------------------------------------------------------------------------------------------
    @property
    def batch_views(self) -> Path:
        return self.home / "views" / "batch"

    def batch_version(self, version: str) -> Path:
        return self.batch_views / version

    @property
    def batch_pointer(self) -> Path:
        return self.batch_views / "CURRENT"

    @property
    def speed_views(self) -> Path:
        return self.home / "views" / "speed"

    def speed_snapshot(self, snapshot: str) -> Path:
        return self.speed_views / snapshot

    @property
    def speed_pointer(self) -> Path:
        return self.speed_views / "CURRENT"

    def checkpoints(self, component: str) -> Path:
        return self.home / "checkpoints" / component

    # kafka ------------------------------------------------------------------------------------------------
    @property
    def kafka(self) -> Path:
        return self.home / "kafka"


def contiguous_ranges(files: list[MasterFile]) -> Iterator[tuple[int, int]]:
    """Per partition, check the files tile [first start, last end) with no gap and no overlap; yield (p, end).

    Raises InvariantViolation on an overlap (two files claim the same offset) — never silently double count.
    A gap is allowed only before the first file (a topic whose early offsets were deleted by retention).
    """
    by_p: dict[int, list[MasterFile]] = {}
    for f in files:
        by_p.setdefault(f.partition, []).append(f)
    for p, fs in sorted(by_p.items()):
        fs.sort(key=lambda m: m.start)
        for a, b in zip(fs, fs[1:], strict=False):
            if b.start < a.end:
                raise InvariantViolation(f"master files overlap: {a.path.name} and {b.path.name} in partition {p}")
            if b.start > a.end:
                raise InvariantViolation(f"gap in master offsets [{a.end}, {b.start}) of partition {p} "
                                         f"between {a.path.name} and {b.path.name}")
        yield p, fs[-1].end


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


def atomic_publish_dir(staging: Path, final: Path) -> None:
    """Rename a fully written (and fsync'd) staging directory to its final name. ``final`` must not exist."""
    if final.exists():
        raise InvariantViolation(f"refusing to overwrite published directory {final}")
    for f in staging.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    os.rename(staging, final)
    fsync_dir(final.parent)


def write_pointer(pointer: Path, payload: dict) -> None:
    """Atomically switch a pointer file (CURRENT) to ``payload``."""
    atomic_write_bytes(pointer, (json.dumps(payload, sort_keys=True, indent=1) + "\n").encode())


def read_pointer(pointer: Path) -> dict | None:
    """The pointer's payload, or None if nothing was published yet."""
    try:
        return json.loads(pointer.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise InvariantViolation(f"pointer file {pointer} is corrupt: {exc}") from exc


# reading published state (every layer and `lambdalake status` use these) -----------------------------------------
def current_batch_manifest(layout: Layout) -> dict | None:
    """Manifest of the published batch version (``views/batch/CURRENT``), or None before the first publish."""
    ptr = read_pointer(layout.batch_pointer)
    if ptr is None:
        return None
    path = layout.batch_version(ptr["version"]) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvariantViolation(
            f"published batch version {ptr['version']} has no readable manifest {path}: {exc}") from exc


def current_speed_snapshot(layout: Layout) -> dict | None:
    """``snapshot.json`` of the published speed snapshot (``views/speed/CURRENT``), or None."""
    ptr = read_pointer(layout.speed_pointer)
    if ptr is None:
        return None
    path = layout.speed_snapshot(ptr["snapshot"]) / "snapshot.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvariantViolation(f"published speed snapshot {ptr['snapshot']} is unreadable ({path}): {exc}") from exc


def watermark_of(manifest: dict | None) -> dict[tuple[str, int], int]:
    """{(topic, partition): W} from a batch manifest (empty before the first publish)."""
    if not manifest:
        return {}
    return {(t, int(p)): int(w) for t, parts in manifest["watermark"].items() for p, w in parts.items()}


def archived_positions(layout: Layout, source: str) -> dict[int, int]:
    """{partition: end offset} the master dataset of ``source`` holds (checks files tile without overlap)."""
    return dict(contiguous_ranges(layout.master_files(source)))
