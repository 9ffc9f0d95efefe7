"""Checks 2-4 of the audit: master <-> batch (inputs unchanged, views recomputed), log <-> speed (rows at blocks
>= W), and merged (what serving answers equals the view recomputed from the log)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa

from audit.events import (
    Erased,
    below_sql,
    not_erased_sql,
)
from audit.report import (
    LOG_SPEED,
    MASTER_BATCH,
    MERGED,
    AuditReport,
    compare_rows,
    scalar,
)
from batch.rejected import revalidated_file
from lambdalake.fields import Source
from lambdalake.layout import Layout, MasterFile
from lambdalake.pipeline import Pipeline, View
from lambdalake.schema import (
    BLOCK_COL,
    PARTITION_COL,
    arrow_schema,
    master_columns,
    speed_view_columns,
    view_columns,
)
from lambdalake.storage.files import data_files
from lambdalake.viewsql import (
    ident,
    master_events_sql,
    output_sql,
    speed_visible_predicate,
    sql_list,
    typed_select,
    view_sql,
)
from serving.published import PublishedPair


# --- 2. master <-> batch --------------------------------------------------------------------------------------------
def check_master_batch(report: AuditReport, con: Any, pipeline: Pipeline, source: Source, pair: PublishedPair,
                       files: list[MasterFile], views: list[View], valid: str, gone: Erased,
                       layout: Layout | None = None) -> None:
    """Check 2. ``layout``: the lake's (its master files may be in a bucket; ``pair.layout`` is then serving's
    local mirror); default ``pair.layout``."""
    check = MASTER_BATCH
    res = report.checks[check]
    manifest = pair.manifest
    if manifest is None:
        res.notes.append("no batch version is published: nothing to compare")
        return
    layout = layout or pair.layout
    lake = data_files(layout.store)
    wm = manifest.watermark.of_topic(source.topic)
    masters = [layout.key(f.path) for f in files if f.start < wm.get(f.partition, 0)]
    res.compared.setdefault("positions", []).extend(f"{source.name}[{p}] [0, {w})" for p, w in sorted(wm.items()))
    res.add("master_files_read", len(masters))
    res.add("master_bytes_read", sum(lake.info(k).size for k in masters))
    with tempfile.TemporaryDirectory() as scratch:
        # rejected messages valid under the declared rules count too (a loosened rule): as the batch job reads them
        extra = revalidated_file(layout, source, wm, Path(scratch))
        if extra is not None:
            res.notes.append(f"{source.name}: rejected messages now valid under the declared rules (a loosened "
                             "rule) are counted with the master rows")
        if masters or extra is not None:  # a bucket's files through pyarrow (DuckDB has no S3 reader offline)
            rows = lake.duckdb_relation(con, "_audit_master_rows", masters, [extra] if extra else [])
            events = master_events_sql(source, rows, wm, f"({valid}) AND {not_erased_sql(source, gone)}")
            con.execute(f"CREATE OR REPLACE TEMP TABLE master_events AS {events}")
            if not lake.local:
                con.unregister("_audit_master_rows")
        else:
            con.execute(f"CREATE OR REPLACE TEMP TABLE master_events AS "
                        f"SELECT * FROM {_empty_master(con, source)}")
    _check_lineage(report, pair, source, layout)
    n_events = scalar(con, "SELECT count(*) FROM master_events")
    res.add("master_events", n_events)
    recorded = manifest.events.get(source.name)
    if recorded is not None and recorded != n_events:
        report.differ(check, f"{pair.batch_version}/{source.name}",
                      f"the manifest says {recorded} deduplicated events below W, the master dataset holds {n_events}")
    for view in views:
        subject = f"{pair.batch_version}/{view.name}"
        if not manifest.definition_matches(view.name, pipeline.fingerprint(view), pipeline.legacy_fingerprint(view)):
            res.notes.append(f"{view.name}: batch version {pair.batch_version} holds another definition (being "
                             "recomputed); not compared")
            continue
        cols = view_columns(source, view)
        paths = pair.batch_files(view)
        batch_files = [str(f) for f in paths]
        res.add("batch_bytes", sum(f.stat().st_size for f in paths))
        actual = (typed_select(cols, f"read_parquet({sql_list(batch_files)})", estimates=True) if batch_files
                  else typed_select(cols, "(SELECT 1) WHERE FALSE", {c.name for c in cols}, estimates=True))
        expected = typed_select(cols, f"({view_sql(source, view, 'SELECT * FROM master_events')})", estimates=True)
        group = [*view.keys, "window_start"]
        n_actual, _ = compare_rows(report, check, subject, con, actual, expected, group, "batch",
                                   "recomputation from master")
        res.add("batch_rows", n_actual)
        expected_rows = manifest.row_counts.get(view.name)
        if expected_rows is not None and expected_rows != n_actual:
            report.differ(check, subject, f"the manifest says {expected_rows} rows, the files hold {n_actual}")


def _check_lineage(report: AuditReport, pair: PublishedPair, source: Source, layout: Layout) -> None:
    """The master files the batch version read (its manifest's inputs) are unchanged: same size and sha256, in the
    lake's store. Files replaced by a compaction since are no longer there to compare (noted, not a difference)."""
    from pyarrow.fs import FileType

    lake = data_files(layout.store)
    res = report.checks[MASTER_BATCH]
    gone = rewritten = 0
    assert pair.manifest is not None
    erased_inputs = _erased_inputs(layout)
    for inp in pair.manifest.inputs:
        if inp.source != source.name:
            continue
        info = lake.info(inp.path)
        if info.type != FileType.File:
            gone += 1
            continue
        res.add("inputs_checksummed", 1)
        size = info.size
        if (inp.path, inp.sha256) in erased_inputs:
            rewritten += 1
        elif size != inp.bytes or lake.sha256(inp.path) != inp.sha256:
            report.differ(MASTER_BATCH, f"{pair.batch_version}/{source.name}",
                          f"master file {inp.path} changed since the batch version read it (now {size} bytes, "
                          f"the manifest recorded {inp.bytes} bytes and its sha256)")
    if rewritten:
        report.differ(MASTER_BATCH, f"{pair.batch_version}/{source.name}",
                      f"{rewritten} master files batch version {pair.batch_version} read were rewritten by "
                      "`lambdalake forget` since: its views still count the erased subjects until the next batch "
                      "version")
    if gone:
        res.notes.append(f"{source.name}: {gone} master files batch version {pair.batch_version} read were "
                         "replaced by a compaction since (not checksummed; their rows are compared)")


def _erased_inputs(layout: Layout) -> set[tuple[str, str]]:
    """(path, sha256) of every master file version an erasure rewrote (``master/_log/*-erase-*``)."""
    from lambdalake.erasure import erase_records, record_file

    return {(layout.key(record_file(layout, rec)), rec.old.sha256)
            for _, rec in erase_records(layout) if rec.status == "done"}


def _empty_master(con: Any, source: Source) -> str:
    cols = arrow_schema(master_columns(source), nullability=False)
    con.register(f"_empty_master_{source.name}", cols.empty_table())
    return ident(f"_empty_master_{source.name}")


# --- 3. log <-> speed -----------------------------------------------------------------------------------------------
def check_log_speed(report: AuditReport, con: Any, pipeline: Pipeline, source: Source, pair: PublishedPair,
                    views: list[View], events: str, speed: dict[str, pa.Table]) -> None:
    check = LOG_SPEED
    res = report.checks[check]
    snapshot = pair.snapshot
    if snapshot is None:
        res.notes.append("no speed snapshot is published: nothing to compare")
        return
    w = pair.watermark.of_topic(source.topic)
    s = snapshot.positions.of_topic(source.topic)
    lower = {p: w.get(p, 0) for p in s}
    res.compared.setdefault("positions", []).extend(
        f"{source.name}[{p}] [{lower[p]}, {n})" for p, n in sorted(s.items()) if n > lower[p])
    window = f"SELECT * FROM ({events}) WHERE {below_sql(s, lower)}"
    res.add("log_events", scalar(con, f"SELECT count(*) FROM ({window})"))
    for view in views:
        subject = f"speed {pair.speed_snapshot}/{view.name}"
        if not snapshot.definition_matches(view.name, pipeline.fingerprint(view)):
            res.notes.append(f"{view.name}: speed snapshot {pair.speed_snapshot} holds another definition (being "
                             "rebuilt); not compared")
            continue
        cols = speed_view_columns(source, view)
        table = speed.get(view.name)
        reg = f"_speed_{view.name}"
        if table is None:
            actual = typed_select(cols, "(SELECT 1) WHERE FALSE", {c.name for c in cols}, estimates=True)
        else:
            res.add("speed_bytes", table.nbytes)
            con.register(reg, table)
            actual = (f"SELECT * FROM ({typed_select(cols, ident(reg), estimates=True)}) "
                      f"WHERE {speed_visible_predicate(w)}")
        expected = typed_select(cols, f"({view_sql(source, view, window, block=snapshot.block)})", estimates=True)
        group = [PARTITION_COL, BLOCK_COL, *view.keys, "window_start"]
        try:
            n_actual, _ = compare_rows(report, check, subject, con, actual, expected, group, "speed",
                                       "recomputation from the log")
        finally:
            if table is not None:
                con.unregister(reg)
        res.add("speed_rows", n_actual)


# --- 4. merged --------------------------------------------------------------------------------------------------------
def check_merged(report: AuditReport, con: Any, serving: Any, source: Source, pair: PublishedPair,
                 views: list[View], events: str, served: dict[str, bool]) -> None:
    check = MERGED
    res = report.checks[check]
    w = pair.watermark.of_topic(source.topic)
    s = pair.positions.of_topic(source.topic)
    covered = {p: max(w.get(p, 0), s.get(p, 0)) for p in set(w) | set(s)}
    res.compared.setdefault("positions", []).extend(f"{source.name}[{p}] [0, {n})" for p, n in sorted(covered.items()))
    below = f"SELECT * FROM ({events}) WHERE {below_sql(covered)}"
    for view in views:
        if not served.get(view.name, False):
            res.notes.append(f"{view.name}: not served under its declared definition (being rebuilt); not compared")
            continue
        answer = serving.sql(f"SELECT * FROM {ident(view.name)}").to_arrow_table()
        reg = f"_served_{view.name}"
        con.register(reg, answer)
        try:
            expected = output_sql(view, view_sql(source, view, below), source)
            n_actual, _ = compare_rows(report, check, view.name, con, f"SELECT * FROM {ident(reg)}", expected,
                                       [*view.keys, "window_start"], "serving", "recomputation from the log")
        finally:
            con.unregister(reg)
        res.add("served_rows", n_actual)
