"""The archiver scaled out by partition: ``lambdalake ingest --workers N`` as N worker processes, one report.

Every step of the roll protocol is per partition (:mod:`batch.archiver`), so N processes archive disjoint partitions
side by side: N members of the archivers' consumer group (a daemon), or N shares ``0/N .. N-1/N``
(:mod:`lambdalake.ownership`; ``--until-caught-up``).
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
                   policy: RollPolicy | None = None, group: bool = False) -> ArchiveReport:
    """Run ``workers`` archiver processes until they all return; one report. ``group``: each is a member of the
    archivers' consumer group (:mod:`batch.archiver`); else they own shares ``0/N .. N-1/N``.

    SIGTERM/SIGINT to this process are passed on to the workers, which finish their files and exit. If a worker
    fails, the others are stopped too and the first error is raised; a worker that dies (kill -9, out of memory) is
    started again (:class:`lambdalake.procs.Restarts`) and resumes from what the lake holds.
    """
    from lambdalake.procs import Restarts, run_workers

    t0 = time.monotonic()
    shares = [Share()] * workers if group else Share.split(workers)
    reports = run_workers(_ingest_share, [(settings, pipeline, share, until_caught_up, policy, group)
                                          for share in shares], restarts=Restarts(),
                          notify=lambda msg: print(f"ingest: {msg}", file=sys.stderr, flush=True))
    return merge_reports(reports, time.monotonic() - t0)


def _ingest_share(settings: Settings, pipeline: Pipeline, share: Share, until_caught_up: bool,
                  policy: RollPolicy | None, group: bool) -> ArchiveReport:
    return ingest(settings, pipeline, until_caught_up=until_caught_up, policy=policy, handle_signals=True,
                  share=share, group=group)


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
