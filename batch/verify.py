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

Field rules in SQL: required/nullable, minimum/maximum and min_length/max_length (DuckDB ``length`` counts code
points, as :mod:`lambdalake.validation` does) are SQL predicates; a ``pattern`` is full-matched by Python's ``re``
(the validator's own dialect) in a DuckDB function over the distinct values.

Raises :class:`VerificationFailed` naming the first disagreement.

:func:`view_sql` and :func:`output_sql` are the same declaration interpreted row by row (every stored row of a view,
and its output columns): ``lambdalake audit`` (:mod:`audit.check`) recomputes the batch side, the speed side and the
merged answer with them.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batch.compact import master_readers_lock
from batch.rejected import revalidated_file
from lambdalake import sketches
from lambdalake.aggregates import Aggregate
from lambdalake.config import Settings
from lambdalake.contracts import BatchManifest, Positions
from lambdalake.erasure import erased_subjects, not_erased_sql
from lambdalake.exceptions import InvariantViolation
from lambdalake.fields import Source
from lambdalake.instants import FIRST_INSTANT_US, LAST_INSTANT_US
from lambdalake.layout import Layout, current_batch_manifest
from lambdalake.pipeline import WINDOW_START, Pipeline, View
from lambdalake.predicates import Predicate, resolve_predicate
from lambdalake.schema import BLOCK_COL, OFFSET_COL, PARTITION_COL, view_columns

FOLD = {"sum": "sum", "min": "min", "max": "max", "union": "union"}  # each merge rule (Aggregate.merge) in words


def _fold_sql(a: Aggregate) -> str:
    """SQL folding a stored aggregate over all rows with its merge rule (a sketch: the estimate of the union)."""
    col = _ident(a.name)
    return sketches.estimate_sql(f"list({col})") if a.merge == "union" else f"{FOLD[a.merge]}({col})"


def _aggregate_sql(a: Aggregate, source: Source) -> str:
    """SQL of a stored aggregate over events (valid, deduplicated, filtered): what one group's row stores."""
    col = _ident(a.column or "")
    if a.kind == "count":
        return "count(*)"
    if a.kind == "sum":
        total = "DOUBLE" if source.field_map[a.column or ""].type == "number" else "BIGINT"  # decimals: scaled ints
        return f"CAST(sum({col}) AS {total})"
    if a.kind == "approx_distinct":
        return sketches.sketch_sql(f"list({col})", source.field_map[a.column or ""].type, a.lg_k or 0)
    return f"{a.kind}({col})"


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


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _pattern_function(con: Any, name: str, pattern: str) -> None:
    """``name(VARCHAR) -> BOOLEAN``: ``re.fullmatch(pattern, value)``, evaluated once per distinct value."""
    fullmatch = re.compile(pattern).fullmatch

    def matches(values: pa.Array) -> pa.Array:
        ok = [v for v in pc.unique(values).to_pylist() if v is not None and fullmatch(v) is not None]
        return pc.is_in(values, value_set=pa.array(ok, pa.string()))

    con.create_function(name, matches, ["VARCHAR"], "BOOLEAN", type="arrow")


def valid_predicate(con: Any, source: Source) -> str:
    """SQL predicate over a master row: valid under the declared field rules (registers pattern functions)."""
    conds = []
    for f in source.fields:
        col = _ident(f.name)
        rules = []
        if f.type == "integer":
            if f.minimum is not None:
                rules.append(f"{col} >= {int(f.minimum)}")
            if f.maximum is not None:
                rules.append(f"{col} <= {int(f.maximum)}")
        elif f.type == "string":
            if f.min_length is not None:
                rules.append(f"length({col}) >= {int(f.min_length)}")
            if f.max_length is not None:
                rules.append(f"length({col}) <= {int(f.max_length)}")
            if f.pattern:
                fn = f"lambdalake_match_{source.name}_{f.name}"
                _pattern_function(con, fn, f.pattern)
                rules.append(f"{fn}({col})")
        elif f.type == "timestamp":  # the supported range (lambdalake.validation rule 6)
            rules.append(f"epoch_us({col}) BETWEEN {FIRST_INSTANT_US} AND {LAST_INSTANT_US}")
        elif f.type == "decimal":  # the scaled integer has at most 18 digits (rule 7)
            rules.append(f"abs({col}) < {10 ** 18}")
        value_ok = " AND ".join(rules) or "TRUE"
        if f.required and not f.nullable:
            conds.append(f"({col} IS NOT NULL AND {value_ok})")
        else:
            conds.append(f"({col} IS NULL OR ({value_ok}))")
    return " AND ".join(conds) or "TRUE"


def master_events_sql(source: Source, files: list[str], watermark: dict[int, int], valid: str) -> str:
    """Valid events below the watermark, the row with the lowest offset per (partition, event id)."""
    cases = " ".join(f"WHEN {p} THEN {w}" for p, w in sorted(watermark.items()))
    below = f"{OFFSET_COL} < (CASE {PARTITION_COL} {cases} ELSE 0 END)" if watermark else "FALSE"
    return (f"SELECT * FROM read_parquet({_sql_list(files)}) WHERE {below} AND {valid} "
            f"QUALIFY row_number() OVER (PARTITION BY {PARTITION_COL}, {_ident(source.event_id)} "
            f"ORDER BY {OFFSET_COL}) = 1")


def view_sql(source: Source, view: View, events: str, block: int | None = None) -> str:
    """The stored rows of ``view`` computed over ``events`` (a relation of master-schema rows: valid, deduplicated
    events), one row per group: keys, ``window_start``, stored aggregates — the batch layout; with ``block``, grouped
    by ``_partition`` and ``_block_start`` (offset floored to the block) too, in front — the speed layout.

    The independent interpretation of a view (DuckDB): :mod:`audit` recomputes batch views from master and speed
    rows from the log with it. ``window_start`` is the event time floored to the bucket (floor also before 1970),
    a UTC ``TIMESTAMPTZ``; count and sum are BIGINT, min/max keep the field's type.
    """
    t, b = f"epoch_us({_ident(source.event_time)})", view.bucket_us
    cols = [_ident(k) for k in view.keys]
    cols.append(f"make_timestamptz({t} - ((({t} % {b}) + {b}) % {b})) AS {_ident(WINDOW_START)}")
    if block:
        cols = [PARTITION_COL, f"({OFFSET_COL} - {OFFSET_COL} % {int(block)}) AS {BLOCK_COL}", *cols]
    for a in view.stored_aggregates:
        cols.append(f"{_aggregate_sql(a, source)} AS {_ident(a.name)}")
    where = "" if view.where is None else \
        f" WHERE {where_sql(resolve_predicate(view.where, source, f'view {view.name!r}'), source)}"
    return f"SELECT {', '.join(cols)} FROM ({events}) AS events{where} GROUP BY ALL"


def where_sql(pred: Predicate, source: Source) -> str:
    """DuckDB SQL of a resolved view filter over master-typed rows: a comparison or ``in`` on a null field is false,
    and/or are two-valued; timestamps compare as UTC µs, decimals as their stored scaled integers."""
    if pred.op in ("and", "or"):
        return "(" + f" {pred.op.upper()} ".join(where_sql(a, source) for a in pred.args) + ")"
    f = source.field_map[pred.field or ""]
    col = _ident(f.name)
    if pred.op in ("is_null", "not_null"):
        return f"({col} IS {'NOT ' if pred.op == 'not_null' else ''}NULL)"
    value = f"epoch_us({col})" if f.type == "timestamp" else col

    def lit(v: object) -> str:
        if isinstance(v, bool):
            return "TRUE" if v else "FALSE"
        if isinstance(v, str):
            return "'" + v.replace("'", "''") + "'"
        if isinstance(v, float):
            return f"CAST('{v!r}' AS DOUBLE)"
        return str(int(v))  # type: ignore[call-overload]

    if pred.op == "in":
        return f"({col} IS NOT NULL AND {value} IN ({', '.join(lit(v) for v in pred.values)}))"
    op = {"eq": "=", "ne": "<>", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}[pred.op]
    return f"({col} IS NOT NULL AND {value} {op} {lit(pred.values[0])})"


def output_sql(view: View, stored: str, source: Source | None = None) -> str:
    """The output columns of ``view`` (``view.output_columns``) over ``stored`` (one row per group, stored columns):
    declared aggregates as stored; a mean is its stored sum over its stored count, as DOUBLE. With ``source``,
    decimals as served (``DECIMAL(18|38, scale)``; a mean's decimal sum divided by 10^scale)."""
    from serving.sql import present

    means = {m.name: m for m in view.means}
    columns = {c.name: c for c in view_columns(source, view)} if source is not None else {}

    def shown(name: str) -> str:
        c = columns.get(name)
        return _ident(name) if c is None else f"{present(_ident(name), c)} AS {_ident(name)}"

    cols = [shown(k) for k in view.keys] + [_ident(WINDOW_START)]
    for a in view.aggregates:
        m = means.get(a.name)
        if isinstance(a, Aggregate) and a.kind == "approx_distinct":
            cols.append(f"{sketches.estimate_sql(f'list_value({_ident(a.name)})')} AS {_ident(a.name)}")
            continue
        if m is None:
            cols.append(shown(a.name))
            continue
        c = columns.get(m.sum_name)
        total = f"CAST({_ident(m.sum_name)} AS DOUBLE)"
        if c is not None and c.type == "decimal" and c.scale:
            total = f"({total} / 1e{int(c.scale)})"
        cols.append(f"{total} / NULLIF({_ident(m.count_name)}, 0) AS {_ident(m.name)}")
    return f"SELECT {', '.join(cols)} FROM ({stored}) AS stored"


def verify_published(settings: Settings, pipeline: Pipeline) -> VerificationReport | None:
    """Check the published batch version (see the module docstring). None: nothing is published."""
    import duckdb
    import pyarrow.parquet as pq

    layout = Layout(settings.home)
    manifest = current_batch_manifest(layout)
    if manifest is None:
        return None
    version = str(manifest.version)
    vdir = layout.batch_version(version)

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
        files = sorted(str(f) for f in (vdir / view.name).glob("*.parquet"))
        expected = manifest.row_counts.get(view.name)
        if expected is None:
            raise fail(f"manifest has no row count for view {view.name!r}")
        declared = [c.name for c in view_columns(pipeline.source_of(view), view)]
        rows = 0
        for f in files:
            meta = pq.ParquetFile(f)
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
                masters = [str(f.path) for f in layout.master_files(src.name) if f.start < wm.get(f.partition, 0)]
                # rejected messages valid under the declared rules count too (a loosened rule, batch.rejected)
                extra = revalidated_file(layout, src, wm, Path(scratch))
                masters += [str(extra)] if extra else []
                keep = f"({valid[src.name]}) AND {not_erased_sql(_ident(src.key), erased_subjects(layout, src.name))}"
                events = master_events_sql(src, masters, wm, keep) if masters else None
                n_events = con.execute(f"SELECT count(*) FROM ({events})").fetchone()[0] if events else 0
                recorded = manifest.events.get(src.name, n_events)
                if recorded != n_events:
                    raise fail(f"manifest says {recorded} deduplicated events of source {src.name!r}, the master "
                               f"dataset below the watermark holds {n_events} valid ones")
                report.events[src.name] = n_events
                for view in pipeline.views_of(src):
                    report.totals[view.name] = _check_view(con, pipeline, view, files_of[view.name], events, fail)
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


def _check_view(con: Any, pipeline: Pipeline, view: View, files: list[str], events_sql: str | None,
                fail: Callable[[str], VerificationFailed]) -> dict[str, Any]:
    """Steps 2 and 3 for one view; returns the totals it compared."""
    source = pipeline.source_of(view)
    fields = source.field_map
    strict = [k for k in view.keys if fields[k].required and not fields[k].nullable] + [WINDOW_START]
    stored = view.stored_aggregates
    if not files:
        if events_sql is not None and con.execute(f"SELECT count(*) FROM ({events_sql})").fetchone()[0]:
            raise fail(f"view {view.name!r} has no rows but the master dataset has valid events below the watermark")
        return {}
    rel = f"read_parquet({_sql_list(files)})"
    nulls = con.execute("SELECT " + ", ".join(f"count(*) FILTER (WHERE {_ident(k)} IS NULL)" for k in strict)
                        + f" FROM {rel}").fetchone()
    for k, n in zip(strict, nulls, strict=True):
        if n:
            raise fail(f"view {view.name!r} has {n} null values in key {k!r}")
    if not stored:
        return {}
    view_totals = con.execute("SELECT " + ", ".join(_fold_sql(a) for a in stored) + f" FROM {rel}").fetchone()
    if events_sql is None:
        master_totals: tuple = tuple(0 if a.kind == "count" else None for a in stored)
    else:
        master_totals = con.execute("SELECT " + ", ".join(
            sketches.estimate_sql(f"list_value({_aggregate_sql(a, source)})") if a.merge == "union"
            else "count(*)" if a.kind == "count" else f"{a.kind}({_ident(a.column or '')})" for a in stored)
            + f" FROM ({events_sql})").fetchone()
    totals: dict[str, Any] = {}
    for a, got, want in zip(stored, view_totals, master_totals, strict=True):
        if a.kind == "count":  # SQL's sum over no rows is NULL; no rows counted is 0 events
            got, want = got or 0, want or 0
        if got != want:
            raise fail(f"view {view.name!r}: {FOLD[a.merge]} of {a.name!r} over the view is {got}, but {a.kind} "
                       f"over the valid deduplicated master events below the watermark is {want}")
        totals[a.name] = got if isinstance(got, int | float | str | None) else str(got)
    return totals
