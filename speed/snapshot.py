"""The speed snapshot: what the serving layer reads (the contract in :mod:`lambdalake.layout`).

Every file is an object of the lake's store (:mod:`lambdalake.storage`), under the worker's prefix
(:attr:`lambdalake.layout.Layout.speed_prefix`)::

    views/speed/<snapshot>/snapshot.json   lambdalake.contracts.SpeedSnapshotMeta: positions S, pruned_to, block,
                                            counters, and per view the definition fingerprint of its rows (while
                                            a changed view is rebuilt: its old rows' fingerprint, the target and
                                            the progress; a new view has fingerprint "" and no rows file) and the
                                            files holding its rows
    views/speed/<snapshot>/<view>.parquet  _partition int32, _block_start int64, keys, window_start
                                            timestamp[us, UTC], stored aggregates (lambdalake.schema)
    views/speed/<snapshot>/<view>.<snapshot>.parquet  the same columns: blocks sealed since the previous snapshot;
                                            later snapshots that still hold them list it as
                                            ``<snapshot>/<view>.<snapshot>.parquet`` (a reference, never a copy)
    views/speed/CURRENT                    lambdalake.contracts.SpeedPointer

A view's rows are the union of the files its ``SpeedView.files`` lists (format 3; before, ``<view>.parquet``
alone; format 4 references part files of earlier snapshots instead of hard-linking them, so nothing here needs a
file system: the same protocol runs on object storage). A checkpoint writes only what changed
(:class:`ViewFiles`): the rows of the open blocks as ``<view>.parquet``, the blocks sealed since the previous
snapshot as one new part file (merged with the newest earlier parts where they are not larger: a log-structured
merge, so a view has O(log n) parts and a row is rewritten O(log n) times), and references to the unchanged parts.
So a commit costs what arrived since the last one, not the size of the speed state.

A snapshot holds, for every view, the aggregates of the valid, deduplicated events at offsets ``[pruned_to[p],
positions[p])`` of every partition, one row per ``(partition, block_start, keys..., window_start)``: a reader
keeps the rows with ``_block_start >= W[p]`` of its batch version (:func:`lambdalake.handoff.speed_row_visible`).
If ``pruned_to[p] > W[p]`` the reader paired the snapshot with an older batch version than the speed layer has
already handed off to, and must re-read ``views/batch/CURRENT``.

Publishing never changes a published object: a snapshot's files are written whole (:meth:`Store.put`), its
``snapshot.json`` last — a snapshot is complete exactly when that exists — and only then made visible by switching
``CURRENT``. Old snapshots stay readable for a while (:func:`retain`) so a query that opened one keeps working; a
retired snapshot's part files stay while a kept snapshot references them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from lambdalake import contracts
from lambdalake.contracts import SpeedPointer, SpeedSnapshotMeta
from lambdalake.exceptions import InvariantViolation
from lambdalake.layout import (
    SPEED_SNAPSHOT_DIR,
    Layout,
    read_speed_snapshot_meta,
    remove_temp_entries,
    speed_pointer,
)
from lambdalake.schema import read_parquet_file
from lambdalake.storage.base import ObjectMissing
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
    """The part file snapshot ``snap`` writes for ``view``, as every snapshot lists it: ``<snap>/<view>.<snap>.parquet``
    (in ``snap``'s prefix; later snapshots reference it there, :meth:`lambdalake.layout.Layout.speed_file_key`)."""
    return f"{snap}/{view}.{snap}.parquet"


def encode_table(table: pa.Table) -> bytes:
    """A snapshot file's bytes (lz4, statistics, the strings dictionary-encoded)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, use_dictionary=dictionary_columns(table.schema), **PARQUET_OPTIONS)
    return sink.getvalue().to_pybytes()


def read_table(layout: Layout, key: str) -> pa.Table:
    """One snapshot or checkpoint file, read whole: by path on a local lake (no copy), else its bytes."""
    path = getattr(layout.store, "path", None)
    if path is not None:
        return read_parquet_file(path(key))
    return pq.ParquetFile(pa.BufferReader(layout.store.get(key))).read()


def write_view(layout: Layout, snap: str, name: str, vf: ViewFiles | pa.Table) -> list[str]:
    """Write one view's new files of snapshot ``snap`` as objects; returns every file the snapshot lists for it
    (:attr:`lambdalake.contracts.SpeedView.files`): the kept parts of the previous snapshot by reference, the new
    part, the base."""
    if isinstance(vf, pa.Table):
        vf = ViewFiles(vf, rows=vf.num_rows)
    prev = vf.previous
    names = [f if "/" in f else f"{prev}/{f}" for f in vf.keep]  # a first-release entry lies in ``prev``'s prefix
    if vf.merge or vf.new is not None:
        parts = [read_table(layout, layout.speed_file_key(prev, f)).cast(vf.base.schema)  # type: ignore[arg-type]
                 for f in vf.merge]
        if vf.new is not None:
            parts.append(vf.new)
        f = part_name(name, snap)
        layout.store.put(layout.speed_file_key(snap, f), encode_table(pa.concat_tables(parts)))
        names.append(f)
    layout.store.put(layout.speed_file_key(snap, f"{name}.parquet"), encode_table(vf.base))
    names.append(f"{name}.parquet")
    return names


def write_snapshot(layout: Layout, snap: str, tables: dict[str, ViewFiles | pa.Table],
                   meta: SpeedSnapshotMeta) -> str:
    """Write snapshot ``snap`` (not yet visible): every view's new files (:func:`write_view`), then
    ``snapshot.json`` listing them — last, so a snapshot is complete exactly when it has one (a crash before leaves
    an orphan prefix, removed by recovery). Each object is written whole (:meth:`Store.put`). Returns its prefix."""
    for name, vf in tables.items():
        names = write_view(layout, snap, name, vf)
        if name in meta.views:
            meta.views[name].files = names
    meta.snapshot = snap
    layout.store.put(f"{layout.speed_prefix}/{snap}/snapshot.json", contracts.encode(meta))
    return f"{layout.speed_prefix}/{snap}"


def make_visible(layout: Layout, snap: str) -> None:
    """Switch ``views/speed/CURRENT`` to ``snap`` (one whole-object put of the pointer)."""
    layout.store.put(f"{layout.speed_prefix}/CURRENT", contracts.encode(SpeedPointer(snap)))


def visible_snapshot(layout: Layout) -> str | None:
    return speed_pointer(layout)


def read_snapshot(layout: Layout, snap: str, views: Iterable[str]) -> tuple[SpeedSnapshotMeta, dict[str, pa.Table]]:
    """``snapshot.json`` and the tables of ``views`` of a published snapshot (for restoring a checkpoint)."""
    try:
        meta = read_speed_snapshot_meta(layout, snap)
        tables = {name: _concat([read_table(layout, layout.speed_file_key(snap, f)) for f in meta.files_of(name)])
                  for name in views}
    except (OSError, ObjectMissing, InvariantViolation, pa.ArrowException) as exc:
        raise CheckpointCorrupt(f"speed snapshot {layout.speed_prefix}/{snap} of the last checkpoint is unreadable "
                                f"({exc}); remove {layout.checkpoints('speed')} to rebuild the speed layer from "
                                "Kafka") from exc
    return meta, tables


def _concat(tables: list[pa.Table]) -> pa.Table:
    return tables[0] if len(tables) == 1 else pa.concat_tables([t.cast(tables[-1].schema) for t in tables])


def remove_staging(layout: Layout) -> None:
    """Remove what a crash while writing a snapshot left and nobody can see: a first release's staging
    directories, the local store's temporary files (this process is the worker's only writer)."""
    remove_temp_entries(layout.speed_views)
    remove_stale = getattr(layout.store, "remove_stale_temps", None)
    if remove_stale is not None:
        remove_stale(layout.speed_prefix, older_than=0.0)


def remove_prefix(layout: Layout, prefix: str, keep: set[str] | frozenset[str] = frozenset()) -> int:
    """Delete every object under ``prefix`` but the keys ``keep``; a local directory left empty goes too. Returns
    the number deleted."""
    removed = 0
    for key in layout.store.list(prefix + "/"):
        if key not in keep:
            layout.store.delete(key)
            removed += 1
    path = getattr(layout.store, "path", None)
    if path is not None:
        with contextlib.suppress(OSError):
            path(prefix).rmdir()
    return removed


def remove_after(layout: Layout, seq: int) -> list[str]:
    """Remove snapshots newer than ``seq``: written by a run that crashed before its checkpoint committed, so
    ``CURRENT`` never pointed at them (commit step 5 comes before step 6), and no committed snapshot references
    their parts (references only point back)."""
    removed = []
    for name in layout.speed_snapshots(complete=False):
        n = seq_of(name)
        if n is not None and n > seq and remove_prefix(layout, f"{layout.speed_prefix}/{name}"):
            removed.append(name)
    return removed


def referenced_keys(layout: Layout, snap: str, meta: SpeedSnapshotMeta) -> set[str]:
    """Every key snapshot ``snap`` reads: its ``snapshot.json`` and each view's files, wherever they lie."""
    keys = {f"{layout.speed_prefix}/{snap}/snapshot.json"}
    for view in set(meta.views) | set(meta.rows):
        keys.update(layout.speed_file_key(snap, f) for f in meta.files_of(view))
    return keys


def retain(layout: Layout, keep: int, keep_seconds: float, protect: set[str],
           metas: dict[str, SpeedSnapshotMeta] | None = None) -> list[str]:
    """Delete old snapshots: those beyond the newest ``keep`` that are also older than ``keep_seconds``
    (a reader that opened one within that time keeps a consistent view). ``protect`` is never deleted.

    A retired snapshot's objects go but for the part files a kept snapshot still references (they stay in the
    retired prefix, without its ``snapshot.json``, until no kept snapshot lists them). ``metas``: a cache of
    snapshot metas by name (they never change once written) kept by the caller across calls."""
    metas = {} if metas is None else metas
    names = layout.speed_snapshots(complete=False)
    now = time.time()
    retire: list[str] = []
    for name in names[:-keep] if keep > 0 else names:
        if name in protect:
            continue
        try:
            age = now - layout.store.modified(f"{layout.speed_prefix}/{name}/snapshot.json")
        except ObjectMissing:  # the parts left of a retired snapshot
            retire.append(name)
            continue
        if age >= keep_seconds:
            retire.append(name)
    if not retire:
        return []
    referenced: set[str] = set()
    for name in names:
        if name in retire:
            continue
        meta = metas.get(name)
        if meta is None:
            try:
                meta = metas[name] = read_speed_snapshot_meta(layout, name)
            except FileNotFoundError:
                continue
        referenced |= referenced_keys(layout, name, meta)
    removed = []
    for name in retire:  # (an emptied prefix may still be listed on some stores: nothing to delete there)
        metas.pop(name, None)
        if remove_prefix(layout, f"{layout.speed_prefix}/{name}", referenced) and \
                not layout.store.exists(f"{layout.speed_prefix}/{name}/snapshot.json"):
            removed.append(name)
    for name in set(metas) - set(names):
        del metas[name]
    return removed
