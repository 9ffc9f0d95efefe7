"""Steps 2-4 of the run protocol (:mod:`batch.job`) for the selected views, per source: read, validate and
deduplicate the events, aggregate (or merge with the published rows), write to staging and check — a full run from
all master below ``W`` (:func:`_compute_source`) or an incremental one from the published version
(:func:`_compute_source_incremental`) — with the event-id index each version keeps."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from batch.carry_over import _carry_over, copy_dir
from batch.incremental import IDS_DIR, erased_digest
from batch.inputs import Inputs
from batch.rejected import write_revalidated
from batch.spark_dedup import deduplicated_events, first_occurrences, valid_events, view_columns_needed
from batch.spark_types import _index_schema, _view_schema
from batch.spark_views import merged_rows, view_frame, write_for_lookups
from batch.staged_checks import check_staged
from lambdalake.config import env_int
from lambdalake.contracts import BatchManifest, BatchView, IdIndex
from lambdalake.erasure import erased_subjects
from lambdalake.fields import Source
from lambdalake.layout import Layout
from lambdalake.pipeline import Pipeline, View
from lambdalake.schema import OFFSET_COL, PARTITION_COL
from lambdalake.storage.files import data_files

log = logging.getLogger(__name__)


@dataclass
class _Computed:
    """What steps 2-4 produced for the computed views and their sources."""

    row_counts: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    meta: dict[str, BatchView] = field(default_factory=dict)
    revalidated: dict[str, int] = field(default_factory=dict)
    index: dict[str, IdIndex] = field(default_factory=dict)


def _compute(spark, layout: Layout, pipeline: Pipeline, inputs: Inputs, selected: list[View],
             staging: str, base: BatchManifest | None = None) -> _Computed:
    """Steps 2-4 for the selected views, from all master below W or, with ``base``, incrementally from that
    version (:func:`_compute_source_incremental`). ``staging``: the key prefix of the staged version (in the lake:
    Spark's executors write there, wherever they run)."""
    done = _Computed()
    scratch = f"{staging}/_revalidated"  # removed before publishing: never part of a version
    try:
        for src in pipeline.sources:
            src_views = [v for v in selected if v.source == src.name]
            if not src_views:
                continue
            if base is None:
                _compute_source(spark, layout, pipeline, inputs, src, src_views, staging, scratch, done)
            else:
                _compute_source_incremental(spark, layout, pipeline, inputs, src, src_views, staging, scratch,
                                            base, done)
    finally:
        data_files(layout.store).delete_prefix(scratch)
    return done


# A full run joins the rows with the first offsets of the ids seen more than once, broadcast, when there are at most
# this many such ids (a few bytes each); beyond it, the dedup shuffles the rows (first_occurrences).
BROADCAST_DUPLICATES_ENV = "LAMBDALAKE_BATCH_BROADCAST_DUPLICATES"
DEFAULT_BROADCAST_DUPLICATES = 2_000_000


def _compute_source(spark, layout: Layout, pipeline: Pipeline, inputs: Inputs, src: Source, src_views: list[View],
                    staging: str, scratch: str, done: _Computed) -> None:
    """Steps 2-4 of a full run for one source. The dedup never shuffles the rows: one hash aggregate of the
    narrow (partition, event id, offset) of the valid rows below W gives, per id, its first offset and how often
    it occurs (cached: it is the event count, the id index and the duplicates at once); the rows are then joined
    with the first offsets of the ids seen more than once (broadcast; few) and a row of such an id is kept only at
    its first offset — the rule of :func:`batch.spark_dedup.first_occurrences`, which takes over when duplicates are
    too many to broadcast (:data:`BROADCAST_DUPLICATES_ENV`). Each view then aggregates those rows with a map-side
    partial aggregate (only its small groups are shuffled), the events cached for the next when the source has
    several."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    # 2. read below W + validate + dedup; rejected messages valid under the declared rules join the master rows
    # (batch.rejected)
    t0 = time.monotonic()
    extra = None
    if inputs.rejudged.get(src.name):
        extra, done.revalidated[src.name] = write_revalidated(layout, src, inputs.rejudged[src.name],
                                                              inputs.watermark.of_topic(src.topic), scratch,
                                                              skip=erased_subjects(layout, src.name))
        log.info("source %s: %d rejected messages valid under the declared rules", src.name,
                 done.revalidated[src.name])
    columns = view_columns_needed(pipeline, src)
    rows = valid_events(spark, layout, src, inputs, columns,
                        None if extra is None else data_files(layout.store).uri(extra))
    key = [PARTITION_COL, src.event_id]  # never null in a valid row (a required, non-nullable field): an equi-join
    ev = None
    ids = (rows.select(*key, OFFSET_COL).groupBy(*key)
           .agg(F.min(OFFSET_COL).alias("_first"), F.count(F.lit(1)).alias("_n"))
           .persist(StorageLevel.MEMORY_AND_DISK))
    try:
        stats = ids.agg(F.count(F.lit(1)).alias("ids"), F.count(F.when(F.col("_n") > 1, 1)).alias("dup")).first()
        done.events[src.name] = n = int(stats["ids"])
        repeated = int(stats["dup"])
        log.info("source %s: %d deduplicated events below W (%d ids repeated) in %.2fs", src.name, n, repeated,
                 time.monotonic() - t0)
        _write_index_segment(ids, src, staging, [], n, layout, done)
        if not repeated:
            ev = rows
        elif repeated <= env_int(BROADCAST_DUPLICATES_ENV, DEFAULT_BROADCAST_DUPLICATES, minimum=0):
            first = F.broadcast(ids.where(F.col("_n") > 1).select(*key, "_first"))
            ev = (rows.join(first, key, "left")
                  .where(F.col("_first").isNull() | (F.col(OFFSET_COL) == F.col("_first"))).select(*columns))
        else:
            ev = first_occurrences(rows, src, columns)
        if len(src_views) > 1:  # the first view's scan caches the events the others read
            ev = ev.persist(StorageLevel.MEMORY_AND_DISK)
        for view in src_views:
            _write_view(layout, pipeline, view_frame(ev, src, view), src, view, staging, n, done)
    finally:
        if ev is not None:
            ev.unpersist()
        ids.unpersist()


def _compute_source_incremental(spark, layout: Layout, pipeline: Pipeline, inputs: Inputs, src: Source,
                                src_views: list[View], staging: str, scratch: str, base: BatchManifest,
                                done: _Computed) -> None:
    """Steps 2-4 of an incremental run for one source: the new events are the valid rows at offsets
    ``[base W[p], W[p])`` (first occurrence among them) whose (partition, event id) is not in ``base``'s id index
    (an id counted before keeps its first occurrence there: the same rule as a full recompute); each view's
    rows are ``base``'s rows merged with the new events' rows (:func:`batch.spark_views.merged_rows`); the index gains
    a segment of the new ids."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    lake = data_files(layout.store)
    since = base.watermark.of_topic(src.topic)
    prev_index = base.id_index[src.name]
    prev_events = base.events.get(src.name, 0)
    t0 = time.monotonic()
    extra, n_extra = None, 0
    rejudged = [f for f in inputs.rejudged.get(src.name, []) if f.end > since.get(f.partition, 0)]
    if rejudged:
        extra, _ = write_revalidated(layout, src, rejudged, inputs.watermark.of_topic(src.topic), scratch,
                                     skip=erased_subjects(layout, src.name))
        if extra is not None:
            pos = lake.read_table(extra, columns=[PARTITION_COL, OFFSET_COL]).to_pydict()
            n_extra = sum(o >= since.get(p, 0) for p, o in zip(pos[PARTITION_COL], pos[OFFSET_COL], strict=True))
    done.revalidated[src.name] = base.revalidated.get(src.name, 0) + n_extra
    key = [PARTITION_COL, src.event_id]
    base_dir = layout.key(layout.batch_version(str(base.version)))
    if all(w <= since.get(p, 0) for p, w in inputs.watermark.of_topic(src.topic).items()):
        fresh = new = None  # nothing archived since: the published views and index as they are
    else:
        fresh = deduplicated_events(spark, layout, src, inputs, view_columns_needed(pipeline, src),
                                    None if extra is None else lake.uri(extra),
                                    since=since).persist(StorageLevel.MEMORY_AND_DISK)
        # ids counted before: the index rows matching a new id (the new ids broadcast: the index is scanned once,
        # never shuffled), then the new rows without them
        id_files = [lake.uri(f"{base_dir}/{IDS_DIR}/{src.name}/{s}/{f}") for s in prev_index.segments
                    for f in lake.names(f"{base_dir}/{IDS_DIR}/{src.name}/{s}")]
        ids = (spark.read.schema(_index_schema(src)).parquet(*id_files) if id_files
               else spark.createDataFrame([], _index_schema(src)))
        seen = ids.join(F.broadcast(fresh.select(*key)), key, "left_semi")
        new = fresh.join(seen, key, "left_anti").persist(StorageLevel.MEMORY_AND_DISK)
    try:
        n_new = 0 if new is None else new.count()
        total = prev_events + n_new
        done.events[src.name] = total
        log.info("source %s: %d new deduplicated events in [%s, W) in %.2fs (%d before)", src.name, n_new,
                 since, time.monotonic() - t0, prev_events)
        _write_index_segment(new, src, staging, prev_index.segments, total, layout, done,
                             carry_from=base_dir, write=n_new > 0)
        for view in src_views:
            files = [lake.uri(f"{base_dir}/{view.name}/{f}") for f in base.views[view.name].files]
            if not n_new:
                frame = None
            elif files:
                increment = view_frame(new, src, view)
                frame = merged_rows(spark.read.schema(_view_schema(src, view)).parquet(*files), increment, src,
                                    view)
            else:
                frame = view_frame(new, src, view)
            if frame is None:  # nothing new: the published rows as they are
                _carry_over(layout, str(base.version), view.name, staging)
                _checked(layout, pipeline, view, f"{staging}/{view.name}", total, done, t0=time.monotonic())
            else:
                _write_view(layout, pipeline, frame, src, view, staging, total, done)
    finally:
        for df in (new, fresh):
            if df is not None:
                df.unpersist()


def _write_index_segment(events, src: Source, staging: str, carried: list[str], total: int, layout: Layout,
                         done: _Computed, carry_from: str | None = None, write: bool = True) -> None:
    """The source's id index in the staged version: ``carried`` segments carried over (hard links, or server-side
    copies) from the version prefix ``carry_from``, plus one segment of the (partition, event id) of ``events``
    (unless ``write`` is false)."""
    lake = data_files(layout.store)
    base = f"{staging}/{IDS_DIR}/{src.name}"
    segments = list(carried)
    for s in carried:
        copy_dir(lake, f"{carry_from}/{IDS_DIR}/{src.name}/{s}", f"{base}/{s}")
    if write:
        name = f"s{len(carried):06d}"
        t0 = time.monotonic()
        events.select(PARTITION_COL, src.event_id).write.mode("errorifexists").parquet(lake.uri(f"{base}/{name}"))
        lake.remove_junk(f"{base}/{name}")
        segments.append(name)
        log.info("source %s: id index segment %s written in %.2fs", src.name, name, time.monotonic() - t0)
    done.index[src.name] = IdIndex(segments, total, erased_digest(layout, src.name))


def _write_view(layout: Layout, pipeline: Pipeline, frame, src: Source, view: View, staging: str, events: int,
                done: _Computed) -> None:
    # 3. aggregate (+ merge) + write to staging
    t0 = time.monotonic()
    lake, vdir = data_files(layout.store), f"{staging}/{view.name}"
    write_for_lookups(frame, view, lake.uri(vdir))
    log.info("view %s computed and written in %.2fs", view.name, time.monotonic() - t0)
    lake.remove_junk(vdir)
    _checked(layout, pipeline, view, vdir, events, done, time.monotonic())


def _checked(layout: Layout, pipeline: Pipeline, view: View, vdir: str, events: int, done: _Computed,
             t0: float) -> None:
    # 4. validate before anything can be published
    lake = data_files(layout.store)
    names = lake.names(vdir)
    done.row_counts[view.name] = check_staged(pipeline, view, {n: lake.parquet(f"{vdir}/{n}") for n in names},
                                              events)
    log.info("view %s validated in %.2fs", view.name, time.monotonic() - t0)
    done.meta[view.name] = BatchView(pipeline.fingerprint(view), files=names)
