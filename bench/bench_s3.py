"""Lake on object storage (issue 28): the speed layer and serving with the lake on the embedded S3 server (SeaweedFS,
:mod:`lambdalake.s3server`) against the same on local disk, as ratios measured in the same run. Not a test.

1. ``speed``: the speed layer in-process (``SpeedLayer.run(until_caught_up=True)``, as ``bench_speed.py`` runs it;
   default checkpoint interval) over the same ``--events`` pre-produced demo events on one embedded broker, into a
   fresh lake per run: on local disk and at ``s3://bench/speed-<i>``, alternated ``--repeat`` times; the best of
   each is the figure, S3 / local the ratio (goal >= 0.8x).
2. ``requests``: the S3 runs' store is wrapped in a counting proxy (every get / get_versioned / put / put_if_absent /
   swap / exists / size / modified / list / children / delete, and the bytes PUT), put where ``Layout.of`` caches a
   lake's store (``lambdalake.layout._STORES``). Requests made in the checkpoint writer thread per checkpoint, PUTs
   per second while busy (the catch-up run), and for an idle worker (``run()`` on the caught-up lake, no new events,
   ``--idle-seconds``): requests and PUTs per second, which should be ~0 (one GET of the batch pointer a second).
3. ``serving``: a lake of ``--serving-events`` pageviews synthesized as ``bench_serving.py`` does (master, one batch
   version, one speed snapshot), uploaded object by object to ``s3://bench/serving`` (without the serving copy:
   a publish on object storage writes none). ``serving.connect()`` p50: local lake (with its copy, the local
   default; and without it), S3 first connect (a fresh ``LAMBDALAKE_WORK_DIR``: the mirror is synced from scratch)
   and S3 second connect (warm mirror), with the object requests of each; then the point lookup of
   ``bench_serving.py`` (one url's hourly views over 30 days) p50 on each connection, answers checked equal.
4. ``batch``: the Spark batch job (a full recompute, one warm ``local[*]`` session with s3a) over the same
   synthesized master of ``--batch-events`` (``bench/batch_master_data.py``), on local disk and uploaded to
   ``s3://bench/batch``, alternated ``--batch-repeat`` times; the best of each is the figure, S3 / local the ratio.
   The S3 runs' object requests through the seam per publish (the driver's; Spark's own s3a requests are not
   counted); the two stores' row counts are checked equal.
5. ``freshness``: ``bench_speed.py``'s freshness run (a real ``lambdalake speed`` process, one worker, events
   offered at ``--fresh-rate`` for ``--fresh-seconds``; ~200 sampled events a second, each timed from its send to
   the first served speed set holding it) on a fresh local lake and on a fresh ``s3://bench/fresh-<hex>`` (read
   through the store every 20 ms: up to one poll late, never early). Goal: p99 <= 1 s at 10k events/s on S3.
0. ``raw``: the ceiling of every figure above, same run: one S3 PUT / conditional PUT / GET of a small object
   (p50, p99), next to a local-store PUT (write, rename, fsync).

Results: ``bench/results/bench_s3-<UTC time>.json`` (with a ``figures`` list that ``bench/run.py`` tabulates).

    .venv/bin/python bench/bench_s3.py --quick     # about 6 minutes
    .venv/bin/python bench/bench_s3.py             # 300k events, 3 runs per store, 1M-event serving lake
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_serving import queries, synthesize  # noqa: E402
from bench_speed import fresh, speed_in_process  # noqa: E402
from results_io import write_result  # noqa: E402
from speed_baselines import produce_all  # noqa: E402

from lambdalake import layout as layout_mod  # noqa: E402
from lambdalake.broker import EmbeddedBroker  # noqa: E402
from lambdalake.config import load_settings  # noqa: E402
from lambdalake.embedded import free_port  # noqa: E402
from lambdalake.layout import Layout  # noqa: E402
from lambdalake.s3server import EmbeddedS3, create_bucket  # noqa: E402
from lambdalake.servingcopy import copy_path  # noqa: E402
from lambdalake.storage import open_store  # noqa: E402
from lambdalake.storage.local import LocalStore  # noqa: E402
from speed.consumer import SpeedLayer, SpeedOptions  # noqa: E402

PIPELINE = "lambdalake.pipelines.clickstream"
BUCKET = "bench"
PUTS = ("put", "put_if_absent", "swap")
OPS = ("get", "get_versioned", *PUTS, "exists", "size", "modified", "list", "children", "delete")


class CountingStore:
    """A store that counts its requests (by the thread kind that made them: the speed layer's checkpoint writer,
    ``speed-commit*``, or any other) and the bytes it PUTs; everything else is the wrapped store's."""

    def __init__(self, inner):
        self._inner = inner
        self._lock = threading.Lock()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.put_bytes = 0

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in OPS:
            return attr

        def call(*a, **k):
            kind = "commit" if threading.current_thread().name.startswith("speed-commit") else "other"
            with self._lock:
                self.counts[(kind, name)] += 1
                if name in PUTS:
                    self.put_bytes += len(a[1] if len(a) > 1 else k.get("data", b""))
            return attr(*a, **k)
        return call

    def snapshot(self) -> tuple[Counter, int]:
        with self._lock:
            return Counter(self.counts), self.put_bytes


def counted(url: str) -> CountingStore:
    """The counting proxy of the lake ``url``, installed where ``Layout.of`` finds it (bench only)."""
    store = CountingStore(open_store(url))
    layout_mod._STORES[url] = store
    return store


def _ops(c: Counter, kind: str | None = None) -> dict[str, int]:
    out: Counter[str] = Counter()
    for (k, op), n in c.items():
        if kind is None or k == kind:
            out[op] += n
    return dict(sorted(out.items()))


def _puts(ops: dict[str, int]) -> int:
    return sum(ops.get(p, 0) for p in PUTS)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 3)


def _ms(xs: list[float]) -> dict:
    return {"p50": round(statistics.median(xs), 3), "p99": _pct(xs, 0.99), "n": len(xs)}


# --- 0. raw requests ----------------------------------------------------------------------------------------------
def raw_requests(work: Path, reps: int) -> dict:
    """ms per request of one small object (1 KiB, like a pointer or snapshot.json) on S3 and on the local store."""
    s3 = open_store(f"s3://{BUCKET}/raw")
    local = LocalStore(work / "raw-local")
    local.root.mkdir(parents=True, exist_ok=True)
    body = os.urandom(1024)
    out: dict = {}
    etag: dict = {}  # the conditional PUTs' chain: each swaps from the ETag the previous one wrote
    for name, fn in (
            ("s3_put", lambda i: s3.put(f"p/{i}", body)),
            ("s3_swap", lambda i, etag=etag: s3.swap("cas", body + str(i).encode(), etag.get("cas"))),
            ("s3_get", lambda i: s3.get(f"p/{i % 10}")),
            ("s3_put_256k", lambda i: s3.put(f"big/{i % 10}", body * 256)),
            ("s3_list", lambda i: s3.list("big/")),
            ("local_put", lambda i: local.put(f"p/{i}", body))):
        ts = []
        for i in range(reps):
            t = time.perf_counter()
            got = fn(i)
            ts.append((time.perf_counter() - t) * 1000)
            if name == "s3_swap":
                etag["cas"] = got
        out[name + "_ms"] = _ms(ts)
    return out


# --- 1 + 2. speed layer -------------------------------------------------------------------------------------------
def speed_runs(work: Path, bootstrap: str, events: int, repeat: int, interval: float, block: int,
               idle_seconds: float) -> dict:
    local_settings, pipe = fresh(work, bootstrap, block)
    produced = produce_all(local_settings, pipe, events)
    print(f"produced {produced}", flush=True)
    runs: dict[str, list[dict]] = {"local": [], "s3": []}
    last_s3 = None
    for i in range(repeat):
        for where in ("local", "s3"):
            if where == "local":
                home = work / f"speed-local-{i}"
                home.mkdir()
                s = local_settings.with_(home=home)
                store = None
            else:
                url = f"s3://{BUCKET}/speed-{i}"
                os.environ["LAMBDALAKE_WORK_DIR"] = str(work / f"speed-s3-work-{i}")
                s = load_settings(home=url, bootstrap=bootstrap, pipeline=local_settings.pipeline, partitions=4,
                                  object_storage=True).with_(handoff_block=block)
                store = counted(url)
            r = speed_in_process(s, pipe, interval)
            r["load_average"] = [round(x, 2) for x in os.getloadavg()]
            if store is not None:
                c, nbytes = store.snapshot()
                commit, other = _ops(c, "commit"), _ops(c, "other")
                cps = max(r["checkpoints"], 1)
                r["requests"] = {"commit_thread": commit, "other_threads": other, "put_bytes": nbytes}
                r["requests_per_checkpoint"] = round(sum(commit.values()) / cps, 2)
                r["puts_per_checkpoint"] = round(_puts(commit) / cps, 2)
                r["put_kib_per_checkpoint"] = round(nbytes / 1024 / cps, 1)
                r["puts_per_second"] = round(_puts(_ops(c)) / r["seconds"], 1)
                r["requests_per_second"] = round(sum(c.values()) / r["seconds"], 1)
                last_s3 = (s, store)
            runs[where].append(r)
            print(f"speed on {where} (run {i + 1}): {r['per_second']:,} events/s, {r['checkpoints']} checkpoints, "
                  f"commit median {r['commit_ms']['median']} ms"
                  + (f"; {r['requests_per_checkpoint']} requests and {r['puts_per_checkpoint']} PUTs per checkpoint, "
                     f"{r['puts_per_second']} PUTs/s" if store is not None else ""), flush=True)
    best = {w: max(rs, key=lambda r: r["per_second"]) for w, rs in runs.items()}
    out = {"events": produced["messages"], "checkpoint_interval": interval, "runs": runs,
           "local_per_second": best["local"]["per_second"], "s3_per_second": best["s3"]["per_second"],
           "s3_over_local": round(best["s3"]["per_second"] / best["local"]["per_second"], 3),
           "s3_best_run": {k: v for k, v in best["s3"].items() if k != "requests"} | {
               "requests": best["s3"]["requests"]}}
    out["idle"] = idle_worker(*last_s3, pipe, interval, idle_seconds)
    return out


def idle_worker(settings, store: CountingStore, pipe, interval: float, seconds: float = 10.0,
                settle: float = 3.0) -> dict:
    """A speed worker running (no --until-caught-up) on a caught-up S3 lake with no new events: its requests."""
    layer = SpeedLayer(settings, pipe, SpeedOptions(checkpoint_interval=interval))
    error: list[BaseException] = []

    def run() -> None:
        try:
            layer.run()
        except BaseException as exc:  # noqa: BLE001
            error.append(exc)

    t = threading.Thread(target=run, name="bench-idle-speed", daemon=True)
    t.start()
    time.sleep(settle)  # start-up: recovery, claim, assignment
    c0, _ = store.snapshot()
    cp0 = layer.stats.checkpoints
    t0 = time.monotonic()
    time.sleep(seconds)
    c1, _ = store.snapshot()
    dt = time.monotonic() - t0
    cps = layer.stats.checkpoints - cp0
    layer.stop()
    t.join(60)
    if error:
        raise error[0]
    ops = _ops(c1 - c0)
    return {"seconds": round(dt, 2), "requests": ops, "checkpoints": cps,
            "requests_per_second": round(sum(ops.values()) / dt, 2), "puts_per_second": round(_puts(ops) / dt, 2)}


# --- 3. serving ---------------------------------------------------------------------------------------------------
def upload(home: Path, url: str) -> dict:
    """Every file of the local lake ``home`` as an object of ``url``, but the serving copy (S3 publishes none)."""
    store = open_store(url)
    skip = {copy_path(Layout(home).batch_version("v000001"))}
    n = size = 0
    for f in sorted(home.rglob("*")):
        if f.is_file() and f not in skip and not f.name.endswith(".lock"):
            data = f.read_bytes()
            store.put(f.relative_to(home).as_posix(), data)
            n, size = n + 1, size + len(data)
    return {"objects": n, "bytes": size}


def serving(work: Path, events: int, cold_reps: int, warm_reps: int, query_reps: int) -> dict:
    from bench_serving import without_copy

    from serving.connection import connect

    home = work / "serving-lake"
    home.mkdir()
    t = time.perf_counter()
    info = synthesize(home, events)
    info["synthesize_s"] = round(time.perf_counter() - t, 2)
    url = f"s3://{BUCKET}/serving"
    t = time.perf_counter()
    info["upload"] = upload(home, url) | {"seconds": round(time.perf_counter() - t, 2)}
    print(f"serving lake: {events:,} events, uploaded {info['upload']}", flush=True)
    settings = load_settings(home=home, pipeline=PIPELINE)
    store = counted(url)

    def timed(fn) -> tuple[float, object]:
        t = time.perf_counter()
        con = fn()
        return (time.perf_counter() - t) * 1000, con

    def s3_connect():
        return connect(pipeline=PIPELINE, home=url)

    times: dict[str, list[float]] = {"local": [], "local_without_copy": [], "s3_first": [], "s3_second": []}
    requests: dict[str, list[dict]] = {"s3_first": [], "s3_second": []}
    for i in range(max(cold_reps, warm_reps)):
        for kind in times:
            if kind == "s3_first" and i >= cold_reps:
                continue
            if kind == "s3_first":  # a machine with an empty work directory: the mirror synced from scratch
                os.environ["LAMBDALAKE_WORK_DIR"] = str(work / f"serving-work-{i}")
            elif kind == "s3_second":
                os.environ["LAMBDALAKE_WORK_DIR"] = str(work / "serving-work-0")
            c0, _ = store.snapshot()
            if kind == "local":
                ms, con = timed(lambda: connect(settings))
            elif kind == "local_without_copy":
                ms, con = timed(lambda: without_copy(home, lambda: connect(settings)))
            else:
                ms, con = timed(s3_connect)
                requests[kind].append(_ops(store.snapshot()[0] - c0))
            con.close()
            times[kind].append(ms)
    out = {"events": events, "lake": info, "connect_ms": {k: _ms(v) for k, v in times.items()},
           "connect_requests": {k: v[-1] if v else {} for k, v in requests.items()}}
    from lambdalake.mirror import mirror_dir, sync

    warm = []  # the mirror's part of a second connect: one sync that finds nothing new
    for _ in range(warm_reps):
        t = time.perf_counter()
        sync(store._inner, mirror_dir(work / "serving-work-0"))
        warm.append((time.perf_counter() - t) * 1000)
    out["warm_sync_ms"] = _ms(warm)
    print(f"connect() ms: { {k: v['p50'] for k, v in out['connect_ms'].items()} }; requests "
          f"{out['connect_requests']}", flush=True)

    os.environ["LAMBDALAKE_WORK_DIR"] = str(work / "serving-work-0")
    cons = {"local": connect(settings), "local_without_copy": without_copy(home, lambda: connect(settings)),
            "s3": s3_connect()}
    try:
        local = cons["local"]
        urls = [r[0] for r in local.execute("SELECT url FROM pageviews_hourly GROUP BY url "
                                            "ORDER BY sum(views) DESC LIMIT 50").fetchall()]
        users = [r[0] for r in local.execute("SELECT user_id FROM user_activity_daily GROUP BY user_id "
                                             "ORDER BY sum(pageviews) DESC LIMIT 200").fetchall()]
        rng = random.Random(42)
        sql = queries(rng, urls, users)["one_key_30d"][0]
        for con in cons.values():
            con.execute(sql).fetchall()  # one untimed warm-up each
        q: dict[str, list[float]] = {k: [] for k in cons}
        for _ in range(query_reps):
            sql = queries(rng, urls, users)["one_key_30d"][0]
            answers = []
            for k, con in cons.items():
                t = time.perf_counter()
                answers.append(con.execute(sql).fetchall())
                q[k].append((time.perf_counter() - t) * 1000)
            if any(a != answers[0] for a in answers):
                raise SystemExit(f"point lookup answers differ between local and S3 for {sql}")
        out["point_lookup_ms"] = {k: _ms(v) for k, v in q.items()}
        out["point_lookup_sql"] = sql
    finally:
        for con in cons.values():
            con.close()
    print(f"point lookup ms: { {k: v['p50'] for k, v in out['point_lookup_ms'].items()} }", flush=True)
    return out


# --- figures for bench/run.py ---------------------------------------------------------------------------------------
# --- 4. batch ----------------------------------------------------------------------------------------------------
def batch_runs(work: Path, events: int, repeat: int) -> dict:
    from batch_master_data import write_master

    from batch.job import run_batch
    from batch.spark_session import spark_session
    from lambdalake.pipeline import load_pipeline

    pipe = load_pipeline(PIPELINE)
    home = work / "batch-lake"
    t = time.perf_counter()
    write_master(home, pipe, events)
    url = f"s3://{BUCKET}/batch"
    up = upload(home, url) | {"seconds": round(time.perf_counter() - t, 2)}
    os.environ["LAMBDALAKE_WORK_DIR"] = str(work / "batch-work")
    store = counted(url)
    spark = spark_session("local[*]", s3=True)
    stores = {"local": load_settings(home=home, pipeline=PIPELINE),
              "s3": load_settings(home=url, pipeline=PIPELINE, object_storage=True)}
    runs: dict[str, list[float]] = {"local": [], "s3": []}
    counts: dict[str, dict] = {}
    requests: list[dict[str, int]] = []
    try:
        for _ in range(max(1, repeat)):
            for kind, settings in stores.items():
                before, _ = store.snapshot()
                t = time.perf_counter()
                m = run_batch(settings, pipe, spark=spark, keep=2, full=True)
                runs[kind].append(round(time.perf_counter() - t, 3))
                counts[kind] = dict(m.row_counts)
                if kind == "s3":
                    requests.append(_ops(store.snapshot()[0] - before))
    finally:
        spark.stop()
    local_s, s3_s = min(runs["local"]), min(runs["s3"])
    print(f"batch: S3 {s3_s}s vs local {local_s}s = {round(s3_s / local_s, 3)}x; requests {requests[-1]}",
          flush=True)
    return {"events": events, "upload": up, "local_runs": runs["local"], "s3_runs": runs["s3"],
            "local_seconds": local_s, "s3_seconds": s3_s, "s3_over_local": round(s3_s / local_s, 3),
            "requests_per_publish": requests[-1], "row_counts_equal": counts["local"] == counts["s3"],
            "row_counts": counts["s3"]}


# --- 5. freshness -------------------------------------------------------------------------------------------------
def freshness_runs(work: Path, bootstrap: str, rate: float, seconds: float, interval: float, block: int) -> dict:
    import uuid

    from bench_speed import freshness

    out = {"rate": rate, "seconds": seconds, "checkpoint_interval": interval}
    for kind, lake in (("local", ""), ("s3", f"s3://{BUCKET}/fresh-{uuid.uuid4().hex[:8]}")):
        res = freshness(work, bootstrap, block, rate, seconds, interval, lake=lake)
        out[kind] = {k: res[k] for k in ("achieved_produce_rate", "messages", "samples", "freshness_ms",
                                         "catch_up_seconds_after_start", "snapshots_seen")}
        print(f"freshness @ {rate:,.0f}/s on {kind}: {res['freshness_ms']}", flush=True)
    return out


def figures(r: dict) -> list[dict]:
    out = []

    def fig(figure, value, unit, baseline="", baseline_value=None, note=""):
        out.append({"figure": figure, "value": value, "unit": unit, "baseline": baseline,
                    "baseline_value": baseline_value, "note": note})

    raw = r.get("raw") or {}
    if "speed" in r:
        s = r["speed"]
        b = s["s3_best_run"]
        fig(f"speed layer on the embedded S3 server ({s['events']:,} events, in-process, checkpoint every "
            f"{s['checkpoint_interval']} s)", s["s3_per_second"], "msg/s",
            "the same speed layer on local disk, same run (goal >= 0.8x)", s["local_per_second"])
        fig("speed checkpoint commit on S3, median (writer thread)", b["commit_ms"]["median"], "ms",
            "its PUTs x one S3 PUT p50 (same run)",
            round(b["puts_per_checkpoint"] * raw["s3_put_ms"]["p50"], 1) if raw else None,
            f"{b['requests_per_checkpoint']} requests, {b['puts_per_checkpoint']} PUTs, "
            f"{b['put_kib_per_checkpoint']} KiB per checkpoint; {b['puts_per_second']} PUTs/s while busy")
        i = s["idle"]
        fig("idle speed worker on S3: object requests per second", i["requests_per_second"], "req/s", "", None,
            f"{i['puts_per_second']} PUTs/s; {i['requests']} in {i['seconds']} s")
    if "serving" in r:
        sv = r["serving"]
        c, n = sv["connect_ms"], f"{sv['events']:,} events"
        for kind, what in (("s3_first", "first connect (mirror synced from scratch)"),
                           ("s3_second", "second connect (warm mirror)")):
            fig(f"connect() p50 on S3, {what}, {n}", c[kind]["p50"], "ms", "local lake (with its serving copy)",
                c["local"]["p50"], f"requests {sv['connect_requests'].get(kind)}; local without a copy (as S3 "
                f"serves) {c['local_without_copy']['p50']} ms; a sync finding nothing new {sv['warm_sync_ms']['p50']} "
                "ms")
        q = sv.get("point_lookup_ms")
        if q:
            fig(f"point lookup p50 on S3 (mirror), {n}", q["s3"]["p50"], "ms", "local lake (with its serving copy)",
                q["local"]["p50"], f"local without a copy {q['local_without_copy']['p50']} ms")
    if "freshness" in r:
        f, lo, hi = r["freshness"], r["freshness"]["local"], r["freshness"]["s3"]
        fig(f"freshness p99 on the embedded S3 server at {f['rate']:,.0f} events/s (1 speed worker, checkpoint every "
            f"{f['checkpoint_interval']} s)", hi["freshness_ms"]["p99"], "ms",
            "the same on local disk, same run (goal on S3: p99 <= 1000 ms)", lo["freshness_ms"]["p99"],
            f"p50 {hi['freshness_ms']['p50']} vs {lo['freshness_ms']['p50']} ms; {hi['samples']} samples; produced "
            f"{hi['achieved_produce_rate']:,}/s vs {lo['achieved_produce_rate']:,}/s")
    if "batch" in r:
        b = r["batch"]
        fig(f"batch job (full recompute, Spark local[*]) on the embedded S3 server, {b['events']:,} events",
            b["s3_seconds"], "s", "the same job on local disk, same run (lower is better)", b["local_seconds"],
            f"{sum(b['requests_per_publish'].values())} object requests per publish through the seam "
            f"({b['requests_per_publish']}; Spark's s3a requests not counted); row counts equal: "
            f"{b['row_counts_equal']}")
    if raw:
        fig("one S3 PUT of 1 KiB, p50 (embedded SeaweedFS)", raw["s3_put_ms"]["p50"], "ms",
            "local store PUT (write, rename, fsync)", raw["local_put_ms"]["p50"],
            f"GET {raw['s3_get_ms']['p50']} ms, conditional PUT {raw['s3_swap_ms']['p50']} ms, "
            f"PUT of 256 KiB {raw['s3_put_256k_ms']['p50']} ms, LIST of 10 keys {raw['s3_list_ms']['p50']} ms")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200k events, 3 runs per store, 300k-event serving lake")
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--repeat", type=int, default=3, help="speed runs per store (alternated); the best is the figure")
    ap.add_argument("--checkpoint-interval", type=float, default=SpeedOptions().checkpoint_interval)
    ap.add_argument("--block", type=int, default=1000)
    ap.add_argument("--idle-seconds", type=float, default=20.0)
    ap.add_argument("--serving-events", type=int, default=1_000_000)
    ap.add_argument("--cold-reps", type=int, default=5, help="first connects on S3 (each a fresh work directory)")
    ap.add_argument("--warm-reps", type=int, default=15)
    ap.add_argument("--query-reps", type=int, default=30)
    ap.add_argument("--raw-reps", type=int, default=100)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-serving", action="store_true")
    ap.add_argument("--batch-events", type=int, default=1_000_000)
    ap.add_argument("--batch-repeat", type=int, default=2, help="batch runs per store (alternated); the best counts")
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--fresh-rate", type=float, default=10_000.0)
    ap.add_argument("--fresh-seconds", type=float, default=30.0)
    ap.add_argument("--skip-freshness", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.events, args.repeat, args.idle_seconds = 200_000, 3, 8.0
        args.batch_events, args.fresh_seconds = 200_000, 12.0
        args.serving_events, args.cold_reps, args.warm_reps, args.query_reps = 300_000, 3, 8, 20
    result: dict = {"bench": "s3", "at": datetime.now(UTC).isoformat(timespec="seconds"), "args": vars(args),
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "platform": platform.platform()},
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    env_before = {k: os.environ.get(k) for k in ("LAMBDALAKE_WORK_DIR", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                 "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    server = broker = None
    try:
        server = EmbeddedS3(work / "s3-server", tied_to_parent=True)
        server.up(timeout=90)
        access = server.access()
        create_bucket(access, BUCKET)
        os.environ.update(access.env())
        result["raw"] = raw_requests(work, args.raw_reps)
        print(f"raw requests (ms): { {k: v['p50'] for k, v in result['raw'].items()} }", flush=True)
        if not args.skip_speed:
            broker = EmbeddedBroker(work / "kafka-home", port=free_port(), controller_port=free_port(), heap="1g",
                                    tied_to_parent=True)
            bootstrap = broker.up(timeout=120)["bootstrap"]
            result["speed"] = speed_runs(work, bootstrap, args.events, args.repeat, args.checkpoint_interval,
                                         args.block, args.idle_seconds)
            s = result["speed"]
            print(f"speed layer: S3 {s['s3_per_second']:,}/s vs local {s['local_per_second']:,}/s = "
                  f"{s['s3_over_local']}x; idle worker {s['idle']}", flush=True)
        if not args.skip_freshness:
            if broker is None:
                broker = EmbeddedBroker(work / "kafka-home-fresh", port=free_port(), controller_port=free_port(),
                                        heap="1g", tied_to_parent=True)
                bootstrap = broker.up(timeout=120)["bootstrap"]
            result["freshness"] = freshness_runs(work, bootstrap, args.fresh_rate, args.fresh_seconds,
                                                 args.checkpoint_interval, args.block)
        if broker is not None:
            broker.down(timeout=30)
            broker = None
        if not args.skip_serving:
            result["serving"] = serving(work, args.serving_events, args.cold_reps, args.warm_reps, args.query_reps)
        if not args.skip_batch:
            result["batch"] = batch_runs(work, args.batch_events, args.batch_repeat)
    finally:
        if broker is not None:
            broker.down(timeout=30)
        if server is not None:
            server.down(timeout=20)
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(work, ignore_errors=True)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["figures"] = figures(result)
    write_result("bench_s3-", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
