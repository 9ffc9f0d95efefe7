"""The independent re-check of a published batch version (the seed of a later ``lambdalake audit``).

It shares no code with the Spark job that computed the version: it interprets the same declaration (the
:class:`~lambdalake.pipeline.Pipeline` objects: sources with their field rules, views with their keys, bucket and
stored aggregates and each aggregate's merge rule) with DuckDB over the master dataset, and compares.

:func:`verify_published` checks, for the published version (``views/batch/CURRENT``):

1. The manifest is of this pipeline and holds every declared view with the declared definition fingerprint; each
   view's files have the stored columns of :func:`lambdalake.schema.view_columns` and hold ``row_counts[view]``
   rows.
2. No null in a view's keys (those the source declares required and non-nullable) nor in ``window_start``.
3. Totals: per view, every stored aggregate folded over all its rows with its merge rule equals the same aggregate
   over the master events below the watermark that are valid under the declared field rules, first occurrence per
   (partition, event id) — the events SQL below; the manifest's ``events`` per source equals that event count.

The declared field rules are a DuckDB predicate (:mod:`lambdalake.validsql`); the views, the events and the folds
are the core's DuckDB interpreter of a view definition (:mod:`lambdalake.viewsql`), which ``lambdalake audit``
(:mod:`audit.check`) shares to recompute the batch side, the speed side and the merged answer.

Raises :class:`VerificationFailed` naming the first disagreement.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch.rejected import revalidated_file
from batch.rewrite import master_readers_lock
from lambdalake import sketches
from lambdalake.config import Settings
from lambdalake.contracts import BatchManifest, Positions
from lambdalake.erasure import erased_subjects, not_erased_sql
from lambdalake.exceptions import InvariantViolation
from lambdalake.heads import master_files
from lambdalake.layout import Layout, current_batch_manifest
from lambdalake.pipeline import WINDOW_START, Pipeline, View
from lambdalake.schema import view_columns
from lambdalake.storage.files import data_files
from lambdalake.validsql import valid_predicate
from lambdalake.viewsql import FOLD, aggregate_sql, fold_sql, ident, master_events_sql


class VerificationFailed(InvariantViolation):
    """The published batch version disagrees with its manifest, the declaration or the master dataset."""


@dataclass
class VerificationReport:
    """What :func:`verify_published` checked, per view."""

    version: str
    watermark: Positions
    row_counts: dict[str, int]
    events: dict[str, int]
    totals: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "watermark": self.watermark.nested(), "row_counts": dict(self.row_counts),
                "events": dict(self.events), "totals": dict(self.totals)}


def verify_published(settings: Settings, pipeline: Pipeline) -> VerificationReport | None:
    """Check the published batch version (see the module docstring). None: nothing is published."""
    import duckdb

    layout = Layout.of(settings.home, settings.lake)
    lake = data_files(layout.store)
    manifest = current_batch_manifest(layout)
    if manifest is None:
        return None
    version = str(manifest.version)
    vdir = layout.key(layout.batch_version(version))

    def fail(msg: str) -> VerificationFailed:
        return VerificationFailed(f"batch version {version} ({vdir}): {msg}; roll back with "
                                  "`lambdalake batch --rollback` if serving must not show it")

    # 1. manifest vs declaration and files
    if manifest.pipeline != pipeline.name:
        raise fail(f"manifest is of pipeline {manifest.pipeline!r}, expected {pipeline.name!r}")
    row_counts: dict[str, int] = {}
    files_of: dict[str, list[str]] = {}
    for view in pipeline.views:
        _check_definition(manifest, pipeline, view, fail)
        files = [f"{vdir}/{view.name}/{name}" for name in lake.names(f"{vdir}/{view.name}")]
        expected = manifest.row_counts.get(view.name)
        if expected is None:
            raise fail(f"manifest has no row count for view {view.name!r}")
        declared = [c.name for c in view_columns(pipeline.source_of(view), view)]
        rows = 0
        for f in files:
            meta = lake.parquet(f)
            if meta.schema_arrow.names != declared:
                raise fail(f"view {view.name!r}: {f} has columns {meta.schema_arrow.names}, declared {declared}")
            rows += meta.metadata.num_rows
        if rows != expected:
            raise fail(f"view {view.name!r} has {rows} rows in {len(files)} files, the manifest says {expected}")
        row_counts[view.name], files_of[view.name] = rows, files

    con = duckdb.connect()
    try:
        sketches.register(con)
        valid = {src.name: valid_predicate(con, src) for src in pipeline.sources}  # registers before any query
        con.execute("SET threads = 2").fetchall()
        report = VerificationReport(version, manifest.watermark, row_counts, {})
        with master_readers_lock(layout), tempfile.TemporaryDirectory() as scratch:  # no compaction meanwhile
            for src in pipeline.sources:
                wm = manifest.watermark.of_topic(src.topic)
                masters = [layout.key(f.path) for f in master_files(layout, src.name)
                           if f.start < wm.get(f.partition, 0)]
                # rejected messages valid under the declared rules count too (a loosened rule, batch.rejected)
                extra = revalidated_file(layout, src, wm, Path(scratch))
                keep = f"({valid[src.name]}) AND {not_erased_sql(ident(src.key), erased_subjects(layout, src.name))}"
                events = None
                if masters or extra:
                    rows = lake.duckdb_relation(con, f"_master_{src.name}", masters, [extra] if extra else [])
                    events = master_events_sql(src, rows, wm, keep)
                n_events = con.execute(f"SELECT count(*) FROM ({events})").fetchall()[0][0] if events else 0
                recorded = manifest.events.get(src.name, n_events)
                if recorded != n_events:
                    raise fail(f"manifest says {recorded} deduplicated events of source {src.name!r}, the master "
                               f"dataset below the watermark holds {n_events} valid ones")
                report.events[src.name] = n_events
                for view in pipeline.views_of(src):
                    rel = lake.duckdb_relation(con, f"_view_{view.name}", files_of[view.name]) \
                        if files_of[view.name] else None
                    report.totals[view.name] = _check_view(con, pipeline, view, rel, events, fail)
        return report
    finally:
        con.close()


def _check_definition(manifest: BatchManifest, pipeline: Pipeline, view: View,
                      fail: Callable[[str], VerificationFailed]) -> None:
    if not manifest.has_view(view.name):
        raise fail(f"the version has no view {view.name!r}")
    if not manifest.definition_matches(view.name, pipeline.fingerprint(view), pipeline.legacy_fingerprint(view)):
        raise fail(f"view {view.name!r} was computed for definition {manifest.fingerprint_of(view.name)}, "
                   f"the declared one is {pipeline.fingerprint(view)}; run `lambdalake batch`")


def _check_view(con: Any, pipeline: Pipeline, view: View, rel: str | None, events_sql: str | None,
                fail: Callable[[str], VerificationFailed]) -> dict[str, Any]:
    """Steps 2 and 3 for one view (``rel``: its rows, None when it has no file); returns the totals it compared."""
    source = pipeline.source_of(view)
    fields = source.field_map
    strict = [k for k in view.keys if fields[k].required and not fields[k].nullable] + [WINDOW_START]
    stored = view.stored_aggregates
    if rel is None:
        if events_sql is not None and con.execute(f"SELECT count(*) FROM ({events_sql})").fetchall()[0][0]:
            raise fail(f"view {view.name!r} has no rows but the master dataset has valid events below the watermark")
        return {}
    nulls = con.execute("SELECT " + ", ".join(f"count(*) FILTER (WHERE {ident(k)} IS NULL)" for k in strict)
                        + f" FROM {rel}").fetchall()[0]
    for k, n in zip(strict, nulls, strict=True):
        if n:
            raise fail(f"view {view.name!r} has {n} null values in key {k!r}")
    if not stored:
        return {}
    view_totals = con.execute("SELECT " + ", ".join(fold_sql(a) for a in stored) + f" FROM {rel}").fetchall()[0]
    if events_sql is None:
        master_totals: tuple = tuple(0 if a.kind == "count" else None for a in stored)
    else:
        master_totals = con.execute("SELECT " + ", ".join(
            sketches.estimate_sql(f"list_value({aggregate_sql(a, source)})") if a.merge == "union"
            else "count(*)" if a.kind == "count" else f"{a.kind}({ident(a.column or '')})" for a in stored)
            + f" FROM ({events_sql})").fetchall()[0]
    totals: dict[str, Any] = {}
    for a, got, want in zip(stored, view_totals, master_totals, strict=True):
        if a.kind == "count":  # SQL's sum over no rows is NULL; no rows counted is 0 events
            got, want = got or 0, want or 0
        if got != want:
            raise fail(f"view {view.name!r}: {FOLD[a.merge]} of {a.name!r} over the view is {got}, but {a.kind} "
                       f"over the valid deduplicated master events below the watermark is {want}")
        totals[a.name] = got if isinstance(got, int | float | str | None) else str(got)
    return totals
