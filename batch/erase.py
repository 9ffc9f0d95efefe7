"""Erasure (``lambdalake forget``): rewrite the master dataset without the events of forgotten subjects.

The request and how every reader honours it are :mod:`lambdalake.erasure`. :func:`forget` runs the steps, each
resumable:

1. Record every request durably — the compacted topic ``lambdalake.erasures`` first, then the lake
   (``checkpoints/erasures/``) — before anything is rewritten. From here on every reader skips the subjects.
2. Under the compaction lock (one master maintenance at a time), rewrite each master file and rejected file that
   holds a message of a subject of the source whose master is not rewritten yet, as a journaled master rewrite
   (:mod:`batch.rewrite`, which owns the protocol and the recovery), in :func:`rewrite_file`:

   a. read the file and keep the rows of other subjects; write them to a temporary name, fsync'd;
   b. record the intent in ``master/_log/<utc>-erase-<source>-<dataset>-p<p>-<start>-<end>.json`` (status
      ``started``, :class:`lambdalake.contracts.ErasureRecord`: the file, its old and new sha256, the offsets
      removed, the request ids);
   c. under the exclusive master readers lock, rename the temporary file over the file (same name, same range:
      readers see either the old or the new file) and fsync the directory;
   d. rewrite the record with status ``done``.

   The offsets removed are accounted as *erased* from the rename on (:func:`lambdalake.erasure.erased_offsets`).
   On object storage nothing is renamed: the new version gets a name of its own and replaces the file in the
   partition's head by a swap (:mod:`batch.rewrite`, "On object storage"); it is in effect from that swap on.
   :func:`recover_erasures` (run first) finishes a rename that happened or aborts one that did not; the subject's
   rows are then simply found again and rewritten.
3. Mark the requests *master rewritten* (lake, then the topic). The next batch version corrects the aggregates; the
   speed layer rebuilds the source's views from the log without the subjects on its own.

``LAMBDALAKE_ERASE_FAULT=recorded|rewrite`` SIGKILLs the process after step 1, or in step 2 between b and c (the
crash tests).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from batch import rewrite
from batch.rewrite import compaction_lock
from lambdalake import erasure
from lambdalake.config import Settings
from lambdalake.contracts import REWRITE_STARTED, ErasureRecord, ErasureRequest, RewriteFile, utc_now_iso
from lambdalake.exceptions import ConfigError
from lambdalake.fields import Source
from lambdalake.heads import master_files, rejected_files, rewrite_name
from lambdalake.layout import Layout, MasterFile
from lambdalake.pipeline import Pipeline
from lambdalake.runtime import crash_point
from lambdalake.schema import OFFSET_COL, VALUE_COL
from lambdalake.storage.files import data_files

log = logging.getLogger(__name__)


@dataclass
class ForgetReport:
    source: str
    subjects: list[str]
    requests: list[ErasureRequest] = field(default_factory=list)
    files_rewritten: list[str] = field(default_factory=list)
    master_rows: int = 0
    rejected_messages: int = 0
    recovered: list[str] = field(default_factory=list)
    retention: dict[str, dict[str, int | None]] = field(default_factory=dict)
    retention_error: str | None = None

    @property
    def erased(self) -> int:
        return self.master_rows + self.rejected_messages


def fault(step: str) -> None:
    """``LAMBDALAKE_ERASE_FAULT=<step>`` (the crash tests' seam; in-process tests replace it)."""
    crash_point("LAMBDALAKE_ERASE_FAULT", step)


def check_subjects(subjects: list[str]) -> list[str]:
    out = []
    for s in subjects:
        if not s or not s.strip() or s != s.strip():
            raise ConfigError(f"subject {s!r} is empty or has surrounding spaces; pass the exact key value, e.g. "
                              "`lambdalake forget --source pageviews u42`")
        if s not in out:
            out.append(s)
    if not out:
        raise ConfigError("no subject given; pass one or more key values, e.g. `lambdalake forget --source "
                          "pageviews u42`")
    return out


# --- recovery -------------------------------------------------------------------------------------------------------
def recover_erasures(layout: Layout) -> list[str]:
    """Finish (new file in place) or abort (not renamed) every erasure rewrite left ``started`` by a crash
    (:func:`batch.rewrite.recover`; the caller holds the compaction lock)."""
    return rewrite.recover(layout, ErasureRecord)


# --- rewriting one file ----------------------------------------------------------------------------------------------
def _keep_mask(table: pa.Table, source: Source, dataset: str, subjects: frozenset[str]) -> pa.Array:
    if dataset == "master":
        col = table.column(source.key)
        return pc.fill_null(pc.invert(pc.is_in(col, value_set=pa.array(sorted(subjects), col.type))), True)
    names = [erasure.subject_of(v, source.key) for v in table.column(VALUE_COL).to_pylist()]
    return pa.array([n is None or n not in subjects for n in names], pa.bool_())


def rewrite_file(layout: Layout, source: Source, f: MasterFile, dataset: str, subjects: frozenset[str],
                 ids: list[str], lock_timeout: float) -> Counter[str]:
    """Rewrite ``f`` without the messages of ``subjects`` (module docstring, step 2); returns how many it removed,
    per subject."""
    lake, key = data_files(layout.store), layout.key(f.path)
    probe = lake.read_table(key, columns=[source.key] if dataset == "master" else [VALUE_COL])
    keep = _keep_mask(probe, source, dataset, subjects)
    if not len(keep) or pc.all(keep).as_py():
        return Counter()
    col = probe.column(0).filter(pc.invert(keep)).to_pylist()
    removed = Counter(col if dataset == "master" else [erasure.subject_of(v, source.key) for v in col])
    # a. the rows of other subjects (the rewrite writes them to a temporary name)
    table = lake.read_table(key)
    schema_meta = lake.parquet(key).schema_arrow.metadata
    offsets = table.column(OFFSET_COL).filter(pc.invert(keep)).to_pylist()
    kept = table.filter(keep)
    if schema_meta:
        kept = kept.replace_schema_metadata(schema_meta)
    final = f.path if lake.local else f.path.with_name(rewrite_name(layout, source.name, f.partition, f.start, f.end))
    record = ErasureRecord(status=REWRITE_STARTED, dataset=dataset, source=source.name, partition=f.partition,
                           start=f.start, end=f.end, name=f.path.name, requests=sorted(ids), offsets=offsets,
                           old=RewriteFile(rows=table.num_rows, bytes=lake.info(key).size, sha256=lake.sha256(key)),
                           new=RewriteFile(name=None if lake.local else final.name))
    # a-d: the journaled rewrite (b, the intent, then the crash tests' seam, then c, the rename over the file)
    rewrite.rewrite(layout, record, kept, final, lock_timeout=lock_timeout, before_swap=lambda: fault("rewrite"))
    return removed


# --- the command ----------------------------------------------------------------------------------------------------
def forget(settings: Settings, pipeline: Pipeline, source_name: str, subjects: list[str], *,
           lock_timeout: float = 300.0, publish: bool = True) -> ForgetReport:
    """Forget ``subjects`` of source ``source_name`` (module docstring). Idempotent: running it again resumes."""
    src = pipeline.source(source_name)
    subjects = check_subjects(subjects)
    layout = Layout.of(settings.home, settings.lake)
    report = ForgetReport(src.name, subjects)
    # 1. durable requests: the topic, then the lake
    reqs = [erasure.stored_request(layout, src.name, s) or erasure.new_request(src.name, s) for s in subjects]
    if publish:
        erasure.publish(settings, reqs)
    for r in reqs:
        if erasure.stored_request(layout, src.name, r.subject) is None:
            erasure.write_request(layout, r)
    fault("recorded")
    # 2. rewrite master and rejected files (every request of the source not rewritten yet: a crash resumes here)
    with compaction_lock(layout):
        report.recovered = recover_erasures(layout)
        todo = [r for r in erasure.read_requests(layout, src.name)
                if r.master_rewritten_at is None or r.subject in subjects]
        gone = frozenset(r.subject for r in todo)
        ids = [r.id for r in todo]
        rewritten: list[str] = []
        per_subject: Counter[str] = Counter()
        for dataset, files in (("master", master_files(layout, src.name)),
                               ("rejected", rejected_files(layout, src.name))):
            for f in files:
                n = rewrite_file(layout, src, f, dataset, gone, ids, lock_timeout)
                if n:
                    rewritten.append(layout.key(f.path))
                    per_subject.update(n)
                    if dataset == "master":
                        report.master_rows += n.total()
                    else:
                        report.rejected_messages += n.total()
        report.files_rewritten = rewritten
        # 3. master rewritten
        now = utc_now_iso()
        done = []
        for r in todo:
            r = erasure.stored_request(layout, src.name, r.subject) or r
            r.master_rewritten_at = now
            r.files_rewritten = sorted(set(r.files_rewritten) | set(rewritten))
            r.messages_erased += per_subject[r.subject]
            r.stage = erasure.MASTER_REWRITTEN
            erasure.write_request(layout, r)
            done.append(r)
    report.requests = [r for r in done if r.subject in subjects]
    if publish:
        try:
            erasure.publish(settings, done)
        except Exception as exc:  # noqa: BLE001 - the lake is the record of the stage; the topic catches up next time
            log.warning("could not publish the new stage to %s: %s", erasure.ERASURES_TOPIC, exc)
        try:
            report.retention = erasure.retention(settings, [src.topic, src.dlq_topic])
        except Exception as exc:  # noqa: BLE001 - informative only
            report.retention_error = f"{type(exc).__name__}: {exc}"
    return report

