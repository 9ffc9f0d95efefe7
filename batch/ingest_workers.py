"""The archiver scaled out by partition: ``lambdalake ingest --workers N`` as N worker processes, one report.

Every step of the roll protocol is per partition (:mod:`batch.archiver`), so N processes with shares
``0/N .. N-1/N`` (:mod:`lambdalake.ownership`) archive disjoint partitions side by side.
"""

from __future__ import annotations

import sys
import time

from batch.archiver import ArchiveReport, ingest
from batch.partition_buffer import RollPolicy
from lambdalake.config import Settings
from lambdalake.ownership import Share
from lambdalake.pipeline import Pipeline


def ingest_workers(settings: Settings, pipeline: Pipeline, workers: int, *, until_caught_up: bool = False,
                   policy: RollPolicy | None = None) -> ArchiveReport:
    """Run ``workers`` archiver processes with shares ``0/N .. N-1/N`` until they all return; one report.

    SIGTERM/SIGINT to this process are passed on to the workers, which finish their files and exit. If a worker
    fails, the others are stopped too and the first error is raised; a worker that dies (kill -9, out of memory) is
    started again (:class:`lambdalake.procs.Restarts`) and resumes from what the lake holds.
    """
    from lambdalake.procs import Restarts, run_workers

    t0 = time.monotonic()
    reports = run_workers(_ingest_share, [(settings, pipeline, share, until_caught_up, policy)
                                          for share in Share.split(workers)], restarts=Restarts(),
                          notify=lambda msg: print(f"ingest: {msg}", file=sys.stderr, flush=True))
    return merge_reports(reports, time.monotonic() - t0)


def _ingest_share(settings: Settings, pipeline: Pipeline, share: Share, until_caught_up: bool,
                  policy: RollPolicy | None) -> ArchiveReport:
    return ingest(settings, pipeline, until_caught_up=until_caught_up, policy=policy, handle_signals=True,
                  share=share)


def merge_reports(reports: list[ArchiveReport], seconds: float) -> ArchiveReport:
    """The workers' reports as one (their partitions are disjoint)."""
    out = ArchiveReport(seconds=seconds)
    for r in reports:
        for name in ("messages", "valid", "invalid", "dead_lettered", "dlq_skipped", "files", "bytes"):
            setattr(out, name, getattr(out, name) + getattr(r, name))
        for src, parts in r.positions.items():
            out.positions.setdefault(src, {}).update(parts)
        out.warnings.extend(r.warnings)
    return out
