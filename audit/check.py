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

import time
from typing import Any

import pyarrow as pa

from audit.events import (
    dedup_sql,
    erased,
    events_table,
)
from audit.log_master import check_log_master, read_rejected
from audit.logread import read_dead_letters, read_source
from audit.report import (
    CHECKS,
    LOG_MASTER,
    LOG_SPEED,
    MASTER_BATCH,
    MERGED,
    AuditReport,
    CheckResult,
    timed,
)
from audit.views import check_log_speed, check_master_batch, check_merged
from lambdalake import sketches
from lambdalake.clients import end_offsets
from lambdalake.config import Settings
from lambdalake.contracts import Positions
from lambdalake.fields import Source
from lambdalake.heads import master_files, rejected_files
from lambdalake.layout import Layout
from lambdalake.pipeline import Pipeline, View
from lambdalake.validsql import valid_predicate
from lambdalake.viewsql import ident
from serving.published import PublishedPair


# --- the audit ------------------------------------------------------------------------------------------------------
def _served_home(settings: Settings):
    """The directory serving reads: the lake, or for a lake on object storage this machine's mirror of it."""
    if not settings.lake:
        return settings.home
    from lambdalake.mirror import mirror_dir

    return mirror_dir(settings.home)


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
            con, pair, served = None, resolve_pair(_served_home(settings)), {}
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
    layout = Layout.of(settings.home, settings.lake)
    end_offsets(settings, [s.topic for s in sources])  # the broker is reachable, before anything is opened
    report = AuditReport(settings.lake or str(settings.home), pipeline.name, sample=sample,
                         views=[v.name for v in selected])
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
    files = master_files(layout, src.name)
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
        rejected, rejected_bytes = read_rejected(rejected_files(layout, src.name), layout)
        res.add("rejected_bytes", rejected_bytes)
        check_log_master(report, src, files, logs, dlq, gone, sample, rejected, layout)
    t_events = time.monotonic()
    table, _ = events_table(src, logs, gone)
    reg = f"_log_{src.name}"
    con.register(reg, table)
    con.execute(f"CREATE OR REPLACE TEMP TABLE log_events AS {dedup_sql(src, ident(reg))}")
    con.unregister(reg)
    events_seconds = time.monotonic() - t_events  # shared by the two log recomputations
    with timed(report, MASTER_BATCH):
        check_master_batch(report, con, pipeline, src, pair, files, views, valid, gone, layout)
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
