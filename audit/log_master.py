"""Check 1 of the audit, log <-> master: every offset below the archived end is in exactly one of master, the DLQ
or erased, and every master row is the log's message, re-validated and compared field by field."""

from __future__ import annotations

from audit.events import (
    Erased,
    epoch_us_columns,
    loosened,
    read_lake_file,
    read_master,
    sampled,
)
from audit.logread import DeadLetters, PartitionLog
from audit.report import (
    LOG_MASTER,
    AuditReport,
    fmt_value,
)
from lambdalake.fields import Source
from lambdalake.layout import Layout, MasterFile
from lambdalake.schema import (
    OFFSET_COL,
    PARTITION_COL,
    VALUE_COL,
)
from lambdalake.validation import Validator


# --- 1. log <-> master ------------------------------------------------------------------------------------------------
def read_rejected(files: list[MasterFile], layout: Layout | None = None
                  ) -> tuple[dict[int, dict[int, bytes | None]], int]:
    """The messages of the rejected files (``{partition: {offset: value bytes}}``) and the bytes of the files (read
    as :func:`audit.events.read_lake_file`)."""
    out: dict[int, dict[int, bytes | None]] = {}
    nbytes = 0
    for f in files:
        t, size = read_lake_file(layout, f, [OFFSET_COL, VALUE_COL])
        nbytes += size
        out.setdefault(f.partition, {}).update(zip(t.column(OFFSET_COL).to_pylist(), t.column(VALUE_COL).to_pylist(),
                                                   strict=True))
    return out, nbytes


def check_log_master(report: AuditReport, source: Source, files: list[MasterFile], logs: dict[int, PartitionLog],
                     dlq: DeadLetters, gone: Erased, sample: float,
                     rejected: dict[int, dict[int, bytes | None]] | None = None, layout: Layout | None = None
                     ) -> None:
    check = LOG_MASTER
    res = report.checks[check]
    table, nbytes = read_master(files, source, layout)
    res.add("master_files", len(files))
    res.add("master_bytes", nbytes)
    res.add("master_rows", table.num_rows)
    res.add("dlq_records", dlq.records)
    res.add("dlq_bytes", dlq.nbytes)
    for where in dlq.unreadable[:3]:
        report.differ(check, source.dlq_topic, f"record {where} is not an archiver dead-letter record")
    validate, loose = Validator(source), Validator(loosened(source))
    names = [f.name for f in source.fields]
    values = epoch_us_columns(table, source)
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
                diffs = [f"{n}={fmt_value(values[n][i])} (log: {fmt_value(verdict.record[n])})" for n in names
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
