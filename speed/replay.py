"""``lambdalake replay``: Kappa-style recomputation — views rebuilt from the log alone with the speed interpreter.

No master dataset, no Spark: every partition is read from Kafka from its first offset up to the *aligned end* of the
log (``W[p]`` = the end offset rounded down to the handoff block, so the speed layer can hand off to the result
exactly as to a Spark version), validated, deduplicated over the whole replay (exact, like the batch job: the dedup
window spans the log) and aggregated by the same declaration interpreter the speed layer runs
(:class:`speed.rebuild.Rebuild`). Rows per ``(partition, block)`` are then merged into the batch layout and published
as a batch version through :func:`lambdalake.versions.publish`
(manifest ``engine`` = ``kappa-replay (speed interpreter)``,
per-view definition fingerprints), so serving, the speed handoff and ``lambdalake status`` treat it like any other
version — and Lambda recompute and Kappa replay can be compared on the same change.

``--view NAME`` replays only the named views, at the published version's watermark (a version holds every view at
one watermark); the other views are carried over from the published version when their definition is unchanged and
replayed too otherwise.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from lambdalake import contracts, sketches
from lambdalake.config import Settings, fix_handoff_block
from lambdalake.contracts import BatchManifest, BatchView, Positions
from lambdalake.exceptions import PipelineError
from lambdalake.handoff import aligned_watermark
from lambdalake.layout import Layout, batch_prefix, current_batch_manifest, read_batch_pointer
from lambdalake.pipeline import WINDOW_START, Pipeline, View
from lambdalake.runtime import streaming_runtime
from lambdalake.schema import arrow_schema, view_columns
from lambdalake.storage.local import LocalStore
from speed.exceptions import SpeedError
from speed.rebuild import Rebuild

log = logging.getLogger(__name__)

ENGINE = "kappa-replay (speed interpreter)"
_MERGE = {"sum": "sum", "min": "min", "max": "max", "union": "list"}  # Aggregate.merge -> Arrow hash aggregate


class NothingToReplay(SpeedError):
    """The log holds no complete handoff block yet."""


def batch_table(pipeline: Pipeline, view: View, speed_rows: pa.Table) -> pa.Table:
    """Merge speed rows (one per partition, block, keys, window) into the batch layout: one row per (keys, window),
    stored aggregates merged by their kind (counts and sums add, min/max fold, nulls skipped, sketches union)."""
    schema = arrow_schema(view_columns(pipeline.source_of(view), view), nullability=False)
    group = [*view.keys, WINDOW_START]
    if speed_rows.num_rows == 0:
        return schema.empty_table()
    stored = view.stored_aggregates
    merged = speed_rows.group_by(group, use_threads=False).aggregate([(a.name, _MERGE[a.merge]) for a in stored])
    cols = [merged.column(k) for k in group] + [merged.column(f"{a.name}_{_MERGE[a.merge]}") for a in stored]
    for i, a in enumerate(stored, start=len(group)):
        if a.merge == "union":
            cols[i] = pa.array([sketches.union_bytes(parts) for parts in cols[i].to_pylist()], pa.binary())
    return pa.Table.from_arrays([c.cast(f.type) for c, f in zip(cols, schema, strict=True)], schema=schema)


def compute(settings: Settings, pipeline: Pipeline, views: list[View], watermark: Positions,
            notify: Callable[[str], None] | None = None) -> tuple[dict[str, pa.Table], dict[str, int]]:
    """The replay proper: the speed interpreter over offsets ``[0, W[p])`` of every partition, dedup over the whole
    range. Returns ({view: rows in the batch layout}, {source: deduplicated valid events})."""
    rb = Rebuild(settings, pipeline, views, settings.handoff_block, dedup_span=max(watermark.values(), default=0) + 1)
    live = dict(watermark)
    try:
        last = time.monotonic()
        while not rb.done(live):
            rb.step(live, {}, timeout_ms=500)
            if notify is not None and time.monotonic() - last >= 5:
                last = time.monotonic()
                notify(f"{rb.progress(live):.0%} replayed ({rb.messages:,} messages)")
    finally:
        rb.close()
    tables: dict[str, pa.Table] = {}
    events: dict[str, int] = {}
    for topic, st in rb.states.items():
        events[pipeline.source_for_topic(topic).name] = rb.counters[topic]["valid"]
        for name, table in st.view_tables().items():
            tables[name] = batch_table(pipeline, pipeline.view(name), table)
    return tables, events


def replay(settings: Settings, pipeline: Pipeline, views: list[str] | None = None, *, keep: int | None = None,
           notify: Callable[[str], None] | None = None) -> BatchManifest:
    """Rebuild ``views`` (default all) from the log and publish them as a batch version; returns its manifest."""
    from lambdalake.clients import end_offsets
    from lambdalake.versions import DEFAULT_KEEP, new_staging_dir, publish

    if not pipeline.views:
        raise PipelineError(f"pipeline {pipeline.name!r} declares no views; nothing to replay")
    layout = Layout.of(settings.home, settings.lake)
    block = settings.handoff_block
    started, t0 = contracts.utc_now_iso(), time.monotonic()
    selected = [pipeline.view(v) for v in views] if views else list(pipeline.views)
    published = current_batch_manifest(layout)
    carried: list[View] = []
    if views and published is not None:
        watermark = published.watermark  # one version = every view at one watermark
        for v in pipeline.views:
            if v in selected:
                continue
            if v.name in published.views and published.definition_matches(
                    v.name, pipeline.fingerprint(v), pipeline.legacy_fingerprint(v)):
                carried.append(v)
            else:
                selected.append(v)
    else:
        selected = list(pipeline.views)
        ends = end_offsets(settings, [s.topic for s in pipeline.sources])
        watermark = Positions({tp: aligned_watermark(e, block) for tp, e in ends.items()})
    if not any(watermark.values()):
        raise NothingToReplay(f"the log holds no complete block of {block} offsets yet; produce more events or "
                              "lower LAMBDALAKE_HANDOFF_BLOCK for a new lake")
    fix_handoff_block(settings.home, block, settings.lake)

    with streaming_runtime():
        tables, events = compute(settings, pipeline, selected, watermark, notify)
    staging = new_staging_dir(layout)
    ok = False
    try:
        view_meta: dict[str, BatchView] = {}
        row_counts: dict[str, int] = {}
        for name, out in tables.items():
            vdir = staging / name
            vdir.mkdir()
            pq.write_table(out, vdir / "part-00000.parquet", compression="zstd")
            row_counts[name] = out.num_rows
            view_meta[name] = BatchView(pipeline.fingerprint(name), files=["part-00000.parquet"])
        for v in carried:
            (staging / v.name).mkdir()
            if isinstance(layout.store, LocalStore):
                for f in (layout.batch_version(published.version) / v.name).glob("*.parquet"):
                    try:
                        os.link(f, staging / v.name / f.name)
                    except OSError:
                        shutil.copy2(f, staging / v.name / f.name)
            else:  # on object storage: the published files, fetched into the local staging directory
                prefix = f"{batch_prefix(read_batch_pointer(layout), published.version)}/{v.name}/"
                for key in layout.store.list(prefix):
                    if key.endswith(".parquet") and "/" not in key[len(prefix):]:
                        (staging / v.name / key.rsplit("/", 1)[1]).write_bytes(layout.store.get(key))
            row_counts[v.name] = published.row_counts.get(v.name, 0)
            old = published.views[v.name]  # (a first-release version matched by its legacy fingerprint: record ours)
            view_meta[v.name] = BatchView(pipeline.fingerprint(v), files=list(old.files),
                                          computed_in=old.computed_in or published.version)
        manifest = BatchManifest(
            pipeline=pipeline.name, watermark=watermark, block=block,
            row_counts={v.name: row_counts[v.name] for v in pipeline.views}, events=events,
            views={v.name: view_meta[v.name] for v in pipeline.views}, engine=ENGINE,
            code_version=_code_version(), started_at=started, finished_at=contracts.utc_now_iso(),
            duration_s=round(time.monotonic() - t0, 3), format=contracts.MANIFEST_FORMAT)
        manifest = publish(layout, staging, manifest, keep=DEFAULT_KEEP if keep is None else keep)
        ok = True
        return manifest
    finally:
        if not ok:
            shutil.rmtree(staging, ignore_errors=True)


def _code_version() -> str:
    import lambdalake

    return f"lambdalake {lambdalake.__version__}"
