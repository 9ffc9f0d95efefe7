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

Where the steps live: 1 :mod:`serving.lockdown`, 2 :mod:`serving.published`, 3-4 :mod:`serving.datasets`,
5 :mod:`serving.install` (and :mod:`serving.metadata` for ``lambdalake.*``), 6 :mod:`serving.watchdog`; this module
binds them to a connection (:func:`connect`, :func:`refresh`).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from lambdalake.config import Settings, lake_url, load_settings, require_existing_lake, work_dir
from lambdalake.layout import Layout
from lambdalake.mirror import mirror_dir, sync
from lambdalake.pipeline import Pipeline, load_pipeline
from lambdalake.viewsql import ident
from serving.exceptions import InconsistentPublishedState
from serving.install import copy_alias, install_pair
from serving.lockdown import DEFAULT_THREADS, DEFAULT_TIMEOUT_S, Limits, default_memory_limit, open_locked
from serving.plans import ViewPlan, plan_views
from serving.published import PublishedPair, resolve_pair
from serving.watchdog import Watchdog

BUILD_ATTEMPTS = 5


def _scratch_root() -> str | None:
    """Where connections build their catalog file: a RAM file system if there is one (no fsync cost), else $TMPDIR."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


@dataclass
class _Binding:
    """What serving keeps of a connection it made: its lake, pipeline, limits, watchdog and the pair it reads."""

    settings: Settings
    pipeline: Pipeline
    scratch: Path
    materialize: bool = False
    allow_stale: bool = False
    spec: str | None = None  # the pipeline file/module, re-read by refresh() (None: a Pipeline object was given)
    limits: Limits = field(default_factory=Limits)
    watchdog: Watchdog | None = None
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
        if lake_url(home):
            settings = load_settings(home=home, pipeline=spec, object_storage=True)
        else:
            settings = load_settings(home=require_existing_lake(home), pipeline=spec)
    elif home is not None:
        settings = (settings.with_(lake=lake_url(home), home=work_dir(lake_url(home))) if lake_url(home)
                    else settings.with_(home=require_existing_lake(home), lake=""))
    if settings.lake:  # served from this machine's mirror of what the bucket publishes (lambdalake.mirror)
        settings = settings.with_(home=mirror_dir(work_dir(settings.lake)))
    if isinstance(pipeline, Pipeline):
        return settings, pipeline
    return settings, load_pipeline(pipeline if isinstance(pipeline, str) else settings.pipeline, fresh=True)


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
    limits = Limits(timeout, default_memory_limit() if memory_limit is None else memory_limit,
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
        binding.watchdog = Watchdog(con, limits.timeout)
        binding.watchdog.start()
    return con


def timed_out(con: duckdb.DuckDBPyConnection) -> int:
    """How many statements of ``con`` the statement timeout interrupted so far."""
    binding = _bindings.get(con)
    return binding.watchdog.fired if binding and binding.watchdog else 0


def limits_of(con: duckdb.DuckDBPyConnection) -> Limits | None:
    binding = _bindings.get(con)
    return binding.limits if binding else None


def sync_mirror(settings: Settings) -> None:
    """On a lake on object storage: bring the mirror ``settings.home`` up to date (:mod:`lambdalake.mirror`)."""
    sync(Layout.of(settings.home, settings.lake).store, settings.home)


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
    if binding.settings.lake:
        sync_mirror(binding.settings)
    last: Exception | None = None
    for _ in range(BUILD_ATTEMPTS):
        pair = resolve_pair(layout.home)
        generation = next(_generations)
        try:
            plans = plan_views(binding.pipeline, pair, binding.allow_stale)
            catalog, registered = install_pair(con, binding.pipeline, binding.settings, binding.scratch, pair, plans,
                                               generation, binding.materialize)
        except FileNotFoundError as exc:  # a file of the pair was pruned while we read it: resolve again
            last = exc
            time.sleep(0.05)
            continue
        old_catalog, old_registered = binding.catalog, binding.registered
        if old_catalog is not None:
            con.execute(f"DETACH {ident(old_catalog)}")
            con.execute(f"DETACH DATABASE IF EXISTS {ident(copy_alias(old_catalog))}")  # its batch copy
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

