"""The incremental-vs-full policy: whether a run may build on the published version (:func:`incremental_base`) —
the settings that force a full recompute and what a version must keep for the next run to merge with it (its
event-id index, taken with the same forgotten subjects: :func:`erased_digest`)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from batch.inputs import Inputs
from lambdalake import contracts
from lambdalake.config import env_float
from lambdalake.contracts import BatchManifest
from lambdalake.erasure import erased_subjects
from lambdalake.layout import Layout
from lambdalake.pipeline import Pipeline

FULL_ENV = "LAMBDALAKE_BATCH_FULL"  # =1: the spark-submit entry point recomputes in full (the DAG's "full" param)
FULL_EVERY_ENV = "LAMBDALAKE_BATCH_FULL_EVERY"  # hours; the age of the last full recompute that forces the next one
DEFAULT_FULL_EVERY_H = 24.0
IDS_DIR = "_ids"  # <version>/_ids/<source>/<segment>/*.parquet: the version's event-id index (IdIndex)


def full_every_hours() -> float:
    """``LAMBDALAKE_BATCH_FULL_EVERY`` (hours, default 24; 0: never by age)."""
    return env_float(FULL_EVERY_ENV, DEFAULT_FULL_EVERY_H, minimum=0.0)


def erased_digest(layout: Layout, source: str) -> str:
    """A digest of the subjects of ``source`` forgotten so far (what a version skipped; "" when none)."""
    gone = sorted(erased_subjects(layout, source))
    return hashlib.sha256("\n".join(gone).encode()).hexdigest()[:16] if gone else ""


def incremental_base(layout: Layout, pipeline: Pipeline, published: BatchManifest | None, inputs: Inputs, block: int,
                     *, full: bool = False, full_every_h: float | None = None,
                     now: datetime | None = None) -> tuple[BatchManifest | None, str]:
    """Whether a run may build on the published version: (that version or None for a full recompute, why).

    Incremental only when every one of these holds (docs/operations.md, "Batch runs: incremental or full"): a version is
    published, of this pipeline and handoff block, with every declared view at the declared definition and an
    event-id index of every source with views (:class:`lambdalake.contracts.IdIndex`) taken with the same forgotten
    subjects as now; every master and rejected file it read is still a valid file with the same range, size and
    sha256 (a compaction or a ``forget`` rewrote none); and its full recompute is younger than ``full_every_h``
    hours. ``full`` (``--full``) forces a full recompute."""
    if full:
        return None, "full recompute requested (--full)"
    if published is None:
        return None, "nothing is published yet"
    v = published.version
    if published.pipeline != pipeline.name or published.block != block:
        return None, f"{v} is of pipeline {published.pipeline!r} block {published.block}"
    for view in pipeline.views:
        if published.fingerprint_of(view.name) != pipeline.fingerprint(view):
            return None, f"view {view.name!r} is new or its definition changed since {v}"
    for src in pipeline.sources:
        if not pipeline.views_of(src):
            continue
        idx = published.id_index.get(src.name)
        if idx is None:
            return None, f"{v} keeps no event-id index of source {src.name!r} (written before incremental runs)"
        if idx.rows != published.events.get(src.name):
            return None, f"{v}: the event-id index of {src.name!r} holds {idx.rows} ids, not its event count"
        if idx.erased != erased_digest(layout, src.name):
            return None, f"subjects of source {src.name!r} were forgotten since {v}"
        now_files = {f.path: f for f in [*inputs.files_of(src), *inputs.rejected_files] if f.source == src.name}
        for f in [*published.inputs, *published.rejected_inputs]:
            if f.source == src.name and now_files.get(f.path) != f:
                return None, f"{f.path} (read by {v}) was rewritten or removed since (compaction or forget)"
    behind = [tp for tp, w in published.watermark.items() if inputs.watermark.at(*tp) < w]
    if behind:
        return None, f"the master dataset is behind {v}'s watermark in {behind[0][0]}[{behind[0][1]}]"
    every = full_every_hours() if full_every_h is None else full_every_h
    last_full = contracts.parse_utc(published.full_at)
    if last_full is None:
        return None, f"{v} records no full recompute"
    age_h = ((now or datetime.now(UTC)) - last_full).total_seconds() / 3600
    if every and age_h >= every:
        return None, f"the last full recompute ({published.full_at}) is {age_h:.1f} h old (every {every:g} h: " \
                     f"{FULL_EVERY_ENV})"
    return published, f"merged {v} with the events archived since"
