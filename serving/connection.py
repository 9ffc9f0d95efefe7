"""The serving connection: a locked-down in-process DuckDB where every view is batch ⊕ speed, merged per query.

What a connection contains (all built from the pipeline declaration, see :mod:`serving.sql`):

- ``<view>`` (e.g. ``pageviews_hourly``) in the default schema: the merged view, columns ``view.output_columns``.
- ``master.<source>``: the raw master dataset (declared fields + ``_partition``, ``_offset``, ``_ingest_time``).
- ``lambdalake.status`` (one row: versions read, freshness), ``lambdalake.watermarks`` (per topic-partition:
  batch watermark ``W``, speed position ``S``), ``lambdalake.views`` (per view: rows on each side, completeness).
- ``_lake.batch_<view>`` / ``_lake.speed_<view>``: the typed sides the merge reads (internal).

Build protocol (:func:`connect`):

1. Open an in-memory DuckDB and lock it down *first* (:func:`lock_down`): no external access at all (DuckDB never
   opens a file or URL: no COPY TO, EXPORT, ATTACH, read_csv('/etc/passwd'), INSTALL/LOAD), no extension
   auto-install/auto-load, no spilling to disk, configuration locked (only display/resource knobs stay settable).
2. Resolve ONE consistent (batch version, speed snapshot) pair (:func:`serving.published.resolve_pair`).
3. Hand DuckDB the published files through pyarrow (so the lock-down never needs an allow-list: DuckDB's
   ``allowed_paths`` would also let ``COPY ... TO`` overwrite those very files). Speed views are copied into
   memory (small). Batch views are copied into memory too by default (``materialize=True``: queries then run on
   native DuckDB tables, ~10x faster than scanning Arrow, and the connection is immune to pruning of old
   versions); with ``materialize=False`` they stay lazy pyarrow datasets scanned per query (cheap to open: what
   one-shot ``lambdalake sql`` uses). ``master.<source>`` is always a lazy dataset.
4. Paranoid checks: every file has the contract's columns, batch row counts equal the manifest's, speed rows lie
   on block boundaries; any failure raises :class:`serving.exceptions.InconsistentPublishedState`.
5. Create the merged views and metadata in one transaction. If a speed file vanished meanwhile (pruned after we
   read the pointer), start again from 2.

Staleness rule: a connection keeps the pair it resolved until :func:`refresh` (or a new :func:`connect`). Queries
on it never mix pairs, so they are exact for that pair, but newer data is invisible; ``lambdalake.status`` shows
the pair and its age. A materialized connection never depends on the files again; a lazy one
(``materialize=False``) reads the batch version's files, which the batch layer retains for its last K versions —
after K more publishes it gets "file not found" and must be refreshed. ``lambdalake sql`` opens a fresh lazy
connection per call, so each call reads the newest pair.
"""

from __future__ import annotations

import itertools
import time
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lambdalake.config import Settings, load_settings
from lambdalake.layout import Layout
from lambdalake.pipeline import Pipeline, View, load_pipeline
from serving.exceptions import InconsistentPublishedState
from serving.published import PublishedPair, resolve_pair
from serving.sql import (
    Columns,
    arrow_schema,
    ident,
    literal,
    master_columns,
    merged_view_sql,
    speed_columns,
    speed_visible_predicate,
    typed_select,
    view_columns,
)

# Settings a user may still change on a locked connection: display and resource knobs only.
ALLOWED_CONFIGS = ("TimeZone", "Calendar", "threads", "memory_limit", "enable_progress_bar", "errors_as_json")
BUILD_ATTEMPTS = 5
_NO_KAFKA = "127.0.0.1:1"  # serving never talks to Kafka; a well-formed placeholder keeps load_settings happy


@dataclass
class _Binding:
    settings: Settings
    pipeline: Pipeline
    materialize: bool = True
    pair: PublishedPair | None = None
    generation: int = 0
    registered: tuple[str, ...] = ()


_bindings: weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, _Binding] = weakref.WeakKeyDictionary()
_generations = itertools.count(1)


def resolve(settings: Settings | None = None, pipeline: Pipeline | str | None = None,
            home: str | Path | None = None) -> tuple[Settings, Pipeline]:
    """Settings and pipeline for serving: explicit objects win, then ``home``/env/defaults (never needs Kafka)."""
    if settings is None:
        spec = pipeline if isinstance(pipeline, str) else None
        settings = load_settings(home=home, bootstrap=_NO_KAFKA, pipeline=spec)
    elif home is not None:
        settings = settings.with_(home=Path(home).expanduser().resolve())
    if isinstance(pipeline, Pipeline):
        return settings, pipeline
    return settings, load_pipeline(pipeline if isinstance(pipeline, str) else settings.pipeline)


def lock_down(con: duckdb.DuckDBPyConnection) -> None:
    """Make ``con`` unable to touch the file system, the network or extensions, for good (step 1)."""
    con.execute("SET TimeZone = 'UTC'")  # window_start is UTC; users may still change the display zone
    con.execute("SET temp_directory = ''")  # never spill to disk: the connection writes no file at all
    con.execute(f"SET allowed_configs = [{', '.join(literal(c) for c in ALLOWED_CONFIGS)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def open_locked() -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB connection with extensions frozen and external access disabled."""
    con = duckdb.connect(":memory:", config={
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "allow_unsigned_extensions": False,
    })
    lock_down(con)
    return con


def connect(settings: Settings | None = None, pipeline: Pipeline | str | None = None,
            home: str | Path | None = None, materialize: bool = True) -> duckdb.DuckDBPyConnection:
    """A ready, read-only DuckDB connection over the lake's merged views (see the module docstring).

    ``settings`` defaults to :func:`lambdalake.config.load_settings` (``LAMBDALAKE_HOME`` …); ``pipeline`` is a
    :class:`Pipeline`, a pipeline file/module spec, or None for the configured one; ``home`` overrides the lake.
    ``materialize`` copies the batch side into memory (fast queries, slower to open; see step 3 above).

    Query with the returned connection itself: ``master.*`` (and lazy batch views) read Arrow datasets registered
    on this connection, which DuckDB does not share with ``con.cursor()``; open one connection per thread.
    """
    settings, pipe = resolve(settings, pipeline, home)
    con = open_locked()
    _bindings[con] = _Binding(settings, pipe, materialize)
    try:
        refresh(con)
    except BaseException:
        con.close()
        raise
    return con


def refresh(con: duckdb.DuckDBPyConnection) -> PublishedPair:
    """Move ``con`` to the newest published pair, atomically for its later queries; returns the pair.

    An unfinished result of ``con`` (rows not fetched yet) is discarded first.
    """
    binding = _bindings.get(con)
    if binding is None:
        raise InconsistentPublishedState("refresh() needs a connection made by lambdalake.connect()")
    con.abort()
    layout = Layout(binding.settings.home)
    last: Exception | None = None
    for _ in range(BUILD_ATTEMPTS):
        pair = resolve_pair(layout.home)
        generation = next(_generations)
        try:
            registered = _install(con, binding.pipeline, binding.settings, pair, generation, binding.materialize)
        except FileNotFoundError as exc:  # a file of the pair was pruned while we read it: resolve again
            last = exc
            time.sleep(0.05)
            continue
        for name in binding.registered:
            con.unregister(name)
        binding.pair, binding.generation, binding.registered = pair, generation, registered
        return pair
    raise InconsistentPublishedState(f"published files kept vanishing while connecting to {layout.home}: {last}")


def pair_of(con: duckdb.DuckDBPyConnection) -> PublishedPair | None:
    """The pair a connection made by :func:`connect` currently reads."""
    binding = _bindings.get(con)
    return binding.pair if binding else None


# --- reading the published files (pyarrow; DuckDB itself never opens a file) -------------------------------------
def _check_columns(schema: pa.Schema, columns: Columns, path: Path, what: str) -> None:
    missing = [n for n, _ in columns if n not in schema.names]
    if missing:
        raise InconsistentPublishedState(
            f"{what} file {path} lacks columns {missing} (has {schema.names}); it does not follow the published "
            "layout contract (lambdalake.layout)")


def batch_dataset(pipeline: Pipeline, view: View, pair: PublishedPair) -> ds.Dataset:
    """Lazy dataset of the batch side of ``view`` (empty, with the contract's schema, if there are no files)."""
    cols = view_columns(pipeline, view)
    files = pair.batch_files(view)
    if not files:
        expected = pair.batch_row_count(view)
        if expected:  # the manifest promises rows that are not there
            raise InconsistentPublishedState(
                f"batch version {pair.batch_version} says view {view.name!r} has {expected} rows but "
                f"{pair.layout.batch_version(str(pair.batch_version)) / view.name} holds no parquet file")
        return ds.dataset(arrow_schema(cols).empty_table())
    dataset = ds.dataset([str(f) for f in files], format="parquet")
    _check_columns(dataset.schema, cols, files[0], f"batch view {view.name!r}")
    expected = pair.batch_row_count(view)
    if expected is not None:
        actual = dataset.count_rows()
        if actual != expected:
            raise InconsistentPublishedState(
                f"batch version {pair.batch_version}, view {view.name!r}: manifest says {expected} rows, "
                f"files hold {actual}; the version is damaged — roll back to the previous version")
    return dataset


def speed_table(pipeline: Pipeline, view: View, pair: PublishedPair) -> pa.Table:
    """The speed side of ``view`` read into memory (empty with the contract's schema if absent)."""
    cols = speed_columns(pipeline, view)
    f = pair.speed_file(view)
    if f is None:
        return arrow_schema(cols).empty_table()
    table = pq.read_table(f)
    _check_columns(table.schema, cols, f, f"speed view {view.name!r}")
    return table


def master_dataset(pipeline: Pipeline, source_name: str, layout: Layout) -> ds.Dataset:
    """Lazy dataset over the master files of a source as listed now (immutable files; new ones need refresh)."""
    cols = master_columns(pipeline.source(source_name))
    files = [str(m.path) for m in layout.master_files(source_name)]
    if not files:
        return ds.dataset(arrow_schema(cols).empty_table())
    return ds.dataset(files, format="parquet")


# --- building the catalog of a connection --------------------------------------------------------------------------
def _install(con: duckdb.DuckDBPyConnection, pipeline: Pipeline, settings: Settings, pair: PublishedPair,
             generation: int, materialize: bool) -> tuple[str, ...]:
    """Steps 3-5: register the pair's data under generation-unique names, then swap every view in one transaction."""
    layout = Layout(settings.home)
    registered: list[str] = []

    def register(kind: str, name: str, obj) -> str:
        reg = f"_g{generation}_{kind}_{name}"
        con.register(reg, obj)
        registered.append(reg)
        return ident(reg)

    view_rows: list[tuple] = []
    batch_rel: dict[str, str] = {}
    batch_rows: dict[str, int] = {}
    speed_data: dict[str, str] = {}
    try:
        for view in pipeline.views:
            dataset = batch_dataset(pipeline, view, pair)
            batch_rows[view.name] = dataset.count_rows()
            batch_rel[view.name] = register("batch", view.name, dataset)
            speed_data[view.name] = register("speed", view.name, speed_table(pipeline, view, pair))
        master_rel = {s.name: register("master", s.name, master_dataset(pipeline, s.name, layout))
                      for s in pipeline.sources}

        con.execute("BEGIN TRANSACTION")
        for schema in ("_lake", "lambdalake", "master"):
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        for view in pipeline.views:
            topic = pipeline.source_of(view).topic
            watermark = pair.topic_watermark(topic)
            batch, speed = f"_lake.{ident('batch_' + view.name)}", f"_lake.{ident('speed_' + view.name)}"
            con.execute(f"CREATE OR REPLACE {'TABLE' if materialize else 'VIEW'} {batch} AS "
                        f"{typed_select(view_columns(pipeline, view), batch_rel[view.name])}")
            con.execute(f"CREATE OR REPLACE TABLE {speed} AS "
                        f"{typed_select(speed_columns(pipeline, view), speed_data[view.name])}")
            if pair.block:
                _check_speed_blocks(con, speed, view, pair)
            con.execute(f"CREATE OR REPLACE VIEW main.{ident(view.name)} AS "
                        f"{merged_view_sql(view, batch, speed, watermark)}")
            view_rows.append(_view_row(con, pipeline, view, pair, batch_rows[view.name], speed, watermark))
        for source in pipeline.sources:
            con.execute(f"CREATE OR REPLACE VIEW master.{ident(source.name)} AS "
                        f"{typed_select(master_columns(source), master_rel[source.name])}")
        _install_metadata(con, pipeline, settings, pair, view_rows)
        con.execute("COMMIT")
    except BaseException:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # no transaction open yet
        for reg in registered:
            con.unregister(reg)
        raise
    # Sides copied into tables no longer need their arrow registration.
    for view in pipeline.views:
        for rel in (speed_data[view.name], *([batch_rel[view.name]] if materialize else [])):
            reg = rel.strip('"')
            con.unregister(reg)
            registered.remove(reg)
    return tuple(registered)


def _check_speed_blocks(con: duckdb.DuckDBPyConnection, speed: str, view: View, pair: PublishedPair) -> None:
    block = int(pair.block or 1)
    bad = con.execute(f"SELECT _partition, _block_start FROM {speed} WHERE _block_start % {block} <> 0 "
                      "OR _block_start < 0 LIMIT 1").fetchone()
    if bad:
        raise InconsistentPublishedState(
            f"speed snapshot {pair.speed_snapshot}, view {view.name!r}: row of partition {bad[0]} has "
            f"_block_start {bad[1]}, not a multiple of the block {block}; the snapshot breaks the handoff rule")


def _view_row(con: duckdb.DuckDBPyConnection, pipeline: Pipeline, view: View, pair: PublishedPair, batch_rows: int,
              speed: str, watermark: dict[int, int]) -> tuple:
    speed_rows, visible = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE {speed_visible_predicate(watermark)}) FROM {speed}").fetchone()
    in_batch = pair.batch_has_view(view)
    in_speed = pair.speed_file(view) is not None
    if pair.batch_version is not None and not in_batch:
        note = (f"batch version {pair.batch_version} does not contain this view (declared after it was computed?): "
                "events below the watermark are missing until the next batch run")
    elif pair.speed_snapshot is not None and not in_speed:
        note = f"speed snapshot {pair.speed_snapshot} has no file for this view: recent events are missing"
    elif pair.nothing_published:
        note = "nothing published yet"
    else:
        note = ""
    return (view.name, view.source, pipeline.source_of(view).topic, pair.batch_version, batch_rows,
            pair.speed_snapshot, speed_rows, visible, note == "", note or None)


def _ts(epoch: float | int | str | None) -> datetime | None:
    if epoch is None:
        return None
    if isinstance(epoch, str):
        try:
            return datetime.fromisoformat(epoch.replace("Z", "+00:00"))
        except ValueError:
            return None
    return datetime.fromtimestamp(float(epoch), tz=UTC)


def _install_metadata(con: duckdb.DuckDBPyConnection, pipeline: Pipeline, settings: Settings, pair: PublishedPair,
                      view_rows: list[tuple]) -> None:
    """``lambdalake.status`` / ``lambdalake.watermarks`` / ``lambdalake.views`` (see :func:`metadata_tables`)."""
    for name, table in metadata_tables(pipeline, settings, pair, view_rows).items():
        reg = f"_meta_{name}"
        con.register(reg, table)
        try:
            con.execute(f"CREATE OR REPLACE TABLE _lake.{ident(name)} AS SELECT * FROM {ident(reg)}")
        finally:
            con.unregister(reg)
    con.execute(STATUS_VIEW)
    con.execute("CREATE OR REPLACE VIEW lambdalake.watermarks AS SELECT * FROM _lake.watermarks")
    con.execute("CREATE OR REPLACE VIEW lambdalake.views AS SELECT * FROM _lake.views")


STATUS_VIEW = (
    "CREATE OR REPLACE VIEW lambdalake.status AS SELECT *, "
    "round(epoch(now()) - epoch(speed_created_at), 3) AS speed_age_seconds, "
    "round(epoch(now()) - epoch(batch_created_at), 3) AS batch_age_seconds FROM _lake.status"
)


def metadata_tables(pipeline: Pipeline, settings: Settings, pair: PublishedPair,
                    view_rows: list[tuple]) -> dict[str, pa.Table]:
    """The metadata of a pair as Arrow tables (also written into the catalog file)."""
    manifest, snapshot = pair.manifest or {}, pair.snapshot or {}
    status = pa.table({
        "pipeline": [pipeline.name],
        "home": [str(settings.home)],
        "batch_version": pa.array([pair.batch_version], pa.string()),
        "batch_created_at": pa.array([_ts(manifest.get("published_at") or manifest.get("created_at"))],
                                     pa.timestamp("us", tz="UTC")),
        "speed_snapshot": pa.array([pair.speed_snapshot], pa.string()),
        "speed_created_at": pa.array([_ts(snapshot.get("created_at"))], pa.timestamp("us", tz="UTC")),
        "handoff_block": pa.array([pair.block or manifest.get("block")], pa.int64()),
        "resolved_at": pa.array([_ts(pair.resolved_at)], pa.timestamp("us", tz="UTC")),
        "nothing_published": [pair.nothing_published],
    })
    w, s, pruned = pair.watermark, pair.positions, pair.pruned_to
    keys = sorted(set(w) | set(s) | set(pruned))
    watermarks = pa.table({
        "topic": pa.array([t for t, _ in keys], pa.string()),
        "partition": pa.array([p for _, p in keys], pa.int32()),
        "batch_watermark": pa.array([w.get(k) for k in keys], pa.int64()),
        "speed_position": pa.array([s.get(k) for k in keys], pa.int64()),
        "speed_pruned_to": pa.array([pruned.get(k) for k in keys], pa.int64()),
        "speed_offsets_beyond_batch": pa.array(
            [max(0, s[k] - w.get(k, 0)) if k in s else None for k in keys], pa.int64()),
    })
    names = ["view", "source", "topic", "batch_version", "batch_rows", "speed_snapshot", "speed_rows",
             "speed_rows_visible", "complete", "note"]
    types = [pa.string(), pa.string(), pa.string(), pa.string(), pa.int64(), pa.string(), pa.int64(), pa.int64(),
             pa.bool_(), pa.string()]
    views = pa.table({n: pa.array([r[i] for r in view_rows], t) for i, (n, t) in enumerate(zip(names, types,
                                                                                                   strict=True))})
    return {"status": status, "watermarks": watermarks, "views": views}
