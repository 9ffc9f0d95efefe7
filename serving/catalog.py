"""The catalog file: a DuckDB database under ``<home>/`` that the stock DuckDB CLI opens to run the same queries.

``duckdb -readonly data/lake.duckdb`` then ``SELECT * FROM pageviews_hourly`` works like ``lambdalake sql``:
the same generated merge (:mod:`serving.sql`), ``master.<source>`` and ``lambdalake.status`` / ``watermarks`` /
``views``.

What the file holds, for the (batch version, speed snapshot) pair current when it was written:

- the speed side *copied* into tables (small; so pruning old speed snapshots never breaks an open session);
- the batch side as views over the version's parquet files by absolute path (batch versions are retained for the
  last K publishes);
- ``master.<source>`` as views over a glob of the master directory (immutable files; new ones show up live);
- the merged views and metadata tables.

Staleness rule: the file is a snapshot of one pair. Re-run ``lambdalake catalog`` (publishers may call
:func:`write_catalog` after each publish) to move it forward. The file is replaced atomically (temporary file +
rename): a DuckDB CLI session that already opened it keeps reading its old, consistent pair until it re-opens the
file (``.open data/lake.duckdb`` or restart); a session older than K batch publishes gets "file not found" for
batch files and must re-open. ``window_start`` is a TIMESTAMPTZ: the CLI shows it in its TimeZone setting
(``SET TimeZone = 'UTC'`` to match ``lambdalake sql``).

The stock CLI is the user's own shell, so the lock-down of :func:`serving.connection.connect` does not apply to
it; open it with ``-readonly`` (and ``-safe`` is not usable, as the views must read the lake's files).
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from lambdalake.config import Settings
from lambdalake.layout import Layout, fsync_dir, tmp_name
from lambdalake.pipeline import Pipeline
from serving.connection import (
    _check_speed_blocks,
    _install_metadata,
    _view_row,
    batch_dataset,
    resolve,
    speed_table,
)
from serving.published import PublishedPair, resolve_pair
from serving.sql import (
    empty_select,
    ident,
    literal,
    master_columns,
    merged_view_sql,
    speed_columns,
    typed_select,
    view_columns,
)

CATALOG_NAME = "lake.duckdb"  # not "lambdalake.duckdb": the catalog would shadow the `lambdalake` schema


def catalog_path(settings: Settings) -> Path:
    """Where ``lambdalake catalog`` writes the catalog file: ``<home>/lake.duckdb``."""
    return settings.home / CATALOG_NAME


def _parquet_list(paths: list[Path]) -> str:
    return "read_parquet([" + ", ".join(literal(str(p.resolve())) for p in paths) + "])"


def write_catalog(settings: Settings | None = None, pipeline: Pipeline | str | None = None,
                  home: str | Path | None = None, path: Path | None = None) -> tuple[Path, PublishedPair]:
    """Write the catalog file for the currently published pair, atomically; returns (path, pair).

    Protocol: 1. resolve one consistent pair; 2. build the database in a temporary file next to the target;
    3. close it (checkpoint, no WAL left) and fsync; 4. rename over the target and fsync the directory.
    """
    settings, pipe = resolve(settings, pipeline, home)
    final = Path(path) if path is not None else catalog_path(settings)
    final.parent.mkdir(parents=True, exist_ok=True)
    layout = Layout(settings.home)
    # 1. one consistent pair
    pair = resolve_pair(layout.home)
    # 2. build in a temporary file that readers ignore
    tmp = tmp_name(final)
    try:
        con = duckdb.connect(str(tmp), config={"autoinstall_known_extensions": False,
                                               "autoload_known_extensions": False})
        try:
            _build(con, pipe, settings, pair, layout)
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
           layout: Layout) -> None:
    con.execute("BEGIN TRANSACTION")
    for schema in ("_lake", "lambdalake", "master"):
        con.execute(f"CREATE SCHEMA {schema}")
    view_rows = []
    for view in pipeline.views:
        watermark = pair.topic_watermark(pipeline.source_of(view).topic)
        batch, speed = f"_lake.{ident('batch_' + view.name)}", f"_lake.{ident('speed_' + view.name)}"
        dataset = batch_dataset(pipeline, view, pair)  # runs the same paranoid checks as a connection
        files = pair.batch_files(view)
        cols = view_columns(pipeline, view)
        batch_sql = typed_select(cols, _parquet_list(files)) if files else empty_select(cols)
        con.execute(f"CREATE VIEW {batch} AS {batch_sql}")
        con.register("_speed_arrow", speed_table(pipeline, view, pair))
        try:
            con.execute(f"CREATE TABLE {speed} AS {typed_select(speed_columns(pipeline, view), '_speed_arrow')}")
        finally:
            con.unregister("_speed_arrow")
        if pair.block:
            _check_speed_blocks(con, speed, view, pair)
        con.execute(f"CREATE VIEW main.{ident(view.name)} AS {merged_view_sql(view, batch, speed, watermark)}")
        view_rows.append(_view_row(con, pipeline, view, pair, dataset.count_rows(), speed, watermark))
    for source in pipeline.sources:
        cols = master_columns(source)
        if layout.master_files(source.name):
            glob = layout.master_source(source.name).resolve() / "p=*" / "*.parquet"
            rel = f"read_parquet({literal(str(glob))}, union_by_name = true)"
            sql = typed_select(cols, rel)
        else:
            sql = empty_select(cols)
        con.execute(f"CREATE VIEW master.{ident(source.name)} AS {sql}")
    _install_metadata(con, pipeline, settings, pair, view_rows)
    con.execute("COMMIT")
