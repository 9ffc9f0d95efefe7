"""Step 2 of the run protocol in Spark: the master rows a run reads (below the watermark, of no forgotten subject,
valid under the declared rules: :func:`valid_events`) and the dedup rule of :mod:`lambdalake.dedup` over them (the
first valid occurrence of an event id per (source, partition), lowest offset wins: :func:`first_occurrences`)."""

from __future__ import annotations

from pathlib import Path

from batch.inputs import Inputs
from batch.spark_rules import valid_rows
from batch.spark_types import _spark_schema
from lambdalake.erasure import erased_subjects
from lambdalake.fields import Source
from lambdalake.layout import Layout
from lambdalake.pipeline import Pipeline
from lambdalake.schema import OFFSET_COL, PARTITION_COL
from lambdalake.storage.files import data_files


def deduplicated_events(spark, layout: Layout, source: Source, inputs: Inputs, columns: list[str],
                        revalidated: str | Path | None = None, since: dict[int, int] | None = None):
    """Step 2: events of ``source`` below the watermark, valid under the declared rules, first occurrence per
    (partition, event id). ``revalidated``: a file of rejected messages now valid (:mod:`batch.rejected`), read
    with the master files. ``since`` (an incremental run): only offsets ``>= since[p]`` (0 for a partition not
    listed) are read — the files reaching beyond it, cut there — so the first occurrence is among those rows only
    (the caller drops the ids counted before, :func:`batch.compute._compute_source_incremental`)."""
    return first_occurrences(valid_events(spark, layout, source, inputs, columns, revalidated, since), source,
                             columns)


def valid_events(spark, layout: Layout, source: Source, inputs: Inputs, columns: list[str],
                 revalidated: str | Path | None = None, since: dict[int, int] | None = None):
    """The rows :func:`deduplicated_events` deduplicates: ``columns`` of the rows of ``source`` below the
    watermark (from ``since`` on), of no forgotten subject, valid under the declared rules (duplicates
    included)."""
    from pyspark.sql import functions as F

    lo = since or {}
    lake = data_files(layout.store)
    files = [lake.uri(f.path) for f in inputs.files_of(source) if f.end > lo.get(f.partition, 0)]
    if revalidated is not None:
        files.append(str(revalidated))
    wm = inputs.watermark.of_topic(source.topic)
    schema = _spark_schema(source)
    if not files:
        return spark.createDataFrame([], schema).select(*columns)
    df = spark.read.schema(schema).parquet(*files)
    # W per partition as a literal map: rows of a file straddling W are cut at W
    wm_map = F.create_map(*[x for p, w in sorted(wm.items()) for x in (F.lit(p), F.lit(w).cast("long"))])
    df = df.where(F.col(OFFSET_COL) < wm_map[F.col(PARTITION_COL)])
    if since is not None and any(lo.values()):
        lo_map = F.create_map(*[x for p, w in sorted(lo.items()) for x in (F.lit(p), F.lit(w).cast("long"))])
        df = df.where(F.col(OFFSET_COL) >= F.coalesce(lo_map[F.col(PARTITION_COL)], F.lit(0).cast("long")))
    gone = erased_subjects(layout, source.name)
    if gone:  # forgotten subjects (lambdalake forget): never counted, also events archived after the request
        df = df.where(F.col(source.key).isNull() | ~F.col(source.key).isin(sorted(gone)))
    valid = valid_rows(source)
    if valid is not None:  # before dedup: an invalid row neither counts nor shadows a later valid duplicate
        df = df.where(valid)
    return df.select(*columns)


def first_occurrences(df, source: Source, columns: list[str]):
    """The dedup rule over ``df`` (valid rows): per (partition, event id) the row of the lowest offset, in one
    pass — one shuffle of the rows by (partition, event id) and one aggregate keeping the row whose offset is the
    minimum (``min`` of a struct led by ``_offset``: offsets are unique within a partition, so exactly one row
    wins and its other fields ride along). No second scan of master, no join."""
    from pyspark.sql import functions as F

    key = [PARTITION_COL, source.event_id]
    rest = [OFFSET_COL, *[c for c in columns if c not in (*key, OFFSET_COL)]]  # the struct is ordered by offset
    first = df.groupBy(*key).agg(F.min(F.struct(*rest)).alias("_first"))
    return first.select(*key, *[F.col(f"_first.{c}").alias(c) for c in rest]).select(*columns)


def view_columns_needed(pipeline: Pipeline, source: Source) -> list[str]:
    cols = [PARTITION_COL, source.event_id, OFFSET_COL, source.event_time]
    for v in pipeline.views_of(source):
        cols += list(v.input_fields)  # keys, aggregated and filtered fields
    return list(dict.fromkeys(cols))
