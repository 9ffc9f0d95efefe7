"""Catching the master dataset up to the log (the ``archive`` step of the ``lambdalake_batch`` DAG).

:func:`archive` makes sure the master dataset has caught up to the end offsets the log had when it started: it runs
the archiver until caught up or, if an archiver daemon already owns the lake, waits for it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from batch.exceptions import ArchiverBehind, ArchiverLocked
from batch.plan import archived_ends
from lambdalake.config import Settings
from lambdalake.contracts import Positions
from lambdalake.layout import Layout
from lambdalake.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass
class ArchiveResult:
    """What :func:`archive` did: ``ran`` (the archiver ran here) or ``waited`` (a daemon owns the lake)."""

    mode: str
    targets: Positions  # the end offsets the master dataset had to reach
    archived: Positions  # archived ends afterwards
    messages: int = 0
    files: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "targets": self.targets.nested(), "archived": self.archived.nested(),
                "messages": self.messages, "files": self.files, "seconds": self.seconds}


def archive(settings: Settings, pipeline: Pipeline, *, wait_timeout: float = 900.0,
            poll_interval: float = 2.0) -> ArchiveResult:
    """Bring the master dataset up to the log's end offsets as of now (idempotent: a caught-up lake is a no-op).

    Runs the archiver until caught up. If another archiver (a daemon) holds the lake's archiver lock, waits until
    it has archived up to those end offsets instead, raising :class:`ArchiverBehind` after ``wait_timeout``.
    """
    from batch.archiver import ingest
    from lambdalake.clients import end_offsets

    t0 = time.monotonic()
    layout = Layout.of(settings.home, settings.lake)
    try:
        report = ingest(settings, pipeline, until_caught_up=True, handle_signals=False)
    except ArchiverLocked as exc:
        log.info("%s; waiting for it to catch up instead", exc)
        targets = Positions(end_offsets(settings, [s.topic for s in pipeline.sources]))
        deadline = time.monotonic() + wait_timeout
        while True:
            archived = archived_ends(layout, pipeline)
            behind = {tp: end for tp, end in targets.items() if archived.at(*tp) < end}
            if not behind:
                return ArchiveResult("waited", targets, archived, seconds=time.monotonic() - t0)
            if time.monotonic() >= deadline:
                (t, p), end = next(iter(behind.items()))
                raise ArchiverBehind(
                    f"the running archiver did not reach the log's end offsets within {wait_timeout:.0f}s "
                    f"({len(behind)} partitions behind, e.g. {t}[{p}] archived {archived.at(t, p)} < {end}); "
                    "is it stuck? see `lambdalake status`") from None
            time.sleep(poll_interval)
    targets = Positions({(pipeline.source(name).topic, p): end for name, parts in report.positions.items()
                         for p, end in parts.items()})
    return ArchiveResult("ran", targets, archived_ends(layout, pipeline), messages=report.messages,
                         files=report.files, seconds=time.monotonic() - t0)
