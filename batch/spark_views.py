"""The Spark *interpreter* of the view declarations in :mod:`lambdalake.pipeline` (step 3 of the run protocol):
there is no per-view Spark code: a view's filter (:func:`where_column`), keys, bucket and stored aggregates
(``view.stored_aggregates``: count/sum -> int64, min/max keep the field's type, including the hidden helpers a mean
needs) are turned into one ``groupBy().agg()`` (:func:`view_frame`); an incremental run folds published and new rows
with the merge rules (:func:`merged_rows`); the rows are written sorted for lookups (:func:`write_for_lookups`)."""

from __future__ import annotations

from pathlib import Path

from batch.spark_types import spark_type
from lambdalake.aggregates import Aggregate
from lambdalake.exceptions import PipelineError
from lambdalake.fields import Source
from lambdalake.pipeline import WINDOW_START, View
from lambdalake.predicates import Predicate, resolve_predicate
from lambdalake.schema import view_columns


def _agg_expr(a: Aggregate, source: Source):
    from pyspark.sql import functions as F

    if a.kind == "count":
        return F.count(F.lit(1)).cast("long").alias(a.name)
    if a.kind == "sum":  # integer and decimal (scaled integer): exact long sums; number: a double sum
        kind = "double" if source.field_map[a.column or ""].type == "number" else "long"
        return F.sum(F.col(a.column)).cast(kind).alias(a.name)
    if a.kind == "min":
        return F.min(F.col(a.column)).alias(a.name)
    if a.kind == "max":
        return F.max(F.col(a.column)).alias(a.name)
    if a.kind == "approx_distinct":  # DataSketches HLL_8, nulls skipped: what lambdalake.sketches reads and unions
        return F.hll_sketch_agg(F.col(a.column), a.lg_k).alias(a.name)
    raise PipelineError(f"aggregate {a.name!r}: unknown kind {a.kind!r}")


def _merge_expr(a: Aggregate):
    """The aggregate folding the stored column ``a.name`` of several rows of one (keys, window_start) into one —
    an incremental run merges the published rows with the new events' rows with it. One place maps each merge rule
    (:attr:`lambdalake.aggregates.Aggregate.merge`) to Spark: count and sum add (a sum over only null values stays
    null, as a recompute gives), min and max keep the least and the greatest (nulls ignored). A row alone in its
    group folds to itself."""
    from pyspark.sql import functions as F

    col = F.col(a.name)
    if a.merge == "sum":
        return F.sum(col).alias(a.name)
    if a.merge == "min":
        return F.min(col).alias(a.name)
    if a.merge == "max":
        return F.max(col).alias(a.name)
    if a.merge == "union":  # approx_distinct: the union of the HLL sketches (lambdalake.sketches)
        return F.hll_union_agg(col).alias(a.name)
    raise PipelineError(f"aggregate {a.name!r}: no merge rule for kind {a.kind!r} (merge {a.merge!r})")


def merged_rows(published, increment, source: Source, view: View):
    """The stored rows of ``view`` over the events of the published rows plus those of ``increment`` (both in the
    stored columns): rows of the same (keys, window_start) folded with :func:`_merge_expr` (null keys match null,
    as in a group-by); a row alone in its group is kept as it was (its very values: a published row no new event
    touched is carried over unchanged, a sketch included)."""
    from pyspark.sql import functions as F

    stored = view.stored_aggregates
    alone = F.count(F.lit(1)) == 1
    order = [*[F.col(k) for k in view.keys], F.col(WINDOW_START)]
    # range-partitioned by the write order (write_for_lookups): the fold and the global sort share one shuffle
    out = (published.unionByName(increment).repartitionByRange(*order)
           .groupBy(*order)
           .agg(*[F.when(alone, F.first(F.col(a.name))).otherwise(_merge_expr(a)).alias(a.name)
                  for a in stored]))
    types = {c.name: spark_type(c.type) for c in view_columns(source, view)}

    def typed(a: Aggregate):  # as a recompute writes it (a count column is not nullable there)
        col = F.col(a.name).cast(types[a.name])
        return (F.coalesce(col, F.lit(0).cast(types[a.name])) if a.kind == "count" else col).alias(a.name)

    return out.select(*view.keys, WINDOW_START, *[typed(a) for a in stored])


def where_column(pred: Predicate, source: Source):
    """A Spark boolean column of a resolved view filter (:meth:`lambdalake.pipeline.Pipeline.where`): a comparison
    or ``in`` on a null field is false (never null), ``and``/``or`` are two-valued; timestamps compare as UTC µs,
    decimals as their scaled integers (how master stores them)."""
    from functools import reduce

    from pyspark.sql import functions as F

    if pred.op in ("and", "or"):
        parts = [where_column(a, source) for a in pred.args]
        return reduce((lambda x, y: x & y) if pred.op == "and" else (lambda x, y: x | y), parts)
    f = source.field_map[pred.field or ""]
    col = F.col(f.name)
    if pred.op == "is_null":
        return col.isNull()
    if pred.op == "not_null":
        return col.isNotNull()
    value = F.unix_micros(col) if f.type == "timestamp" else col
    lits = [F.lit(v).cast({"timestamp": "long", "decimal": "long", "integer": "long", "number": "double"}[f.type])
            if f.type in ("timestamp", "decimal", "integer", "number") else F.lit(v) for v in pred.values]
    if pred.op == "in":
        test = value.isin(*lits)
    else:
        test = {"eq": value == lits[0], "ne": value != lits[0], "lt": value < lits[0], "le": value <= lits[0],
                "gt": value > lits[0], "ge": value >= lits[0]}[pred.op]
    return col.isNotNull() & F.coalesce(test, F.lit(False))


def view_frame(events, source: Source, view: View):
    """Step 3: the stored columns of ``view`` (keys, window_start, stored aggregates) from deduplicated events
    (those its filter holds for, if it has one)."""
    from pyspark.sql import functions as F

    et_us = F.unix_micros(F.col(source.event_time))
    window_start = F.timestamp_micros(et_us - F.pmod(et_us, F.lit(view.bucket_us).cast("long")))
    stored = view.stored_aggregates
    if view.where is not None:
        events = events.where(where_column(resolve_predicate(view.where, source, f"view {view.name!r}"), source))
    return (events.groupBy(*[F.col(k) for k in view.keys], window_start.alias(WINDOW_START))
            .agg(*[_agg_expr(a, source) for a in stored])
            .select(*view.keys, WINDOW_START, *[a.name for a in stored]))


# Row groups of ~1 MiB (parquet-mr's default is 128 MiB: one group per file): with files sorted by the view's keys,
# a point lookup reads the statistics of every group and the rows of one or two.
LOOKUP_ROW_GROUP_BYTES = 1 << 20


def write_for_lookups(frame, view: View, vdir: Path) -> None:
    """Step 3's write: the view's rows sorted by its keys then ``window_start`` (a global sort, so files hold
    disjoint key ranges) in small row groups whose min/max statistics let readers (DuckDB, pyarrow) skip all but
    the few groups of a key. Sorting changes no row: the answer of every query is the same."""
    from pyspark.sql import functions as F

    (frame.orderBy(*[F.col(k) for k in view.keys], F.col(WINDOW_START))
     .write.mode("errorifexists")
     .option("parquet.block.size", LOOKUP_ROW_GROUP_BYTES)
     .parquet(str(vdir)))
