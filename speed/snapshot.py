"""The speed snapshot: what the serving layer reads (the contract in :mod:`lambdalake.layout`).

::

    views/speed/<snapshot>/snapshot.json   lambdalake.contracts.SpeedSnapshotMeta: positions S, pruned_to, block,
                                            counters, and per view the definition fingerprint of its rows (while
                                            a changed view is rebuilt: its old rows' fingerprint, the target and
                                            the progress; a new view has fingerprint "" and no rows file)
    views/speed/<snapshot>/<view>.parquet  _partition int32, _block_start int64, keys, window_start
                                            timestamp[us, UTC], stored aggregates (lambdalake.schema)
    views/speed/<snapshot>/<view>.<id>.parquet  the same columns: sealed blocks written by snapshot <id> and
                                            hard-linked into every later snapshot that still holds them
    views/speed/CURRENT                    lambdalake.contracts.SpeedPointer

A view's rows are the union of the files its ``SpeedView.files`` lists (format 3; before, ``<view>.parquet``
alone). A checkpoint writes only what changed (:class:`ViewFiles`): the rows of the open blocks as
``<view>.parquet``, the blocks sealed since the previous snapshot as one new part file (merged with the newest
earlier parts where they are not larger: a log-structured merge, so a file holds O(log n) parts and a row is
rewritten O(log n) times), and links to the unchanged parts of the previous snapshot. So a commit costs what
arrived since the last one, not the size of the speed state (it wrote every row each time before).

A snapshot holds, for every view, the aggregates of the valid, deduplicated events at offsets ``[pruned_to[p],
positions[p])`` of every partition, one row per ``(partition, block_start, keys..., window_start)``: a reader
keeps the rows with ``_block_start >= W[p]`` of its batch version (:func:`lambdalake.handoff.speed_row_visible`).
If ``pruned_to[p] > W[p]`` the reader paired the snapshot with an older batch version than the speed layer has
already handed off to, and must re-read ``views/batch/CURRENT``.

Publishing never changes a published directory: a snapshot is written to a staging directory, fsync'd, renamed
(:func:`lambdalake.layout.atomic_publish_dir`) and only then made visible by switching ``CURRENT``. Old
snapshots stay readable for a while (:func:`retain`) so a query that opened one keeps working.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lambdalake import contracts
from lambdalake.contracts import SpeedPointer, SpeedSnapshotMeta
from lambdalake.exceptions import InvariantViolation
from lambdalake.layout import (
    SPEED_SNAPSHOT_DIR,
    Layout,
    atomic_publish_dir,
    read_speed_snapshot_meta,
    remove_temp_entries,
    speed_pointer,
    tmp_name,
    write_pointer,
)
from lambdalake.schema import read_parquet_file
from speed.exceptions import CheckpointCorrupt

PARQUET_OPTIONS = dict(compression="lz4", write_statistics=True, row_group_size=256 * 1024)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns a snapshot file dictionary-encodes: the strings (view keys, where values repeat). Encoding every
    column took half of a snapshot's write time for no smaller file (numbers, sketches and window starts rarely
    repeat within a block)."""
    return [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]


def snapshot_id(seq: int) -> str:
    """Snapshot (and checkpoint) ids are a zero-padded sequence, so names sort in commit order."""
    return f"{seq:012d}"


def seq_of(name: str) -> int | None:
    m = SPEED_SNAPSHOT_DIR.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ViewFiles:
    """How one view's rows go into a snapshot: ``base`` (the open blocks' rows, or every row of a view kept whole)
    as ``<view>.parquet``; the part files ``keep`` of snapshot ``previous`` linked unchanged; and one new part
    file holding the parts ``merge`` of ``previous`` read again plus the rows ``new``."""

    base: pa.Table
    keep: tuple[str, ...] = ()
    merge: tuple[str, ...] = ()
    new: pa.Table | None = None
    previous: str | None = None
    rows: int = 0  # every row of the view in the snapshot


def part_name(view: str, snap: str) -> str:
    """The part file snapshot ``snap`` writes for ``view``."""
    return f"{view}.{snap}.parquet"


def _write(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, use_dictionary=dictionary_columns(table.schema), **PARQUET_OPTIONS)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links: a copy, same bytes
        shutil.copy2(src, dst)


def write_view(layout: Layout, snap: str, name: str, staging: Path, vf: ViewFiles | pa.Table) -> list[str]:
    """Write one view's files into the staging directory of snapshot ``snap``; returns their names."""
    if isinstance(vf, pa.Table):
        vf = ViewFiles(vf, rows=vf.num_rows)
    names: list[str] = []
    prev = None if vf.previous is None else layout.speed_snapshot(vf.previous)
    for f in vf.keep:
        _link(prev / f, staging / f)  # type: ignore[operator]
        names.append(f)
    if vf.merge or vf.new is not None:
        parts = [read_parquet_file(prev / f).cast(vf.base.schema) for f in vf.merge]  # type: ignore[operator]
        if vf.new is not None:
            parts.append(vf.new)
        f = part_name(name, snap)
        _write(pa.concat_tables(parts), staging / f)
        names.append(f)
    _write(vf.base, staging / f"{name}.parquet")
    names.append(f"{name}.parquet")
    return names


def write_snapshot(layout: Layout, snap: str, tables: dict[str, ViewFiles | pa.Table],
                   meta: SpeedSnapshotMeta) -> Path:
    """Write snapshot ``snap`` (not yet visible): staging dir, every view's files (:func:`write_view`) +
    ``snapshot.json`` listing them, fsync, atomic rename to ``views/speed/<snap>``. Returns the final directory."""
    final = layout.speed_snapshot(snap)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = tmp_name(final)
    staging.mkdir()
    try:
        linked: set[str] = set()
        for name, vf in tables.items():
            names = write_view(layout, snap, name, staging, vf)
            if name in meta.views:
                meta.views[name].files = names
            if isinstance(vf, ViewFiles):
                linked.update(vf.keep)
        meta.snapshot = snap
        (staging / "snapshot.json").write_bytes(contracts.encode(meta))
        atomic_publish_dir(staging, final, durable=linked)  # fsyncs the new files, renames, fsyncs views/speed
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def make_visible(layout: Layout, snap: str) -> None:
    """Switch ``views/speed/CURRENT`` to ``snap`` (atomic rename of the pointer file)."""
    write_pointer(layout.speed_pointer, SpeedPointer(snap))


def visible_snapshot(layout: Layout) -> str | None:
    return speed_pointer(layout)


def read_snapshot(layout: Layout, snap: str, views: Iterable[str]) -> tuple[SpeedSnapshotMeta, dict[str, pa.Table]]:
    """``snapshot.json`` and the tables of ``views`` of a published snapshot (for restoring a checkpoint)."""
    d = layout.speed_snapshot(snap)
    try:
        meta = read_speed_snapshot_meta(layout, snap)
        tables = {name: _concat([read_parquet_file(d / f) for f in meta.files_of(name)]) for name in views}
    except (OSError, InvariantViolation, pa.ArrowException) as exc:
        raise CheckpointCorrupt(f"speed snapshot {d} of the last checkpoint is unreadable ({exc}); remove "
                                f"{layout.checkpoints('speed')} to rebuild the speed layer from Kafka") from exc
    return meta, tables


def _concat(tables: list[pa.Table]) -> pa.Table:
    return tables[0] if len(tables) == 1 else pa.concat_tables([t.cast(tables[-1].schema) for t in tables])


def remove_staging(layout: Layout) -> None:
    """Remove staging directories left by a crash while writing a snapshot (never visible to anyone)."""
    remove_temp_entries(layout.speed_views)


def remove_after(layout: Layout, seq: int) -> list[str]:
    """Remove snapshots newer than ``seq``: written by a run that crashed before its checkpoint committed, so
    ``CURRENT`` never pointed at them (commit step 5 comes before step 6)."""
    removed = []
    for name in layout.speed_snapshots(complete=False):
        n = seq_of(name)
        if n is not None and n > seq:
            shutil.rmtree(layout.speed_snapshot(name), ignore_errors=True)
            removed.append(name)
    return removed


def retain(layout: Layout, keep: int, keep_seconds: float, protect: set[str]) -> list[str]:
    """Delete old snapshots: those beyond the newest ``keep`` that are also older than ``keep_seconds``
    (a reader that opened one within that time keeps a consistent view). ``protect`` is never deleted."""
    names = layout.speed_snapshots(complete=False)
    now = time.time()
    removed = []
    for name in names[:-keep] if keep > 0 else names:
        if name in protect:
            continue
        d = layout.speed_snapshot(name)
        try:
            age = now - d.stat().st_mtime
        except FileNotFoundError:
            continue
        if age >= keep_seconds:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(name)
    return removed
