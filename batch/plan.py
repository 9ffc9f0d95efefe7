"""Planning a batch run: decide whether a new version is needed (the ``plan`` step of the ``lambdalake_batch``
DAG; the ``archive`` step before it is :mod:`batch.catch_up`).

- :func:`plan_batch` — compare what the batch job would compute now with what is published. A new version is
  needed (``action == "batch"``) when nothing is published, the published version is of another pipeline or handoff
  block, the watermark the job would choose (archived ends aligned to the handoff block) is ahead of the published
  one, or the published version lacks a declared view or recorded another *definition* of it
  (:meth:`lambdalake.contracts.BatchManifest.definition_matches`; first-release versions match by the legacy
  fingerprint). Else ``none``: nothing new means no new version, so an idle hourly DAG does not churn versions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from batch.rewrite import master_readers_lock
from lambdalake.config import Settings
from lambdalake.contracts import Positions
from lambdalake.handoff import aligned_watermark
from lambdalake.heads import master_files
from lambdalake.layout import Layout, current_batch_manifest
from lambdalake.pipeline import Pipeline

log = logging.getLogger(__name__)


def archived_ends(layout: Layout, pipeline: Pipeline) -> Positions:
    """The archived end of every partition of the pipeline's sources (read under the master readers lock)."""
    out: dict[tuple[str, int], int] = {}
    with master_readers_lock(layout):
        for src in pipeline.sources:
            for f in master_files(layout, src.name):  # sorted by (partition, start): the last one ends the range
                out[(src.topic, f.partition)] = f.end
    return Positions(out)


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
    layout = Layout.of(settings.home, settings.lake)
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
