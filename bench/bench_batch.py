"""Batch-layer bench (not a test): archiver throughput, and Spark vs DuckDB recompute time over the same master files.

1. **Archiver**: produce ``--archiver-events`` demo events (with duplicates and malformed ones) into a dedicated
   embedded broker (or ``LAMBDALAKE_BOOTSTRAP``), then time ``ingest(until_caught_up=True)``: messages/s.
2. **Recompute**: for each size in ``--sizes``, write a synthetic master dataset of the clickstream pipeline (same
   schema and layout as the archiver's, 2 % duplicates, late events) and compute every view

   - with the Spark job (:func:`batch.job.run_batch`: snapshot + checksums, dedup, aggregate, write, validate,
     publish) on a warm session (``--steps`` logs its step timings), and
   - with DuckDB SQL over the same files (same dedup rule, same watermark, each view written to Parquet), and
   - with a *plain Spark* job (:func:`batch_baselines.spark_ceiling`), the ceiling of any Spark job for these views
     on the same session: read the master Parquet (the needed columns), keep offsets below W, first occurrence per
     (partition, event id), one group-by per view, write Parquet — no validation, checksums, id index, sort or
     manifest,

   reporting wall times and the ratios of our job to DuckDB and to the plain-Spark ceiling. ``--workdir DIR
   --keep-lakes`` builds each size's master once and reuses it in later runs.
3. **Incremental** (``--incremental``): on the lake of each size, publish a full version, append 1 % new events
   (5 % of them late by up to 3 h, 2 % re-sent ids of archived events) as new master files, then time the
   incremental run (the published version + the appended files, :func:`batch.job.run_batch`) against a full
   recompute (``full=True``) of the same data, both from the same published version; the two versions are checked
   equal row by row. Its floor in the same run: :func:`batch_baselines.spark_incremental_floor`, the least an exact
   incremental Spark run does (new rows, dedup, the id index, one merge group-by per view).

Results: one JSON file under ``bench/results/`` (git-ignored) and a table on stdout. Example::

    .venv/bin/python bench/bench_batch.py --sizes 1000000 --archiver-events 1000000
    .venv/bin/python bench/bench_batch.py --sizes 1000000 10000000 --skip-archiver --steps
    .venv/bin/python bench/bench_batch.py --sizes 10000000 --skip-archiver --workdir /tmp/llb --keep-lakes
    .venv/bin/python bench/bench_batch.py --sizes 1000000 --skip-archiver --incremental
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
from batch_baselines import duckdb_views, spark_ceiling, spark_incremental_floor  # noqa: E402
from batch_master_data import PARTITIONS, append_master, write_master  # noqa: E402

from lambdalake.aggregates import Mean  # noqa: E402
from lambdalake.config import load_settings  # noqa: E402
from lambdalake.layout import Layout  # noqa: E402
from lambdalake.pipeline import load_pipeline  # noqa: E402

PIPELINE = "lambdalake.pipelines.clickstream"


# --- 1. archiver ------------------------------------------------------------------------------------------------
def bench_archiver(events: int, workdir: Path, s3: bool = True) -> dict:
    from batch.archiver import ingest
    from lambdalake.broker import EmbeddedBroker
    from lambdalake.clients import ensure_topics
    from lambdalake.embedded import free_port
    from wiring.demo_stream import demo_messages
    from wiring.produce import send

    broker = None
    bootstrap = os.environ.get("LAMBDALAKE_BOOTSTRAP")
    if not bootstrap:
        broker = EmbeddedBroker(workdir / "kafka-home", port=free_port(), controller_port=free_port(), heap="1g",
                                tied_to_parent=True)
        bootstrap = broker.up(timeout=120)["bootstrap"]
    try:
        suffix = f"bench{int(time.time())}"
        pfile = workdir / "pipeline_bench.py"
        pfile.write_text(
            "from lambdalake.fields import Source\n"
            "from lambdalake.pipeline import Pipeline, load_pipeline\n"
            f"_p = load_pipeline({PIPELINE!r})\n"
            "pipeline = Pipeline(_p.name, views=_p.views, sources=[Source(name=s.name, topic=f'{s.topic}."
            f"{suffix}', fields=s.fields, event_id=s.event_id, event_time=s.event_time, key=s.key) "
            "for s in _p.sources])\n")
        settings = load_settings(home=workdir / "archiver-lake", bootstrap=bootstrap, pipeline=str(pfile),
                                 partitions=PARTITIONS)
        pipeline = load_pipeline(str(pfile))
        ensure_topics(settings, pipeline)
        t0 = time.monotonic()
        rep = send(settings, demo_messages(pipeline, events, seed=3), progress=False)
        produce_s = time.monotonic() - t0
        print(f"produced {rep.total} messages in {produce_s:.1f}s", file=sys.stderr)
        out: dict = {"produce_seconds": round(produce_s, 3)}
        report = ingest(settings, pipeline, until_caught_up=True)
        if s3:  # then S3, then local again into a fresh lake: the local figure is the better of a cold and a warm run
            out["s3"] = _archive_on_s3(workdir, bootstrap, pfile, pipeline)
            again = ingest(settings.with_(home=workdir / "archiver-lake-2"), pipeline, until_caught_up=True)
            report = max(report, again, key=lambda r: r.events_per_second)
        out.update({"messages": report.messages, "valid": report.valid, "invalid": report.invalid,
                    "files": report.files, "bytes": report.bytes, "seconds": round(report.seconds, 3),
                    "events_per_s": round(report.events_per_second)})
        if s3:
            out["s3"]["over_local"] = round(out["s3"]["events_per_s"] / max(out["events_per_s"], 1), 3)
        return out
    finally:
        if broker is not None:
            broker.down()


def _archive_on_s3(workdir: Path, bootstrap: str, pfile: Path, pipeline) -> dict:
    """The same topics archived into a lake on the embedded S3 server: throughput and object requests."""
    from collections import Counter

    from batch.archiver import ingest
    from lambdalake.s3server import EmbeddedS3, create_bucket
    from lambdalake.storage.s3 import S3Store

    server = EmbeddedS3(workdir / "s3-server", tied_to_parent=True)
    server.up(timeout=90)
    requests: Counter[str] = Counter()
    originals = {n: getattr(S3Store, n) for n in ("get", "get_versioned", "put", "put_if_absent", "swap", "list",
                                                   "children", "delete", "exists", "size")}

    def counted(name, fn):
        def call(self, *a, **k):
            requests[name] += 1
            return fn(self, *a, **k)
        return call

    try:
        access = server.access()
        create_bucket(access, "bench")
        os.environ.update({**access.env(), "LAMBDALAKE_WORK_DIR": str(workdir / "s3-work")})
        for name, fn in originals.items():
            setattr(S3Store, name, counted(name, fn))
        settings = load_settings(home="s3://bench/lake", bootstrap=bootstrap, pipeline=str(pfile),
                                 partitions=PARTITIONS, object_storage=True)
        report = ingest(settings, pipeline, until_caught_up=True)
    finally:
        for name, fn in originals.items():
            setattr(S3Store, name, fn)
        server.down(timeout=20)
    return {"messages": report.messages, "files": report.files, "seconds": round(report.seconds, 3),
            "events_per_s": round(report.events_per_second), "requests": dict(requests),
            "requests_per_roll": round(sum(requests.values()) / max(report.files, 1), 2),
            "requests_per_1k_events": round(1000 * sum(requests.values()) / max(report.messages, 1), 3)}


def bench_incremental(n: int, workdir: Path, spark, block: int, repeat: int = 1) -> dict:
    """Incremental run after 1 % new events vs a full recompute of the same data, both from the same published
    version (best of ``repeat`` each)."""
    import pyarrow.parquet as pq

    from batch.job import run_batch
    from lambdalake.layout import batch_pointer
    from lambdalake.versions import rollback

    pipeline = load_pipeline(PIPELINE)
    home = workdir / f"lake-inc-{n}"
    shutil.rmtree(home, ignore_errors=True)
    write_master(home, pipeline, n)
    settings = load_settings(home=home, pipeline=PIPELINE).with_(handoff_block=block)
    layout = Layout(home)
    t0 = time.monotonic()
    base = run_batch(settings, pipeline, spark=spark, keep=2 * repeat + 3)
    base_s = time.monotonic() - t0
    appended = append_master(home, pipeline, n // 100)
    inc_runs, full_runs, floor_runs = [], [], []
    inc = full = base
    floor_counts: dict[str, int] = {}
    for _ in range(max(1, repeat)):
        for runs, full_run in ((inc_runs, False), (full_runs, True)):
            while batch_pointer(layout) != base.version:  # both start from the base
                rollback(home, force=True)
            t0 = time.monotonic()
            m = run_batch(settings, pipeline, spark=spark, keep=2 * repeat + 3, full=full_run)
            runs.append(round(time.monotonic() - t0, 3))
            if full_run:
                full = m
            else:
                inc = m
        out = workdir / f"plain-spark-inc-{n}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.monotonic()
        floor_counts = spark_incremental_floor(spark, home, pipeline, base, block, out)
        floor_runs.append(round(time.monotonic() - t0, 3))
        shutil.rmtree(out, ignore_errors=True)
    assert inc.mode == "incremental" and full.mode == "full", (inc.mode_reason, full.mode_reason)
    if floor_counts != inc.row_counts:
        print(f"WARNING: row counts differ: incremental {inc.row_counts} plain spark {floor_counts}", file=sys.stderr)

    def rows(m, view) -> pa.Table:
        t = pq.read_table(layout.batch_version(str(m.version)) / view.name)
        keep = [c for c in t.column_names if not pa.types.is_binary(t.schema.field(c).type)]  # sketches: bytes differ
        t = t.select(keep)
        return t.sort_by([(c, "ascending") for c in keep])

    equal = inc.events == full.events and inc.row_counts == full.row_counts and all(
        rows(inc, v).equals(rows(full, v)) for v in pipeline.views)
    shutil.rmtree(home, ignore_errors=True)
    inc_s, full_s, floor_s = min(inc_runs), min(full_runs), min(floor_runs)
    return {"events": n, "appended": appended, "new_events_below_w": sum(inc.events.values()) - sum(
                base.events.values()), "late_fraction": 0.05, "base_full_seconds": round(base_s, 3),
            "incremental_seconds": inc_s, "full_seconds": full_s, "plain_spark_incremental_seconds": floor_s,
            "incremental_runs": inc_runs, "full_runs": full_runs, "plain_spark_incremental_runs": floor_runs,
            "incremental_over_full": round(inc_s / full_s, 3),
            "plain_spark_incremental_over_full": round(floor_s / full_s, 3),
            "incremental_over_plain_spark": round(inc_s / floor_s, 2),
            "versions_equal": equal, "plain_spark_row_counts_match": floor_counts == inc.row_counts,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def bench_recompute(n: int, workdir: Path, spark, spark_master: str, block: int, repeat: int = 1,
                    keep_lake: bool = False) -> dict:
    """Best of ``repeat`` runs of each engine over the same files, interleaved (all runs are reported too).
    ``keep_lake``: reuse the master of a previous run in ``workdir`` (and leave it there)."""
    from batch.job import run_batch

    pipeline = load_pipeline(PIPELINE)
    home = workdir / f"lake-{n}"
    built = home / ".bench-master-complete"
    t0 = time.monotonic()
    if not (keep_lake and built.exists()):
        shutil.rmtree(home, ignore_errors=True)
        write_master(home, pipeline, n)
        built.touch()
    gen_s = time.monotonic() - t0
    settings = load_settings(home=home, pipeline=PIPELINE).with_(handoff_block=block)
    spark_runs, duck_runs, plain_runs = [], [], []
    for _ in range(max(1, repeat)):
        t0 = time.monotonic()
        manifest = run_batch(settings, pipeline, spark=spark, keep=2, full=True)
        spark_runs.append(round(time.monotonic() - t0, 3))
        out = workdir / f"duck-{n}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        t0 = time.monotonic()
        duck_counts = duckdb_views(home, pipeline, block, out)
        duck_runs.append(round(time.monotonic() - t0, 3))
        shutil.rmtree(out, ignore_errors=True)
        out = workdir / f"plain-spark-{n}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.monotonic()
        plain_counts = spark_ceiling(spark, home, pipeline, block, out)
        plain_runs.append(round(time.monotonic() - t0, 3))
        shutil.rmtree(out, ignore_errors=True)
    spark_s, duck_s, plain_s = min(spark_runs), min(duck_runs), min(plain_runs)
    for name, counts in (("duckdb", duck_counts), ("plain spark", plain_counts)):
        if counts != manifest.row_counts:
            print(f"WARNING: row counts differ: spark {manifest.row_counts} {name} {counts}", file=sys.stderr)
    master_bytes = sum(f.stat().st_size for f in (home / "master").rglob("*.parquet"))
    if not keep_lake:
        shutil.rmtree(home, ignore_errors=True)
    return {"events": n, "master_bytes": master_bytes, "generate_seconds": round(gen_s, 2),
            "spark_seconds": spark_s, "duckdb_seconds": duck_s, "plain_spark_seconds": plain_s,
            "spark_runs": spark_runs, "duckdb_runs": duck_runs, "plain_spark_runs": plain_runs,
            "spark_over_duckdb": round(spark_s / duck_s, 2), "spark_over_plain_spark": round(spark_s / plain_s, 2),
            "plain_spark_over_duckdb": round(plain_s / duck_s, 2), "row_counts": manifest.row_counts,
            "row_counts_match": duck_counts == manifest.row_counts == plain_counts, "spark_master": spark_master,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "means_declared": sum(isinstance(a, Mean) for v in pipeline.views for a in v.aggregates)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 10_000_000])
    ap.add_argument("--archiver-events", type=int, default=1_000_000)
    ap.add_argument("--skip-archiver", action="store_true")
    ap.add_argument("--skip-s3", action="store_true", help="archiver: no run on the embedded S3 server")
    ap.add_argument("--spark-master", default=os.environ.get("LAMBDALAKE_SPARK_MASTER", "local[*]"))
    ap.add_argument("--block", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=2, help="runs per engine and size; the best is the figure")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory [a temp dir]")
    ap.add_argument("--keep-lakes", action="store_true",
                    help="with --workdir: build each size's master once, reuse it in later runs, leave it there")
    ap.add_argument("--steps", action="store_true", help="log the batch job's step timings (stderr)")
    ap.add_argument("--incremental", action="store_true", help="only the incremental bench (1%% appended) per size")
    args = ap.parse_args()
    if args.steps:
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        for step_log in ("batch.job", "batch.compute"):  # the run protocol and its steps 2-4
            logging.getLogger(step_log).setLevel(logging.INFO)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lambdalake-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"bench": "batch", "at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "platform": platform.platform()}}
    try:
        if not args.skip_archiver and args.archiver_events > 0:
            result["archiver"] = bench_archiver(args.archiver_events, workdir, s3=not args.skip_s3)
            a = result["archiver"]
            print(f"archiver: {a['messages']} messages in {a['seconds']}s = {a['events_per_s']} events/s")
            if "s3" in a:
                print(f"archiver on S3: {a['s3']['events_per_s']} events/s = {a['s3']['over_local']}x local; "
                      f"{a['s3']['requests_per_roll']} requests per roll ({a['s3']['requests']})")
        if args.sizes:
            from batch.spark_session import spark_session

            spark = spark_session(args.spark_master, app_name="lambdalake-bench")
            spark.sparkContext.setLogLevel("ERROR")
            result["spark"] = f"spark {spark.version} ({args.spark_master})"
            try:
                warm = min(args.sizes)
                bench_recompute(min(warm, 100_000), workdir, spark, args.spark_master, args.block)  # JIT warm-up
                if args.incremental:
                    result["incremental"] = []
                    for n in args.sizes:
                        r = bench_incremental(n, workdir, spark, args.block, args.repeat)
                        result["incremental"].append(r)
                        print(f"incremental {n:>11,} events + {r['appended']:,} ({r['new_events_below_w']:,} new "
                              f"deduplicated below W): incremental "
                              f"{r['incremental_seconds']:.1f}s, full {r['full_seconds']:.1f}s, ratio "
                              f"{r['incremental_over_full']:.1%} (equal: {r['versions_equal']}); plain-Spark "
                              f"incremental {r['plain_spark_incremental_seconds']:.1f}s = "
                              f"{r['plain_spark_incremental_over_full']:.1%} of full")
                result["recompute"] = []
                for n in ([] if args.incremental else args.sizes):
                    r = bench_recompute(n, workdir, spark, args.spark_master, args.block, args.repeat,
                                        keep_lake=args.keep_lakes and args.workdir is not None)
                    result["recompute"].append(r)
                    print(f"recompute {n:>11,} events: spark {r['spark_seconds']:.1f}s, duckdb "
                          f"{r['duckdb_seconds']:.1f}s, plain spark {r['plain_spark_seconds']:.1f}s; ours/duckdb "
                          f"{r['spark_over_duckdb']}x, ours/plain spark {r['spark_over_plain_spark']}x, plain "
                          f"spark/duckdb {r['plain_spark_over_duckdb']}x (rows match: {r['row_counts_match']}, "
                          f"load {r['load_average']})")
            finally:
                spark.stop()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"bench_batch-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
