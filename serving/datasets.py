"""The published files handed to DuckDB as Arrow data, checked against the contract (steps 3-4).

Steps 3 and 4 of the build protocol (:mod:`serving.connection`): pyarrow reads the published files, so DuckDB
itself never opens a lake file (an allow-list of lake paths would also let ``COPY ... TO`` overwrite them). Batch
views and ``master.<source>`` are lazy pyarrow datasets scanned per query (opening costs the file listing and
footers, not the rows); the speed side is read into Arrow memory (small). Paranoid checks: every file has the
contract's columns, lies inside the lake (no symlink out, :meth:`Layout.inside`), batch row counts equal the
manifest's; any failure raises :class:`serving.exceptions.InconsistentPublishedState`. The catalog file
(:mod:`serving.catalog`) runs the same checks.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from lambdalake.heads import master_files
from lambdalake.layout import Layout
from lambdalake.pipeline import WINDOW_START, Pipeline, View
from lambdalake.schema import (
    ARROW_TYPES,
    BLOCK_COL,
    PARTITION_COL,
    arrow_schema,
    master_columns,
    read_parquet_file,
    speed_view_columns,
    view_columns,
)
from lambdalake.storage.base import Store
from lambdalake.viewsql import Columns
from serving.exceptions import InconsistentPublishedState
from serving.published import PublishedPair

POSITION_COLUMNS = frozenset({WINDOW_START, PARTITION_COL, BLOCK_COL})  # where a row belongs: never optional


def _check_columns(schema: pa.Schema, columns: Columns, path: Path, what: str, stale: bool = False) -> None:
    """Every contract column is in the file; for pieces of an earlier definition (``stale``) only the position
    columns must be (the others may differ: :func:`absent_columns`)."""
    required = [c for c in columns if c.name in POSITION_COLUMNS] if stale else columns
    missing = [c.name for c in required if c.name not in schema.names]
    if missing:
        raise InconsistentPublishedState(
            f"{what} file {path} lacks columns {missing} (has {schema.names}); it does not follow the published "
            "layout contract (lambdalake.layout)")


def absent_columns(schema: pa.Schema, columns: Columns) -> frozenset[str]:
    """The contract columns a file of an earlier definition does not hold as such (missing, or of another type):
    a stale answer shows them as NULL."""
    return frozenset(c.name for c in columns
                     if c.name not in schema.names or schema.field(c.name).type != ARROW_TYPES[c.type])


def batch_dataset(pipeline: Pipeline, view: View, pair: PublishedPair, stale: bool = False) -> ds.Dataset:
    """Lazy dataset of the batch side of ``view`` (empty, with the contract's schema, if there are no files).

    ``stale``: the pair holds pieces of an earlier definition of the view, whose columns may differ."""
    cols = view_columns(pipeline.source_of(view), view)
    files = pair.batch_files(view)
    if not files:
        expected = pair.batch_row_count(view)
        if expected:  # the manifest promises rows that are not there
            raise InconsistentPublishedState(
                f"batch version {pair.batch_version} says view {view.name!r} has {expected} rows but "
                f"{pair.layout.batch_version(str(pair.batch_version)) / view.name} holds no parquet file")
        return ds.dataset(arrow_schema(cols, nullability=False).empty_table())
    dataset = ds.dataset([str(f) for f in files], format="parquet")
    _check_columns(dataset.schema, cols, files[0], f"batch view {view.name!r}", stale)
    expected = pair.batch_row_count(view)
    if expected is not None:
        actual = dataset.count_rows()  # footers only
        if actual != expected:
            raise InconsistentPublishedState(
                f"batch version {pair.batch_version}, view {view.name!r}: manifest says {expected} rows, "
                f"files hold {actual}; the version is damaged — roll back to the previous version")
    return dataset


def speed_table(pipeline: Pipeline, view: View, pair: PublishedPair, stale: bool = False) -> pa.Table:
    """The speed side of ``view`` read into memory (empty with the contract's schema if absent; ``stale`` as for
    :func:`batch_dataset`)."""
    source = pipeline.source_of(view)
    cols = speed_view_columns(source, view)
    files = pair.speed_files(view, source.topic)
    if not files:
        sv = None if pair.snapshot is None else pair.snapshot.views.get(view.name)
        if sv is not None and sv.rows:  # the snapshot promises rows that are not there
            raise InconsistentPublishedState(
                f"speed snapshot {pair.speed_snapshot} says view {view.name!r} has {sv.rows} rows but "
                f"{pair.speed_dir()} holds no {view.name}.parquet")
        return arrow_schema(cols, nullability=False).empty_table()
    tables = []
    for f, parts in files:  # several speed workers: each file gives the partitions its worker holds
        table = read_parquet_file(f)
        _check_columns(table.schema, cols, f, f"speed view {view.name!r}", stale)
        if parts is not None:
            table = table.filter(pc.is_in(table.column("_partition"), value_set=pa.array(sorted(parts), pa.int32())))
        tables.append(table)
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def master_dataset(pipeline: Pipeline, source_name: str, layout: Layout, remote: Store | None = None) -> ds.Dataset:
    """Lazy dataset over the master files of a source as listed now (immutable files; new ones need refresh).
    ``remote``: the lake on object storage that ``layout`` mirrors (:mod:`lambdalake.mirror`): the heads are read in
    the mirror, the files they list in the bucket, through pyarrow's S3 file system (per query, never via DuckDB)."""
    cols = master_columns(pipeline.source(source_name))
    listed = master_files(layout, source_name)  # THE rule
    if not listed:
        return ds.dataset(arrow_schema(cols, nullability=False).empty_table())
    if remote is not None:
        fs, base = remote.arrow_filesystem()  # type: ignore[attr-defined]
        return ds.dataset([f"{base}/{layout.key(m.path)}" for m in listed], format="parquet",
                          filesystem=fs)
    return ds.dataset([str(f) for f in layout.inside_all(m.path for m in listed)], format="parquet")
