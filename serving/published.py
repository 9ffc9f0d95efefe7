"""Which published data a serving connection reads: ONE consistent (batch version, speed snapshot) pair.

Resolution protocol (:func:`resolve_pair`), mirroring the publishers' order (batch publishes version ``v+1`` and
only afterwards the speed layer prunes to ``W_{v+1}`` and publishes a snapshot with ``pruned_to = W_{v+1}``):

1. Read ``views/speed/CURRENT`` and that snapshot's ``snapshot.json`` (positions ``S``, ``pruned_to``, ``block``).
2. Read ``views/batch/CURRENT`` (once: it names the version and the prefix holding it) and that version's
   ``manifest.json`` (watermark ``W``). Reading speed first means any batch version we see is at least as new as
   the one the speed layer had pruned to.
3. Paranoid checks, each a named exception instead of a silent wrong answer:
   - ``pruned_to[p] <= W[p]`` for every partition, else the speed layer dropped blocks this batch version does not
     cover (a rollback or a publish racing us): retry from 1 a few times, then raise.
   - every ``W[p]`` is a multiple of the snapshot's ``block`` (the handoff rule, :mod:`lambdalake.handoff`);
     a misaligned watermark would split a speed block between both sides and double count.
   - the batch manifest's ``block`` equals the snapshot's.

Either side may be absent (nothing published yet): that is a valid state and yields an empty side.

The same pairing rules (:func:`pairing_problems`) choose the *stale* pair of a view whose declared definition is
being rebuilt (:func:`stale_pair`): among the batch versions and speed snapshots still kept on disk, the newest pair
made by one and the same earlier definition.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from lambdalake import contracts
from lambdalake.contracts import BatchManifest, Positions, SpeedSnapshotMeta
from lambdalake.layout import (
    Layout,
    batch_prefix,
    kept_batch_versions,
    kept_speed_snapshots,
    read_batch_pointer,
    speed_pointer,
)
from lambdalake.pipeline import View
from lambdalake.speedset import SpeedSet, read_speed_set
from serving.exceptions import InconsistentPublishedState

RESOLVE_ATTEMPTS = 5


@dataclass(frozen=True)
class PublishedPair:
    """The batch version and speed snapshot one connection reads, with everything needed to merge them."""

    home: Path
    batch_version: str | None = None
    manifest: BatchManifest | None = None
    speed_snapshot: str | None = None
    snapshot: SpeedSnapshotMeta | None = None
    resolved_at: float = field(default_factory=time.time)
    speed: SpeedSet | None = None  # the worker snapshots behind ``snapshot`` (None: the snapshot named above alone)
    batch_dir: Path | None = None  # where the batch version's files are, as resolved (None: ask the pointer)

    @property
    def layout(self) -> Layout:
        return Layout(self.home)

    @property
    def watermark(self) -> Positions:
        """W of the batch version (empty without one: every speed row is visible)."""
        return self.manifest.watermark if self.manifest is not None else Positions()

    @property
    def positions(self) -> Positions:
        """S: the speed snapshot covers offsets up to these (exclusive)."""
        return self.snapshot.positions if self.snapshot is not None else Positions()

    @property
    def pruned_to(self) -> Positions:
        """The first offset per partition the speed snapshot still holds."""
        return self.snapshot.pruned_to if self.snapshot is not None else Positions()

    @property
    def block(self) -> int | None:
        """Offsets per handoff block, as the speed snapshot records it."""
        return self.snapshot.block if self.snapshot is not None else None

    @property
    def nothing_published(self) -> bool:
        return self.batch_version is None and self.speed_snapshot is None

    def topic_watermark(self, topic: str) -> dict[int, int]:
        """{partition: W} of one topic; partitions not listed have W = 0."""
        return self.watermark.of_topic(topic)

    def batch_files(self, view: View) -> list[Path]:
        """The batch version's parquet files of ``view`` (Spark's ``_SUCCESS``/``.crc`` and hidden files skipped)."""
        if self.batch_version is None:
            return []
        layout = self.layout
        d = (self.batch_dir or layout.batch_version(self.batch_version)) / view.name
        if not d.is_dir():
            return []
        files = sorted(f for f in d.glob("*.parquet") if f.is_file() and not f.name.startswith((".", "_")))
        layout.inside_all(files)  # a symlink out of the lake is refused, naming it
        return files

    def batch_has_view(self, view: View) -> bool:
        """Whether the batch version computed ``view`` (a view declared after the last batch run is missing)."""
        return self.manifest is not None and self.manifest.has_view(view.name)

    def batch_row_count(self, view: View) -> int | None:
        """Rows the manifest says the batch version wrote for ``view`` (None if it does not say)."""
        return None if self.manifest is None else self.manifest.row_counts.get(view.name)

    def speed_files(self, view: View, topic: str) -> list[tuple[Path, frozenset[int] | None]]:
        """The speed snapshot's parquet files of ``view`` (a view of ``topic``), each with the partitions to read
        from it (None: all): one file, or with several speed workers one per worker holding some of the topic's
        partitions (:mod:`lambdalake.speedset`). Empty without a snapshot or file."""
        if self.speed_snapshot is None:
            return []
        if self.speed is None or self.speed.single:
            part = None if self.speed is None else self.speed.parts[0]
            found = [(f, None) for f in self._speed_files(part.worker if part else "",
                                                          part.snapshot if part else self.speed_snapshot,
                                                          part.meta if part else self.snapshot, view)]
        else:
            found = [(f, parts) for part, parts in self.speed.parts_of(view.name, topic)
                     for f in self._speed_files(part.worker, part.snapshot, part.meta, view)]
        return found

    def _speed_files(self, worker: str, snap: str, meta: SpeedSnapshotMeta | None, view: View) -> list[Path]:
        """The files of ``view`` in one snapshot (:meth:`SpeedSnapshotMeta.files_of`); a file the snapshot lists
        that is missing raises FileNotFoundError (resolve again)."""
        wl = self.layout.for_speed_worker(worker)
        d = wl.speed_snapshot(snap)
        sv = None if meta is None else meta.views.get(view.name)
        listed = sv is not None and bool(sv.files)
        out = []
        for name in ([f"{view.name}.parquet"] if meta is None else meta.files_of(view.name)):
            f = wl.speed_file(snap, name)
            if f.is_symlink() or f.is_file():
                self.layout.inside(f)
            if f.is_file():
                out.append(f)
            elif listed:
                raise FileNotFoundError(f"speed snapshot {d} lists {name} but does not hold it")
        return out

    def speed_dir(self) -> Path | None:
        """Where the speed snapshot lives (for messages): its directory, or the workers' parent directory."""
        if self.speed_snapshot is None:
            return None
        if self.speed is None or self.speed.single:
            part = None if self.speed is None else self.speed.parts[0]
            return self.layout.for_speed_worker(part.worker if part else "").speed_snapshot(
                part.snapshot if part else self.speed_snapshot)
        return self.layout.speed_views / "workers"


def _read_once(layout: Layout) -> PublishedPair:
    """Steps 1-2 of the protocol; FileNotFoundError if a pointed-to file vanished meanwhile (retry). A pointer,
    version directory or contract file resolving outside the lake (symlink) is refused (:meth:`Layout.inside`)."""
    for worker in layout.speed_workers():
        wl = layout.for_speed_worker(worker)
        if wl.speed_pointer.is_symlink() or wl.speed_pointer.exists():
            layout.inside(wl.speed_pointer)
            snap_id = speed_pointer(wl)
            if snap_id is not None:
                layout.inside(wl.speed_snapshot(snap_id) / "snapshot.json")
    if layout.batch_pointer.is_symlink() or layout.batch_pointer.exists():
        layout.inside(layout.batch_pointer)
    speed = read_speed_set(layout)
    ptr = read_batch_pointer(layout)  # once: the version and the prefix holding it come from one body
    version = None if ptr is None else ptr.version
    vdir = None if ptr is None else layout.home / batch_prefix(ptr, ptr.version)
    manifest = None
    if vdir is not None:
        layout.inside(vdir / "manifest.json")
        manifest = contracts.read(vdir / "manifest.json", BatchManifest)
    if speed is None:
        return PublishedPair(layout.home, version, manifest, batch_dir=vdir)
    return PublishedPair(layout.home, version, manifest, speed.id, speed.meta, speed=speed, batch_dir=vdir)


def pairing_problems(manifest: BatchManifest | None, snapshot: SpeedSnapshotMeta | None,
                     topics: set[str] | None = None) -> list[str]:
    """Why a speed snapshot cannot be merged with a batch version: partitions pruned past the watermark.

    ``topics`` restricts the check (a view reads one topic); None checks every partition.
    """
    if snapshot is None:
        return []
    w = manifest.watermark if manifest is not None else Positions()
    return [f"{t}[{p}]: speed pruned to {n} > batch watermark {w.at(t, p)}"
            for (t, p), n in snapshot.pruned_to.items() if n > w.at(t, p) and (topics is None or t in topics)]


def alignment_problem(manifest: BatchManifest | None, snapshot: SpeedSnapshotMeta | None,
                      version: str | None, snap_id: str | None, topics: set[str] | None = None) -> str | None:
    """Why a pair breaks the handoff rule (block sizes differ, watermarks not on block boundaries), or None."""
    if snapshot is None or manifest is None:
        return None
    block = snapshot.block
    if manifest.block != block:
        return (f"batch version {version} was cut with handoff block {manifest.block} but speed snapshot "
                f"{snap_id} uses block {block}; both sides must use the same LAMBDALAKE_HANDOFF_BLOCK")
    bad = {f"{t}[{p}]": w for (t, p), w in manifest.watermark.items()
           if w % block and (topics is None or t in topics)}
    if bad:
        return (f"batch version {version} has watermarks {bad} that are not multiples of the speed snapshot's "
                f"block {block}; merging would count part of a block twice. Republish the batch version with an "
                "aligned watermark (lambdalake.handoff.aligned_watermark)")
    return None


def check_alignment(pair: PublishedPair) -> None:
    """Raise if the pair breaks the handoff rule (watermarks not on block boundaries, block sizes differ)."""
    problem = alignment_problem(pair.manifest, pair.snapshot, pair.batch_version, pair.speed_snapshot)
    if problem:
        raise InconsistentPublishedState(problem)


def resolve_pair(home: Path, attempts: int = RESOLVE_ATTEMPTS) -> PublishedPair:
    """Read the published pointers once and return a consistent pair (see the module docstring)."""
    layout = Layout(home)
    problems: list[str] = []
    for attempt in range(attempts):
        try:
            pair = _read_once(layout)
        except FileNotFoundError as exc:  # pruned between reading the pointer and the file: read again
            problems = [f"{exc.filename} vanished while reading"]
        else:
            problems = pairing_problems(pair.manifest, pair.snapshot)
            if not problems:
                check_alignment(pair)
                return pair
        time.sleep(0.05 * (attempt + 1))
    raise InconsistentPublishedState(
        f"no consistent batch/speed pair in {home} after {attempts} attempts: {'; '.join(problems)}. "
        "Is a batch rollback or publish in progress? Retry, or check `views/batch/CURRENT`")


# --- the kept pieces, for serving a view stale ---------------------------------------------------------------------
def stale_pair(home: Path, view: View, topic: str) -> tuple[PublishedPair, str] | None:
    """The newest kept (batch version, speed snapshot) pair whose parts of ``view`` were made by ONE definition.

    Returns the pair and that definition's fingerprint, or None. Pairing is the same as :func:`resolve_pair`'s,
    restricted to the view's topic: ``pruned_to <= W``, watermarks on block boundaries, the same block. A side is
    left out (None) only if the lake has no piece of that side at all, exactly as for a current pair. Only pieces
    that record a fingerprint in the current form can be paired (a first-release manifest records the legacy one,
    a first-release snapshot none: neither tells which definition made it).
    """
    layout = Layout(home)
    versions: list[tuple[str | None, BatchManifest | None]] = list(kept_batch_versions(layout)) or [(None, None)]
    snaps: list[tuple[str | None, SpeedSnapshotMeta | None]] = list(kept_speed_snapshots(layout)) or [(None, None)]
    topics = {topic}
    for snap_id, meta in snaps:
        sv = None if meta is None else meta.views.get(view.name)
        if meta is not None and (sv is None or not sv.fingerprint or
                                 (sv.rows and not all(layout.speed_file(snap_id, f).is_file()
                                                      for f in sv.file_names(view.name)))):
            continue
        for version, manifest in versions:
            if manifest is not None and (manifest.format < 2 or not manifest.has_view(view.name)):
                continue
            fb = None if manifest is None else manifest.fingerprint_of(view.name)
            fs = None if sv is None else sv.fingerprint
            if fb is None and fs is None:
                continue
            if fb is not None and fs is not None and fb != fs:
                continue
            if pairing_problems(manifest, meta, topics) or alignment_problem(manifest, meta, version, snap_id, topics):
                continue
            return PublishedPair(home, version, manifest, snap_id, meta), str(fb or fs)
    return None
