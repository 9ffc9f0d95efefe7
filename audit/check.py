"""``lambdalake audit``: trust, but verify — the lake checked end to end at ONE consistent served pair.

The pair is the one a serving connection reads (:func:`serving.connection.connect`, which resolves it with
:func:`serving.published.resolve_pair`): batch version ``v`` with watermark ``W``, speed snapshot with positions
``S``. Four checks, each independent of the code path that produced what it checks:

1. **log ↔ master** (:func:`check_log_master`): every offset of the log below the archived end (and still in the
   log: retention) is in exactly one of master / DLQ / erased; every master row is a message of the log, re-validated
   from the log bytes with :mod:`lambdalake.validation` and compared field by field (``sample``: a deterministic
   share of the offsets); a rejected file's message (the lake's copy of a DLQ'd one) has the log's bytes; a DLQ'd
   message valid under the declared rules (a loosened rule) must be kept in a rejected file.
2. **master ↔ batch** (:func:`check_master_batch`): the batch version's input files are unchanged (size, sha256)
   and each of its views equals the view recomputed with DuckDB from the valid, deduplicated master events below
   ``W`` — rejected messages now valid included, as the batch job reads them (:func:`lambdalake.viewsql.view_sql`, not
   Spark).
3. **log ↔ speed** (:func:`check_log_speed`): the speed rows at blocks ``>= W`` equal the same recomputation over
   the valid events read from the log, deduplicated over the whole log, at offsets in ``[W, S)``.
4. **merged** (:func:`check_merged`): what serving answers for each view equals the view recomputed from the log
   over offsets below ``max(W, S)`` — the product's exactness invariant itself.

Validity and dedup are the declared rules (:mod:`lambdalake.validation` for log bytes, the DuckDB predicates of
:mod:`lambdalake.validsql` for master rows); the view interpretation is :mod:`lambdalake.viewsql`'s (one
interpreter, shared with the Airflow ``verify`` step and serving). Views the pair does not serve under their
declared definition (being rebuilt) are skipped with a note.

Erasure (``lambdalake forget``): :func:`erased` is what every check consults — offsets a master rewrite removed are
accounted as erased (their copy in the DLQ topic stays until its retention: not a second place, but a rejected file
still holding one is), and every recomputation skips the erased subjects.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from audit.logread import DeadLetters, PartitionLog, read_dead_letters, read_source
from batch.rejected import revalidated_file
from lambdalake import sketches
from lambdalake.clients import end_offsets
from lambdalake.config import Settings
from lambdalake.contracts import Positions
from lambdalake.fields import Field, Source
from lambdalake.layout import Layout, MasterFile
from lambdalake.pipeline import Pipeline, View
from lambdalake.schema import (
    BLOCK_COL,
    OFFSET_COL,
    PARTITION_COL,
    VALUE_COL,
    arrow_schema,
    master_columns,
    speed_view_columns,
    view_columns,
)
from lambdalake.validation import Validator
from lambdalake.validsql import valid_predicate
from lambdalake.viewsql import ident, master_events_sql, output_sql, speed_visible_predicate, typed_select, view_sql
from serving.published import PublishedPair

LOG_MASTER, MASTER_BATCH, LOG_SPEED, MERGED = "log-master", "master-batch", "log-speed", "merged"
CHECKS = (LOG_MASTER, MASTER_BATCH, LOG_SPEED, MERGED)
MAX_DIFFERENCES = 20  # differences listed in a report (all are counted)
ROW_EXAMPLES = 5  # differing rows named per view and check


@dataclass(frozen=True)
class Difference:
    """One thing that does not hold: which check, about what (a view, a partition, an offset), and how."""

    check: str
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.check}: {self.subject}: {self.detail}"


@dataclass
class CheckResult:
    """What one check compared (positions, rows, bytes), how long it took, and notes (what it skipped, and why)."""

    name: str
    compared: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    differences: int = 0

    def add(self, key: str, n: int) -> None:
        self.compared[key] = self.compared.get(key, 0) + n


@dataclass
class AuditReport:
    """The outcome of :func:`audit`: the pair audited, each check's result, and the first differences."""

    home: str
    pipeline: str
    batch_version: str | None = None
    speed_snapshot: str | None = None
    watermark: dict = field(default_factory=dict)
    positions: dict = field(default_factory=dict)
    sample: float = 1.0
    views: list[str] = field(default_factory=list)
    checks: dict[str, CheckResult] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)
    total_differences: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.total_differences == 0

    def differ(self, check: str, subject: str, detail: str) -> None:
        self.total_differences += 1
        if check in self.checks:
            self.checks[check].differences += 1
        if len(self.differences) < MAX_DIFFERENCES:
            self.differences.append(Difference(check, subject, detail))

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "home": self.home, "pipeline": self.pipeline, "batch_version": self.batch_version,
                "speed_snapshot": self.speed_snapshot, "watermark": self.watermark, "speed_positions": self.positions,
                "sample": self.sample, "views": self.views, "seconds": round(self.seconds, 3),
                "checks": {n: dataclasses.asdict(c) | {"seconds": round(c.seconds, 3)} for n, c in self.checks.items()},
                "differences": [dataclasses.asdict(d) for d in self.differences],
                "total_differences": self.total_differences,
                "differences_not_listed": self.total_differences - len(self.differences)}


# --- the erasure hook ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Erased:
    """What erasure removed from one source: offsets per partition (accounted as *erased*) and subjects (skipped by
    every recomputation)."""

    offsets: dict[int, frozenset[int]] = field(default_factory=dict)
    subjects: frozenset[str] = frozenset()


def erased(layout: Layout, source: Source) -> Erased:
    """The erasures recorded for ``source`` (``lambdalake forget``, :mod:`lambdalake.erasure`): the offsets whose
    message a master rewrite removed (accounted as erased), and the subjects every recomputation skips."""
    from lambdalake.erasure import erased_offsets, erased_subjects

    return Erased(offsets=erased_offsets(layout, source.name), subjects=erased_subjects(layout, source.name))


def _not_erased_sql(source: Source, gone: Erased) -> str:
    if not gone.subjects:
        return "TRUE"
    values = ", ".join("'" + s.replace("'", "''") + "'" for s in sorted(gone.subjects))
    return f"{ident(source.key)} NOT IN ({values})"


# --- helpers -------------------------------------------------------------------------------------------------------
def sampled(partition: int, offset: int, fraction: float) -> bool:
    """Deterministic sample of positions (the same ``--sample`` audits the same offsets on every run)."""
    if fraction >= 1.0:
        return True
    h = ((offset + 1) * 0x9E3779B97F4A7C15 + (partition + 1) * 0xC2B2AE3D27D4EB4F) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 29
    h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 32
    return h / 2**64 < fraction


def _fmt(v: Any) -> str:
    if isinstance(v, datetime):
        return v.isoformat().replace("+00:00", "Z")
    return repr(v)


def _row_text(names: list[str], row: tuple) -> str:
    return "(" + ", ".join(f"{n}={_fmt(v)}" for n, v in zip(names, row, strict=True)) + ")"


def _scalar(con: Any, sql: str) -> Any:
    """The one value of ``sql``, the result consumed (DuckDB refuses ``register`` while a result is unfinished)."""
    return con.execute(sql).fetchall()[0][0]


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def _below_sql(bounds: dict[int, int], lower: dict[int, int] | None = None) -> str:
    """``_offset < bounds[_partition]`` (and ``>= lower[_partition]``); a partition not in ``bounds``: none."""
    if not bounds:
        return "FALSE"
    hi = " ".join(f"WHEN {int(p)} THEN {int(n)}" for p, n in sorted(bounds.items()))
    cond = f"{OFFSET_COL} < (CASE {PARTITION_COL} {hi} ELSE 0 END)"
    if lower:
        lo = " ".join(f"WHEN {int(p)} THEN {int(n)}" for p, n in sorted(lower.items()))
        cond += f" AND {OFFSET_COL} >= (CASE {PARTITION_COL} {lo} ELSE 0 END)"
    return cond


def _float_close(a: Any, b: Any) -> bool:
    return isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def compare_rows(report: AuditReport, check: str, subject: str, con: Any, actual: str, expected: str,
                 group: list[str], actual_name: str, expected_name: str) -> tuple[int, int]:
    """Compare two relations with the same columns as multisets (``EXCEPT ALL`` both ways); report differences.

    Rows of the same group (``group`` columns) on both sides are reported as one changed row naming the columns
    that differ. Returns (rows of actual, rows of expected).
    """
    n_actual = _scalar(con, f"SELECT count(*) FROM ({actual})")
    n_expected = _scalar(con, f"SELECT count(*) FROM ({expected})")
    cur = con.execute(f"SELECT * FROM ({actual}) EXCEPT ALL SELECT * FROM ({expected})")
    names = [d[0] for d in cur.description]
    extra = cur.fetchall()
    missing = con.execute(f"SELECT * FROM ({expected}) EXCEPT ALL SELECT * FROM ({actual})").fetchall()
    if not extra and not missing:
        return n_actual, n_expected
    gi = [names.index(g) for g in group]
    want = {tuple(r[i] for i in gi): r for r in missing}
    shown = 0

    def differ(text: str) -> None:  # the first ROW_EXAMPLES are listed, all are counted
        nonlocal shown
        if shown < ROW_EXAMPLES:
            report.differ(check, subject, text)
        else:
            report.total_differences += 1
            report.checks[check].differences += 1
        shown += 1

    for row in extra:
        key = tuple(row[i] for i in gi)
        other = want.pop(key, None)
        if other is not None:
            cols = [f"{n}={_fmt(a)} ({expected_name}: {_fmt(b)})" for n, a, b in zip(names, row, other, strict=True)
                    if a != b and not _float_close(a, b)]
            if not cols:  # float sums differ only in summation order (README "Field types"): not a difference
                continue
            differ(f"{actual_name} row {_row_text(group, key)} has " + ", ".join(cols))
        else:
            differ(f"{actual_name} has a row {expected_name} does not: {_row_text(names, row)}")
    for row in want.values():
        differ(f"{actual_name} lacks a row of {expected_name}: {_row_text(names, row)}")
    if shown:
        report.checks[check].notes.append(f"{subject}: {len(extra)} rows of {actual_name} and {len(missing)} of "
                                          f"{expected_name} differ ({n_actual} vs {n_expected} rows)")
    return n_actual, n_expected


@contextmanager
def timed(report: AuditReport, name: str) -> Iterator[CheckResult]:
    result = report.checks.setdefault(name, CheckResult(name))
    t0 = time.monotonic()
    try:
        yield result
    finally:
        result.seconds += time.monotonic() - t0


# --- reading --------------------------------------------------------------------------------------------------------
def _loose(source: Source) -> Source:
    """The source with its value rules (lengths, ranges, patterns) dropped: types and presence only. Reads a log
    message as the event it carries even when a tightened rule now rejects it (master still holds it, and the
    batch job drops it), so the fields can still be compared."""
    def loosen(f: Field) -> Field:
        return dataclasses.replace(f, min_length=None, max_length=None, minimum=None, maximum=None, pattern=None)

    return dataclasses.replace(source, fields=[loosen(f) for f in source.fields])


def read_master(files: list[MasterFile], source: Source) -> tuple[pa.Table, int]:
    """The master rows of ``files`` (declared fields, ``_partition``, ``_offset``; timestamps as int64 µs) sorted by
    (partition, offset), and the bytes of the files."""
    names = [f.name for f in source.fields] + [PARTITION_COL, OFFSET_COL]
    schema = arrow_schema(master_columns(source), nullability=False)
    tables, nbytes = [], 0
    for f in files:
        nbytes += f.path.stat().st_size
        t = pq.read_table(f.path, columns=names)
        tables.append(t.select(names))
    if not tables:
        return pa.schema([schema.field(n) for n in names]).empty_table(), 0
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.sort_by([(PARTITION_COL, "ascending"), (OFFSET_COL, "ascending")]), nbytes


def _as_epoch_us(table: pa.Table, source: Source) -> dict[str, list]:
    cols = {}
    for f in source.fields:
        col = table.column(f.name)
        if f.type == "timestamp":
            col = pc.cast(col, pa.int64())
        cols[f.name] = col.to_pylist()
    return cols


def events_table(source: Source, logs: dict[int, PartitionLog], gone: Erased) -> tuple[pa.Table, int]:
    """The valid events of the log read (the master schema: declared fields, ``_partition``, ``_offset``), not
    deduplicated; subjects erased are left out. Returns the table and the number of invalid messages."""
    validate = Validator(source)
    names = [f.name for f in source.fields]
    cols: dict[str, list] = {n: [] for n in names}
    parts: list[int] = []
    offsets: list[int] = []
    invalid = 0
    for p, log in sorted(logs.items()):
        for o, v in zip(log.offsets, log.values, strict=True):
            verdict = validate(v)
            if not verdict.ok:
                invalid += 1
                continue
            rec = verdict.record
            if gone.subjects and rec[source.key] in gone.subjects:
                continue
            for n in names:
                cols[n].append(rec[n])
            parts.append(p)
            offsets.append(o)
    schema = arrow_schema(master_columns(source), nullability=False)
    arrays = [pa.array(cols[f.name], pa.int64()).cast(schema.field(f.name).type) if f.type == "timestamp"
              else pa.array(cols[f.name], schema.field(f.name).type) for f in source.fields]
    arrays += [pa.array(parts, pa.int32()), pa.array(offsets, pa.int64())]
    return pa.Table.from_arrays(arrays, names=[*names, PARTITION_COL, OFFSET_COL]), invalid


def dedup_sql(source: Source, relation: str) -> str:
    """First occurrence per (partition, event id), by offset (the documented dedup rule)."""
    return (f"SELECT * FROM {relation} QUALIFY row_number() OVER (PARTITION BY {PARTITION_COL}, "
            f"{ident(source.event_id)} ORDER BY {OFFSET_COL}) = 1")


# --- 1. log <-> master ------------------------------------------------------------------------------------------------
def read_rejected(files: list[MasterFile]) -> tuple[dict[int, dict[int, bytes | None]], int]:
    """The messages of the rejected files (``{partition: {offset: value bytes}}``) and the bytes of the files."""
    out: dict[int, dict[int, bytes | None]] = {}
    nbytes = 0
    for f in files:
        nbytes += f.path.stat().st_size
        t = pq.read_table(f.path, columns=[OFFSET_COL, VALUE_COL])
        out.setdefault(f.partition, {}).update(zip(t.column(OFFSET_COL).to_pylist(), t.column(VALUE_COL).to_pylist(),
                                                   strict=True))
    return out, nbytes


def check_log_master(report: AuditReport, source: Source, files: list[MasterFile], logs: dict[int, PartitionLog],
                     dlq: DeadLetters, gone: Erased, sample: float,
                     rejected: dict[int, dict[int, bytes | None]] | None = None) -> None:
    check = LOG_MASTER
    res = report.checks[check]
    table, nbytes = read_master(files, source)
    res.add("master_files", len(files))
    res.add("master_bytes", nbytes)
    res.add("master_rows", table.num_rows)
    res.add("dlq_records", dlq.records)
    res.add("dlq_bytes", dlq.nbytes)
    for where in dlq.unreadable[:3]:
        report.differ(check, source.dlq_topic, f"record {where} is not an archiver dead-letter record")
    validate, loose = Validator(source), Validator(_loose(source))
    names = [f.name for f in source.fields]
    values = _as_epoch_us(table, source)
    part_col = table.column(PARTITION_COL).to_pylist()
    off_col = table.column(OFFSET_COL).to_pylist()
    ends: dict[int, tuple[int, int]] = {}
    for f in files:
        lo, hi = ends.get(f.partition, (f.start, f.end))
        ends[f.partition] = (min(lo, f.start), max(hi, f.end))
    rows_by_p: dict[int, dict[int, int]] = {}
    for i, (p, o) in enumerate(zip(part_col, off_col, strict=True)):
        held = rows_by_p.setdefault(p, {})
        if o in held:
            report.differ(check, f"{source.name}[{p}]@{o}", "the master dataset holds this offset twice")
        held[o] = i
    ranges = []
    compared = rejected_now = revalidated = dlq_gone = 0
    for p in sorted(set(ends) | set(logs) | set(rows_by_p)):
        first_file, archived_end = ends.get(p, (0, 0))
        log = logs.get(p)
        held = rows_by_p.get(p, {})
        subject = f"{source.name}[{p}]"
        bad = [o for o in held if not first_file <= o < archived_end]
        for o in bad[:3]:
            report.differ(check, f"{subject}@{o}", f"master row outside the offsets [{first_file}, {archived_end}) "
                                                    "its files cover")
        if log is None:
            if archived_end:
                report.differ(check, subject, f"the master dataset covers offsets up to {archived_end} but the "
                                              f"topic {source.topic!r} has no partition {p}")
            continue
        if archived_end > log.end:
            report.differ(check, subject, f"the master dataset covers offsets up to {archived_end} but the log "
                                          f"ends at {log.end} (topic recreated?)")
        in_dlq: dict[int, int] = {}
        for o in dlq.offsets.get(p, ()):
            in_dlq[o] = in_dlq.get(o, 0) + 1
        gone_p = gone.offsets.get(p, frozenset())
        rejected_p = (rejected or {}).get(p, {})
        checked_from = log.first
        stop = min(archived_end, log.stop)
        if log.first > 0:
            res.notes.append(f"{subject}: offsets below {log.first} are no longer in the log (retention); "
                             "their master rows cannot be checked against it")
        seen_log: set[int] = set()
        for o, v in zip(log.offsets, log.values, strict=True):
            if o >= stop:
                break
            seen_log.add(o)
            where = f"{subject}@{o}"
            n_dlq = in_dlq.get(o, 0)
            if not n_dlq and o in rejected_p:  # kept in the lake, its DLQ record is gone (DLQ retention?)
                dlq_gone += 1
            erased_here = o in gone_p  # its DLQ record may remain (the topic's retention): not a second place
            places = (o in held) + ((0 if erased_here else n_dlq) or (o in rejected_p)) + erased_here
            if places == 0:
                report.differ(check, where, "archived offset is in none of master, DLQ, erased")
                continue
            if places > 1:
                kinds = [k for k, c in (("master", o in held), (f"DLQ x{n_dlq}", n_dlq),
                                        ("a rejected file", o in rejected_p), ("erased", o in gone_p)) if c]
                report.differ(check, where, f"offset is in more than one place: {', '.join(kinds)}")
            if not sampled(p, o, sample):
                continue
            compared += 1
            if o in held:
                verdict = loose(v)
                if not verdict.ok:
                    report.differ(check, where, f"master holds a row but the log message is not an event of "
                                                f"{source.name!r}: {verdict.reason}")
                    continue
                i = held[o]
                diffs = [f"{n}={_fmt(values[n][i])} (log: {_fmt(verdict.record[n])})" for n in names
                         if values[n][i] != verdict.record[n]]
                if diffs:
                    report.differ(check, where, "master row differs from the log message: " + ", ".join(diffs))
                if not validate(v).ok:
                    rejected_now += 1
            elif (n_dlq or o in rejected_p) and not erased_here:
                kept = o in rejected_p
                if kept and rejected_p[o] != v:
                    report.differ(check, where, "the rejected file holds other bytes than the log message")
                if validate(v).ok:
                    if kept:
                        revalidated += 1  # a loosened rule: the batch job re-validates it from the rejected file
                    else:
                        report.differ(check, where, "dead-lettered, but the message is valid under the declared "
                                                    "rules and no rejected file keeps it for the batch job (a "
                                                    "loosened rule over a range archived before rejected files)")
        for o in sorted(set(held) - seen_log):
            if o >= checked_from and o < log.stop:
                report.differ(check, f"{subject}@{o}", "master row has no message at this offset in the log")
                break
        ranges.append(f"{subject} [{checked_from}, {stop})")
        res.add("log_messages", sum(1 for o in log.offsets if o < stop))
        res.add("log_bytes", sum(0 if v is None else len(v) for o, v in zip(log.offsets, log.values, strict=True)
                                 if o < stop))
    res.compared.setdefault("positions", []).extend(ranges)
    res.add("messages_revalidated", compared)
    if dlq_gone:
        res.notes.append(f"{source.name}: {dlq_gone} rejected messages kept in rejected files have no DLQ record any "
                         "more (the DLQ topic's retention?); they count as dead-lettered")
    if revalidated:
        res.notes.append(f"{source.name}: {revalidated} dead-lettered messages are valid under the declared rules (a "
                         "loosened rule): the batch job counts them from the rejected files")
    if rejected_now:
        res.notes.append(f"{source.name}: {rejected_now} master rows are invalid under the declared rules (a "
                         "tightened rule): the batch job and the recomputations drop them")


# --- 2. master <-> batch --------------------------------------------------------------------------------------------
def check_master_batch(report: AuditReport, con: Any, pipeline: Pipeline, source: Source, pair: PublishedPair,
                       files: list[MasterFile], views: list[View], valid: str, gone: Erased) -> None:
    check = MASTER_BATCH
    res = report.checks[check]
    manifest = pair.manifest
    if manifest is None:
        res.notes.append("no batch version is published: nothing to compare")
        return
    wm = manifest.watermark.of_topic(source.topic)
    masters = [str(f.path) for f in files if f.start < wm.get(f.partition, 0)]
    res.compared.setdefault("positions", []).extend(f"{source.name}[{p}] [0, {w})" for p, w in sorted(wm.items()))
    res.add("master_files_read", len(masters))
    res.add("master_bytes_read", sum(f.path.stat().st_size for f in files if f.start < wm.get(f.partition, 0)))
    with tempfile.TemporaryDirectory() as scratch:
        # rejected messages valid under the declared rules count too (a loosened rule): as the batch job reads them
        extra = revalidated_file(pair.layout, source, wm, Path(scratch))
        if extra is not None:
            masters.append(str(extra))
            res.notes.append(f"{source.name}: rejected messages now valid under the declared rules (a loosened "
                             "rule) are counted with the master rows")
        if masters:
            events = master_events_sql(source, masters, wm, f"({valid}) AND {_not_erased_sql(source, gone)}")
            con.execute(f"CREATE OR REPLACE TEMP TABLE master_events AS {events}")
        else:
            con.execute(f"CREATE OR REPLACE TEMP TABLE master_events AS "
                        f"SELECT * FROM {_empty_master(con, source)}")
    _check_lineage(report, pair, source)
    n_events = _scalar(con, "SELECT count(*) FROM master_events")
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
        actual = (typed_select(cols, f"read_parquet({_sql_list(batch_files)})", estimates=True) if batch_files
                  else typed_select(cols, "(SELECT 1) WHERE FALSE", {c.name for c in cols}, estimates=True))
        expected = typed_select(cols, f"({view_sql(source, view, 'SELECT * FROM master_events')})", estimates=True)
        group = [*view.keys, "window_start"]
        n_actual, _ = compare_rows(report, check, subject, con, actual, expected, group, "batch",
                                   "recomputation from master")
        res.add("batch_rows", n_actual)
        expected_rows = manifest.row_counts.get(view.name)
        if expected_rows is not None and expected_rows != n_actual:
            report.differ(check, subject, f"the manifest says {expected_rows} rows, the files hold {n_actual}")


def _check_lineage(report: AuditReport, pair: PublishedPair, source: Source) -> None:
    """The master files the batch version read (its manifest's inputs) are unchanged: same size and sha256. Files
    replaced by a compaction since are no longer there to compare (noted, not a difference)."""
    from batch.master import sha256_file

    res = report.checks[MASTER_BATCH]
    gone = rewritten = 0
    assert pair.manifest is not None
    erased_inputs = _erased_inputs(pair.layout)
    for inp in pair.manifest.inputs:
        if inp.source != source.name:
            continue
        path = pair.home / inp.path
        if not path.exists():
            gone += 1
            continue
        res.add("inputs_checksummed", 1)
        size = path.stat().st_size
        if (inp.path, inp.sha256) in erased_inputs:
            rewritten += 1
        elif size != inp.bytes or sha256_file(path) != inp.sha256:
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

    return {(str(record_file(layout, rec).relative_to(layout.home)), rec.old.sha256)
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
    window = f"SELECT * FROM ({events}) WHERE {_below_sql(s, lower)}"
    res.add("log_events", _scalar(con, f"SELECT count(*) FROM ({window})"))
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
    below = f"SELECT * FROM ({events}) WHERE {_below_sql(covered)}"
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


# --- the audit ------------------------------------------------------------------------------------------------------
def _served_pair(settings: Settings, pipeline: Pipeline, report: AuditReport
                 ) -> tuple[Any, PublishedPair, dict[str, bool], dict[str, pa.Table]]:
    """A serving connection (what ``lambdalake sql`` opens), the pair it reads, which views it serves current, and
    the pair's speed rows read at once (a running speed layer deletes older snapshots a few seconds later)."""
    from serving.connection import connect, pair_of, plans_of
    from serving.datasets import speed_table
    from serving.exceptions import InconsistentPublishedState
    from serving.plans import CURRENT
    from serving.published import resolve_pair

    for attempt in range(3):
        try:
            con = connect(settings=settings, pipeline=pipeline, materialize=False)
        except InconsistentPublishedState as exc:
            report.differ(MERGED, "serving", f"serving refuses the published pair: {exc}")
            con, pair, served = None, resolve_pair(settings.home), {}
        else:
            pair = pair_of(con)
            assert pair is not None
            served = {name: plan.state == CURRENT and plan.pair is not None for name, plan in plans_of(con).items()}
        try:
            speed = {v.name: speed_table(pipeline, v, pair) for v in pipeline.views
                     if pair.speed_files(v, pipeline.source_of(v).topic)}
        except FileNotFoundError:  # pruned since the pair was resolved: take the newer pair
            if con is not None:
                con.close()
            if attempt == 2:
                raise
            continue
        return con, pair, served, speed
    raise AssertionError("unreachable")


def audit(settings: Settings, pipeline: Pipeline, views: list[str] | None = None, sample: float = 1.0,
          log_timeout: float = 300.0) -> AuditReport:
    """Run every check (module docstring) at the pair serving reads now; ``views`` restricts the view checks (the
    log ↔ master check then covers only their sources). Raises a LambdalakeError when it cannot run (broker
    unreachable, unreadable published files)."""
    import duckdb

    from batch.rewrite import master_readers_lock

    t0 = time.monotonic()
    if not 0.0 < sample <= 1.0:
        from lambdalake.exceptions import ConfigError

        raise ConfigError(f"--sample {sample} must be in (0, 1]")
    selected = [pipeline.view(v) for v in views] if views else list(pipeline.views)
    sources = [s for s in pipeline.sources if not views or any(v.source == s.name for v in selected)]
    layout = Layout(settings.home)
    end_offsets(settings, [s.topic for s in sources])  # the broker is reachable, before anything is opened
    report = AuditReport(str(settings.home), pipeline.name, sample=sample, views=[v.name for v in selected])
    for name in CHECKS:
        report.checks[name] = CheckResult(name)
    serving, pair, served, speed = _served_pair(settings, pipeline, report)
    report.batch_version, report.speed_snapshot = pair.batch_version, pair.speed_snapshot
    report.watermark, report.positions = pair.watermark.nested(), pair.positions.nested()
    con = duckdb.connect()
    try:
        sketches.register(con)  # approx_distinct: sketches compare by their canonical estimates
        con.execute("SET TimeZone = 'UTC'")
        valid = {src.name: valid_predicate(con, src) for src in sources}  # registers functions before any query
        con.execute("SET threads = 2")
        with master_readers_lock(layout):  # compaction must not swap master files while we read them
            for src in sources:
                _audit_source(report, con, serving, settings, pipeline, layout, src, pair, served, speed,
                              [v for v in selected if v.source == src.name], valid[src.name], sample, log_timeout)
    finally:
        con.close()
        if serving is not None:
            serving.close()
    report.seconds = time.monotonic() - t0
    return report


def _audit_source(report: AuditReport, con: Any, serving: Any, settings: Settings, pipeline: Pipeline,
                  layout: Layout, src: Source, pair: PublishedPair, served: dict[str, bool],
                  speed: dict[str, pa.Table], views: list[View], valid: str, sample: float, log_timeout: float
                  ) -> None:
    gone = erased(layout, src)
    files = layout.master_files(src.name)
    archived: dict[int, int] = {}
    for f in files:
        archived[f.partition] = max(archived.get(f.partition, 0), f.end)
    w = pair.watermark.of_topic(src.topic)
    s = pair.positions.of_topic(src.topic)
    targets = {p: max(archived.get(p, 0), w.get(p, 0), s.get(p, 0)) for p in set(archived) | set(w) | set(s)}
    with timed(report, LOG_MASTER) as res:
        t_read = time.monotonic()
        logs = read_source(settings, src, targets, timeout=log_timeout)
        dlq = read_dead_letters(settings, src, timeout=log_timeout)
        res.notes.append(f"{src.name}: read {sum(len(g.offsets) for g in logs.values())} messages and "
                         f"{dlq.records} DLQ records in {time.monotonic() - t_read:.2f}s")
        rejected, rejected_bytes = read_rejected(layout.rejected_files(src.name))
        res.add("rejected_bytes", rejected_bytes)
        check_log_master(report, src, files, logs, dlq, gone, sample, rejected)
    t_events = time.monotonic()
    table, _ = events_table(src, logs, gone)
    reg = f"_log_{src.name}"
    con.register(reg, table)
    con.execute(f"CREATE OR REPLACE TEMP TABLE log_events AS {dedup_sql(src, ident(reg))}")
    con.unregister(reg)
    events_seconds = time.monotonic() - t_events  # shared by the two log recomputations
    with timed(report, MASTER_BATCH):
        check_master_batch(report, con, pipeline, src, pair, files, views, valid, gone)
    with timed(report, LOG_SPEED) as res:
        res.seconds += events_seconds / 2
        check_log_speed(report, con, pipeline, src, pair, views, "SELECT * FROM log_events", speed)
    with timed(report, MERGED) as res:
        res.seconds += events_seconds / 2
        if serving is not None:
            check_merged(report, con, serving, src, pair, views, "SELECT * FROM log_events", served)


def positions_text(positions: Positions | dict) -> str:
    return ", ".join(f"{t}[{p}]={n}" for t, parts in (positions.nested() if isinstance(positions, Positions)
                                                       else positions).items() for p, n in parts.items())
