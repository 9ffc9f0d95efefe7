"""Compaction (``lambdalake compact``): rewrite runs of small adjacent master files of one partition into one file.

Content and positions are preserved: the merged file ``<first start>-<last end>.parquet`` holds exactly the rows of
the files it replaces, in offset order, and covers exactly their union of ranges. It is the only way the immutable
master dataset is ever rewritten, so every compaction is recorded under ``master/_log/``.

Protocol for one group of files (:func:`compact`), mirrored by numbered comments in the code:

1. Read and check every file of the group against its name (schema, partition, offsets inside the range).
2. Write the merged table to a temporary name in the partition directory and fsync it (invisible to readers).
3. Record the intent in ``master/_log/<utc>-compact-<source>-p<p>-<start>-<end>.json`` (status ``started``: the
   replaced files with rows/bytes/sha256, the merged file and its sha256).
4. Under the exclusive *master readers lock* (a batch snapshot holds it shared while it reads): rename the
   temporary file to its final name, delete the replaced files, fsync the directory.
5. Rewrite the log record with status ``done``.

A crash leaves either the old files (before the rename in 4) or the merged file plus some old ones (during 4).
:func:`recover_compactions` — run by ``compact`` and ``ingest`` on start — finishes or aborts every ``started``
record, and :meth:`lambdalake.layout.Layout.master_files` (the one rule every reader uses) ignores files a logged,
renamed compaction already replaced, so no reader ever counts an offset twice.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from batch.master import check_master_file, sha256_file
from lambdalake.exceptions import InvariantViolation, LambdalakeError
from lambdalake.layout import Layout, MasterFile, atomic_write_bytes, compaction_records, fsync_dir, tmp_name
from lambdalake.locks import flock
from lambdalake.pipeline import Pipeline

log = logging.getLogger(__name__)


class CompactionBusy(LambdalakeError):
    """Another compaction runs on this lake, or the master readers lock could not be taken in time."""

    exit_code = 5


@dataclass
class CompactReport:
    groups: int = 0
    files_replaced: int = 0
    files_written: int = 0
    rows: int = 0
    records: list[str] = field(default_factory=list)


# locks ------------------------------------------------------------------------------------------------------------
def _lock_path(layout: Layout, name: str) -> Path:
    d = layout.checkpoints("master")
    d.mkdir(parents=True, exist_ok=True)
    return d / name


@contextmanager
def master_readers_lock(layout: Layout, timeout: float | None = None) -> Iterator[None]:
    """Held (shared) by a batch run while it snapshots and reads master files; compaction takes it exclusively."""
    with flock(_lock_path(layout, "readers.lock"), shared=True, timeout=timeout, what="the master readers lock",
               on_busy=CompactionBusy):
        yield


def _compaction_lock(layout: Layout):
    """Exclusive, not waited for: one compaction (or recovery) at a time per lake."""
    return flock(_lock_path(layout, "compact.lock"), timeout=0, what="the compaction lock", on_busy=CompactionBusy)


# recovery -----------------------------------------------------------------------------------------------------------
def recover_compactions(layout: Layout, pipeline: Pipeline | None = None) -> list[str]:
    """Finish (merged file in place) or abort (not renamed) every compaction left ``started`` by a crash.

    Skipped while another compaction holds the compaction lock (it finishes its own work).
    """
    done: list[str] = []
    try:
        with _compaction_lock(layout):
            for path, rec in compaction_records(layout):
                if rec.get("status") != "started":
                    continue
                pdir = layout.master_partition(rec["source"], int(rec["partition"]))
                merged = pdir / rec["merged"]["name"]
                if merged.exists() and sha256_file(merged) == rec["merged"]["sha256"]:
                    for r in rec["replaced"]:
                        (pdir / r["name"]).unlink(missing_ok=True)
                    fsync_dir(pdir)
                    rec["status"] = "done"
                    rec["recovered"] = True
                else:
                    if rec["merged"].get("tmp"):
                        (pdir / rec["merged"]["tmp"]).unlink(missing_ok=True)
                    rec["status"] = "aborted"
                rec["recovered_at"] = _now()
                atomic_write_bytes(path, _dump(rec))
                log.warning("recovered interrupted compaction %s: %s", path.name, rec["status"])
                done.append(f"{path.name}: {rec['status']}")
    except CompactionBusy:
        pass
    return done


# planning and rewriting -------------------------------------------------------------------------------------------
def plan_groups(files: list[MasterFile], target_rows: int, target_bytes: int) -> list[list[MasterFile]]:
    """Greedy runs of adjacent files whose merged size stays within the targets; only runs of >= 2 files."""
    from batch.master import file_rows

    groups: list[list[MasterFile]] = []
    cur: list[MasterFile] = []
    rows = size = 0
    for f in files:
        fr, fb = file_rows(f.path), f.path.stat().st_size
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
            lock_timeout: float = 300.0) -> CompactReport:
    """Rewrite small adjacent master files (see the module docstring for the protocol)."""
    import pyarrow.parquet as pq

    from batch.master import COMPRESSION

    layout = Layout(settings_home)
    report = CompactReport()
    recover_compactions(layout, pipeline)
    sources = [pipeline.source(source)] if source else list(pipeline.sources)
    with _compaction_lock(layout):
        for src in sources:
            files = layout.master_files(src.name)
            by_p: dict[int, list[MasterFile]] = {}
            for f in files:
                by_p.setdefault(f.partition, []).append(f)
            for p, pfiles in sorted(by_p.items()):
                if partition is not None and p != partition:
                    continue
                for group in plan_groups(pfiles, target_rows, target_bytes):
                    # 1. read + check every file against its name
                    tables = [check_master_file(src, f) for f in group]
                    merged = pa.concat_tables(tables)
                    first, last = group[0], group[-1]
                    final = layout.master_file(src.name, p, first.start, last.end)
                    if final.exists():
                        raise InvariantViolation(f"compaction target {final} already exists")
                    # 2. temporary merged file, fsync'd
                    tmp = tmp_name(final)
                    with open(tmp, "wb") as fh:
                        pq.write_table(merged, fh, compression=COMPRESSION)
                        fh.flush()
                        os.fsync(fh.fileno())
                    if pq.ParquetFile(tmp).metadata.num_rows != sum(t.num_rows for t in tables):
                        tmp.unlink()
                        raise InvariantViolation(f"compaction of {final.name}: row count changed; aborted")
                    # 3. intent record
                    rec = {"kind": "compact", "status": "started", "source": src.name, "partition": p,
                           "start": first.start, "end": last.end, "started_at": _now(), "pid": os.getpid(),
                           "replaced": [{"name": f.path.name, "rows": t.num_rows, "bytes": f.path.stat().st_size,
                                         "sha256": sha256_file(f.path)} for f, t in zip(group, tables, strict=True)],
                           "merged": {"name": final.name, "tmp": tmp.name, "rows": merged.num_rows,
                                      "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}}
                    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
                    rec_name = f"{stamp}-compact-{src.name}-p{p}-{first.start:020d}-{last.end:020d}.json"
                    rec_path = layout.master_log() / rec_name
                    atomic_write_bytes(rec_path, _dump(rec))
                    # 4. swap under the exclusive readers lock
                    with flock(_lock_path(layout, "readers.lock"), timeout=lock_timeout,
                               what="the master readers lock (a batch run is reading)", on_busy=CompactionBusy):
                        os.replace(tmp, final)
                        fsync_dir(final.parent)
                        for f in group:
                            f.path.unlink()
                        fsync_dir(final.parent)
                    # 5. done
                    rec["status"] = "done"
                    rec["finished_at"] = _now()
                    atomic_write_bytes(rec_path, _dump(rec))
                    report.groups += 1
                    report.files_replaced += len(group)
                    report.files_written += 1
                    report.rows += merged.num_rows
                    report.records.append(str(rec_path.relative_to(layout.home)))
    return report


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _dump(rec: dict) -> bytes:
    return (json.dumps(rec, indent=1, sort_keys=True) + "\n").encode()
