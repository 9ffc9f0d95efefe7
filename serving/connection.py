"""The serving connection: a locked-down in-process DuckDB where every view is batch ⊕ speed, merged per query.

What a connection contains (all built from the pipeline declaration, see :mod:`lambdalake.viewsql`):

- ``<view>`` (e.g. ``pageviews_hourly``) in the default schema: the merged view, columns ``view.output_columns``.
- ``sketches.<view>`` (views with ``approx_distinct``): keys, ``window_start`` and each approx_distinct's merged HLL
  sketch (BLOB), to roll up further: ``SELECT page, hll_count(list(unique_users)) FROM sketches.pageviews_hourly
  GROUP BY page`` (functions ``hll_count``/``hll_union``, :mod:`lambdalake.sketches`).
- ``master.<source>``: the raw master dataset (declared fields + ``_partition``, ``_offset``, ``_ingest_time``).
- ``lambdalake.status`` (one row: versions read, freshness), ``lambdalake.watermarks`` (per topic-partition:
  batch watermark ``W``, speed position ``S``), ``lambdalake.views`` (per view: state ``current`` / ``rebuilding`` /
  ``stale``, served and declared definition fingerprints, the pieces read, rows on each side).
- A view whose declared definition is not what both sides hold yet (:mod:`serving.plans`) is *rebuilding*:
  every query on it fails with one line (``view V is being rebuilt for its new definition: batch pending, speed
  63%``), other views still answer; with ``allow_stale=True`` it is served from an older pair of one earlier
  definition instead (state ``stale``).
- ``_lake.batch_<view>`` / ``_lake.speed_<view>``: the typed sides the merge reads (internal).

Build protocol (:func:`connect`):

1. Open an in-memory DuckDB with the connection's resource limits (:class:`Limits`: threads, memory) and lock it
   down *first* (:func:`lock_down`): no external access (no COPY TO, EXPORT, read_csv('/etc/passwd'), INSTALL/LOAD,
   URLs), no extension auto-install/auto-load, no spilling to disk, configuration locked (only display knobs stay
   settable: ``SET memory_limit``/``threads`` are refused). The only directory DuckDB may touch is the connection's
   own private scratch directory (where step 5 builds its catalog; removed with the connection).
2. Resolve ONE consistent (batch version, speed snapshot) pair (:func:`serving.published.resolve_pair`).
3. Hand DuckDB the published files through pyarrow (so DuckDB itself never opens a lake file: an allow-list of
   lake paths would also let ``COPY ... TO`` overwrite them — DuckDB's ``allowed_paths`` lets ``COPY ... TO <that
   file> (USE_TMP_FILE false)`` and a writable ``ATTACH`` through). Batch views and ``master.<source>`` are lazy
   pyarrow datasets scanned per query (opening costs the file listing and footers, not the rows: constant in view
   size); the speed side is read into Arrow memory (small) and scanned from there, not copied into DuckDB (a copy
   was most of a connect's time at 10M events). ``materialize=True`` copies both sides into DuckDB tables (the
   connection then never reads the files again and survives pruning of old versions; slower to open).
4. Paranoid checks: every file has the contract's columns, lies inside the lake (no symlink out,
   :meth:`Layout.inside`), batch row counts equal the manifest's, speed rows lie on block boundaries; any failure
   raises :class:`serving.exceptions.InconsistentPublishedState` (or ``InvariantViolation``).
5. Build the whole catalog of the pair — ``_lake.batch_<view>`` / ``_lake.speed_<view>`` (views over the registered
   Arrow data, each guarded so that a dropped or replaced registration fails the query instead of answering), the
   merged views, ``master.*``, ``lambdalake.*`` — in a database file in the scratch directory, then re-attach that
   file READ_ONLY and make it the default database (``USE lake_g<N>``). User SQL can therefore not UPDATE, DROP or
   replace anything the lake serves: DuckDB refuses with ``Cannot execute statement of type "UPDATE" on database
   "lake_g1" which is attached in read-only mode!``. Temporary objects of the user's own (``CREATE TEMP TABLE``)
   still work; they live in ``temp`` and, as in any DuckDB session, a temp object named like a view shadows it for
   that session only. If a speed file vanished meanwhile (pruned after we read the pointer), start again from 2.
6. Every statement is bounded by the statement timeout (a watchdog thread interrupts a statement that runs
   longer; ``duckdb.InterruptException``; ``lambdalake sql`` prints one line and exits 124).

Staleness rule: a connection keeps the pair it resolved until :func:`refresh` (or a new :func:`connect`). Queries
on it never mix pairs, so they are exact for that pair, but newer data is invisible; ``lambdalake.status`` shows
the pair and its age. A lazy connection (the default) reads the batch version's files, which the batch layer
retains for its last K versions — after K more publishes it gets "file not found" and must be refreshed; a
materialized one never depends on the files again. ``lambdalake sql`` opens a fresh connection per call, so each
call reads the newest pair.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from lambdalake import sketches
from lambdalake.config import Settings, load_settings, require_existing_lake
from lambdalake.erasure import erased_subjects, not_erased_sql
from lambdalake.exceptions import ConfigError
from lambdalake.layout import Layout
from lambdalake.pipeline import WINDOW_START, Pipeline, View, load_pipeline
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
from lambdalake.viewsql import (
    FN,
    Columns,
    empty_select,
    ident,
    literal,
    merged_view_sql,
    speed_visible_predicate,
    typed_select,
)
from serving.exceptions import InconsistentPublishedState
from serving.plans import CURRENT, REBUILDING, STALE, ViewPlan, plan_views
from serving.published import PublishedPair, resolve_pair

# Settings a user may still change on a locked connection: display knobs only. Resources (threads, memory_limit)
# are fixed when the connection is opened (Limits) and refused from SQL.
ALLOWED_CONFIGS = ("TimeZone", "Calendar", "errors_as_json")
BUILD_ATTEMPTS = 5
POSITION_COLUMNS = frozenset({WINDOW_START, PARTITION_COL, BLOCK_COL})  # where a row belongs: never optional
log = logging.getLogger(__name__)
_said_no_timeout = False
WATCH_INTERVAL_S = 0.05  # how often the statement-timeout watchdog looks at a connection
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_THREADS = max(1, min(4, os.cpu_count() or 1))
TAMPERED = "an internal relation of this connection was dropped or replaced; reconnect (serving.connect())"


def _scratch_root() -> str | None:
    """Where connections build their catalog file: a RAM file system if there is one (no fsync cost), else $TMPDIR."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _default_memory_limit() -> str:
    """A quarter of the machine's RAM (DuckDB's own default is 80%), at least 256 MB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "1GB"
    return f"{max(256, total // 4 // 2**20)}MB"


@dataclass(frozen=True)
class Limits:
    """What one serving connection may use: ``timeout`` seconds per statement (None: unbounded), DuckDB's
    ``memory_limit`` (e.g. ``"2GB"``; no spilling, a query over it fails) and worker ``threads``. Fixed at connect
    time; SQL cannot change them."""

    timeout: float | None = DEFAULT_TIMEOUT_S
    memory_limit: str = field(default_factory=_default_memory_limit)
    threads: int = DEFAULT_THREADS

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"timeout {self.timeout!r} must be a positive number of seconds (or None)")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"threads {self.threads!r} must be a positive integer")


class _Watchdog(threading.Thread):
    """Interrupts a statement of ``con`` that runs longer than ``timeout`` seconds.

    DuckDB has no statement timeout of its own; its progress report (-1 when idle) tells when a statement runs, and
    a drop of the progress marks the next statement. The thread ends when the connection is closed or collected.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, timeout: float):
        super().__init__(name="lambdalake-statement-timeout", daemon=True)
        self._con = weakref.ref(con)
        self.timeout = timeout
        self.fired = 0  # statements interrupted so far
        self.stopped = threading.Event()

    def run(self) -> None:
        since: float | None = None
        last = -1.0
        while not self.stopped.wait(WATCH_INTERVAL_S):
            con = self._con()
            if con is None:
                return
            try:
                progress = con.query_progress()
            except (duckdb.Error, RuntimeError):
                return  # closed
            now = time.monotonic()
            if progress < 0:
                since = None
            elif since is None or progress < last:
                since = now
            last = progress
            if since is not None and now - since >= self.timeout:
                self.fired += 1
                con.interrupt()
                since = None
            del con


@dataclass
class _Binding:
    settings: Settings
    pipeline: Pipeline
    scratch: Path
    materialize: bool = False
    allow_stale: bool = False
    spec: str | None = None  # the pipeline file/module, re-read by refresh() (None: a Pipeline object was given)
    limits: Limits = field(default_factory=Limits)
    watchdog: _Watchdog | None = None
    pair: PublishedPair | None = None
    plans: dict[str, ViewPlan] = field(default_factory=dict)
    generation: int = 0
    catalog: str | None = None  # the attached read-only database the connection serves from (lake_g<N>)
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
        settings = load_settings(home=require_existing_lake(home), pipeline=spec)
    elif home is not None:
        settings = settings.with_(home=require_existing_lake(home))
    if isinstance(pipeline, Pipeline):
        return settings, pipeline
    return settings, load_pipeline(pipeline if isinstance(pipeline, str) else settings.pipeline, fresh=True)


def lock_down(con: duckdb.DuckDBPyConnection, scratch: Path | None = None) -> bool:
    """Make ``con`` unable to touch the file system (but its own ``scratch`` directory), the network or extensions,
    or to change its configuration (but display knobs), for good (step 1). Returns whether DuckDB's progress report
    (what the statement-timeout watchdog reads) is available."""
    con.execute("SET TimeZone = 'UTC'")  # window_start is UTC; users may still change the display zone
    con.execute("SET temp_directory = ''")  # never spill to disk
    # the statement-timeout watchdog reads the progress report; nothing is printed. Inside a Jupyter kernel DuckDB
    # refuses every progress-bar setting unless ipywidgets is installed: no watchdog there (connect() says so).
    try:
        con.execute("SET enable_progress_bar = true")
        con.execute("SET enable_progress_bar_print = false")
        con.execute("SET progress_bar_time = 0")
        progress = True
    except duckdb.Error:
        progress = False
    if scratch is not None:
        con.execute(f"SET allowed_directories = [{literal(str(scratch) + os.sep)}]")
    con.execute(f"SET allowed_configs = [{', '.join(literal(c) for c in ALLOWED_CONFIGS)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return progress


def open_locked(scratch: Path | None = None, limits: Limits | None = None) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB connection with extensions frozen, resources bounded and external access disabled."""
    limits = limits or Limits()
    try:
        con = duckdb.connect(":memory:", config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
            "allow_unsigned_extensions": False,
            "threads": limits.threads,
            "memory_limit": limits.memory_limit,
        })
    except duckdb.Error as exc:
        raise ConfigError(f"cannot open a serving connection with {limits}: {str(exc).splitlines()[0]}") from None
    sketches.register(con)  # approx_distinct's functions, before the lock-down
    global _said_no_timeout
    if not lock_down(con, scratch) and limits.timeout is not None and not _said_no_timeout:
        _said_no_timeout = True  # once per process
        log.warning("statement timeout not enforced on this connection: DuckDB refuses its progress report here "
                    "(inside Jupyter it needs the ipywidgets package); memory and thread limits still hold")
    return con


def connect(settings: Settings | None = None, pipeline: Pipeline | str | None = None,
            home: str | Path | None = None, materialize: bool = False, allow_stale: bool = False,
            timeout: float | None = DEFAULT_TIMEOUT_S, memory_limit: str | None = None,
            threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """A ready, read-only DuckDB connection over the lake's merged views (see the module docstring).

    ``settings`` defaults to :func:`lambdalake.config.load_settings` (``LAMBDALAKE_HOME`` …); ``pipeline`` is a
    :class:`Pipeline`, a pipeline file/module spec, or None for the configured one; ``home`` overrides the lake.
    ``materialize`` copies the batch side into the connection (slower to open, never reads the files again).
    ``allow_stale`` serves a view whose declared definition is being rebuilt from the newest kept pair of pieces
    made by one earlier definition (``lambdalake.views`` says ``stale``) instead of refusing it
    (:mod:`serving.plans`).
    Limits (fixed for the connection's life, not changeable from SQL): ``timeout`` seconds per statement (None: no
    limit; a statement over it raises ``duckdb.InterruptException``), ``memory_limit`` (DuckDB size, default a
    quarter of RAM) and ``threads`` (default min(4, CPUs)).

    Query with the returned connection itself: batch views and ``master.*`` read Arrow datasets registered on this
    connection, which DuckDB does not share with ``con.cursor()``; open one connection per thread.
    """
    limits = Limits(timeout, _default_memory_limit() if memory_limit is None else memory_limit,
                    DEFAULT_THREADS if threads is None else threads)
    settings, pipe = resolve(settings, pipeline, home)
    scratch = Path(os.path.realpath(tempfile.mkdtemp(prefix="lambdalake-serving-", dir=_scratch_root())))
    try:
        con = open_locked(scratch, limits)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    weakref.finalize(con, shutil.rmtree, str(scratch), True)
    spec = None if isinstance(pipeline, Pipeline) else (pipeline or settings.pipeline)
    binding = _Binding(settings, pipe, scratch, materialize, allow_stale, spec, limits)
    _bindings[con] = binding
    try:
        refresh(con)
    except BaseException:
        con.close()
        raise
    if limits.timeout is not None:
        binding.watchdog = _Watchdog(con, limits.timeout)
        binding.watchdog.start()
    return con


def timed_out(con: duckdb.DuckDBPyConnection) -> int:
    """How many statements of ``con`` the statement timeout interrupted so far."""
    binding = _bindings.get(con)
    return binding.watchdog.fired if binding and binding.watchdog else 0


def limits_of(con: duckdb.DuckDBPyConnection) -> Limits | None:
    binding = _bindings.get(con)
    return binding.limits if binding else None


def refresh(con: duckdb.DuckDBPyConnection) -> PublishedPair:
    """Move ``con`` to the newest published pair, atomically for its later queries; returns the pair.

    An unfinished result of ``con`` (rows not fetched yet) is discarded first. A pipeline given as a file or module
    is read again, so views whose declaration changed since are refused (or served stale) from now on, added views
    appear and removed ones disappear. Temp tables of the user's own survive.
    """
    binding = _bindings.get(con)
    if binding is None:
        raise InconsistentPublishedState("refresh() needs a connection made by serving.connect()")
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
            catalog, registered = _install(con, binding, pair, plans, generation)
        except FileNotFoundError as exc:  # a file of the pair was pruned while we read it: resolve again
            last = exc
            time.sleep(0.05)
            continue
        old_catalog, old_registered = binding.catalog, binding.registered
        if old_catalog is not None:
            con.execute(f"DETACH {ident(old_catalog)}")
        else:
            try:  # the writable in-memory default: nothing of ours lives there; leave the user only `temp`
                con.execute("DETACH memory")
            except duckdb.Error:
                pass
        for name in old_registered:
            con.unregister(name)
        binding.pair, binding.plans, binding.generation = pair, plans, generation
        binding.catalog, binding.registered = catalog, registered
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


def master_dataset(pipeline: Pipeline, source_name: str, layout: Layout) -> ds.Dataset:
    """Lazy dataset over the master files of a source as listed now (immutable files; new ones need refresh)."""
    cols = master_columns(pipeline.source(source_name))
    files = [str(f) for f in layout.inside_all(m.path for m in layout.master_files(source_name))]  # THE rule
    if not files:
        return ds.dataset(arrow_schema(cols, nullability=False).empty_table())
    return ds.dataset(files, format="parquet")


# --- building the catalog of a connection --------------------------------------------------------------------------
def side_names(view: View, catalog: str | None = None) -> tuple[str, str]:
    """The internal relations of a view's two sides: ``[<catalog>.]_lake.batch_<view>``, ``…speed_<view>``."""
    db = f"{ident(catalog)}." if catalog else ""
    return f"{db}_lake.{ident('batch_' + view.name)}", f"{db}_lake.{ident('speed_' + view.name)}"


def _guarded(reg: str, oid: int) -> str:
    """A subquery over the registered dataset ``reg`` that fails (:data:`TAMPERED`) unless ``reg`` is still the
    registration made here (catalog entry ``oid``: a dropped and re-created view gets a new one): the temp catalog
    is the user's, so a registration could be dropped and replaced. (Comparing the entry's ``sql`` instead made
    DuckDB render every view's SQL on each scan: ~2 ms a side of a point lookup.)"""
    guard = (f"EXISTS (SELECT 1 FROM {FN}duckdb_views() WHERE database_name = 'temp' AND view_name = {literal(reg)} "
             f"AND view_oid = {int(oid)}) OR {FN}error({literal(TAMPERED)})")
    return f"(SELECT * FROM temp.main.{ident(reg)} WHERE {guard}) AS {ident(reg)}"


def _install(con: duckdb.DuckDBPyConnection, binding: _Binding, pair: PublishedPair, plans: dict[str, ViewPlan],
             generation: int) -> tuple[str, tuple[str, ...]]:
    """Steps 3-5: register the pair's datasets under generation-unique names, build the catalog ``lake_g<N>`` in a
    scratch file, re-attach it read-only and make it the default. Returns (catalog, registered names).

    A view being rebuilt gets empty sides and a refusing ``main.<view>``; a stale one reads its own older pair.
    """
    pipeline, settings, materialize = binding.pipeline, binding.settings, binding.materialize
    layout = Layout(settings.home)
    catalog = f"lake_g{generation}"
    path = binding.scratch / f"{catalog}.duckdb"
    registered: list[str] = []
    transient: list[str] = []

    def register(kind: str, name: str, obj, keep: bool = True) -> str:
        reg = f"_g{generation}_{kind}_{name}"
        con.register(reg, obj)
        (registered if keep else transient).append(reg)
        return reg

    attached = False
    try:
        sides = {}
        for view in pipeline.views:
            plan = plans[view.name]
            if plan.pair is None:
                continue
            stale = plan.state == STALE
            source = pipeline.source_of(view)
            dataset = batch_dataset(pipeline, view, plan.pair, stale)
            speed_tbl = speed_table(pipeline, view, plan.pair, stale)
            absent = ((absent_columns(dataset.schema, view_columns(source, view)),
                       absent_columns(speed_tbl.schema, speed_view_columns(source, view)))
                      if stale else (frozenset(), frozenset()))
            sides[view.name] = (register("batch", view.name, dataset, keep=not materialize),
                                register("speed", view.name, speed_tbl, keep=not materialize), absent,
                                plan.pair.batch_row_count(view) if plan.pair.batch_row_count(view) is not None
                                else dataset.count_rows())
        masters = {s.name: register("master", s.name, master_dataset(pipeline, s.name, layout))
                   for s in pipeline.sources}

        oids = dict(con.execute("SELECT view_name, view_oid FROM duckdb_views() WHERE database_name = 'temp'")
                    .fetchall())
        con.execute(f"ATTACH {literal(str(path))} AS {ident(catalog)}")
        attached = True
        db = ident(catalog)
        for schema in ("_lake", "lambdalake", "master", "sketches"):
            con.execute(f"CREATE SCHEMA {db}.{schema}")
        view_rows: list[tuple] = []
        for view in pipeline.views:
            plan = plans[view.name]
            source = pipeline.source_of(view)
            batch, speed = side_names(view, catalog)
            batch_cols, speed_cols = view_columns(source, view), speed_view_columns(source, view)
            if plan.pair is None:
                view_rows.append(install_refused(con, pipeline, plan, "VIEW", catalog))
                continue
            batch_reg, speed_reg, (batch_absent, speed_absent), batch_rows = sides[view.name]
            watermark = plan.pair.topic_watermark(source.topic)
            kind = "TABLE" if materialize else "VIEW"
            batch_src = ident(batch_reg) if materialize else _guarded(batch_reg, oids[batch_reg])
            speed_src = ident(speed_reg) if materialize else _guarded(speed_reg, oids[speed_reg])
            con.execute(f"CREATE {kind} {batch} AS {typed_select(batch_cols, batch_src, batch_absent)}")
            con.execute(f"CREATE {kind} {speed} AS {typed_select(speed_cols, speed_src, speed_absent)}")
            if plan.pair.block:
                _check_speed_blocks(con, ident(speed_reg), view, plan.pair)  # the Arrow rows: no cast, no guard
            gone = erased_subjects(layout, source.name) if source.key in view.keys else None
            for schema, sketched in (("main", False), ("sketches", True)):
                if sketched and not any(a.merge == "union" for a in view.stored_aggregates):
                    continue
                merged = merged_view_sql(view, batch, speed, watermark, source, sketches=sketched)
                if gone:
                    merged = f"SELECT * FROM ({merged}) WHERE {not_erased_sql(ident(source.key), gone)}"  # forgotten
                con.execute(f"CREATE VIEW {db}.{schema}.{ident(view.name)} AS {merged}")
            view_rows.append(view_row(con, pipeline, plan, batch_rows, ident(speed_reg), batch_absent | speed_absent))
        for source in pipeline.sources:
            reg = masters[source.name]
            gone = erased_subjects(layout, source.name)  # events archived after a forget request: hidden too
            con.execute(f"CREATE VIEW {db}.master.{ident(source.name)} AS "
                        f"{typed_select(master_columns(source), _guarded(reg, oids[reg]), presented=True)}"
                        + (f" WHERE {not_erased_sql(ident(source.key), gone)}" if gone else ""))
        _install_metadata(con, pipeline, settings, pair, view_rows, catalog)
        con.execute(f"DETACH {db}")
        attached = False
        con.execute(f"ATTACH {literal(str(path))} AS {db} (READ_ONLY)")
        con.execute(f"USE {db}")
    except BaseException:
        if attached:
            try:
                con.execute(f"DETACH {ident(catalog)}")
            except duckdb.Error:
                pass
        for reg in registered:
            con.unregister(reg)
        raise
    finally:
        for reg in transient:
            con.unregister(reg)
        for leftover in (path, path.with_name(path.name + ".wal")):
            leftover.unlink(missing_ok=True)  # DuckDB keeps the attached file open; nothing else may open it
    return catalog, tuple(registered)


def refusing_select(relation: str, message: str) -> str:
    """The columns of ``relation`` (a subquery), but every scan fails with ``message`` (DuckDB's ``error()``): the
    view of a definition that cannot be served yet. Binding (DESCRIBE, ``LIMIT 0``) still works."""
    return (f"SELECT answer.* FROM (SELECT 1 AS one WHERE {FN}error({literal(message)})) AS refused "
            f"LEFT JOIN ({relation}) AS answer ON true")


def install_refused(con: duckdb.DuckDBPyConnection, pipeline: Pipeline, plan: ViewPlan, batch_kind: str,
                    catalog: str | None = None, sketch_functions: bool = True) -> tuple:
    """A view being rebuilt: empty sides and ``main.<view>`` with the declared columns whose every scan fails with
    the one-line refusal. Returns its ``lambdalake.views`` row."""
    view, source = plan.view, pipeline.source_of(plan.view)
    batch, speed = side_names(view, catalog)
    db = f"{ident(catalog)}." if catalog else ""
    con.execute(f"CREATE OR REPLACE {batch_kind} {batch} AS {empty_select(view_columns(source, view))}")
    con.execute(f"CREATE OR REPLACE TABLE {speed} AS {empty_select(speed_view_columns(source, view))}")
    merged = merged_view_sql(view, batch, speed, {}, source, sketch_functions=sketch_functions)
    con.execute(f"CREATE OR REPLACE VIEW {db}main.{ident(view.name)} AS {refusing_select(merged, str(plan.message))}")
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
                      view_rows: list[tuple], catalog: str | None = None) -> None:
    """``lambdalake.status`` / ``lambdalake.watermarks`` / ``lambdalake.views`` (see :func:`metadata_tables`)."""
    db = f"{ident(catalog)}." if catalog else ""
    for name, table in metadata_tables(pipeline, settings, pair, view_rows).items():
        reg = f"_meta_{name}"
        con.register(reg, table)
        try:
            con.execute(f"CREATE OR REPLACE TABLE {db}_lake.{ident(name)} AS SELECT * FROM {ident(reg)}")
        finally:
            con.unregister(reg)
    con.execute(STATUS_VIEW.format(db=db, fn=FN))
    con.execute(f"CREATE OR REPLACE VIEW {db}lambdalake.watermarks AS SELECT * FROM {db}_lake.watermarks")
    con.execute(f"CREATE OR REPLACE VIEW {db}lambdalake.views AS SELECT * FROM {db}_lake.views")


STATUS_VIEW = (
    "CREATE OR REPLACE VIEW {db}lambdalake.status AS SELECT *, "
    "{fn}round({fn}epoch({fn}now()) - {fn}epoch(speed_created_at), 3) AS speed_age_seconds, "
    "{fn}round({fn}epoch({fn}now()) - {fn}epoch(batch_created_at), 3) AS batch_age_seconds FROM {db}_lake.status"
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
