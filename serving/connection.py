"""The serving connection: a locked-down in-process DuckDB where every view is batch ⊕ speed, merged per query.

What a connection contains (all built from the pipeline declaration, see :mod:`serving.sql`):

- ``<view>`` (e.g. ``pageviews_hourly``) in the default schema: the merged view, columns ``view.output_columns``.
- ``master.<source>``: the raw master dataset (declared fields + ``_partition``, ``_offset``, ``_ingest_time``).
- ``lambdalake.status`` (one row: versions read, freshness), ``lambdalake.watermarks`` (per topic-partition:
  batch watermark ``W``, speed position ``S``), ``lambdalake.views`` (per view: state ``current`` / ``rebuilding`` /
  ``stale``, served and declared definition fingerprints, the pieces read, rows on each side).
- A view whose declared definition is not what both sides hold yet (:mod:`serving.definitions`) is *rebuilding*:
  every query on it fails with one line (``view V is being rebuilt for its new definition: batch pending, speed
  63%``), other views still answer; with ``allow_stale=True`` it is served from an older pair of one earlier
  definition instead (state ``stale``).
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
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lambdalake.config import Settings, load_settings
from lambdalake.layout import Layout
from lambdalake.pipeline import WINDOW_START, Pipeline, View, load_pipeline
from lambdalake.schema import (
    ARROW_TYPES,
    BLOCK_COL,
    PARTITION_COL,
    arrow_schema,
    master_columns,
    speed_view_columns,
    view_columns,
)
from serving.definitions import CURRENT, REBUILDING, STALE, ViewPlan, plan_views
from serving.exceptions import InconsistentPublishedState
from serving.published import PublishedPair, resolve_pair
from serving.sql import (
    Columns,
    empty_select,
    ident,
    literal,
    merged_view_sql,
    refusing_select,
    speed_visible_predicate,
    typed_select,
)

# Settings a user may still change on a locked connection: display and resource knobs only.
ALLOWED_CONFIGS = ("TimeZone", "Calendar", "threads", "memory_limit", "enable_progress_bar", "errors_as_json")
BUILD_ATTEMPTS = 5
POSITION_COLUMNS = frozenset({WINDOW_START, PARTITION_COL, BLOCK_COL})  # where a row belongs: never optional


@dataclass
class _Binding:
    settings: Settings
    pipeline: Pipeline
    materialize: bool = True
    allow_stale: bool = False
    spec: str | None = None  # the pipeline file/module, re-read by refresh() (None: a Pipeline object was given)
    pair: PublishedPair | None = None
    plans: dict[str, ViewPlan] = field(default_factory=dict)
    generation: int = 0
    registered: tuple[str, ...] = ()


_bindings: weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, _Binding] = weakref.WeakKeyDictionary()
_generations = itertools.count(1)


def resolve(settings: Settings | None = None, pipeline: Pipeline | str | None = None,
            home: str | Path | None = None) -> tuple[Settings, Pipeline]:
    """Settings and pipeline for serving: explicit objects win, then ``home``/env/defaults (never needs Kafka).

    A pipeline *file* is read anew each time: what is declared now decides which definition may be served.
    """
    if settings is None:
        spec = pipeline if isinstance(pipeline, str) else None
        settings = load_settings(home=home, pipeline=spec)
    elif home is not None:
        settings = settings.with_(home=Path(home).expanduser().resolve())
    if isinstance(pipeline, Pipeline):
        return settings, pipeline
    return settings, load_pipeline(pipeline if isinstance(pipeline, str) else settings.pipeline, fresh=True)


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
            home: str | Path | None = None, materialize: bool = True,
            allow_stale: bool = False) -> duckdb.DuckDBPyConnection:
    """A ready, read-only DuckDB connection over the lake's merged views (see the module docstring).

    ``settings`` defaults to :func:`lambdalake.config.load_settings` (``LAMBDALAKE_HOME`` …); ``pipeline`` is a
    :class:`Pipeline`, a pipeline file/module spec, or None for the configured one; ``home`` overrides the lake.
    ``materialize`` copies the batch side into memory (fast queries, slower to open; see step 3 above).
    ``allow_stale`` serves a view whose declared definition is being rebuilt from the newest kept pair of pieces
    made by one earlier definition (``lambdalake.views`` says ``stale``) instead of refusing it
    (:mod:`serving.definitions`).

    Query with the returned connection itself: ``master.*`` (and lazy batch views) read Arrow datasets registered
    on this connection, which DuckDB does not share with ``con.cursor()``; open one connection per thread.
    """
    settings, pipe = resolve(settings, pipeline, home)
    con = open_locked()
    spec = None if isinstance(pipeline, Pipeline) else (pipeline or settings.pipeline)
    _bindings[con] = _Binding(settings, pipe, materialize, allow_stale, spec)
    try:
        refresh(con)
    except BaseException:
        con.close()
        raise
    return con


def refresh(con: duckdb.DuckDBPyConnection) -> PublishedPair:
    """Move ``con`` to the newest published pair, atomically for its later queries; returns the pair.

    An unfinished result of ``con`` (rows not fetched yet) is discarded first. A pipeline given as a file or module
    is read again, so views whose declaration changed since are refused (or served stale) from now on, added views
    appear and removed ones disappear.
    """
    binding = _bindings.get(con)
    if binding is None:
        raise InconsistentPublishedState("refresh() needs a connection made by lambdalake.connect()")
    con.abort()
    if binding.spec is not None:
        binding.pipeline = load_pipeline(binding.spec, fresh=True)
    layout = Layout(binding.settings.home)
    last: Exception | None = None
    for _ in range(BUILD_ATTEMPTS):
        pair = resolve_pair(layout.home)
        generation = next(_generations)
        try:
            plans = plan_views(binding.pipeline, pair, binding.allow_stale)
            registered = _install(con, binding.pipeline, binding.settings, pair, plans, generation,
                                  binding.materialize, dropped=[v for v in binding.plans if v not in plans])
        except FileNotFoundError as exc:  # a file of the pair was pruned while we read it: resolve again
            last = exc
            time.sleep(0.05)
            continue
        for name in binding.registered:
            con.unregister(name)
        binding.pair, binding.plans, binding.generation, binding.registered = pair, plans, generation, registered
        return pair
    raise InconsistentPublishedState(f"published files kept vanishing while connecting to {layout.home}: {last}")


def pair_of(con: duckdb.DuckDBPyConnection) -> PublishedPair | None:
    """The pair a connection made by :func:`connect` currently reads."""
    binding = _bindings.get(con)
    return binding.pair if binding else None


def plans_of(con: duckdb.DuckDBPyConnection) -> dict[str, ViewPlan]:
    """Per view, what a connection made by :func:`connect` serves (current, stale or refused)."""
    binding = _bindings.get(con)
    return dict(binding.plans) if binding else {}


# --- reading the published files (pyarrow; DuckDB itself never opens a file) -------------------------------------
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
        actual = dataset.count_rows()
        if actual != expected:
            raise InconsistentPublishedState(
                f"batch version {pair.batch_version}, view {view.name!r}: manifest says {expected} rows, "
                f"files hold {actual}; the version is damaged — roll back to the previous version")
    return dataset


def speed_table(pipeline: Pipeline, view: View, pair: PublishedPair, stale: bool = False) -> pa.Table:
    """The speed side of ``view`` read into memory (empty with the contract's schema if absent; ``stale`` as for
    :func:`batch_dataset`)."""
    cols = speed_view_columns(pipeline.source_of(view), view)
    f = pair.speed_file(view)
    if f is None:
        sv = None if pair.snapshot is None else pair.snapshot.views.get(view.name)
        if sv is not None and sv.rows:  # the snapshot promises rows that are not there
            raise InconsistentPublishedState(
                f"speed snapshot {pair.speed_snapshot} says view {view.name!r} has {sv.rows} rows but "
                f"{pair.layout.speed_snapshot(str(pair.speed_snapshot)) / (view.name + '.parquet')} is missing")
        return arrow_schema(cols, nullability=False).empty_table()
    table = pq.read_table(f)
    _check_columns(table.schema, cols, f, f"speed view {view.name!r}", stale)
    return table


def master_dataset(pipeline: Pipeline, source_name: str, layout: Layout) -> ds.Dataset:
    """Lazy dataset over the master files of a source as listed now (immutable files; new ones need refresh)."""
    cols = master_columns(pipeline.source(source_name))
    files = [str(m.path) for m in layout.master_files(source_name)]  # THE valid-file rule
    if not files:
        return ds.dataset(arrow_schema(cols, nullability=False).empty_table())
    return ds.dataset(files, format="parquet")


# --- building the catalog of a connection --------------------------------------------------------------------------
def side_names(view: View) -> tuple[str, str]:
    """The internal relations of a view's two sides: ``_lake.batch_<view>``, ``_lake.speed_<view>``."""
    return f"_lake.{ident('batch_' + view.name)}", f"_lake.{ident('speed_' + view.name)}"


def _install(con: duckdb.DuckDBPyConnection, pipeline: Pipeline, settings: Settings, pair: PublishedPair,
             plans: dict[str, ViewPlan], generation: int, materialize: bool,
             dropped: Iterable[str] = ()) -> tuple[str, ...]:
    """Steps 3-5: register the pair's data under generation-unique names, then swap every view in one transaction.

    A view being rebuilt gets empty sides and a refusing ``main.<view>``; a stale one reads its own older pair.
    """
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
    absent: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
    try:
        for view in pipeline.views:
            plan = plans[view.name]
            if plan.pair is None:
                continue
            stale = plan.state == STALE
            source = pipeline.source_of(view)
            dataset = batch_dataset(pipeline, view, plan.pair, stale)
            speed_tbl = speed_table(pipeline, view, plan.pair, stale)
            absent[view.name] = ((absent_columns(dataset.schema, view_columns(source, view)),
                                  absent_columns(speed_tbl.schema, speed_view_columns(source, view)))
                                 if stale else (frozenset(), frozenset()))
            batch_rows[view.name] = dataset.count_rows()
            batch_rel[view.name] = register("batch", view.name, dataset)
            speed_data[view.name] = register("speed", view.name, speed_tbl)
        master_rel = {s.name: register("master", s.name, master_dataset(pipeline, s.name, layout))
                      for s in pipeline.sources}

        con.execute("BEGIN TRANSACTION")
        for schema in ("_lake", "lambdalake", "master"):
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        for name in dropped:  # no longer declared (refresh after the pipeline changed)
            con.execute(f"DROP VIEW IF EXISTS main.{ident(name)}")
            for side in (f"_lake.{ident('batch_' + name)}", f"_lake.{ident('speed_' + name)}"):
                con.execute(f"DROP {'TABLE' if materialize or 'speed_' in side else 'VIEW'} IF EXISTS {side}")
        for view in pipeline.views:
            plan = plans[view.name]
            source = pipeline.source_of(view)
            batch, speed = side_names(view)
            batch_cols, speed_cols = view_columns(source, view), speed_view_columns(source, view)
            kind = "TABLE" if materialize else "VIEW"
            if plan.pair is None:
                view_rows.append(install_refused(con, pipeline, plan, kind))
                continue
            watermark = plan.pair.topic_watermark(source.topic)
            batch_absent, speed_absent = absent[view.name]
            con.execute(f"CREATE OR REPLACE {kind} {batch} AS "
                        f"{typed_select(batch_cols, batch_rel[view.name], batch_absent)}")
            con.execute(f"CREATE OR REPLACE TABLE {speed} AS "
                        f"{typed_select(speed_cols, speed_data[view.name], speed_absent)}")
            if plan.pair.block:
                _check_speed_blocks(con, speed, view, plan.pair)
            con.execute(f"CREATE OR REPLACE VIEW main.{ident(view.name)} AS "
                        f"{merged_view_sql(view, batch, speed, watermark)}")
            view_rows.append(view_row(con, pipeline, plan, batch_rows[view.name], speed,
                                      absent[view.name][0] | absent[view.name][1]))
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
    for name in speed_data:
        for rel in (speed_data[name], *([batch_rel[name]] if materialize else [])):
            reg = rel.strip('"')
            con.unregister(reg)
            registered.remove(reg)
    return tuple(registered)


def install_refused(con: duckdb.DuckDBPyConnection, pipeline: Pipeline, plan: ViewPlan, batch_kind: str) -> tuple:
    """A view being rebuilt: empty sides and ``main.<view>`` with the declared columns whose every scan fails with
    the one-line refusal. Returns its ``lambdalake.views`` row."""
    view, source = plan.view, pipeline.source_of(plan.view)
    batch, speed = side_names(view)
    con.execute(f"CREATE OR REPLACE {batch_kind} {batch} AS {empty_select(view_columns(source, view))}")
    con.execute(f"CREATE OR REPLACE TABLE {speed} AS {empty_select(speed_view_columns(source, view))}")
    con.execute(f"CREATE OR REPLACE VIEW main.{ident(view.name)} AS "
                f"{refusing_select(merged_view_sql(view, batch, speed, {}), str(plan.message))}")
    return view_row(con, pipeline, plan, None, speed)


def _check_speed_blocks(con: duckdb.DuckDBPyConnection, speed: str, view: View, pair: PublishedPair) -> None:
    block = int(pair.block or 1)
    bad = con.execute(f"SELECT _partition, _block_start FROM {speed} WHERE _block_start % {block} <> 0 "
                      "OR _block_start < 0 LIMIT 1").fetchone()
    if bad:
        raise InconsistentPublishedState(
            f"speed snapshot {pair.speed_snapshot}, view {view.name!r}: row of partition {bad[0]} has "
            f"_block_start {bad[1]}, not a multiple of the block {block}; the snapshot breaks the handoff rule")


VIEW_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("name", pa.string()), ("source", pa.string()), ("topic", pa.string()), ("state", pa.string()),
    ("served_fingerprint", pa.string()), ("declared_fingerprint", pa.string()),
    ("batch_version", pa.string()), ("batch_rows", pa.int64()), ("speed_snapshot", pa.string()),
    ("speed_rows", pa.int64()), ("speed_rows_visible", pa.int64()), ("complete", pa.bool_()), ("note", pa.string()),
)


def view_row(con: duckdb.DuckDBPyConnection, pipeline: Pipeline, plan: ViewPlan, batch_rows: int | None,
             speed: str, absent: frozenset[str] = frozenset()) -> tuple:
    """One row of ``lambdalake.views`` (columns :data:`VIEW_COLUMNS`)."""
    view, pair = plan.view, plan.pair
    topic = pipeline.source_of(view).topic
    speed_rows = visible = None
    note = plan.message
    if pair is not None:
        watermark = pair.topic_watermark(topic)
        speed_rows, visible = con.execute(
            f"SELECT count(*), count(*) FILTER (WHERE {speed_visible_predicate(watermark)}) FROM {speed}").fetchone()
        if plan.state == CURRENT and pair.nothing_published:
            note = "nothing published yet"
        if absent:
            note = f"{note}; NULL: {', '.join(sorted(absent))} (not stored by that definition)"
    batch_version, speed_snapshot = plan.served_pieces
    return (view.name, view.source, topic, plan.state, plan.served, plan.defs.declared, batch_version, batch_rows,
            speed_snapshot, speed_rows, visible, plan.state == CURRENT, note)


def _utc(moment: datetime | float | None) -> datetime | None:
    if moment is None or isinstance(moment, datetime):
        return moment
    return datetime.fromtimestamp(float(moment), tz=UTC)


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
    manifest, snapshot = pair.manifest, pair.snapshot
    ts = pa.timestamp("us", tz="UTC")
    status = pa.table({
        "pipeline": [pipeline.name],
        "home": [str(settings.home)],
        "batch_version": pa.array([pair.batch_version], pa.string()),
        "batch_created_at": pa.array([None if manifest is None else manifest.published_time], ts),
        "speed_snapshot": pa.array([pair.speed_snapshot], pa.string()),
        "speed_created_at": pa.array([None if snapshot is None else snapshot.created_time], ts),
        "handoff_block": pa.array([pair.block or (None if manifest is None else manifest.block)], pa.int64()),
        "resolved_at": pa.array([_utc(pair.resolved_at)], ts),
        "nothing_published": [pair.nothing_published],
        "views_rebuilding": pa.array([sum(1 for r in view_rows if r[3] == REBUILDING)], pa.int64()),
        "views_stale": pa.array([sum(1 for r in view_rows if r[3] == STALE)], pa.int64()),
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
    views = pa.table({name: pa.array([r[i] for r in view_rows], typ) for i, (name, typ) in enumerate(VIEW_COLUMNS)})
    return {"status": status, "watermarks": watermarks, "views": views}
