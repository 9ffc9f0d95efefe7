"""Planning a batch run: bring the master dataset up to the log, then decide whether a new version is needed.

Used by the ``lambdalake_batch`` Airflow DAG (steps ``archive`` and ``plan``) and usable from anywhere else:

- :func:`archive` — make sure the master dataset has caught up to the end offsets the log had when it started: run
  the archiver until caught up or, if an archiver daemon already owns the lake, wait for it.
- :func:`plan_batch` — compare what the batch job would compute now with what is published. A new version is
  needed (``action == "batch"``) when nothing is published, the published version is of another pipeline or handoff
  block, the watermark the job would choose (archived ends aligned to the handoff block) is ahead of the published
  one, or the published version lacks a declared view or recorded another *definition* of it
  (:meth:`lambdalake.contracts.BatchManifest.definition_matches`; first-release versions match by the legacy
  fingerprint). Else ``none``: nothing new means no new version, so an idle hourly DAG does not churn versions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from batch.compact import master_readers_lock
from batch.exceptions import ArchiverBehind, ArchiverLocked
from lambdalake.config import Settings
from lambdalake.contracts import Positions
from lambdalake.handoff import aligned_watermark
from lambdalake.layout import Layout, current_batch_manifest
from lambdalake.pipeline import Pipeline

log = logging.getLogger(__name__)


def archived_ends(layout: Layout, pipeline: Pipeline) -> Positions:
    """The archived end of every partition of the pipeline's sources (read under the master readers lock)."""
    out: dict[tuple[str, int], int] = {}
    with master_readers_lock(layout):
        for src in pipeline.sources:
            for f in layout.master_files(src.name):  # sorted by (partition, start): the last one ends the range
                out[(src.topic, f.partition)] = f.end
    return Positions(out)


# --- archive ---------------------------------------------------------------------------------------------------------
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
    layout = Layout(settings.home)
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


# --- plan ------------------------------------------------------------------------------------------------------------
@dataclass
class BatchPlan:
    """What a batch run has to do, and why: ``action`` is ``batch`` (compute and publish a new version) or ``none``.

    ``changed_views``: declared views the published version lacks or computed with another definition.
    """

    action: str
    reason: str
    published_version: str | None
    published_watermark: Positions
    next_watermark: Positions
    changed_views: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "reason": self.reason, "published_version": self.published_version,
                "published_watermark": self.published_watermark.nested(),
                "next_watermark": self.next_watermark.nested(), "changed_views": list(self.changed_views)}


def changed_views(manifest, pipeline: Pipeline) -> list[str]:
    """Declared views the published version ``manifest`` lacks or computed with another definition."""
    return [v.name for v in pipeline.views
            if not manifest.definition_matches(v.name, pipeline.fingerprint(v), pipeline.legacy_fingerprint(v))]


def plan_batch(settings: Settings, pipeline: Pipeline, *, force: bool = False) -> BatchPlan:
    """Compare what the batch job would compute now with what is published (see the module docstring)."""
    layout = Layout(settings.home)
    block = settings.handoff_block
    manifest = current_batch_manifest(layout)
    published = Positions() if manifest is None else manifest.watermark
    version = None if manifest is None else manifest.version
    nxt = Positions({tp: aligned_watermark(end, block) for tp, end in archived_ends(layout, pipeline).items()})
    changed = [] if manifest is None else changed_views(manifest, pipeline)

    def plan(action: str, reason: str) -> BatchPlan:
        return BatchPlan(action, reason, version, published, nxt, changed)

    if not any(nxt.values()):
        return plan("none", f"the master dataset holds no complete block of {block} offsets yet")
    if force:
        return plan("batch", "forced")
    if manifest is None:
        return plan("batch", "nothing is published yet")
    if manifest.pipeline != pipeline.name:
        return plan("batch", f"the published version is of pipeline {manifest.pipeline!r}, not {pipeline.name!r}")
    if manifest.block != block:
        return plan("batch", f"the published version was cut at handoff block {manifest.block}, now {block}")
    if changed:
        return plan("batch", "recompute: the published version lacks or has another definition of view(s) "
                             + ", ".join(changed))
    ahead = sorted(tp for tp, w in nxt.items() if w > published.at(*tp))
    if ahead:
        (t, p) = ahead[0]
        return plan("batch", f"the watermark advances in {len(ahead)} partitions (e.g. {t}[{p}] "
                             f"{published.at(t, p)} -> {nxt[(t, p)]})")
    return plan("none", f"published version {version} already covers the archived data")
