"""The batch job: Spark recomputes every view of the pipeline from the master dataset and publishes a new version.

This is the Spark *interpreter* of the view declarations in :mod:`lambdalake.pipeline` — there is no per-view Spark
code: keys, bucket and the stored aggregates (``view.stored_aggregates``: count/sum -> int64, min/max keep the
field's type, including the hidden helpers a mean needs) are turned into one ``groupBy().agg()`` per view.

Run protocol (:func:`run_batch`), mirrored by numbered comments in the code:

1. Snapshot, under the shared master readers lock (compaction cannot swap files meanwhile): per source the master
   files (checked to tile without gap or overlap), the archived end per partition and the watermark
   ``W[p] = aligned_watermark(end, block)`` (:mod:`lambdalake.handoff`); the inputs are the files that start
   below ``W`` — recorded with size, rows and sha256.
2. Read the inputs, keep rows with ``_offset < W[_partition]`` and apply the dedup rule (:mod:`lambdalake.dedup`):
   the first valid occurrence of an event id per (source, partition), lowest offset wins. Restricting to ``< W``
   first is exact: an id's first occurrence below ``W`` is its first occurrence overall.
3. Per view: ``window_start`` = event time floored to the bucket (UTC), group by keys + window_start, aggregate;
   write ``<staging>/<view>/*.parquet``.
4. Validate the staged output (:func:`validate_staged`): schema as declared, no null in non-nullable keys, one row
   per (keys, window_start), and the count aggregate of each view sums to the deduplicated events of its source.
5. Publish (:func:`batch.publish.publish`): manifest, atomic rename of the staging directory, atomic ``CURRENT``
   switch, pruning. A failure anywhere before that removes the staging directory and changes nothing served.

``--view NAME`` recomputes only the named views, at the *published* watermark, and carries the other views over
from the published version (hard links) when their definition is unchanged, so a version still holds every view
at one watermark.

Also runnable with ``spark-submit batch/job.py --home DIR --pipeline SPEC [--view NAME] [--keep K]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if __package__ in (None, ""):  # run as a script (spark-submit batch/job.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch.compact import master_readers_lock, snapshot_files
from batch.exceptions import BatchValidationError, NothingToCompute
from batch.master import INGEST_COL, OFFSET_COL, PARTITION_COL, TS_TYPE, arrow_type, file_rows, sha256_file
from batch.publish import DEFAULT_KEEP, new_staging_dir, publish
from lambdalake.config import Settings, fix_handoff_block
from lambdalake.exceptions import PipelineError
from lambdalake.handoff import aligned_watermark
from lambdalake.layout import Layout, current_batch_manifest, watermark_of
from lambdalake.pipeline import WINDOW_START, Aggregate, Pipeline, Source, View

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BROADCAST_REPEATED_MAX = 2_000_000  # repeated event ids (with their first offset) small enough to broadcast
SESSION_CONF = {
    "spark.sql.session.timeZone": "UTC",  # window_start is a UTC instant; never the JVM's zone
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",  # not INT96: readable as timestamp[us, UTC]
}


# --- snapshot ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputFile:
    """One master file a version read (its lineage entry in the manifest)."""

    path: str  # relative to the lake home
    source: str
    partition: int
    start: int
    end: int
    bytes: int
    sha256: str
    rows: int


@dataclass(frozen=True)
class Snapshot:
    """The master files a run reads and the watermark it covers: ``{topic: {partition: W}}``."""

    watermark: dict[str, dict[int, int]]
    inputs: list[InputFile]
    archived: dict[str, dict[int, int]]  # topic -> partition -> archived end (W trails it by < block)

    def files_of(self, source: Source) -> list[InputFile]:
        return [f for f in self.inputs if f.source == source.name]


def take_snapshot(layout: Layout, pipeline: Pipeline, block: int,
                  fixed_watermark: dict[tuple[str, int], int] | None = None) -> Snapshot:
    """Step 1 of the run protocol. ``fixed_watermark`` reuses a published one (``--view``)."""
    if block < 1:
        raise PipelineError(f"handoff block {block} must be >= 1 (LAMBDALAKE_HANDOFF_BLOCK)")
    watermark: dict[str, dict[int, int]] = {}
    archived: dict[str, dict[int, int]] = {}
    inputs: list[InputFile] = []
    for src in pipeline.sources:
        files = snapshot_files(layout, src)
        ends: dict[int, int] = {}
        for f in files:
            ends[f.partition] = f.end
        archived[src.topic] = dict(sorted(ends.items()))
        if fixed_watermark is None:
            wm = {p: aligned_watermark(end, block) for p, end in ends.items()}
        else:
            wm = {p: w for (t, p), w in fixed_watermark.items() if t == src.topic}
            short = {p: w for p, w in wm.items() if ends.get(p, 0) < w}
            if short:
                raise BatchValidationError(f"master dataset of {src.name!r} no longer reaches the published "
                                           f"watermark {short} (archived ends {ends}); run a full batch")
        watermark[src.topic] = dict(sorted(wm.items()))
        for f in files:
            if f.start >= wm.get(f.partition, 0):
                continue
            st = f.path.stat()
            inputs.append(InputFile(str(f.path.relative_to(layout.home)), src.name, f.partition, f.start, f.end,
                                    st.st_size, sha256_file(f.path), file_rows(f.path)))
    return Snapshot(watermark, inputs, archived)


# --- Spark ---------------------------------------------------------------------------------------------------------
def spark_session(master: str | None = None, app_name: str = "lambdalake-batch"):
    """A SparkSession for ``master`` (``local[*]``, ``local-cluster[2,1,1024]``, ``spark://...``, ``yarn`` ...).

    Returns an existing active session if there is one (e.g. under ``spark-submit``).
    """
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    for k, v in SESSION_CONF.items():
        builder = builder.config(k, v)
    builder = builder.config("spark.ui.showConsoleProgress", "false")  # the CLI shows its own status
    builder = builder.config("spark.sql.shuffle.partitions",
                             os.environ.get("LAMBDALAKE_SPARK_SHUFFLE_PARTITIONS", "16"))
    if master and master.startswith("local-cluster"):
        # executors are separate JVMs started from pyspark's own jars
        import pyspark

        builder = builder.config("spark.home", os.environ.get("SPARK_HOME", str(Path(pyspark.__file__).parent)))
    return builder.getOrCreate()


def _spark_schema(source: Source):
    from pyspark.sql import types as T

    t = {"string": T.StringType(), "integer": T.LongType(), "timestamp": T.TimestampType()}
    fields = [T.StructField(f.name, t[f.type], True) for f in source.fields]
    fields += [T.StructField(PARTITION_COL, T.IntegerType(), True), T.StructField(OFFSET_COL, T.LongType(), True),
               T.StructField(INGEST_COL, T.TimestampType(), True)]
    return T.StructType(fields)


def deduplicated_events(spark, layout: Layout, source: Source, snapshot: Snapshot, columns: list[str]):
    """Step 2: valid events of ``source`` below the watermark, first occurrence per (partition, event id)."""
    from pyspark.sql import functions as F

    files = snapshot.files_of(source)
    wm = snapshot.watermark.get(source.topic, {})
    schema = _spark_schema(source)
    if not files:
        return spark.createDataFrame([], schema).select(*columns)
    df = spark.read.schema(schema).parquet(*[str(layout.home / f.path) for f in files])
    # W per partition as a literal map: rows of a file straddling W are cut at W
    wm_map = F.create_map(*[x for p, w in sorted(wm.items()) for x in (F.lit(p), F.lit(w).cast("long"))])
    df = df.where(F.col(OFFSET_COL) < wm_map[F.col(PARTITION_COL)]).select(*columns)
    # Duplicates are rare: find the ids seen more than once (a narrow aggregate that reads only ids and
    # offsets) and drop their later occurrences with a broadcast join, so full rows are never shuffled for dedup.
    # If the repeated ids are too many to broadcast, Spark picks a shuffle join; the result is the same.
    repeated = (df.groupBy(PARTITION_COL, source.event_id)
                .agg(F.min(OFFSET_COL).alias("_first"), F.count(F.lit(1)).alias("_n"))
                .where(F.col("_n") > 1).drop("_n"))
    repeated = repeated.localCheckpoint(eager=True)  # computed once, reused by the count and the join
    if repeated.count() <= BROADCAST_REPEATED_MAX:
        repeated = F.broadcast(repeated)
    return (df.join(repeated, [PARTITION_COL, source.event_id], "left")
            .where(F.col("_first").isNull() | (F.col(OFFSET_COL) == F.col("_first")))
            .select(*columns))


def _agg_expr(a: Aggregate):
    from pyspark.sql import functions as F

    if a.kind == "count":
        return F.count(F.lit(1)).cast("long").alias(a.name)
    if a.kind == "sum":
        return F.sum(F.col(a.column)).cast("long").alias(a.name)
    if a.kind == "min":
        return F.min(F.col(a.column)).alias(a.name)
    if a.kind == "max":
        return F.max(F.col(a.column)).alias(a.name)
    raise PipelineError(f"aggregate {a.name!r}: unknown kind {a.kind!r}")


def view_frame(events, source: Source, view: View):
    """Step 3: the stored columns of ``view`` (keys, window_start, stored aggregates) from deduplicated events."""
    from pyspark.sql import functions as F

    et_us = F.unix_micros(F.col(source.event_time))
    window_start = F.timestamp_micros(et_us - F.pmod(et_us, F.lit(view.bucket_us).cast("long")))
    stored = view.stored_aggregates
    return (events.groupBy(*[F.col(k) for k in view.keys], window_start.alias(WINDOW_START))
            .agg(*[_agg_expr(a) for a in stored])
            .select(*view.keys, WINDOW_START, *[a.name for a in stored]))


def view_columns_needed(pipeline: Pipeline, source: Source) -> list[str]:
    cols = [PARTITION_COL, source.event_id, OFFSET_COL, source.event_time]
    for v in pipeline.views_of(source):
        cols += list(v.keys) + [a.column for a in v.stored_aggregates if a.column]
    return list(dict.fromkeys(cols))


# --- validation ----------------------------------------------------------------------------------------------------
def expected_schema(pipeline: Pipeline, view: View) -> pa.Schema:
    """Arrow schema of a batch view as declared (the layout contract)."""
    fields = pipeline.source_of(view).field_map
    cols = [pa.field(k, arrow_type(fields[k])) for k in view.keys] + [pa.field(WINDOW_START, TS_TYPE)]
    for a in view.stored_aggregates:
        cols.append(pa.field(a.name, pa.int64() if a.kind in ("count", "sum") else arrow_type(fields[a.column])))
    return pa.schema(cols)


def validate_staged(pipeline: Pipeline, view: View, vdir: Path, events: int | None) -> int:
    """Step 4 for one view: schema, null keys, row counts (the count aggregate sums to the deduplicated events
    read; a non-empty input yields rows), and no duplicate (keys, window_start). Returns the row count."""
    files = sorted(vdir.glob("*.parquet"))
    want = expected_schema(pipeline, view)
    rows = 0
    nullable_keys = {f.name for f in pipeline.source_of(view).fields if not f.required or f.nullable}
    count_col = next((a.name for a in view.stored_aggregates if a.kind == "count"), None)
    counted = 0
    group_cols = [*view.keys, WINDOW_START]
    groups: list[pa.Table] = []
    for f in files:
        pf = pq.ParquetFile(f)
        got = pf.schema_arrow
        if [(x.name, x.type) for x in got] != [(x.name, x.type) for x in want]:
            raise BatchValidationError(f"view {view.name!r}: staged file {f.name} has schema "
                                       f"{[(x.name, str(x.type)) for x in got]}, declared "
                                       f"{[(x.name, str(x.type)) for x in want]}; nothing was published")
        rows += pf.metadata.num_rows
        strict_keys = [k for k in group_cols if k not in nullable_keys]
        table = pf.read(columns=group_cols + ([count_col] if count_col else []))
        groups.append(table.select(group_cols))
        for k in strict_keys:
            if table.column(k).null_count:
                raise BatchValidationError(f"view {view.name!r}: {table.column(k).null_count} null values in key "
                                           f"{k!r} ({f.name}); nothing was published")
        if count_col:
            counted += pc.sum(table.column(count_col)).as_py() or 0
    if groups and pa.concat_tables(groups).group_by(group_cols).aggregate([]).num_rows != rows:
        raise BatchValidationError(f"view {view.name!r}: some (keys, window_start) appear in more than one row; "
                                   "nothing was published")
    if events and not rows:
        raise BatchValidationError(f"view {view.name!r}: {events} events were read but no rows were written; "
                                   "nothing was published")
    if count_col and events is not None and counted != events:
        raise BatchValidationError(f"view {view.name!r}: counts sum to {counted} but {events} deduplicated events "
                                   "were read; nothing was published")
    return rows


# --- lineage ---------------------------------------------------------------------------------------------------
def code_version() -> str:
    """``lambdalake <version> (git <sha>[+dirty])`` of the code that computed the views."""
    import lambdalake

    ver = f"lambdalake {lambdalake.__version__}"
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "batch", "lambdalake"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ver
    return f"{ver} (git {sha}{'+dirty' if dirty else ''})" if sha else ver


def view_fingerprint(pipeline: Pipeline, view: View) -> str:
    """Hash of everything a view's rows depend on besides the data: its declaration and its source's."""
    src = pipeline.source_of(view)
    text = repr((view.name, view.keys, view.bucket_us, view.stored_aggregates, src.name, src.fields, src.event_id,
                 src.event_time))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# --- the run -------------------------------------------------------------------------------------------------------
def run_batch(settings: Settings, pipeline: Pipeline, spark: Any = None, views: list[str] | None = None, *,
              spark_master: str | None = None, keep: int | None = None) -> dict:
    """Compute and publish a new batch version (the run protocol in the module docstring). Returns its manifest.

    ``spark``: an existing SparkSession to use (it is left running); otherwise one is created for
    ``spark_master`` (default ``settings.spark_master``) and stopped at the end.
    ``views``: names to recompute at the published watermark (others carried over); None = all, new watermark.
    """
    layout = Layout(settings.home)
    keep = DEFAULT_KEEP if keep is None else keep
    selected = [pipeline.view(v) for v in views] if views else list(pipeline.views)
    if not pipeline.views:
        raise PipelineError(f"pipeline {pipeline.name!r} declares no views; nothing to compute")
    started, t0 = _now(), time.monotonic()

    published = current_batch_manifest(layout)
    fixed_wm = None
    carried: dict[str, dict] = {}
    if views and published is not None:
        # recompute the named views at the published watermark; carry over the others if unchanged
        fixed_wm = watermark_of(published)
        old_views = published.get("views", {})
        for v in pipeline.views:
            if v in selected:
                continue
            old = old_views.get(v.name)
            if old and old.get("fingerprint") == view_fingerprint(pipeline, v):
                carried[v.name] = old
            else:
                selected.append(v)
    elif views:
        selected = list(pipeline.views)  # nothing published yet: a version must hold every view

    own_spark = spark is None
    staging = new_staging_dir(layout)
    published_ok = False
    try:
        with master_readers_lock(layout):
            # 1. snapshot (before starting Spark: an empty lake fails fast)
            snap = take_snapshot(layout, pipeline, settings.handoff_block, fixed_wm)
            if not any(w for parts in snap.watermark.values() for w in parts.values()):
                raise NothingToCompute(
                    f"the master dataset holds no complete block of {settings.handoff_block} offsets yet "
                    f"(archived ends: {snap.archived}); run `lambdalake ingest` first or wait for more data")
            fix_handoff_block(settings.home, settings.handoff_block)  # fixed for the life of the lake from now on
            if own_spark:
                spark = spark_session(spark_master or settings.spark_master)
            saved = {k: spark.conf.get(k, None) for k in SESSION_CONF}
            for k, v in SESSION_CONF.items():
                spark.conf.set(k, v)
            try:
                # 2-4. read + dedup, aggregate, write, validate
                row_counts, events, view_meta = _compute(spark, layout, pipeline, snap, selected, staging)
            finally:
                for k, v in saved.items():
                    if v is None:
                        spark.conf.unset(k)
                    else:
                        spark.conf.set(k, v)
        engine, master = f"spark {spark.version}", spark.sparkContext.master
        for name, old in carried.items():
            _carry_over(layout, published["version"], name, staging)
            row_counts[name] = published["row_counts"][name]
            view_meta[name] = {**old}
        finished = _now()
        manifest = {
            "version": None,  # filled in by publish
            "pipeline": pipeline.name,
            "watermark": {t: {str(p): w for p, w in parts.items()} for t, parts in snap.watermark.items()},
            "block": settings.handoff_block,
            "archived": {t: {str(p): e for p, e in parts.items()} for t, parts in snap.archived.items()},
            "inputs": [asdict(f) for f in snap.inputs],
            "row_counts": {v.name: row_counts[v.name] for v in pipeline.views},
            "events": events,
            "views": {v.name: view_meta[v.name] for v in pipeline.views},
            "engine": engine,
            "spark_master": master,
            "code_version": code_version(),
            "started_at": started,
            "finished_at": finished,
            "duration_s": round(time.monotonic() - t0, 3),
        }
        # 5. publish (manifest, atomic dir rename, CURRENT switch, prune)
        manifest = publish(layout, staging, manifest, keep=keep)
        published_ok = True
        return manifest
    finally:
        if not published_ok:
            shutil.rmtree(staging, ignore_errors=True)
        if own_spark and spark is not None:
            spark.stop()


def _compute(spark, layout: Layout, pipeline: Pipeline, snap: Snapshot, selected: list[View],
             staging: Path) -> tuple[dict[str, int], dict[str, int], dict[str, dict]]:
    """Steps 2-4 for the selected views. Returns (row counts, deduplicated events per source, per-view meta)."""
    from pyspark import StorageLevel

    row_counts: dict[str, int] = {}
    events: dict[str, int] = {}
    meta: dict[str, dict] = {}
    for src in pipeline.sources:
        src_views = [v for v in selected if v.source == src.name]
        if not src_views:
            continue
        # 2. read below W + dedup (cached: every view of the source reads it)
        t0 = time.monotonic()
        ev = deduplicated_events(spark, layout, src, snap, view_columns_needed(pipeline, src))
        ev = ev.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            events[src.name] = ev.count()
            log.info("source %s: %d deduplicated events below W in %.2fs", src.name, events[src.name],
                     time.monotonic() - t0)
            for view in src_views:
                # 3. aggregate + write to staging
                t0 = time.monotonic()
                vdir = staging / view.name
                view_frame(ev, src, view).write.mode("errorifexists").parquet(str(vdir))
                log.info("view %s computed and written in %.2fs", view.name, time.monotonic() - t0)
                for junk in [*vdir.glob(".*.crc"), vdir / "_SUCCESS"]:
                    junk.unlink(missing_ok=True)
                # 4. validate before anything can be published
                row_counts[view.name] = validate_staged(pipeline, view, vdir, events[src.name])
                meta[view.name] = {"fingerprint": view_fingerprint(pipeline, view), "computed_in": None,
                                   "files": sorted(f.name for f in vdir.glob("*.parquet"))}
        finally:
            ev.unpersist()
    return row_counts, events, meta


def _carry_over(layout: Layout, version: str, view: str, staging: Path) -> None:
    """Hard-link (or copy) an unchanged view's files from the published version into the staging directory."""
    src_dir = layout.batch_version(version) / view
    dst = staging / view
    dst.mkdir()
    for f in src_dir.glob("*.parquet"):
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


# --- spark-submit entry point --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``spark-submit batch/job.py --home DIR [--pipeline SPEC] [--view NAME ...] [--keep K]``."""
    import argparse

    from lambdalake.config import load_settings
    from lambdalake.exceptions import LambdalakeError
    from lambdalake.pipeline import load_pipeline

    ap = argparse.ArgumentParser(prog="batch/job.py", description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=None, help="lake directory [env LAMBDALAKE_HOME]")
    ap.add_argument("--pipeline", default=None, help="pipeline file or module [env LAMBDALAKE_PIPELINE]")
    ap.add_argument("--view", action="append", default=None, help="recompute only this view (repeatable)")
    ap.add_argument("--keep", type=int, default=None, help="versions to keep [default 5]")
    ap.add_argument("--spark-master", default=None, help="only when not run by spark-submit")
    args = ap.parse_args(argv)
    try:
        settings = load_settings(home=args.home, pipeline=args.pipeline)
        pipeline = load_pipeline(settings.pipeline)
        from batch.publish import default_keep

        manifest = run_batch(settings, pipeline, views=args.view, spark_master=args.spark_master,
                             keep=args.keep if args.keep is not None else default_keep())
    except LambdalakeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps({k: manifest[k] for k in ("version", "watermark", "row_counts", "duration_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
