"""The published speed state of every speed worker, read as ONE snapshot (docs/design.md, "Ownership is per partition").

Each speed worker (:mod:`lambdalake.ownership`) publishes its own snapshots behind its own pointer
(``views/speed/CURRENT`` for the worker owning every partition, ``views/speed/workers/<worker>/CURRENT`` for the
others). A worker that takes a partition over claims a higher *ownership epoch* for it than any published snapshot
holds (under the partition's owner lock), so a reader takes each partition from exactly one snapshot: the one with
the highest epoch for it (then the newest). Every worker snapshot is exact for the partitions it holds (speed
invariant, per partition), so the union is exact at the union of those positions: no partition is counted by two
workers, none is missing once any worker published it.

:func:`read_speed_set` reads the pointers and metas (a ``FileNotFoundError`` while a worker prunes means: read
again), :func:`merge` combines them into a :class:`SpeedSet` whose ``meta`` looks like one snapshot's (positions,
pruned_to, block, per-view fingerprints) to every reader of ``SpeedSnapshotMeta``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lambdalake.contracts import Positions, SpeedSnapshotMeta, SpeedView
from lambdalake.exceptions import InvariantViolation
from lambdalake.layout import Layout, read_speed_snapshot_meta, speed_pointer

TP = tuple[str, int]


@dataclass(frozen=True)
class SpeedPart:
    """One worker's published snapshot and the partitions a reader takes from it."""

    worker: str
    snapshot: str
    meta: SpeedSnapshotMeta
    partitions: frozenset[TP]


@dataclass(frozen=True)
class SpeedSet:
    """The union of the workers' current snapshots (``parts``), and its combined ``meta``."""

    parts: tuple[SpeedPart, ...]
    meta: SpeedSnapshotMeta

    @property
    def id(self) -> str:
        return self.meta.snapshot

    @property
    def single(self) -> bool:
        """One snapshot holds every partition (the usual, single-worker lake): read it without filters."""
        return len(self.parts) == 1

    def parts_of(self, view: str, topic: str) -> list[tuple[SpeedPart, frozenset[int]]]:
        """The parts holding rows of ``view`` of the merged definition, with the partitions of ``topic`` to take."""
        want = self.meta.views.get(view)
        out = []
        for part in self.parts:
            sv = part.meta.views.get(view)
            if want is None or sv is None or sv.fingerprint != want.fingerprint or not want.fingerprint:
                continue
            parts = frozenset(p for t, p in part.partitions if t == topic)
            if parts:
                out.append((part, parts))
        return out


def epoch_of(meta: SpeedSnapshotMeta, key: TP) -> int:
    return meta.epochs.get(key, 0)


def worker_snapshots(layout: Layout) -> list[tuple[str, str, SpeedSnapshotMeta]]:
    """(worker, snapshot id, meta) of every worker's published snapshot; FileNotFoundError if one vanished."""
    root = layout.root()
    out = []
    for worker in root.speed_workers():
        wl = root.for_speed_worker(worker)
        snap = speed_pointer(wl)
        if snap is not None:
            out.append((worker, snap, read_speed_snapshot_meta(wl, snap)))
    return out


def best_epochs(snapshots: Iterable[tuple[str, str, SpeedSnapshotMeta]]) -> dict[TP, int]:
    """The highest ownership epoch any published snapshot holds, per partition."""
    best: dict[TP, int] = {}
    for _, _, meta in snapshots:
        for key in meta.positions:
            best[key] = max(best.get(key, -1), epoch_of(meta, key))
    return best


def merge(snapshots: list[tuple[str, str, SpeedSnapshotMeta]]) -> SpeedSet | None:
    """The union (module docstring); None when no worker published anything."""
    if not snapshots:
        return None
    owner: dict[TP, int] = {}
    for i, (_, _, meta) in enumerate(snapshots):
        for key in meta.positions:
            j = owner.get(key)
            if j is None or _rank(meta, key) > _rank(snapshots[j][2], key):
                owner[key] = i
    held = {i: frozenset(k for k, j in owner.items() if j == i) for i in range(len(snapshots))}
    parts = tuple(SpeedPart(w, s, m, held[i]) for i, (w, s, m) in enumerate(snapshots)
                  if held[i] or len(snapshots) == 1)
    if not parts:  # every worker published, none holds a partition yet (group members before their assignment)
        w, s, m = snapshots[0]
        parts = (SpeedPart(w, s, m, frozenset()),)
    if len(parts) == 1 and parts[0].partitions == frozenset(parts[0].meta.positions):
        return SpeedSet(parts, parts[0].meta)  # one snapshot holds everything: it is the set
    blocks = {p.meta.block for p in parts}
    if len(blocks) > 1:
        raise InvariantViolation(f"speed workers use different handoff blocks {sorted(blocks)}; every worker of a "
                                 "lake must use the same LAMBDALAKE_HANDOFF_BLOCK")
    return SpeedSet(parts, _merged_meta(parts))


def _rank(meta: SpeedSnapshotMeta, key: TP) -> tuple[int, float]:
    return epoch_of(meta, key), meta.created_at_unix or 0.0


def _merged_meta(parts: tuple[SpeedPart, ...]) -> SpeedSnapshotMeta:
    positions: dict[TP, int] = {}
    pruned: dict[TP, int] = {}
    epochs: dict[TP, int] = {}
    counters: dict[str, dict[str, int]] = {}
    for part in parts:
        m = part.meta
        for key in part.partitions:
            positions[key] = m.positions[key]
            pruned[key] = m.pruned_to.get(key, 0)
            epochs[key] = epoch_of(m, key)
        for topic, c in m.counters.items():
            acc = counters.setdefault(topic, {})
            for k, n in c.items():
                acc[k] = acc.get(k, 0) + n
    names = sorted({name for p in parts for name in p.meta.views})
    views = {name: v for name in names if (v := _merged_view(name, parts)) is not None}
    oldest = min(parts, key=lambda p: p.meta.created_at_unix or 0.0).meta
    versions = {p.meta.batch_version for p in parts}
    return SpeedSnapshotMeta(
        snapshot="+".join(f"{p.worker or 'all'}:{p.snapshot}" for p in parts), pipeline=oldest.pipeline,
        positions=Positions(positions), pruned_to=Positions(pruned), block=parts[0].meta.block,
        created_at=oldest.created_at, created_at_unix=oldest.created_at_unix,
        batch_version=versions.pop() if len(versions) == 1 else None,
        counters=counters, rows={n: v.rows for n, v in views.items()}, views=views,
        format=min(p.meta.format for p in parts), worker="*", epochs=Positions(epochs))


def _merged_view(name: str, parts: tuple[SpeedPart, ...]) -> SpeedView | None:
    """One view across the workers: their rows combine only when made by the same definition in the same state;
    otherwise the view has no usable speed rows (fingerprint ``""``) until the workers agree again."""
    svs = [(p, p.meta.views.get(name)) for p in parts if p.partitions]
    if any(sv is None for _, sv in svs):
        return None
    first = svs[0][1]
    if any((sv.fingerprint, sv.target) != (first.fingerprint, first.target) for _, sv in svs):
        targets = [sv.target or sv.fingerprint for _, sv in svs]
        return SpeedView("", 0, target=max(targets), progress=0.0, positions=Positions())
    rows = sum(_rows_in(p, name) for p, _ in svs)
    if first.target is None:
        return SpeedView(first.fingerprint, rows)
    covers: dict[TP, int] = {}
    for p, sv in svs:
        src = sv.positions if sv.positions is not None else p.meta.positions
        covers.update((key, src[key]) for key in p.partitions if key in src)
    progress = min((sv.progress or 0.0) for _, sv in svs)
    return SpeedView(first.fingerprint, rows, target=first.target, progress=progress, positions=Positions(covers))


def _rows_in(part: SpeedPart, view: str) -> int:
    """Rows the part's snapshot says it holds for ``view`` (all partitions; the reader filters)."""
    sv = part.meta.views.get(view)
    return 0 if sv is None else sv.rows


def read_speed_set(layout: Layout) -> SpeedSet | None:
    """The current union of the workers' snapshots (FileNotFoundError: one was pruned meanwhile, read again)."""
    return merge(worker_snapshots(layout))


def current_speed_snapshot(layout: Layout) -> SpeedSnapshotMeta | None:
    """The published speed state as one snapshot meta: ``snapshot.json`` of ``views/speed/CURRENT``, or with
    several speed workers the union of theirs (:mod:`lambdalake.speedset`); None before the first snapshot."""
    for attempt in range(5):
        try:
            found = read_speed_set(layout)
            return None if found is None else found.meta
        except FileNotFoundError as exc:  # a worker pruned the snapshot between its pointer and its meta
            if attempt == 4:
                raise InvariantViolation(f"published speed snapshot {exc.filename} is unreadable: {exc}") from exc
        except OSError as exc:
            raise InvariantViolation(f"a published speed snapshot is unreadable: {exc}") from exc
    return None
