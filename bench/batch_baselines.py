"""Batch-bench baselines: the same views computed by DuckDB SQL and by plain Spark, next to the batch job.

``duckdb_views`` (the native-engine figure), ``spark_ceiling`` (the least any Spark job does for a full recompute)
and ``spark_incremental_floor`` (the least an exact incremental Spark run does), over the same master files. A
sibling module of ``bench_batch.py`` (the script's directory is on ``sys.path``), not a script.
"""

from __future__ import annotations

import os
from pathlib import Path

from lambdalake.handoff import aligned_watermark
from lambdalake.heads import archived_positions, master_files
from lambdalake.layout import Layout
from lambdalake.pipeline import Pipeline


# --- DuckDB: the same views over the same files -----------------------------------------------------------------------
def duckdb_views(home: Path, pipeline: Pipeline, block: int, out: Path) -> dict[str, int]:
    import duckdb

    layout = Layout(home)
    con = duckdb.connect()
    con.execute(f"SET threads = {os.cpu_count() or 1}")
    counts: dict[str, int] = {}
    for src in pipeline.sources:
        views = pipeline.views_of(src)
        files = [str(f.path) for f in master_files(layout, src.name)]
        wm = {p: aligned_watermark(e, block) for p, e in archived_positions(layout, src.name).items()}
        cond = " OR ".join(f"(_partition = {p} AND _offset < {w})" for p, w in wm.items()) or "FALSE"
        needed = {src.event_time} | {k for v in views for k in v.keys} | {
            a.column for v in views for a in v.stored_aggregates if a.column}
        sel = ", ".join(f'"{c}"' for c in sorted(needed))
        con.execute(f"""CREATE OR REPLACE TEMP TABLE ev AS
            SELECT {sel} FROM read_parquet({files!r}) WHERE {cond}
            QUALIFY row_number() OVER (PARTITION BY _partition, "{src.event_id}" ORDER BY _offset) = 1""")
        for v in views:
            b = v.bucket_us
            us = f'epoch_us("{src.event_time}")'
            ws = f"make_timestamp({us} - ((({us} % {b}) + {b}) % {b}))"
            aggs = []
            for a in v.stored_aggregates:
                col = f'"{a.column}"' if a.column else None
                aggs.append({"count": "count(*)", "sum": f"sum({col})::BIGINT", "min": f"min({col})",
                             "max": f"max({col})",
                             # DuckDB's own HLL (not the stored DataSketches bytes): the native-engine ceiling
                             "approx_distinct": f"approx_count_distinct({col})"}[a.kind] + f' AS "{a.name}"')
            keys = ", ".join(f'"{k}"' for k in v.keys)
            dest = out / f"{v.name}.parquet"
            con.execute(f"COPY (SELECT {keys}, {ws} AS window_start, {', '.join(aggs)} FROM ev "
                        f"GROUP BY ALL) TO '{dest}' (FORMAT parquet)")
            counts[v.name] = con.execute(f"SELECT count(*) FROM read_parquet('{dest}')").fetchone()[0]
    con.close()
    return counts


# --- plain Spark: the ceiling of any Spark job for these views --------------------------------------------------------
def _by_partition(positions: dict[int, int]):
    """A Spark map column partition -> offset (a per-partition bound of ``_offset``)."""
    from pyspark.sql import functions as F

    return F.create_map(*[x for p, w in sorted(positions.items()) for x in (F.lit(p), F.lit(w).cast("long"))])


def spark_ceiling(spark, home: Path, pipeline: Pipeline, block: int, out: Path) -> dict[str, int]:
    """The least a Spark job must do for the pipeline's views over the master files, on ``spark``: read the
    needed columns of the master Parquet, keep offsets below W, first occurrence per (partition, event id), one
    group-by per view (the same aggregates as the job, sketches included), write Parquet. No validation,
    checksums, id index, sort, staging or manifest. The dedup is the cheapest exact one found for Spark here (the
    job's, :func:`batch.compute._compute_source`): a hash aggregate of (partition, event id) -> first offset, count,
    then the rows joined with the broadcast first offsets of the repeated ids — the rows themselves are never shuffled
    (a ``min(struct)`` group-by of every row, the job's previous dedup, shuffles and sorts them all). Returns the
    rows per view (read back from the files' footers, after the timed part)."""
    from pyspark.sql import functions as F

    from batch.spark_dedup import view_columns_needed
    from batch.spark_types import _spark_schema
    from batch.spark_views import view_frame
    from lambdalake.schema import OFFSET_COL, PARTITION_COL

    layout = Layout(home)
    for src in pipeline.sources:
        views = pipeline.views_of(src)
        if not views:
            continue
        cols = view_columns_needed(pipeline, src)
        wm = {p: aligned_watermark(e, block) for p, e in archived_positions(layout, src.name).items()}
        df = (spark.read.schema(_spark_schema(src)).parquet(*[str(f.path) for f in master_files(layout, src.name)])
              .where(F.col(OFFSET_COL) < _by_partition(wm)[F.col(PARTITION_COL)]).select(*cols))
        key = [PARTITION_COL, src.event_id]
        first = (df.select(*key, OFFSET_COL).groupBy(*key)
                 .agg(F.min(OFFSET_COL).alias("_first"), F.count(F.lit(1)).alias("_n"))
                 .where(F.col("_n") > 1).select(*key, "_first"))
        ev = (df.join(F.broadcast(first), key, "left")
              .where(F.col("_first").isNull() | (F.col(OFFSET_COL) == F.col("_first"))))
        for v in views:  # the job's aggregation (batch.spark_views.view_frame), without its sort
            view_frame(ev, src, v).write.mode("overwrite").parquet(str(out / v.name))
    import pyarrow.parquet as pq

    return {v.name: sum(pq.ParquetFile(f).metadata.num_rows for f in (out / v.name).glob("*.parquet"))
            for v in pipeline.views}


def spark_incremental_floor(spark, home: Path, pipeline: Pipeline, base, block: int, out: Path) -> dict[str, int]:
    """The least an exact incremental Spark run must do on ``spark`` after the published version ``base`` (its
    manifest): read the needed columns of the master rows archived since (offsets in ``[base W, W)``), first
    occurrence per (partition, event id) among them, drop the ids ``base``'s event-id index holds (the index scanned
    once, the new ids broadcast), write the new ids (the next run needs them), and per view merge ``base``'s rows
    with the new events' rows in one group-by (the job's merge rules) and write Parquet. No validation, checksums,
    sort, staging or manifest. Returns the rows per view (read back from the files' footers, after the timed
    part)."""
    from pyspark.sql import functions as F

    from batch.incremental import IDS_DIR
    from batch.spark_dedup import first_occurrences, view_columns_needed
    from batch.spark_types import _index_schema, _spark_schema
    from batch.spark_views import _merge_expr, view_frame
    from lambdalake.pipeline import WINDOW_START
    from lambdalake.schema import OFFSET_COL, PARTITION_COL

    layout = Layout(home)
    base_dir = layout.batch_version(str(base.version))
    for src in pipeline.sources:
        views = pipeline.views_of(src)
        if not views:
            continue
        cols = view_columns_needed(pipeline, src)
        since = base.watermark.of_topic(src.topic)
        wm = {p: aligned_watermark(e, block) for p, e in archived_positions(layout, src.name).items()}
        if all(w <= since.get(p, 0) for p, w in wm.items()):
            continue  # nothing new below W: the base's views as they are
        files = [str(f.path) for f in master_files(layout, src.name) if f.end > since.get(f.partition, 0)]
        off, part = F.col(OFFSET_COL), F.col(PARTITION_COL)
        df = (spark.read.schema(_spark_schema(src)).parquet(*files)
              .where((off < _by_partition(wm)[part])
                     & (off >= F.coalesce(_by_partition(since)[part], F.lit(0).cast("long"))))
              .select(*cols))
        key = [PARTITION_COL, src.event_id]
        fresh = first_occurrences(df, src, cols).cache()  # the job's dedup rule among the new rows
        ids = spark.read.schema(_index_schema(src)).parquet(
            *[str(base_dir / IDS_DIR / src.name / s) for s in base.id_index[src.name].segments])
        seen = ids.join(F.broadcast(fresh.select(*key)), key, "left_semi")
        new = fresh.join(F.broadcast(seen), key, "left_anti").cache()
        new.select(*key).write.mode("overwrite").parquet(str(out / f"_ids-{src.name}"))
        for v in views:
            inc = view_frame(new, src, v)  # the job's aggregation and merge rules, without its sort
            old = spark.read.parquet(*[str(base_dir / v.name / f) for f in base.views[v.name].files])
            (old.unionByName(inc).groupBy(*v.keys, WINDOW_START).agg(*[_merge_expr(a) for a in v.stored_aggregates])
             .write.mode("overwrite").parquet(str(out / v.name)))
        new.unpersist()
        fresh.unpersist()
    import pyarrow.parquet as pq

    return {v.name: sum(pq.ParquetFile(f).metadata.num_rows for f in (out / v.name).glob("*.parquet"))
            if (out / v.name).exists() else base.row_counts[v.name] for v in pipeline.views}
