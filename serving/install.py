"""The catalog of one pair, built in a scratch file and attached read-only as the connection's database (step 5).

Step 5 of the build protocol (:mod:`serving.connection`): build the whole catalog of the pair —
``_lake.batch_<view>`` / ``_lake.speed_<view>`` (views over the registered Arrow data of :mod:`serving.datasets`,
each guarded so that a dropped or replaced registration fails the query instead of answering), the merged views
(:func:`lambdalake.viewsql.merged_view_sql`), ``master.*``, ``lambdalake.*`` (:mod:`serving.metadata`) — in a
database file in the scratch directory, then re-attach that file READ_ONLY and make it the default database
(``USE lake_g<N>``). User SQL can therefore not UPDATE, DROP or replace anything the lake serves. A view being
rebuilt gets empty sides and a refusing ``main.<view>`` (:func:`install_refused`); a stale one reads its own older
pair.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import duckdb

from lambdalake.config import Settings
from lambdalake.erasure import erased_subjects, not_erased_sql
from lambdalake.fields import Source
from lambdalake.layout import Layout
from lambdalake.pipeline import Pipeline, View
from lambdalake.schema import master_columns, speed_view_columns, view_columns
from lambdalake.servingcopy import estimate_column
from lambdalake.viewsql import (
    FN,
    empty_select,
    first_speed_window_sql,
    ident,
    literal,
    merged_view_sql,
    since_sql,
    speed_groups_sql,
    split_view_sql,
    typed_select,
)
from serving.copies import Copy, attach_copy, guarded_copy
from serving.datasets import absent_columns, batch_dataset, master_dataset, speed_table
from serving.exceptions import InconsistentPublishedState
from serving.metadata import install_metadata, view_row
from serving.plans import CURRENT, STALE, ViewPlan
from serving.published import PublishedPair

TAMPERED = "an internal relation of this connection was dropped or replaced; reconnect (serving.connect())"


def copy_alias(catalog: str) -> str:
    """The name a generation's batch copy is attached under (detached with its catalog)."""
    return f"{catalog}_batch"


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


class _Registrations:
    """The Arrow data of one generation registered on a connection, as ``_g<N>_<kind>_<name>``: ``kept`` ones are
    read by the catalog for the connection's life, ``transient`` ones only while they are copied (materialize)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, generation: int):
        self.con, self.generation = con, generation
        self.kept: list[str] = []
        self.transient: list[str] = []

    def add(self, kind: str, name: str, obj: Any, keep: bool = True) -> str:
        reg = f"_g{self.generation}_{kind}_{name}"
        self.con.register(reg, obj)
        (self.kept if keep else self.transient).append(reg)
        return reg


class _Sides(NamedTuple):
    """A served view's two registered sides (the batch one None when read from its serving copy), the columns
    their files lack (stale pieces) and its batch rows."""

    batch_reg: str | None
    speed_reg: str
    absent: tuple[frozenset[str], frozenset[str]]
    batch_rows: int
    copy: Copy | None = None


def install_pair(con: duckdb.DuckDBPyConnection, pipeline: Pipeline, settings: Settings, scratch: Path,
                 pair: PublishedPair, plans: dict[str, ViewPlan], generation: int, materialize: bool = False
                 ) -> tuple[str, tuple[str, ...]]:
    """Steps 3-5: register the pair's datasets under generation-unique names, build the catalog ``lake_g<N>`` in a
    scratch file, re-attach it read-only and make it the default. Returns (catalog, registered names).

    A view being rebuilt gets empty sides and a refusing ``main.<view>``; a stale one reads its own older pair.
    A current view whose batch version has a serving copy reads its batch side from a private copy of it attached
    as ``lake_g<N>_batch`` (:mod:`serving.copies`) and is served split (:func:`lambdalake.viewsql.split_view_sql`).
    """
    layout = Layout(settings.home)
    catalog = f"lake_g{generation}"
    path = scratch / f"{catalog}.duckdb"
    regs = _Registrations(con, generation)
    attached = False
    try:
        copy = None if materialize else attach_copy(con, pair, scratch, copy_alias(catalog))
        sides = _register_sides(regs, pipeline, plans, materialize, {copy.version: copy} if copy else {})
        remote = Layout.of(settings.home, settings.lake).store if settings.lake else None  # a mirrored lake
        masters = {s.name: regs.add("master", s.name, master_dataset(pipeline, s.name, layout, remote))
                   for s in pipeline.sources}

        oids = dict(con.execute("SELECT view_name, view_oid FROM duckdb_views() WHERE database_name = 'temp'")
                    .fetchall())
        con.execute(f"ATTACH {literal(str(path))} AS {ident(catalog)}")
        attached = True
        con.execute("BEGIN TRANSACTION")  # one commit for the whole catalog (not one per statement)
        _create_schemas(con, catalog)
        view_rows = [_install_view(con, pipeline, plans[view.name], sides.get(view.name), oids, catalog, layout,
                                   materialize) for view in pipeline.views]
        for source in pipeline.sources:
            _install_master(con, source, masters[source.name], oids, catalog, layout)
        install_metadata(con, pipeline, settings, pair, view_rows, catalog)
        con.execute("COMMIT")
        con.execute(f"DETACH {ident(catalog)}")
        attached = False
        _serve_read_only(con, path, catalog)
    except BaseException:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # no transaction open
        for name in ([catalog] if attached else []) + [copy_alias(catalog)]:
            try:
                con.execute(f"DETACH DATABASE IF EXISTS {ident(name)}")
            except duckdb.Error:
                pass
        for reg in regs.kept:
            con.unregister(reg)
        raise
    finally:
        for reg in regs.transient:
            con.unregister(reg)
        for leftover in (path, path.with_name(path.name + ".wal")):
            leftover.unlink(missing_ok=True)  # DuckDB keeps the attached file open; nothing else may open it
    return catalog, tuple(regs.kept)


def _register_sides(regs: _Registrations, pipeline: Pipeline, plans: dict[str, ViewPlan], materialize: bool,
                    copies: dict[str, Copy]) -> dict[str, _Sides]:
    """Steps 3-4 per served view: read (and check) both sides of its pair and register them on the connection
    (the batch side of a current view whose version has a usable serving copy is read from the copy)."""
    sides = {}
    for view in pipeline.views:
        plan = plans[view.name]
        if plan.pair is None:
            continue
        stale = plan.state == STALE
        source = pipeline.source_of(view)
        copy = copies.get(plan.pair.batch_version or "")
        if not materialize and plan.state == CURRENT and copy is not None and copy.usable(pipeline, view):
            speed_tbl = speed_table(pipeline, view, plan.pair)
            sides[view.name] = _Sides(None, regs.add("speed", view.name, speed_tbl), (frozenset(), frozenset()),
                                      int(plan.pair.batch_row_count(view) or 0), copy)
            continue
        dataset = batch_dataset(pipeline, view, plan.pair, stale)
        speed_tbl = speed_table(pipeline, view, plan.pair, stale)
        absent = ((absent_columns(dataset.schema, view_columns(source, view)),
                   absent_columns(speed_tbl.schema, speed_view_columns(source, view)))
                  if stale else (frozenset(), frozenset()))
        sides[view.name] = _Sides(regs.add("batch", view.name, dataset, keep=not materialize),
                                  regs.add("speed", view.name, speed_tbl, keep=not materialize), absent,
                                  plan.pair.batch_row_count(view) if plan.pair.batch_row_count(view) is not None
                                  else dataset.count_rows())
    return sides


def _create_schemas(con: duckdb.DuckDBPyConnection, catalog: str) -> None:
    db = ident(catalog)
    for schema in ("_lake", "lambdalake", "master", "sketches"):
        con.execute(f"CREATE SCHEMA {db}.{schema}")


def _install_view(con: duckdb.DuckDBPyConnection, pipeline: Pipeline, plan: ViewPlan, sides: _Sides | None,
                  oids: dict[str, int], catalog: str, layout: Layout, materialize: bool) -> tuple:
    """One view in the catalog: its typed sides and merged views (or the refusal); returns its ``lambdalake.views``
    row."""
    view = plan.view
    if plan.pair is None or sides is None:
        return install_refused(con, pipeline, plan, "VIEW", catalog)
    source = pipeline.source_of(view)
    batch, speed = side_names(view, catalog)
    batch_absent, speed_absent = sides.absent
    kind = "TABLE" if materialize else "VIEW"
    if sides.copy is not None:
        batch_src = f"{guarded_copy(sides.copy, view)} AS copied"
    else:
        assert sides.batch_reg is not None
        batch_src = ident(sides.batch_reg) if materialize else _guarded(sides.batch_reg, oids[sides.batch_reg])
    speed_src = ident(sides.speed_reg) if materialize else _guarded(sides.speed_reg, oids[sides.speed_reg])
    con.execute(f"CREATE {kind} {batch} AS {typed_select(view_columns(source, view), batch_src, batch_absent)}")
    con.execute(f"CREATE {kind} {speed} AS {typed_select(speed_view_columns(source, view), speed_src, speed_absent)}")
    if plan.pair.block:
        check_speed_blocks(con, ident(sides.speed_reg), view, plan.pair)  # the Arrow rows: no cast, no guard
    watermark = plan.pair.topic_watermark(source.topic)
    if sides.copy is not None:
        _install_split(con, view, source, sides.copy, batch, speed, watermark, catalog, layout)
    else:
        _install_merged(con, view, source, batch, speed, watermark, catalog, layout)
    return view_row(con, pipeline, plan, sides.batch_rows, ident(sides.speed_reg), batch_absent | speed_absent)


def _install_merged(con: duckdb.DuckDBPyConnection, view: View, source: Source, batch: str, speed: str,
                    watermark: dict[int, int], catalog: str, layout: Layout, main: str | None = None) -> None:
    """``main.<view>`` (and ``sketches.<view>`` for views with sketches): the merge of the two sides, without the
    rows of forgotten subjects."""
    gone = erased_subjects(layout, source.name) if source.key in view.keys else None
    for schema, sketched in (("main", False), ("sketches", True)):
        if sketched and not any(a.merge == "union" for a in view.stored_aggregates):
            continue
        merged = main if main is not None and not sketched else \
            merged_view_sql(view, batch, speed, watermark, source, sketches=sketched)
        if gone:
            merged = f"SELECT * FROM ({merged}) WHERE {not_erased_sql(ident(source.key), gone)}"  # forgotten
        con.execute(f"CREATE VIEW {ident(catalog)}.{schema}.{ident(view.name)} AS {merged}")


def _install_split(con: duckdb.DuckDBPyConnection, view: View, source: Source, copy: Copy, batch: str, speed: str,
                   watermark: dict[int, int], catalog: str, layout: Layout) -> None:
    """``main.<view>`` served split (:func:`split_view_sql`): the batch rows before the earliest window of a visible
    speed row read from the serving copy as stored, with their stored estimates; every group from that window on
    merged once, here, into ``_lake.speed_groups_<view>`` (few rows; a sketch list only for a group of two or more
    parts). ``sketches.<view>`` is the plain merge."""
    estimates = copy.estimates(view)
    batch_est = "(" + typed_select(view_columns(source, view), f"{guarded_copy(copy, view)} AS copied",
                                   extra=[estimate_column(e) for e in sorted(estimates)]) + ")"
    first = con.execute(first_speed_window_sql(speed, watermark)).fetchall()[0][0]
    since = since_sql(first)  # a constant: the copy's scan skips row groups by their window_start range
    db = ident(catalog)
    tail = f"{db}._lake.{ident('speed_groups_' + view.name)}"
    con.execute(f"CREATE TABLE {tail} AS "
                f"{speed_groups_sql(view, batch_est, speed, watermark, source, estimates, since)}")
    main = split_view_sql(view, batch_est, None if first is None else tail, source, estimates,
                          None if first is None else since)  # no visible speed row: batch rows alone
    _install_merged(con, view, source, batch, speed, watermark, catalog, layout, main=main)


def _install_master(con: duckdb.DuckDBPyConnection, source: Source, reg: str, oids: dict[str, int], catalog: str,
                    layout: Layout) -> None:
    """``master.<source>``: the source's master dataset, typed as served, without forgotten subjects."""
    gone = erased_subjects(layout, source.name)  # events archived after a forget request: hidden too
    con.execute(f"CREATE VIEW {ident(catalog)}.master.{ident(source.name)} AS "
                f"{typed_select(master_columns(source), _guarded(reg, oids[reg]), presented=True)}"
                + (f" WHERE {not_erased_sql(ident(source.key), gone)}" if gone else ""))


def _serve_read_only(con: duckdb.DuckDBPyConnection, path: Path, catalog: str) -> None:
    """Re-attach the built catalog file READ_ONLY and make it the default database."""
    db = ident(catalog)
    con.execute(f"ATTACH {literal(str(path))} AS {db} (READ_ONLY)")
    con.execute(f"USE {db}")


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


def check_speed_blocks(con: duckdb.DuckDBPyConnection, speed: str, view: View, pair: PublishedPair) -> None:
    """Step 4 for the speed side: every row lies on a block boundary (the handoff rule)."""
    block = int(pair.block or 1)
    bad = con.execute(f"SELECT _partition, _block_start FROM {speed} WHERE _block_start % {block} <> 0 "
                      "OR _block_start < 0 LIMIT 1").fetchone()
    if bad:
        raise InconsistentPublishedState(
            f"speed snapshot {pair.speed_snapshot}, view {view.name!r}: row of partition {bad[0]} has "
            f"_block_start {bad[1]}, not a multiple of the block {block}; the snapshot breaks the handoff rule")
