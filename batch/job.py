r"""The batch job: Spark recomputes every view of the pipeline from the master dataset and publishes a new version.

This is the Spark *interpreter* of the view declarations in :mod:`lambdalake.pipeline` (:mod:`batch.spark_views`) —
there is no per-view Spark code: keys, bucket and the stored aggregates (``view.stored_aggregates``: count/sum ->
int64, min/max keep the field's type, including the hidden helpers a mean needs) are turned into one
``groupBy().agg()`` per view.

Run protocol (:func:`run_batch`), mirrored by numbered comments in the code:

1. Inputs, under the shared master readers lock (compaction cannot swap files meanwhile): per source the master
   files (:meth:`lambdalake.layout.Layout.master_files`, checked to tile without gap or overlap), the archived end
   per partition and the watermark ``W[p] = aligned_watermark(end, block)`` (:mod:`lambdalake.handoff`); the inputs
   are the files that start below ``W`` — recorded with size, rows and sha256
   (:class:`lambdalake.contracts.InputFile`; a sha256 the published version recorded for the same, unchanged file
   is reused instead of hashing it again: :class:`batch.inputs.KnownChecksums`).
2. Read the inputs, keep rows with ``_offset < W[_partition]`` that are valid under the *declared* field rules
   (:func:`batch.spark_rules.valid_rows`), and apply the dedup rule (:mod:`lambdalake.dedup`): the first valid
   occurrence of an event id per (source, partition), lowest offset wins. A full run never shuffles the rows for it
   (:func:`batch.compute._compute_source`: a hash aggregate of the narrow (partition, event id, offset) gives each
   id's first offset and count — also the event count and the id index — and the rows are joined with the broadcast
   first offsets of the few repeated ids); :func:`batch.spark_dedup.first_occurrences` (one shuffle of the rows)
   serves incremental runs and too many repeated ids to broadcast. Restricting to ``< W`` first is exact: an id's
   first occurrence below ``W`` is its first occurrence overall.
3. Per view: ``window_start`` = event time floored to the bucket (UTC), group by keys + window_start, aggregate;
   write ``<staging>/<view>/*.parquet``.
4. Check the staged output (:func:`batch.staged_checks.check_staged`): schema as declared, no null in
   non-nullable keys, one row per (keys, window_start), and the count aggregate of each view sums to the
   deduplicated events of its source.
5. Publish (:func:`lambdalake.versions.publish`): manifest into the staging prefix (where the version stays), one
   compare-and-swap of ``CURRENT``, retention. A failure anywhere before that removes the staging directory and
   changes nothing served. (``LAMBDALAKE_BATCH_FAULT=staged`` SIGKILLs the process right before this step, ``swap``
   right before the swap, for crash tests: a killed run leaves its staging directory, which the next run removes.)

``--view NAME`` recomputes only the named views, at the *published* watermark, and carries the other views over
from the published version (hard links) when their definition is unchanged
(:meth:`lambdalake.contracts.BatchManifest.definition_matches`), so a version still holds every view at one
watermark. Every version records each view's definition fingerprint
(:meth:`lambdalake.pipeline.Pipeline.fingerprint`); a view no longer declared is not in the next version.

Field rules at batch time. The master dataset holds the events that were valid under the rules *when they were
archived*. The batch job re-applies the rules declared *now* to every master row
(:func:`batch.spark_rules.valid_rows`, compiled from the declaration with the semantics of
:mod:`lambdalake.validation`; its limits are in :mod:`batch.spark_rules`), before dedup: a row invalid under the
current rules neither counts nor shadows a later valid duplicate of its event id. So a *tightened* rule (lower
``maximum``, a new ``pattern``, a field becoming required and non-nullable, ...) drops the master rows it makes
invalid. A *loosened* rule makes some rejected messages valid: the archiver keeps every range's invalid messages in
the lake (rejected files), and step 2 judges those recorded under other rules again with the product's validator
(:mod:`batch.rejected`) and reads the now-valid ones with the master rows, before dedup. The manifest records them
(``rejected_inputs``, ``revalidated``). Messages dead-lettered by a release without rejected files stay out.

Also runnable with ``spark-submit batch/job.py --home DIR --pipeline SPEC [--view NAME] [--keep K] [--full]``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

if __package__ in (None, ""):  # run as a script (spark-submit batch/job.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch.carry_over import _carry_index, _carry_over
from batch.compute import _compute
from batch.exceptions import NothingToCompute
from batch.incremental import FULL_ENV, incremental_base
from batch.inputs import KnownChecksums, check_not_behind, select_inputs
from batch.rewrite import master_readers_lock
from batch.spark_rules import java_pattern
from batch.spark_session import SESSION_CONF, spark_session
from lambdalake import contracts
from lambdalake.config import Settings, fix_handoff_block
from lambdalake.contracts import BatchManifest, BatchView
from lambdalake.exceptions import PipelineError
from lambdalake.layout import Layout, current_batch_manifest
from lambdalake.pipeline import Pipeline
from lambdalake.runtime import crash_point
from lambdalake.storage.files import data_files
from lambdalake.versions import DEFAULT_KEEP, new_staging_dir, publish

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


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


# --- the run -------------------------------------------------------------------------------------------------------
def run_batch(settings: Settings, pipeline: Pipeline, spark: Any = None, views: list[str] | None = None, *,
              spark_master: str | None = None, keep: int | None = None, full: bool = False) -> BatchManifest:
    """Compute and publish a new batch version (the run protocol in the module docstring). Returns its manifest.

    ``spark``: an existing SparkSession to use (it is left running); otherwise one is created for
    ``spark_master`` (default ``settings.spark_master``) and stopped at the end.
    ``views``: names to recompute at the published watermark (others carried over when their definition is
    unchanged, else recomputed too); None = all, new watermark — incrementally from the published version when
    :func:`batch.incremental.incremental_base` allows it, unless ``full``.
    """
    layout = Layout.of(settings.home, settings.lake)
    lake = data_files(layout.store)
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
    stage = layout.key(staging)  # the staged version's prefix in the lake
    published_ok = False
    try:
        with master_readers_lock(layout):
            # 1. inputs (before starting Spark: an empty lake fails fast)
            t1 = time.monotonic()
            inputs = select_inputs(layout, pipeline, settings.handoff_block, fixed_wm, KnownChecksums.of(published))
            log.info("inputs: %d master files selected in %.2fs", len(inputs.files), time.monotonic() - t1)
            check_not_behind(inputs, published)
            if not any(inputs.watermark.values()):
                raise NothingToCompute(
                    f"the master dataset holds no complete block of {settings.handoff_block} offsets yet "
                    f"(archived ends: {inputs.archived.nested()}); run `lambdalake ingest` first or wait for more "
                    "data")
            # fixed for the life of the lake from now on
            fix_handoff_block(settings.home, settings.handoff_block, settings.lake)
            if views:
                base, reason = None, "recompute of the named views at the published watermark (--view)"
            else:
                base, reason = incremental_base(layout, pipeline, published, inputs, settings.handoff_block,
                                                full=full)
            log.info("%s run: %s", "incremental" if base is not None else "full", reason)
            if own_spark:
                spark = spark_session(spark_master or settings.spark_master, s3=not lake.local)
            saved = {k: spark.conf.get(k, None) for k in SESSION_CONF}
            for k, v in SESSION_CONF.items():
                spark.conf.set(k, v)
            try:
                # 2-4. read + validate + dedup, aggregate (+ merge), write, check
                done = _compute(spark, layout, pipeline, inputs, selected, stage, base)
            finally:
                for k, v in saved.items():
                    if v is None:
                        spark.conf.unset(k)
                    else:
                        spark.conf.set(k, v)
        engine, master = f"spark {spark.version}", spark.sparkContext.master
        for name, meta in carried.items():
            _carry_over(layout, published.version, name, stage)
            done.row_counts[name] = published.row_counts[name]
            done.meta[name] = meta
        events = done.events
        if published is not None and views:
            events = {**published.events, **events}  # a carried view's source keeps its published count
            for src in pipeline.sources:  # a source none of whose views was computed keeps its index
                idx = published.id_index.get(src.name)
                if src.name not in done.index and idx is not None:
                    _carry_index(layout, published.version, src.name, idx, stage)
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
        # 5. publish (manifest, one compare-and-swap of CURRENT, retention)
        crash_point("LAMBDALAKE_BATCH_FAULT", "staged")  # crash tests: staged, nothing published
        manifest = publish(layout, staging, manifest, keep=keep, staged_in_store=True)
        published_ok = True
        return manifest
    finally:
        if not published_ok:
            shutil.rmtree(staging, ignore_errors=True)
            if not lake.local:
                try:
                    lake.delete_prefix(stage)
                except OSError as exc:  # the store is away: never hide why the run failed
                    log.warning("could not delete the failed run's prefix %s (garbage collection removes it after "
                                "the grace period): %s", stage, exc)
        if own_spark and spark is not None:
            spark.stop()


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
        settings = load_settings(home=args.home, pipeline=args.pipeline, object_storage=True)
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
