"""Compaction (``lambdalake compact``): rewrite runs of small adjacent master files of one partition into one file.

Content and positions are preserved: the merged file ``<first start>-<last end>.parquet`` holds exactly the rows of
the files it replaces, in offset order, and covers exactly their union of ranges. Every compaction is a journaled
master rewrite (:mod:`batch.rewrite` owns the protocol, the locks and the recovery), recorded in
``master/_log/<utc>-compact-<source>-p<p>-<start>-<end>.json`` (:class:`lambdalake.contracts.CompactionRecord`).

What this module decides, per group of files (:func:`compact`):

- which files: greedy runs of at least two adjacent files of one partition within the targets (:func:`plan_groups`);
- before the rewrite, every file of the group is read and checked against its name (schema, partition, offsets
  inside the range); the merged table is written (its row count read back), renamed to ``<first start>-<last
  end>.parquet``, and the replaced files deleted under the exclusive master readers lock.

After the rewrites, :func:`lambdalake.heads.collect_master_garbage` deletes the master and rejected files of the
compacted sources that no head lists and that are older than the grace period (``gc_grace``; default
``LAMBDALAKE_MASTER_GC_GRACE``, 6 hours): a fenced writer's late rolls, rolls of a partition nobody claims again.

:func:`recover_compactions` — run by ``compact`` and ``ingest`` on start — finishes or aborts every ``started``
compaction record, and :meth:`lambdalake.layout.Layout.master_files` (the one rule every reader uses) ignores files a
logged, renamed compaction already replaced, so no reader ever counts an offset twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from batch import rewrite
from batch.master import check_master_file
from batch.rewrite import CompactionBusy, compaction_lock
from lambdalake.contracts import REWRITE_STARTED, CompactionRecord, ErasureRecord, RewriteFile
from lambdalake.exceptions import InvariantViolation
from lambdalake.heads import collect_master_garbage, master_files, rewrite_name
from lambdalake.layout import Layout, MasterFile
from lambdalake.pipeline import Pipeline
from lambdalake.runtime import crash_point
from lambdalake.storage.files import data_files

FAULT_ENV = "LAMBDALAKE_COMPACT_FAULT"  # crash tests: "swap" SIGKILLs a compaction between its put and its swap


@dataclass
class CompactReport:
    groups: int = 0
    files_replaced: int = 0
    files_written: int = 0
    rows: int = 0
    records: list[str] = field(default_factory=list)
    garbage: list[str] = field(default_factory=list)  # keys of unlisted files deleted (collect_master_garbage)
    skipped: list[str] = field(default_factory=list)  # object storage: groups another rewrite changed first


# recovery -----------------------------------------------------------------------------------------------------------
def recover_compactions(layout: Layout, pipeline: Pipeline | None = None) -> list[str]:
    """Finish (merged file in place) or abort (not renamed) every compaction left ``started`` by a crash
    (:func:`batch.rewrite.recover`).

    Skipped while another compaction holds the compaction lock (it finishes its own work).
    """
    try:
        with compaction_lock(layout):
            return rewrite.recover(layout, CompactionRecord)
    except CompactionBusy:
        return []


# planning and rewriting -------------------------------------------------------------------------------------------
def plan_groups(files: list[MasterFile], target_rows: int, target_bytes: int,
                layout: Layout | None = None) -> list[list[MasterFile]]:
    """Greedy runs of adjacent files whose merged size stays within the targets; only runs of >= 2 files. With
    ``layout``, the files' rows and sizes are read through its store (a bucket too)."""
    from batch.master import file_rows

    groups: list[list[MasterFile]] = []
    cur: list[MasterFile] = []
    rows = size = 0
    lake = None if layout is None else data_files(layout.store)
    for f in files:
        if lake is None:
            fr, fb = file_rows(f.path), f.path.stat().st_size
        else:
            key = layout.key(f.path)
            fr, fb = lake.parquet(key).metadata.num_rows, lake.info(key).size
        adjacent = bool(cur) and cur[-1].end == f.start
        if cur and (not adjacent or rows + fr > target_rows or size + fb > target_bytes):
            if len(cur) >= 2:
                groups.append(cur)
            cur, rows, size = [], 0, 0
        cur.append(f)
        rows += fr
        size += fb
    if len(cur) >= 2:
        groups.append(cur)
    return groups


def compact(settings_home: Path, pipeline: Pipeline, *, source: str | None = None, partition: int | None = None,
            target_rows: int = 2_000_000, target_bytes: int = 256 * 1024 * 1024,
            lock_timeout: float = 300.0, gc_grace: float | None = None, lake: str = "") -> CompactReport:
    """Rewrite small adjacent master files (see the module docstring, and :mod:`batch.rewrite` for the protocol).
    ``lake``: a lake on object storage (``settings_home`` is then the machine's work directory)."""
    layout = Layout.of(settings_home, lake)
    files_of = data_files(layout.store)
    report = CompactReport()
    recover_compactions(layout, pipeline)
    if not files_of.local:  # no lock there: settle a killed forget's old records too (only those past the grace)
        rewrite.recover(layout, ErasureRecord)
    sources = [pipeline.source(source)] if source else list(pipeline.sources)
    with compaction_lock(layout):
        for src in sources:
            files = master_files(layout, src.name)
            by_p: dict[int, list[MasterFile]] = {}
            for f in files:
                by_p.setdefault(f.partition, []).append(f)
            for p, pfiles in sorted(by_p.items()):
                if partition is not None and p != partition:
                    continue
                for group in plan_groups(pfiles, target_rows, target_bytes, None if files_of.local else layout):
                    # read + check every file against its name
                    tables = [check_master_file(src, f, None if files_of.local
                                                else files_of.read_table(layout.key(f.path))) for f in group]
                    merged = pa.concat_tables(tables)
                    first, last = group[0], group[-1]
                    final = layout.master_file(src.name, p, first.start, last.end)
                    if not files_of.local:  # a name no other compaction uses (no lake-wide lock there)
                        final = final.with_name(rewrite_name(layout, src.name, p, first.start, last.end))
                    elif final.exists():
                        raise InvariantViolation(f"compaction target {final} already exists")
                    record = CompactionRecord(
                        status=REWRITE_STARTED, source=src.name, partition=p, start=first.start, end=last.end,
                        replaced=[RewriteFile(name=f.path.name, rows=t.num_rows,
                                              bytes=files_of.info(layout.key(f.path)).size,
                                              sha256=files_of.sha256(layout.key(f.path)))
                                  for f, t in zip(group, tables, strict=True)],
                        merged=RewriteFile(name=final.name))
                    # the journaled rewrite: the merged file in place of the group
                    try:
                        rec_path = rewrite.rewrite(layout, record, merged, final, replaced=[f.path for f in group],
                                                   check_rows=True, lock_timeout=lock_timeout,
                                                   before_swap=lambda: crash_point(FAULT_ENV, "swap"))
                    except InvariantViolation as exc:
                        if files_of.local:
                            raise
                        report.skipped.append(f"{src.name}[{p}] [{first.start}, {last.end}): {exc}")
                        continue
                    report.groups += 1
                    report.files_replaced += len(group)
                    report.files_written += 1
                    report.rows += merged.num_rows
                    report.records.append(layout.key(rec_path))
        for src in sources:  # under the compaction lock: no rewrite of ours is half done
            report.garbage += collect_master_garbage(layout, src.name, gc_grace, partition=partition)
    return report
