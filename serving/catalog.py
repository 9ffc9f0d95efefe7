"""The catalog file: a DuckDB database under ``<home>/`` that the stock DuckDB CLI opens to run the same queries.

``duckdb -readonly data/lake.duckdb`` then ``SELECT * FROM pageviews_hourly`` works like ``lambdalake sql``:
the same generated merge (:mod:`lambdalake.viewsql`), ``master.<source>`` and ``lambdalake.status`` / ``watermarks`` /
``views``.

What the file holds, for the (batch version, speed snapshot) pair current when it was written:

- the speed side *copied* into tables (small; so pruning old speed snapshots never breaks an open session);
- the batch side as views over the version's parquet files by absolute path (batch versions are retained for the
  last K publishes);
- ``master.<source>`` as views over the master files valid when it was written (:meth:`Layout.master_files`: an
  interrupted compaction counts once); files archived or compacted later need a re-run;
- the merged views and metadata tables.

Staleness rule: the file is a snapshot of one pair. Re-run ``lambdalake catalog`` (publishers may call
:func:`write_catalog` after each publish) to move it forward. The file is replaced atomically (temporary file +
rename): a DuckDB CLI session that already opened it keeps reading its old, consistent pair until it re-opens the
file (``.open data/lake.duckdb`` or restart); a session older than K batch publishes gets "file not found" for
batch files and must re-open. ``window_start`` is a TIMESTAMPTZ: the CLI shows it in its TimeZone setting
(``SET TimeZone = 'UTC'`` to match ``lambdalake sql``).

The stock CLI is the user's own shell, so the lock-down of :func:`serving.connection.connect` does not apply to
it; open it with ``-readonly`` (and ``-safe`` is not usable, as the views must read the lake's files).

CLI versions: the file is written with ``storage_compatibility_version`` :data:`STORAGE_COMPATIBILITY` (storage
version 64), so DuckDB 1.0 and later read it; tested with the DuckDB CLI 1.5.6 (``pip install duckdb-cli``, pinned
in the ``test`` extra) and DuckDB 2.0.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from lambdalake.config import Settings
from lambdalake.heads import master_files
from lambdalake.layout import Layout, fsync_dir, tmp_name
from lambdalake.pipeline import Pipeline
from lambdalake.schema import master_columns, speed_view_columns, view_columns
from lambdalake.viewsql import empty_select, ident, literal, merged_view_sql, sql_list, typed_select
from serving.connection import resolve, sync_mirror
from serving.datasets import absent_columns, batch_dataset, speed_table
from serving.install import check_speed_blocks, install_refused, side_names
from serving.metadata import install_metadata, view_row
from serving.plans import STALE, plan_views
from serving.published import PublishedPair, resolve_pair

CATALOG_NAME = "lake.duckdb"  # not "lambdalake.duckdb": the catalog would shadow the `lambdalake` schema
# The file is written in the oldest storage format DuckDB 2.0 can write (storage version 64, read by every DuckDB
# since 1.0), not 2.0's own (69): the stable CLI users install (`pip install duckdb-cli`, 1.5.6) reads 64-68 only.
STORAGE_COMPATIBILITY = "v1.0.0"


def remote_note(settings: Settings, source: str) -> str:
    """What a stock DuckDB CLI is told when it reads ``master.<source>`` of a catalog of an object-storage lake."""
    return (f"master.{source} is in the bucket {settings.lake}: this catalog holds the published views (mirrored to "
            f"{settings.home}), not the master dataset — a stock DuckDB has no S3 reader offline; query it with "
            "`lambdalake sql` or serving.connect()")


def catalog_path(settings: Settings) -> Path:
    """Where ``lambdalake catalog`` writes the catalog file: ``<home>/lake.duckdb``."""
    return settings.home / CATALOG_NAME


def _parquet_list(paths: list[Path], union_by_name: bool = False) -> str:
    files = sql_list([str(p.resolve()) for p in paths])
    return f"read_parquet({files}, union_by_name = true)" if union_by_name else f"read_parquet({files})"


def write_catalog(settings: Settings | None = None, pipeline: Pipeline | str | None = None,
                  home: str | Path | None = None, path: Path | None = None,
                  allow_stale: bool = False) -> tuple[Path, PublishedPair]:
    """Write the catalog file for the currently published pair, atomically; returns (path, pair).

    Protocol: 1. resolve one consistent pair; 2. build the database in a temporary file next to the target;
    3. close it (checkpoint, no WAL left) and fsync; 4. rename over the target and fsync the directory.
    A view being rebuilt for a new definition is refused in the file as in a connection (or, ``allow_stale``,
    served from an older pair of one earlier definition; see :mod:`serving.plans`).
    """
    settings, pipe = resolve(settings, pipeline, home)
    if settings.lake:
        sync_mirror(settings)
    final = Path(path) if path is not None else catalog_path(settings)
    final.parent.mkdir(parents=True, exist_ok=True)
    layout = Layout(settings.home)
    # 1. one consistent pair
    pair = resolve_pair(layout.home)
    # 2. build in a temporary file that readers ignore
    tmp = tmp_name(final)
    try:
        con = duckdb.connect(str(tmp), config={"autoinstall_known_extensions": False,
                                               "autoload_known_extensions": False,
                                               "storage_compatibility_version": STORAGE_COMPATIBILITY})
        try:
            _build(con, pipe, settings, pair, layout, allow_stale)
        finally:
            con.close()  # 3. closing checkpoints the database into the file
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        # 4. atomic switch
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            leftover.unlink(missing_ok=True)
    return final, pair


def _build(con: duckdb.DuckDBPyConnection, pipeline: Pipeline, settings: Settings, pair: PublishedPair,
           layout: Layout, allow_stale: bool) -> None:
    plans = plan_views(pipeline, pair, allow_stale)
    con.execute("BEGIN TRANSACTION")
    for schema in ("_lake", "lambdalake", "master"):
        con.execute(f"CREATE SCHEMA {schema}")
    view_rows = []
    for view in pipeline.views:
        plan, source = plans[view.name], pipeline.source_of(view)
        batch, speed = side_names(view)
        batch_cols, speed_cols = view_columns(source, view), speed_view_columns(source, view)
        if plan.pair is None:  # being rebuilt: same columns, every scan refused with the one line
            view_rows.append(install_refused(con, pipeline, plan, "VIEW", sketch_functions=False))
            continue
        served, stale = plan.pair, plan.state == STALE
        dataset = batch_dataset(pipeline, view, served, stale)  # runs the same paranoid checks as a connection
        speed_tbl = speed_table(pipeline, view, served, stale)
        batch_absent = absent_columns(dataset.schema, batch_cols) if stale else frozenset()
        speed_absent = absent_columns(speed_tbl.schema, speed_cols) if stale else frozenset()
        files = served.batch_files(view)
        batch_sql = typed_select(batch_cols, _parquet_list(files), batch_absent) if files else empty_select(batch_cols)
        con.execute(f"CREATE VIEW {batch} AS {batch_sql}")
        con.register("_speed_arrow", speed_tbl)
        try:
            con.execute(f"CREATE TABLE {speed} AS {typed_select(speed_cols, '_speed_arrow', speed_absent)}")
        finally:
            con.unregister("_speed_arrow")
        if served.block:
            check_speed_blocks(con, speed, view, served)
        watermark = served.topic_watermark(source.topic)
        merged = merged_view_sql(view, batch, speed, watermark, source, sketch_functions=False)  # no hll_* in a CLI
        con.execute(f"CREATE VIEW main.{ident(view.name)} AS {merged}")
        view_rows.append(view_row(con, pipeline, plan, dataset.count_rows(), speed, batch_absent | speed_absent))
    for source in pipeline.sources:
        if settings.lake:  # the master files stay in the bucket: a stock DuckDB has no S3 reader offline
            note = literal(remote_note(settings, source.name))
            con.execute(f"CREATE VIEW master.{ident(source.name)} AS SELECT error({note})")
            continue
        cols = master_columns(source)
        files = master_files(layout, source.name)  # THE valid-file rule (an interrupted compaction counts once)
        layout.inside_all(m.path for m in files)  # never a symlink out of the lake
        sql = typed_select(cols, _parquet_list([m.path for m in files], union_by_name=True), presented=True) \
            if files else empty_select(cols, presented=True)
        con.execute(f"CREATE VIEW master.{ident(source.name)} AS {sql}")
    install_metadata(con, pipeline, settings, pair, view_rows)
    con.execute("COMMIT")
