r"""The batch job: Spark recomputes every view of the pipeline from the master dataset and publishes a new version.

This is the Spark *interpreter* of the view declarations in :mod:`lambdalake.pipeline` — there is no per-view Spark
code: keys, bucket and the stored aggregates (``view.stored_aggregates``: count/sum -> int64, min/max keep the
field's type, including the hidden helpers a mean needs) are turned into one ``groupBy().agg()`` per view.

Run protocol (:func:`run_batch`), mirrored by numbered comments in the code:

1. Inputs, under the shared master readers lock (compaction cannot swap files meanwhile): per source the master
   files (:meth:`lambdalake.layout.Layout.master_files`, checked to tile without gap or overlap), the archived end
   per partition and the watermark ``W[p] = aligned_watermark(end, block)`` (:mod:`lambdalake.handoff`); the inputs
   are the files that start below ``W`` — recorded with size, rows and sha256
   (:class:`lambdalake.contracts.InputFile`; a sha256 the published version recorded for the same, unchanged file
   is reused instead of hashing it again: :class:`KnownChecksums`).
2. Read the inputs, keep rows with ``_offset < W[_partition]`` that are valid under the *declared* field rules
   (:func:`valid_rows`, below), and apply the dedup rule (:mod:`lambdalake.dedup`): the first valid occurrence of an
   event id per (source, partition), lowest offset wins. A full run never shuffles the rows for it
   (:func:`_compute_source`: a hash aggregate of the narrow (partition, event id, offset) gives each id's first
   offset and count — also the event count and the id index — and the rows are joined with the broadcast first
   offsets of the few repeated ids); :func:`first_occurrences` (one shuffle of the rows) serves incremental runs
   and too many repeated ids to broadcast. Restricting to ``< W`` first is exact: an id's first occurrence below
   ``W`` is its first occurrence overall.
3. Per view: ``window_start`` = event time floored to the bucket (UTC), group by keys + window_start, aggregate;
   write ``<staging>/<view>/*.parquet``.
4. Validate the staged output (:func:`validate_staged`): schema as declared, no null in non-nullable keys, one row
   per (keys, window_start), and the count aggregate of each view sums to the deduplicated events of its source.
5. Publish (:func:`lambdalake.versions.publish`): manifest, atomic rename of the staging directory, atomic ``CURRENT``
   switch, pruning. A failure anywhere before that removes the staging directory and changes nothing served.
   (``LAMBDALAKE_BATCH_FAULT=staged`` SIGKILLs the process right before this step, for crash tests: a killed run
   leaves its staging directory, which the next run removes.)

``--view NAME`` recomputes only the named views, at the *published* watermark, and carries the other views over
from the published version (hard links) when their definition is unchanged
(:meth:`lambdalake.contracts.BatchManifest.definition_matches`), so a version still holds every view at one
watermark. Every version records each view's definition fingerprint
(:meth:`lambdalake.pipeline.Pipeline.fingerprint`); a view no longer declared is not in the next version.

Field rules at batch time. The master dataset holds the events that were valid under the rules *when they were
archived*. The batch job re-applies the rules declared *now* to every master row (:func:`valid_rows`, compiled from
the declaration with the semantics of :mod:`lambdalake.validation`), before dedup: a row invalid under the current
rules neither counts nor shadows a later valid duplicate of its event id. So a *tightened* rule (lower ``maximum``, a
new ``pattern``, a field becoming required and non-nullable, ...) drops the master rows it makes invalid. A
*loosened* rule makes some rejected messages valid: the archiver keeps every range's invalid messages in the lake
(rejected files), and step 2 judges those recorded under other rules again with the product's validator
(:mod:`batch.rejected`) and reads the now-valid ones with the master rows, before dedup. The manifest records them
(``rejected_inputs``, ``revalidated``). Messages dead-lettered by a release without rejected files stay out.

Limits of the compiled rules (the archiver applied the exact rules; these only re-check stored values):

- ``pattern`` is a Python ``re`` pattern; Spark evaluates it with Java's ``java.util.regex`` as
  ``(?dU)\A(?:<pattern>)\z`` — a full match like ``re.fullmatch``, ``.``/``^``/``$`` treating only ``\n`` as a
  line break (``UNIX_LINES``) and ``\d``/``\w``/``\s``/``\b`` as Unicode classes (``UNICODE_CHARACTER_CLASS``),
  as in Python. The two dialects agree on the common syntax (classes, quantifiers, groups, alternation, anchors,
  ``(?i)``; ``tests/test_batch_evolution.py`` checks it on the demo patterns and edge strings); Python-only syntax
  (``(?P<name>...)``, ``(?P=name)``, ``\Z``, conditional groups) is refused with a :class:`PipelineError`, and
  Unicode class membership can differ for rare code points: Python's ``\s`` also matches U+001C..U+001F, Java's
  does not. POSIX bracket classes (``[[:alpha:]]``) are Java syntax; Python reads them as plain characters.
- Length is counted in Unicode code points on both sides (Spark ``length``, Python ``len``).
- A field that becomes *required but nullable* cannot be re-checked: master stores an absent optional field and an
  explicit null alike (null), so such rows are kept.

Also runnable with ``spark-submit batch/job.py --home DIR --pipeline SPEC [--view NAME] [--keep K] [--full]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if __package__ in (None, ""):  # run as a script (spark-submit batch/job.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch.exceptions import BatchValidationError, NothingToCompute
from batch.master import sha256_file
from batch.rejected import rejudged_files, write_revalidated
from batch.rewrite import master_readers_lock
from lambdalake import contracts
from lambdalake.aggregates import Aggregate
from lambdalake.config import Settings, env_float, env_int, fix_handoff_block
from lambdalake.contracts import BatchManifest, BatchView, IdIndex, InputFile, Positions
from lambdalake.erasure import erased_subjects
from lambdalake.exceptions import PipelineError
from lambdalake.fields import DECIMAL_DIGITS, Field, Source
from lambdalake.handoff import aligned_watermark
from lambdalake.instants import FIRST_INSTANT_US, LAST_INSTANT_US
from lambdalake.layout import Layout, MasterFile, current_batch_manifest
from lambdalake.pipeline import WINDOW_START, Pipeline, View
from lambdalake.predicates import Predicate, resolve_predicate
from lambdalake.runtime import crash_point
from lambdalake.schema import OFFSET_COL, PARTITION_COL, arrow_schema, master_columns, view_columns
from lambdalake.versions import DEFAULT_KEEP, new_staging_dir, publish

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SESSION_CONF = {
    "spark.sql.session.timeZone": "UTC",  # window_start is a UTC instant; never the JVM's zone
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",  # not INT96: readable as timestamp[us, UTC]
}


# --- inputs --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Inputs:
    """The master files a run reads (its lineage) and the watermark ``W`` it covers."""

    watermark: Positions
    archived: Positions  # archived end per partition (W trails it by < block)
    files: list[InputFile]
    rejudged: dict[str, list[MasterFile]]  # per source: rejected files to judge again (batch.rejected)
    rejected_files: list[InputFile]  # the same, as lineage

    def files_of(self, source: Source) -> list[InputFile]:
        return [f for f in self.files if f.source == source.name]


def select_inputs(layout: Layout, pipeline: Pipeline, block: int, fixed_watermark: Positions | None = None,
                  known: KnownChecksums | None = None) -> Inputs:
    """Step 1 of the run protocol. ``fixed_watermark`` reuses a published one (``--view``); ``known``: the
    checksums the published version recorded (:class:`KnownChecksums`), reused for files unchanged since."""
    if block < 1:
        raise PipelineError(f"handoff block {block} must be >= 1 (LAMBDALAKE_HANDOFF_BLOCK)")
    watermark: dict[tuple[str, int], int] = {}
    archived: dict[tuple[str, int], int] = {}
    inputs: list[InputFile] = []
    rejudged: dict[str, list[MasterFile]] = {}
    rejected: list[InputFile] = []
    for src in pipeline.sources:
        files = layout.master_files(src.name)
        ends: dict[int, int] = {}
        for f in files:  # sorted by (partition, start): the last file of a partition ends its range
            ends[f.partition] = f.end
        archived.update({(src.topic, p): e for p, e in ends.items()})
        if fixed_watermark is None:
            wm = {p: aligned_watermark(end, block) for p, end in ends.items()}
        else:
            wm = fixed_watermark.of_topic(src.topic)
            short = {p: w for p, w in wm.items() if ends.get(p, 0) < w}
            if short:
                raise BatchValidationError(f"master dataset of {src.name!r} no longer reaches the published "
                                           f"watermark {short} (archived ends {ends}); run a full batch")
        watermark.update({(src.topic, p): w for p, w in wm.items()})
        for f in files:
            if f.start >= wm.get(f.partition, 0):
                continue
            inputs.append(_input_file(layout, f, src, known))
        rejudged[src.name] = rejudged_files(layout, src, wm)
        rejected += [_input_file(layout, f, known=known) for f in rejudged[src.name]]
    return Inputs(Positions(watermark), Positions(archived), inputs, rejudged, rejected)


# A file modified less than this before a run started is hashed again by the next run (mtime granularity, clocks).
CHECKSUM_REUSE_MARGIN_S = 2.0


@dataclass(frozen=True)
class KnownChecksums:
    """The input checksums a published version recorded, reusable by the next run (master and rejected files are
    immutable: written once under a name of their offset range, replaced only by files of other names).

    A recorded sha256 is reused for a file at the same path with the same offset range and size whose mtime is
    older than that run's start (minus :data:`CHECKSUM_REUSE_MARGIN_S`): the run that recorded it hashed those very
    bytes. Any other file is hashed. The audit (``audit.check``) still re-hashes every input independently, so a
    file changed in place behind an unchanged mtime is reported there, never hidden."""

    files: dict[str, InputFile]
    before_ns: int  # files last modified before this instant (ns since the epoch) are unchanged since hashed

    @classmethod
    def of(cls, manifest: BatchManifest | None) -> KnownChecksums | None:
        if manifest is None or not manifest.started_at:
            return None
        try:
            started = datetime.fromisoformat(manifest.started_at.replace("Z", "+00:00"))
        except ValueError:
            return None
        before_ns = int((started.timestamp() - CHECKSUM_REUSE_MARGIN_S) * 1e9)
        return cls({f.path: f for f in [*manifest.inputs, *manifest.rejected_inputs]}, before_ns)

    def sha256(self, rel: str, f: MasterFile, st: os.stat_result) -> str | None:
        rec = self.files.get(rel)
        if (rec is None or rec.bytes != st.st_size or st.st_mtime_ns >= self.before_ns
                or (rec.partition, rec.start, rec.end) != (f.partition, f.start, f.end)):
            return None
        return rec.sha256


def _input_file(layout: Layout, f: MasterFile, source: Source | None = None,
                known: KnownChecksums | None = None) -> InputFile:
    """The lineage entry of ``f`` (one footer read; the sha256 reused from ``known`` when the file is unchanged
    since a published run hashed it); with ``source``, a master file, checked to hold every declared
    field: a field declared after the file was archived is not in it (the archiver stores declared fields only),
    so its values, and which events it makes valid, cannot be recomputed from master. Refused, never read as
    null."""
    meta = pq.ParquetFile(f.path).metadata
    missing = [] if source is None else [x.name for x in source.fields if x.name not in set(meta.schema.names)]
    if missing:
        raise PipelineError(
            f"source {source.name!r}: field(s) {', '.join(map(repr, missing))} are not in master file "
            f"{f.path.name} of partition {f.partition} (archived before they were declared), so the batch job cannot "
            "recompute views with them; rebuild from the log with `lambdalake replay` (Kappa) instead")
    rel, st = str(f.path.relative_to(layout.home)), f.path.stat()
    digest = known.sha256(rel, f, st) if known is not None else None
    return InputFile(rel, f.source, f.partition, f.start, f.end, st.st_size, digest or sha256_file(f.path),
                     meta.num_rows)


# --- Spark ---------------------------------------------------------------------------------------------------------
def spark_session(master: str | None = None, app_name: str = "lambdalake-batch"):
    """A SparkSession for ``master`` (``local[*]``, ``local-cluster[2,1,1024]``, ``spark://...``, ``yarn`` ...).

    Returns an existing active session if there is one. Under ``spark-submit`` (which starts this Python process
    from its JVM and says so in ``PYSPARK_GATEWAY_PORT``) the master is spark-submit's ``--master``: setting one
    here would silently override it (a job submitted to a cluster would run in the driver).
    """
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        master = None
    if master:
        builder = builder.master(master)
    for k, v in SESSION_CONF.items():
        builder = builder.config(k, v)
    builder = builder.config("spark.ui.showConsoleProgress", "false")  # the CLI shows its own status
    builder = builder.config("spark.sql.shuffle.partitions",
                             os.environ.get("LAMBDALAKE_SPARK_SHUFFLE_PARTITIONS", "16"))
    # the heap of a local run (executors live in the driver JVM): Spark's 1g default spills the dedup shuffle of
    # a few million events to disk. Only applies when this call starts the JVM (spark-submit sets its own).
    builder = builder.config("spark.driver.memory", os.environ.get("LAMBDALAKE_SPARK_DRIVER_MEMORY", "4g"))
    if master and master.startswith("local-cluster"):
        # executors are separate JVMs started from pyspark's own jars
        import pyspark

        builder = builder.config("spark.home", os.environ.get("SPARK_HOME", str(Path(pyspark.__file__).parent)))
    return builder.getOrCreate()


# The Spark type of each logical type (lambdalake.schema): the only type table of this engine.
SPARK_TYPES = {"string": "StringType", "integer": "LongType", "timestamp": "TimestampType", "int32": "IntegerType",
               "binary": "BinaryType", "decimal": "LongType", "boolean": "BooleanType", "number": "DoubleType",
               "sketch": "BinaryType"}


def spark_type(logical: str):
    from pyspark.sql import types as T

    return getattr(T, SPARK_TYPES[logical])()


def _spark_schema(source: Source):
    from pyspark.sql import types as T

    return T.StructType([T.StructField(c.name, spark_type(c.type), True) for c in master_columns(source)])


_PYTHON_ONLY_REGEX = re.compile(r"\(\?P[<=]|\\Z|\(\?\(")


def java_pattern(field: Field) -> str:
    """The Java regex that full-matches like ``re.fullmatch(field.pattern, value)`` (see the module docstring)."""
    assert field.pattern is not None
    bad = _PYTHON_ONLY_REGEX.search(field.pattern)
    if bad:
        raise PipelineError(f"field {field.name!r}: pattern {field.pattern!r} uses Python-only regex syntax "
                            f"{bad.group(0)!r}, which the Spark batch job cannot evaluate; write it without it "
                            "(e.g. (?<name>...) for a named group, $ or \\z instead of \\Z)")
    return rf"(?dU)\A(?:{field.pattern})\z"


def valid_rows(source: Source):
    """A Spark boolean column: the stored master row is valid under the *declared* field rules (rules 3 and 5 of
    :mod:`lambdalake.validation`: required/nullable, minimum/maximum, min_length/max_length in code points, pattern
    as a full match) and the supported timestamp range of rule 6 (which rows archived before that rule existed may
    break). Master values are already typed, so the type rules need no re-check. None: no rule can reject a
    row."""
    from pyspark.sql import functions as F

    conds = []
    for f in source.fields:
        col = F.col(f.name)
        rules = []
        if f.type == "integer":
            if f.minimum is not None:
                rules.append(col >= F.lit(f.minimum))
            if f.maximum is not None:
                rules.append(col <= F.lit(f.maximum))
        elif f.type == "string":
            if f.min_length is not None and f.min_length > 0:
                rules.append(F.length(col) >= F.lit(f.min_length))
            if f.max_length is not None:
                rules.append(F.length(col) <= F.lit(f.max_length))
            if f.pattern:
                rules.append(col.rlike(java_pattern(f)))
        elif f.type == "timestamp":
            rules.append(F.unix_micros(col).between(F.lit(FIRST_INSTANT_US), F.lit(LAST_INSTANT_US)))
        elif f.type == "decimal":  # the scaled integer has at most 18 digits (rule 7)
            rules.append(F.abs(col) < F.lit(10 ** DECIMAL_DIGITS).cast("long"))
        value_ok = None
        for r in rules:
            value_ok = r if value_ok is None else value_ok & r
        if f.required and not f.nullable:  # null is invalid (absent, or null where null is not allowed)
            conds.append(col.isNotNull() if value_ok is None else col.isNotNull() & value_ok)
        elif value_ok is not None:
            conds.append(col.isNull() | value_ok)
    out = None
    for c in conds:
        out = c if out is None else out & c
    return out


def deduplicated_events(spark, layout: Layout, source: Source, inputs: Inputs, columns: list[str],
                        revalidated: Path | None = None, since: dict[int, int] | None = None):
    """Step 2: events of ``source`` below the watermark, valid under the declared rules, first occurrence per
    (partition, event id). ``revalidated``: a file of rejected messages now valid (:mod:`batch.rejected`), read
    with the master files. ``since`` (an incremental run): only offsets ``>= since[p]`` (0 for a partition not
    listed) are read — the files reaching beyond it, cut there — so the first occurrence is among those rows only
    (the caller drops the ids counted before, :func:`_compute_source_incremental`)."""
    return first_occurrences(valid_events(spark, layout, source, inputs, columns, revalidated, since), source,
                             columns)


def valid_events(spark, layout: Layout, source: Source, inputs: Inputs, columns: list[str],
                 revalidated: Path | None = None, since: dict[int, int] | None = None):
    """The rows :func:`deduplicated_events` deduplicates: ``columns`` of the rows of ``source`` below the
    watermark (from ``since`` on), of no forgotten subject, valid under the declared rules (duplicates
    included)."""
    from pyspark.sql import functions as F

    lo = since or {}
    files = [str(layout.home / f.path) for f in inputs.files_of(source) if f.end > lo.get(f.partition, 0)]
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


def view_columns_needed(pipeline: Pipeline, source: Source) -> list[str]:
    cols = [PARTITION_COL, source.event_id, OFFSET_COL, source.event_time]
    for v in pipeline.views_of(source):
        cols += list(v.input_fields)  # keys, aggregated and filtered fields
    return list(dict.fromkeys(cols))


# --- validation ----------------------------------------------------------------------------------------------------
def expected_schema(pipeline: Pipeline, view: View) -> pa.Schema:
    """Arrow schema of a batch view as declared (the layout contract; Spark writes every column nullable)."""
    return arrow_schema(view_columns(pipeline.source_of(view), view), nullability=False)


def validate_staged(pipeline: Pipeline, view: View, vdir: Path, events: int | None) -> int:
    """Step 4 for one view: schema, null keys, row counts (the count aggregate sums to the deduplicated events
    read — at most that many for a filtered view, which may also be empty; a non-empty input yields rows), and no
    duplicate (keys, window_start). Returns the row count."""
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
    filtered = view.where is not None
    if events and not rows and not filtered:
        raise BatchValidationError(f"view {view.name!r}: {events} events were read but no rows were written; "
                                   "nothing was published")
    if count_col and events is not None and (counted > events if filtered else counted != events):
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


# --- incremental runs ----------------------------------------------------------------------------------------------
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

    Incremental only when every one of these holds (README, "Batch runs: incremental or full"): a version is
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


# --- the run -------------------------------------------------------------------------------------------------------
@dataclass
class _Computed:
    """What steps 2-4 produced for the computed views and their sources."""

    row_counts: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    meta: dict[str, BatchView] = field(default_factory=dict)
    revalidated: dict[str, int] = field(default_factory=dict)
    index: dict[str, IdIndex] = field(default_factory=dict)


def run_batch(settings: Settings, pipeline: Pipeline, spark: Any = None, views: list[str] | None = None, *,
              spark_master: str | None = None, keep: int | None = None, full: bool = False) -> BatchManifest:
    """Compute and publish a new batch version (the run protocol in the module docstring). Returns its manifest.

    ``spark``: an existing SparkSession to use (it is left running); otherwise one is created for
    ``spark_master`` (default ``settings.spark_master``) and stopped at the end.
    ``views``: names to recompute at the published watermark (others carried over when their definition is
    unchanged, else recomputed too); None = all, new watermark — incrementally from the published version when
    :func:`incremental_base` allows it, unless ``full``.
    """
    layout = Layout(settings.home)
    keep = DEFAULT_KEEP if keep is None else keep
    selected = [pipeline.view(v) for v in views] if views else list(pipeline.views)
    if not pipeline.views:
        raise PipelineError(f"pipeline {pipeline.name!r} declares no views; nothing to compute")
    for src in pipeline.sources:  # refuse a pattern Spark cannot evaluate before anything is read
        for f in src.fields:
            if f.pattern:
                java_pattern(f)
    started, t0 = contracts.utc_now_iso(), time.monotonic()

    published = current_batch_manifest(layout)
    fixed_wm = None
    carried: dict[str, BatchView] = {}
    if views and published is not None:
        # recompute the named views at the published watermark; carry over the others if unchanged
        fixed_wm = published.watermark
        for v in pipeline.views:
            if v in selected:
                continue
            declared = pipeline.fingerprint(v)
            if published.definition_matches(v.name, declared, pipeline.legacy_fingerprint(v)):
                # a format-1 version matched by its legacy fingerprint: record the current one from now on
                carried[v.name] = msgspec.structs.replace(published.views[v.name], fingerprint=declared)
            else:
                selected.append(v)
    elif views:
        selected = list(pipeline.views)  # nothing published yet: a version must hold every view

    own_spark = spark is None
    staging = new_staging_dir(layout)
    published_ok = False
    try:
        with master_readers_lock(layout):
            # 1. inputs (before starting Spark: an empty lake fails fast)
            t1 = time.monotonic()
            inputs = select_inputs(layout, pipeline, settings.handoff_block, fixed_wm, KnownChecksums.of(published))
            log.info("inputs: %d master files selected in %.2fs", len(inputs.files), time.monotonic() - t1)
            if not any(inputs.watermark.values()):
                raise NothingToCompute(
                    f"the master dataset holds no complete block of {settings.handoff_block} offsets yet "
                    f"(archived ends: {inputs.archived.nested()}); run `lambdalake ingest` first or wait for more "
                    "data")
            fix_handoff_block(settings.home, settings.handoff_block)  # fixed for the life of the lake from now on
            if views:
                base, reason = None, "recompute of the named views at the published watermark (--view)"
            else:
                base, reason = incremental_base(layout, pipeline, published, inputs, settings.handoff_block,
                                                full=full)
            log.info("%s run: %s", "incremental" if base is not None else "full", reason)
            if own_spark:
                spark = spark_session(spark_master or settings.spark_master)
            saved = {k: spark.conf.get(k, None) for k in SESSION_CONF}
            for k, v in SESSION_CONF.items():
                spark.conf.set(k, v)
            try:
                # 2-4. read + validate + dedup, aggregate (+ merge), write, check
                done = _compute(spark, layout, pipeline, inputs, selected, staging, base)
            finally:
                for k, v in saved.items():
                    if v is None:
                        spark.conf.unset(k)
                    else:
                        spark.conf.set(k, v)
        engine, master = f"spark {spark.version}", spark.sparkContext.master
        for name, meta in carried.items():
            _carry_over(layout, published.version, name, staging)
            done.row_counts[name] = published.row_counts[name]
            done.meta[name] = meta
        events = done.events
        if published is not None and views:
            events = {**published.events, **events}  # a carried view's source keeps its published count
            for src in pipeline.sources:  # a source none of whose views was computed keeps its index
                idx = published.id_index.get(src.name)
                if src.name not in done.index and idx is not None:
                    _carry_index(layout, published.version, src.name, idx, staging)
                    done.index[src.name] = idx
        manifest = BatchManifest(
            pipeline=pipeline.name,
            watermark=inputs.watermark,
            block=settings.handoff_block,
            archived=inputs.archived,
            inputs=inputs.files,
            rejected_inputs=inputs.rejected_files,
            revalidated=done.revalidated,
            row_counts={v.name: done.row_counts[v.name] for v in pipeline.views},
            events={s.name: events[s.name] for s in pipeline.sources if s.name in events},
            views={v.name: done.meta[v.name] for v in pipeline.views},
            engine=engine,
            spark_master=master,
            code_version=code_version(),
            started_at=started,
            finished_at=contracts.utc_now_iso(),
            duration_s=round(time.monotonic() - t0, 3),
            format=contracts.MANIFEST_FORMAT,
            mode="full" if base is None else "incremental",
            based_on=None if base is None else base.version,
            mode_reason=reason,
            full_at=(base.full_at if base is not None
                     else (published.full_at or published.started_at) if carried and published is not None
                     else started),
            id_index=done.index,
        )
        # 5. publish (manifest, atomic dir rename, CURRENT switch, prune)
        crash_point("LAMBDALAKE_BATCH_FAULT", "staged")  # crash tests: staged, nothing published
        manifest = publish(layout, staging, manifest, keep=keep)
        published_ok = True
        return manifest
    finally:
        if not published_ok:
            shutil.rmtree(staging, ignore_errors=True)
        if own_spark and spark is not None:
            spark.stop()


def _compute(spark, layout: Layout, pipeline: Pipeline, inputs: Inputs, selected: list[View],
             staging: Path, base: BatchManifest | None = None) -> _Computed:
    """Steps 2-4 for the selected views, from all master below W or, with ``base``, incrementally from that
    version (:func:`_compute_source_incremental`)."""
    done = _Computed()
    scratch = staging / "_revalidated"  # removed before publishing: never part of a version
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
        shutil.rmtree(scratch, ignore_errors=True)
    return done


# A full run joins the rows with the first offsets of the ids seen more than once, broadcast, when there are at most
# this many such ids (a few bytes each); beyond it, the dedup shuffles the rows (first_occurrences).
BROADCAST_DUPLICATES_ENV = "LAMBDALAKE_BATCH_BROADCAST_DUPLICATES"
DEFAULT_BROADCAST_DUPLICATES = 2_000_000


def _compute_source(spark, layout: Layout, pipeline: Pipeline, inputs: Inputs, src: Source, src_views: list[View],
                    staging: Path, scratch: Path, done: _Computed) -> None:
    """Steps 2-4 of a full run for one source. The dedup never shuffles the rows: one hash aggregate of the
    narrow (partition, event id, offset) of the valid rows below W gives, per id, its first offset and how often
    it occurs (cached: it is the event count, the id index and the duplicates at once); the rows are then joined
    with the first offsets of the ids seen more than once (broadcast; few) and a row of such an id is kept only at
    its first offset — the rule of :func:`first_occurrences`, which takes over when duplicates are too many to
    broadcast (:data:`BROADCAST_DUPLICATES_ENV`). Each view then aggregates those rows with a map-side partial
    aggregate (only its small groups are shuffled), the events cached for the next when the source has several."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    # 2. read below W + validate + dedup; rejected messages valid under the declared rules join the master rows
    # (batch.rejected)
    t0 = time.monotonic()
    extra = None
    if inputs.rejudged.get(src.name):
        extra, done.revalidated[src.name] = write_revalidated(src, inputs.rejudged[src.name],
                                                              inputs.watermark.of_topic(src.topic), scratch,
                                                              skip=erased_subjects(layout, src.name))
        log.info("source %s: %d rejected messages valid under the declared rules", src.name,
                 done.revalidated[src.name])
    columns = view_columns_needed(pipeline, src)
    rows = valid_events(spark, layout, src, inputs, columns, extra)
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
            _write_view(pipeline, view_frame(ev, src, view), src, view, staging, n, done)
    finally:
        if ev is not None:
            ev.unpersist()
        ids.unpersist()


def _compute_source_incremental(spark, layout: Layout, pipeline: Pipeline, inputs: Inputs, src: Source,
                                src_views: list[View], staging: Path, scratch: Path, base: BatchManifest,
                                done: _Computed) -> None:
    """Steps 2-4 of an incremental run for one source: the new events are the valid rows at offsets
    ``[base W[p], W[p])`` (first occurrence among them) whose (partition, event id) is not in ``base``'s id index
    (an id counted before keeps its first occurrence there: the same rule as a full recompute); each view's
    rows are ``base``'s rows merged with the new events' rows (:func:`merged_rows`); the index gains a segment of
    the new ids."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    since = base.watermark.of_topic(src.topic)
    prev_index = base.id_index[src.name]
    prev_events = base.events.get(src.name, 0)
    t0 = time.monotonic()
    extra, n_extra = None, 0
    rejudged = [f for f in inputs.rejudged.get(src.name, []) if f.end > since.get(f.partition, 0)]
    if rejudged:
        extra, _ = write_revalidated(src, rejudged, inputs.watermark.of_topic(src.topic), scratch,
                                     skip=erased_subjects(layout, src.name))
        if extra is not None:
            pos = pq.read_table(extra, columns=[PARTITION_COL, OFFSET_COL]).to_pydict()
            n_extra = sum(o >= since.get(p, 0) for p, o in zip(pos[PARTITION_COL], pos[OFFSET_COL], strict=True))
    done.revalidated[src.name] = base.revalidated.get(src.name, 0) + n_extra
    key = [PARTITION_COL, src.event_id]
    base_dir = layout.batch_version(str(base.version))
    if all(w <= since.get(p, 0) for p, w in inputs.watermark.of_topic(src.topic).items()):
        fresh = new = None  # nothing archived since: the published views and index as they are
    else:
        fresh = deduplicated_events(spark, layout, src, inputs, view_columns_needed(pipeline, src), extra,
                                    since=since).persist(StorageLevel.MEMORY_AND_DISK)
        # ids counted before: the index rows matching a new id (the new ids broadcast: the index is scanned once,
        # never shuffled), then the new rows without them
        id_files = [str(f) for s in prev_index.segments for f in sorted((base_dir / IDS_DIR / src.name / s)
                                                                        .glob("*.parquet"))]
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
            files = [str(base_dir / view.name / f)
                     for f in base.views[view.name].files]
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
                _validated(pipeline, view, staging / view.name, total, done, t0=time.monotonic())
            else:
                _write_view(pipeline, frame, src, view, staging, total, done)
    finally:
        for df in (new, fresh):
            if df is not None:
                df.unpersist()


def _index_schema(src: Source):
    from pyspark.sql import types as T

    return T.StructType([T.StructField(PARTITION_COL, T.IntegerType(), True),
                         T.StructField(src.event_id, T.StringType(), True)])


def _view_schema(src: Source, view: View):
    from pyspark.sql import types as T

    return T.StructType([T.StructField(c.name, spark_type(c.type), True) for c in view_columns(src, view)])


def _write_index_segment(events, src: Source, staging: Path, carried: list[str], total: int, layout: Layout,
                         done: _Computed, carry_from: Path | None = None, write: bool = True) -> None:
    """The source's id index in the staged version: ``carried`` segments hard-linked from ``carry_from``, plus
    one segment of the (partition, event id) of ``events`` (unless ``write`` is false)."""
    base = staging / IDS_DIR / src.name
    segments = list(carried)
    for s in carried:
        _link_dir(carry_from / IDS_DIR / src.name / s, base / s)  # type: ignore[operator]
    if write:
        name = f"s{len(carried):06d}"
        t0 = time.monotonic()
        events.select(PARTITION_COL, src.event_id).write.mode("errorifexists").parquet(str(base / name))
        for junk in [*(base / name).glob(".*.crc"), base / name / "_SUCCESS"]:
            junk.unlink(missing_ok=True)
        segments.append(name)
        log.info("source %s: id index segment %s written in %.2fs", src.name, name, time.monotonic() - t0)
    done.index[src.name] = IdIndex(segments, total, erased_digest(layout, src.name))


def _write_view(pipeline: Pipeline, frame, src: Source, view: View, staging: Path, events: int,
                done: _Computed) -> None:
    # 3. aggregate (+ merge) + write to staging
    t0 = time.monotonic()
    vdir = staging / view.name
    write_for_lookups(frame, view, vdir)
    log.info("view %s computed and written in %.2fs", view.name, time.monotonic() - t0)
    for junk in [*vdir.glob(".*.crc"), vdir / "_SUCCESS"]:
        junk.unlink(missing_ok=True)
    _validated(pipeline, view, vdir, events, done, time.monotonic())


def _validated(pipeline: Pipeline, view: View, vdir: Path, events: int, done: _Computed, t0: float) -> None:
    # 4. validate before anything can be published
    done.row_counts[view.name] = validate_staged(pipeline, view, vdir, events)
    log.info("view %s validated in %.2fs", view.name, time.monotonic() - t0)
    done.meta[view.name] = BatchView(pipeline.fingerprint(view), files=sorted(f.name for f in vdir.glob("*.parquet")))


def _link_dir(src_dir: Path, dst: Path) -> None:
    """Hard-link (or copy) the parquet files of ``src_dir`` into a new directory ``dst``."""
    dst.mkdir(parents=True)
    for f in src_dir.glob("*.parquet"):
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def _carry_over(layout: Layout, version: str, view: str, staging: Path) -> None:
    """Hard-link (or copy) an unchanged view's files from the published version into the staging directory."""
    _link_dir(layout.batch_version(version) / view, staging / view)


def _carry_index(layout: Layout, version: str, source: str, index: IdIndex, staging: Path) -> None:
    for s in index.segments:
        _link_dir(layout.batch_version(version) / IDS_DIR / source / s, staging / IDS_DIR / source / s)


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
    ap.add_argument("--full", action="store_true", default=os.environ.get(FULL_ENV, "") in ("1", "true"),
                    help=f"recompute from all master data, never incrementally [env {FULL_ENV}=1]")
    args = ap.parse_args(argv)
    try:
        settings = load_settings(home=args.home, pipeline=args.pipeline)
        pipeline = load_pipeline(settings.pipeline)
        from lambdalake.versions import default_keep

        manifest = run_batch(settings, pipeline, views=args.view, spark_master=args.spark_master,
                             keep=args.keep if args.keep is not None else default_keep(), full=args.full)
    except LambdalakeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    out = contracts.to_builtins(manifest)
    print(json.dumps({k: out[k] for k in ("version", "mode", "mode_reason", "watermark", "row_counts",
                                          "duration_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
