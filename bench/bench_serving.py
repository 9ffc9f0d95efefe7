"""Serving latency: merged views (batch ⊕ speed, ``serving.connect()``) vs a raw master scan and vs the ceiling.

Not a test. For each size it synthesizes a lake of the clickstream pipeline's ``pageviews`` directly on disk, per
the published contracts (no Kafka, no Spark): master parquet files per partition/offset range; a batch version
with the views aggregated over offsets ``< W`` (W aligned to the handoff block), written the way the Spark job
writes them (sorted by the view's keys then ``window_start``, small row groups:
``batch.spark_views.write_for_lookups``) and its serving copy (``lambdalake.servingcopy``, as
``lambdalake.versions.publish`` writes it); a speed snapshot with the partitions' remaining offsets aggregated per
(partition, block). Two streams per size (``--streams``): ``demo`` (405 urls) and ``zipf`` (10,000 urls and the users
each Zipf-distributed, exponent 1.1, fixed seed). Then it times:

- ``connect()``: the default, lazy connection (views over the files) and ``materialize=True`` (both sides copied),
  against its floor (:func:`connect_floor`: open DuckDB, pyarrow datasets over the same files, speed files read);
- ``one_key_30d``:  one url's hourly views over 30 days (point lookup, ``pageviews_hourly``)
- ``one_user_30d``: one user's daily activity over 30 days (point lookup, ``user_activity_daily``)
- ``top_n_day``:    top-10 urls of one day by views (``pageviews_hourly``)
- ``rollup_urls``:  views per url over everything (full roll-up of ``pageviews_hourly``)
- ``rollup_users``: total pageviews over everything (full roll-up of ``user_activity_daily``)

each against (a) the serving connection (batch side from the serving copy), (a') the same connection over a
version without a copy (the parquet path: what earlier releases serve), (b) the same answer computed from the raw
master files with ``read_parquet`` in a plain DuckDB connection (the "no views" baseline) and (c) the same SQL over
plain in-memory DuckDB tables holding the merged views' rows (the ceiling: what the query costs with no merge, no
files, no Arrow); answers must agree. Printed per query: p50 of (a), its ratio to (c) and (b)/(a) (> 1: the views
beat the raw scan), (a') and its ratio to (c), and how many events a view row stands for. Also ``lambdalake sql``
wall time for a point lookup (process start to first byte of output, and to exit), against its start-up floor (an
interpreter importing DuckDB and pyarrow.dataset).
Results: ``bench/results/serving-<utc time>.json``.

    .venv/bin/python bench/bench_serving.py --sizes 1000000 --reps 30  # quick
    .venv/bin/python bench/bench_serving.py --sizes 1000000,10000000   # both, ratios in one run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lambdalake import sketches  # noqa: E402
from lambdalake.config import load_settings  # noqa: E402
from lambdalake.contracts import (  # noqa: E402
    MANIFEST_FORMAT,
    SNAPSHOT_FORMAT,
    BatchManifest,
    BatchPointer,
    BatchView,
    Positions,
    SpeedPointer,
    SpeedSnapshotMeta,
    SpeedView,
    utc_now_iso,
)
from lambdalake.layout import Layout, write_contract, write_pointer  # noqa: E402
from lambdalake.pipeline import load_pipeline  # noqa: E402
from lambdalake.servingcopy import copy_path, write_serving_copy  # noqa: E402
from serving.connection import connect  # noqa: E402

PARTITIONS = 4
BLOCK = 1000
SPAN_DAYS = 60
T0 = datetime(2026, 1, 1, tzinfo=UTC)
CHUNK = 1_000_000
SPEED_SHARE = 0.02  # the newest ~2% of every partition is still in the speed layer
ROW_GROUP_ROWS = 20_000  # about batch.spark_views.LOOKUP_ROW_GROUP_BYTES (1 MiB) of view rows
LAMBDALAKE = Path(sys.executable).with_name("lambdalake")


def zipf_ranks(rng: np.random.Generator, population: int, exponent: float, m: int) -> np.ndarray:
    """``m`` draws of ranks 0..population-1 with P(rank k) proportional to 1/(k+1)^exponent (a bounded Zipf)."""
    weights = 1.0 / np.arange(1, population + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    return np.minimum(np.searchsorted(cdf, rng.random(m) * cdf[-1], side="right"), population - 1)


def synthesize(home: Path, n: int, seed: int = 1, stream: str = "demo", copy: bool = True) -> dict:
    """Write master files, one batch version (with its serving copy unless ``copy`` is false) and one speed
    snapshot for ``n`` pageview events. ``stream``: ``demo`` (405 urls, users n/20; url and user ranks drawn from
    numpy's unbounded Zipf 1.1 / 1.3 folded onto them) or ``zipf`` (the issue's skewed stream: 10,000 urls and
    max(1000, n/20) users, each a bounded Zipf of exponent 1.1, fixed seed)."""
    pipeline = load_pipeline("lambdalake.pipelines.clickstream")
    src = pipeline.source("pageviews")
    layout = Layout(home)
    rng = np.random.default_rng(seed)
    n_urls = 10_000 if stream == "zipf" else 400
    urls = np.array([f"https://shop.example/{p}" for p in ("", "cart", "checkout", "search", "about")]
                    + [f"https://shop.example/product/{i}" for i in range(n_urls - 5 if stream == "zipf" else 400)])
    n_users = max(1000 if stream == "zipf" else 50, n // 20)
    next_offset = [0] * PARTITIONS
    span_us = SPAN_DAYS * 86_400 * 1_000_000
    t0_us = int(T0.timestamp() * 1_000_000)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        idx = np.arange(start, start + m)
        et = t0_us + idx * (span_us // n) - (rng.random(m) < 0.05) * rng.integers(0, 3 * 3_600_000_000, m)
        if stream == "zipf":
            user, url = zipf_ranks(rng, n_users, 1.1, m), zipf_ranks(rng, len(urls), 1.1, m)
        else:
            user = (rng.zipf(1.3, m) - 1) % n_users
            url = (rng.zipf(1.1, m) - 1) % len(urls)
        part = user % PARTITIONS
        table = pa.table({
            "event_id": pa.array([f"pv-{i}" for i in idx]),
            "event_time": pa.array(et, pa.timestamp("us", tz="UTC")),
            "user_id": pa.array(np.char.add("user-", np.char.zfill(user.astype(str), 7))),
            "url": pa.array(urls[url]),
            "referrer": pa.nulls(m, pa.string()),
            "duration_ms": pa.array(rng.integers(0, 120_000, m), pa.int64()),
        })
        for p in range(PARTITIONS):
            mask = part == p
            k = int(mask.sum())
            if not k:
                continue
            sub = table.filter(pa.array(mask))
            off = next_offset[p]
            sub = sub.append_column("_partition", pa.array(np.full(k, p), pa.int32()))
            sub = sub.append_column("_offset", pa.array(np.arange(off, off + k), pa.int64()))
            sub = sub.append_column("_ingest_time", pa.array(et[mask], pa.timestamp("us", tz="UTC")))
            f = layout.master_file(src.name, p, off, off + k)
            f.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(sub, f)
            next_offset[p] = off + k
    ends = {p: next_offset[p] for p in range(PARTITIONS)}
    wm = {p: int(e * (1 - SPEED_SHARE)) // BLOCK * BLOCK for p, e in ends.items()}
    counts = _publish_views(home, pipeline, src, wm, ends)
    if copy:  # what lambdalake.versions.publish writes with every version
        t = time.perf_counter()
        write_serving_copy(layout.batch_version("v000001"), counts)
        copy_s = round(time.perf_counter() - t, 2)
    return {"events": n, "stream": stream, "watermark": wm, "positions": ends,
            "serving_copy_write_s": copy_s if copy else None}


def _publish_views(home: Path, pipeline, src, wm: dict[int, int], ends: dict[int, int]) -> dict[str, int]:
    layout = Layout(home)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    sketches.register(con)  # approx_distinct columns hold HLL sketches, built as the batch job builds them
    types = {f.name: f.type for f in src.fields}
    master = f"read_parquet('{layout.master_source(src.name)}/p=*/*.parquet')"
    case_w = "CASE _partition " + " ".join(f"WHEN {p} THEN {w}" for p, w in wm.items()) + " ELSE 0 END"
    version, snap = "v000001", "000000000001"
    counts = {}
    for view in pipeline.views:
        keys = [f'"{k}"' for k in view.keys]
        ws = f"make_timestamptz((epoch_us(event_time) // {view.bucket_us}) * {view.bucket_us}) AS window_start"
        aggs = []
        for a in view.stored_aggregates:
            if a.kind == "approx_distinct":
                aggs.append(f'{sketches.sketch_sql(f"list({chr(34)}{a.column}{chr(34)})", types[a.column], a.lg_k)} '
                            f'AS "{a.name}"')
                continue
            expr = "count(*)" if a.kind == "count" else f'{a.kind}("{a.column}")'
            aggs.append(f'CAST({expr} AS BIGINT) AS "{a.name}"')
        if view.source != src.name:  # purchases: nothing synthesized, the view stays empty on both sides
            continue
        sel = ", ".join(keys + [ws] + aggs)
        group = ", ".join(keys + ["window_start"])
        vdir = layout.batch_version(version) / view.name
        vdir.mkdir(parents=True)
        order = ", ".join(keys + ["window_start"])  # as batch.spark_views.write_for_lookups: sorted, small row groups
        con.execute(f"COPY (SELECT {sel} FROM {master} WHERE _offset < {case_w} GROUP BY {group} ORDER BY {order}) "
                    f"TO '{vdir}/part-00000.parquet' (FORMAT parquet, ROW_GROUP_SIZE {ROW_GROUP_ROWS})")
        counts[view.name] = con.execute(f"SELECT count(*) FROM '{vdir}/part-00000.parquet'").fetchone()[0]
        sdir = layout.speed_snapshot(snap)
        sdir.mkdir(parents=True, exist_ok=True)
        sgroup = "_partition, _block_start, " + group
        con.execute(f"COPY (SELECT _partition, (_offset // {BLOCK}) * {BLOCK} AS _block_start, {sel} FROM {master} "
                    f"WHERE _offset >= {case_w} GROUP BY {sgroup}) TO '{sdir}/{view.name}.parquet' (FORMAT parquet)")
    counts["revenue_daily"] = 0
    topic = src.topic
    fingerprints = pipeline.fingerprints  # the rows are of the declared definitions
    write_contract(layout.batch_version(version) / "manifest.json", BatchManifest(
        version=version, pipeline=pipeline.name, watermark=Positions.of_topics({topic: wm}), block=BLOCK,
        row_counts=counts, views={name: BatchView(fp) for name, fp in fingerprints.items()}, engine="bench (duckdb)",
        finished_at=utc_now_iso(), published_at=utc_now_iso(), format=MANIFEST_FORMAT))
    write_contract(layout.speed_snapshot(snap) / "snapshot.json", SpeedSnapshotMeta(
        snapshot=snap, pipeline=pipeline.name, positions=Positions.of_topics({topic: ends}),
        pruned_to=Positions.of_topics({topic: wm}), block=BLOCK, created_at=utc_now_iso(),
        created_at_unix=time.time(), views={name: SpeedView(fp) for name, fp in fingerprints.items()},
        format=SNAPSHOT_FORMAT))
    write_pointer(layout.batch_pointer, BatchPointer(version))
    write_pointer(layout.speed_pointer, SpeedPointer(snap))
    return counts


def queries(rng: random.Random, urls: list[str], users: list[str]) -> dict[str, tuple]:
    """(merged SQL, raw SQL) per query kind, with random parameters drawn per repetition."""
    day = T0 + timedelta(days=rng.randrange(SPAN_DAYS - 1))
    start30 = T0 + timedelta(days=rng.randrange(SPAN_DAYS - 30))
    lo30, hi30 = start30.isoformat(), (start30 + timedelta(days=30)).isoformat()
    lo1, hi1 = day.isoformat(), (day + timedelta(days=1)).isoformat()
    url, user = rng.choice(urls), rng.choice(users)
    raw = "master_raw"
    return {
        "one_key_30d": (
            f"SELECT epoch_us(window_start), views FROM pageviews_hourly WHERE url = '{url}' "
            f"AND window_start >= '{lo30}' AND window_start < '{hi30}' ORDER BY window_start",
            f"SELECT (epoch_us(event_time) // 3600000000) * 3600000000 AS window_start, "
            f"count(*) AS views FROM {raw} WHERE url = '{url}' AND event_time >= '{lo30}' "
            f"AND event_time < '{hi30}' GROUP BY 1 ORDER BY 1"),
        "one_user_30d": (
            f"SELECT epoch_us(window_start), pageviews FROM user_activity_daily WHERE user_id = '{user}' "
            f"AND window_start >= '{lo30}' AND window_start < '{hi30}' ORDER BY window_start",
            f"SELECT (epoch_us(event_time) // 86400000000) * 86400000000 AS window_start, "
            f"count(*) AS pageviews FROM {raw} WHERE user_id = '{user}' AND event_time >= '{lo30}' "
            f"AND event_time < '{hi30}' GROUP BY 1 ORDER BY 1"),
        "top_n_day": (
            f"SELECT url, sum(views) AS v FROM pageviews_hourly WHERE window_start >= '{lo1}' "
            f"AND window_start < '{hi1}' GROUP BY url ORDER BY v DESC, url LIMIT 10",
            f"SELECT url, count(*) AS v FROM {raw} WHERE event_time >= '{lo1}' AND event_time < '{hi1}' "
            f"GROUP BY url ORDER BY v DESC, url LIMIT 10"),
        "rollup_urls": (
            "SELECT url, sum(views) AS v FROM pageviews_hourly GROUP BY url ORDER BY url",
            f"SELECT url, count(*) AS v FROM {raw} GROUP BY url ORDER BY url"),
        "rollup_users": (
            "SELECT sum(pageviews) FROM user_activity_daily",
            f"SELECT count(*) FROM {raw}"),
    }


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _timed(con, sql: str) -> tuple[float, list]:
    t = time.perf_counter()
    rows = con.execute(sql).fetchall()
    return (time.perf_counter() - t) * 1000, rows


def _stats(xs: list[float]) -> tuple[float, float]:
    return round(statistics.median(xs), 3), round(_pct(xs, 0.99), 3)


def cli_times(home: Path, sql: str, runs: int) -> dict:
    """``lambdalake sql`` for one query: ms from process start to the first byte of stdout, and to exit."""
    env = {**os.environ, "LAMBDALAKE_HOME": str(home), "LAMBDALAKE_PIPELINE": "lambdalake.pipelines.clickstream"}
    first, total = [], []
    for _ in range(runs):
        t = time.perf_counter()
        proc = subprocess.Popen([str(LAMBDALAKE), "sql", sql, "--format", "csv"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env)
        proc.stdout.read(1)
        first.append((time.perf_counter() - t) * 1000)
        proc.stdout.read()
        if proc.wait() != 0:
            raise SystemExit(f"lambdalake sql failed for {sql}")
        total.append((time.perf_counter() - t) * 1000)
    return {"first_byte_ms_p50": round(statistics.median(first), 1), "exit_ms_p50": round(statistics.median(total), 1),
            "runs": runs}


def connect_floor(home: Path, runs: int) -> float:
    """p50 ms of the least a lazy connection over this design does (the ceiling for ``connect()``): open an in-memory
    DuckDB, open a pyarrow dataset over each view's batch files (footers: row counts) and over each source's master
    files, read each speed file into memory, register all. No lock-down, checks or catalog."""
    import pyarrow.dataset as ds

    layout = Layout(home)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        con = duckdb.connect(":memory:")
        for vdir in sorted(layout.batch_version("v000001").iterdir()):
            if vdir.is_dir() and (files := sorted(str(f) for f in vdir.glob("*.parquet"))):
                dataset = ds.dataset(files, format="parquet")
                dataset.count_rows()
                con.register(f"b_{vdir.name}", dataset)
        for f in sorted(layout.speed_snapshot("000000000001").glob("*.parquet")):
            con.register(f"s_{f.stem}", pq.read_table(f))
        for sdir in sorted(p for p in layout.master.iterdir() if p.is_dir() and not p.name.startswith("_")):
            if files := sorted(str(f) for f in sdir.glob("p=*/*.parquet")):
                con.register(f"m_{sdir.name}", ds.dataset(files, format="parquet"))
        con.close()
        ts.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(ts), 1)


# What `lambdalake sql` cannot avoid importing (pandas refused, as serving.cli.main does): its start-up floor.
IMPORT_FLOOR = """
import sys
class NoPandas:
    def find_spec(self, name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoPandas())
import duckdb, pyarrow.dataset
print("x", flush=True)
"""


def start_floor(runs: int) -> dict:
    """p50 ms of a bare interpreter start and of one that imports DuckDB and pyarrow.dataset (the CLI's floor)."""
    out = {}
    for name, code in (("python_ms_p50", "print('x', flush=True)"), ("import_duckdb_pyarrow_ms_p50", IMPORT_FLOOR)):
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
            ts.append((time.perf_counter() - t) * 1000)
        out[name] = round(statistics.median(ts), 1)
    return out


def without_copy(home: Path, fn):
    """``fn()`` with the batch version's serving copy hidden: what a version of an earlier release is served as."""
    path = copy_path(Layout(home).batch_version("v000001"))
    hidden = path.with_name(".hidden" + path.name)
    path.rename(hidden)
    try:
        return fn()
    finally:
        hidden.rename(path)


def bench_size(n: int, reps: int, raw_reps: int, cli_runs: int, workdir: Path | None, keep: bool,
               stream: str = "demo") -> dict:
    base = Path(tempfile.mkdtemp(prefix=f"bench-serving-{n}-", dir=workdir))
    home = base / "lake"
    home.mkdir()
    try:
        t = time.perf_counter()
        info = synthesize(home, n, stream=stream)
        info["synthesize_s"] = round(time.perf_counter() - t, 2)
        settings = load_settings(home=home, pipeline="lambdalake.pipelines.clickstream")

        connect_ms, lazy_ms, parquet_ms = [], [], []
        for _ in range(15):
            for mode, sink in (("materialize", connect_ms), ("lazy", lazy_ms), ("parquet", parquet_ms)):
                t = time.perf_counter()
                c = without_copy(home, lambda: connect(settings)) if mode == "parquet" else \
                    connect(settings, materialize=mode == "materialize")
                sink.append((time.perf_counter() - t) * 1000)
                c.close()
        con = connect(settings)  # the default: lazy; the batch side from the version's serving copy
        pcon = without_copy(home, lambda: connect(settings))  # the previous path: the batch side's parquet files
        raw = duckdb.connect()
        raw.execute("SET TimeZone = 'UTC'")
        raw.execute(f"CREATE VIEW master_raw AS SELECT * FROM "
                    f"read_parquet('{Layout(home).master_source('pageviews')}/p=*/*.parquet')")
        ceiling = duckdb.connect()  # plain in-memory tables of the merged views' rows: no merge, no files
        ceiling.execute("SET TimeZone = 'UTC'")
        for name in ("pageviews_hourly", "user_activity_daily"):
            ceiling.register("_rows", con.sql(f"SELECT * FROM {name}").to_arrow_table())
            ceiling.execute(f"CREATE TABLE {name} AS SELECT * FROM _rows")
            ceiling.unregister("_rows")
        urls = [r[0] for r in con.execute("SELECT url FROM pageviews_hourly GROUP BY url "
                                          "ORDER BY sum(views) DESC LIMIT 50").fetchall()]
        users = [r[0] for r in con.execute("SELECT user_id FROM user_activity_daily GROUP BY user_id "
                                           "ORDER BY sum(pageviews) DESC LIMIT 200").fetchall()]
        info["batch_rows"] = dict(con.execute("SELECT name, batch_rows FROM lambdalake.views").fetchall())
        info["speed_rows"] = dict(con.execute("SELECT name, speed_rows FROM lambdalake.views").fetchall())
        info["events_per_view_row"] = {  # how many events a served row stands for (the view's compression)
            name: round(n / max(1, con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]), 2)
            for name in ("pageviews_hourly", "user_activity_daily")}
        rng = random.Random(42)
        one_key = queries(rng, urls, users)["one_key_30d"][0]
        info["explain_point_lookup"] = [ln.strip() for ln in con.execute(f"EXPLAIN {one_key}").fetchall()[0][1]
                                        .splitlines() if "Filters" in ln or "url" in ln][:6]
        results: dict[str, dict] = {}
        for kind in ("one_key_30d", "one_user_30d", "top_n_day", "rollup_urls", "rollup_users"):
            m_sql, r_sql = queries(rng, urls, users)[kind]
            for c, q in ((con, m_sql), (pcon, m_sql), (raw, r_sql), (ceiling, m_sql)):
                c.execute(q).fetchall()  # one untimed warm-up per side (OS page cache, parquet metadata)
            merged_ms, parquet_ms_q, raw_ms, ceil_ms = [], [], [], []
            for i in range(reps):
                m_sql, r_sql = queries(rng, urls, users)[kind]
                ms, got = _timed(con, m_sql)
                merged_ms.append(ms)
                ms, top = _timed(ceiling, m_sql)
                ceil_ms.append(ms)
                if got != top:
                    raise SystemExit(f"{kind}: merged view disagrees with the in-memory ceiling for {m_sql}")
                ms, old = _timed(pcon, m_sql)
                parquet_ms_q.append(ms)
                if old != got:
                    raise SystemExit(f"{kind}: the parquet path disagrees with the serving copy for {m_sql}")
                if i < raw_reps:
                    ms, want = _timed(raw, r_sql)
                    raw_ms.append(ms)
                    if got != want:
                        raise SystemExit(f"{kind}: merged view disagrees with the raw master for {m_sql}")
            (mp50, mp99), (rp50, rp99), (cp50, cp99) = _stats(merged_ms), _stats(raw_ms), _stats(ceil_ms)
            pp50, pp99 = _stats(parquet_ms_q)
            results[kind] = {
                "merged_p50_ms": mp50, "merged_p99_ms": mp99, "raw_p50_ms": rp50, "raw_p99_ms": rp99,
                "ceiling_p50_ms": cp50, "ceiling_p99_ms": cp99, "parquet_p50_ms": pp50, "parquet_p99_ms": pp99,
                "ratio_p50": round(rp50 / mp50, 2),  # raw / merged: > 1 means the views beat the raw scan
                "merged_over_ceiling_p50": round(mp50 / cp50, 2),
                "parquet_over_ceiling_p50": round(pp50 / cp50, 2), "parquet_ratio_p50": round(rp50 / pp50, 2),
                "merged_runs": len(merged_ms), "raw_runs": len(raw_ms),
            }
        con.close()
        pcon.close()
        raw.close()
        ceiling.close()
        info["connect_ms_p50"] = round(statistics.median(connect_ms), 1)  # materialize=True (batch copied)
        info["connect_lazy_ms_p50"] = round(statistics.median(lazy_ms), 1)  # the default
        info["connect_parquet_ms_p50"] = round(statistics.median(parquet_ms), 1)  # a version without a copy
        info["connect_floor_ms_p50"] = connect_floor(home, 15)
        info["queries"] = results
        if cli_runs:
            info["cli_point_lookup"] = cli_times(home, queries(rng, urls, users)["one_key_30d"][0], cli_runs)
            info["cli_start_floor"] = start_floor(cli_runs)
        return info
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def report(n: int, stream: str, r: dict) -> None:
    """One size's table: per query the merged view (serving copy), the previous parquet path, the raw master scan
    and the in-memory ceiling, with the ratios the issue's goals are stated in."""
    print(f"size {n:,}, stream {stream}: events per view row {r['events_per_view_row']}; batch rows "
          f"{r['batch_rows']}; serving copy written in {r.get('serving_copy_write_s')} s")
    print(f"  connect p50 {r['connect_lazy_ms_p50']} ms (without the copy {r['connect_parquet_ms_p50']} ms; "
          f"materialized {r['connect_ms_p50']} ms; floor {r['connect_floor_ms_p50']} ms); lambdalake sql point "
          f"lookup {r.get('cli_point_lookup')} (start-up floor {r.get('cli_start_floor')})")
    print(f"  {'query':13s} {'merged':>9s} {'/ceiling':>8s} {'raw/merged':>10s} | {'parquet path':>12s} "
          f"{'/ceiling':>8s} | {'raw scan':>9s} {'ceiling':>8s}   (p50 ms)")
    for kind, q in r["queries"].items():
        print(f"  {kind:13s} {q['merged_p50_ms']:9.2f} {q['merged_over_ceiling_p50']:7.2f}x {q['ratio_p50']:9.2f}x | "
              f"{q['parquet_p50_ms']:12.2f} {q['parquet_over_ceiling_p50']:7.2f}x | {q['raw_p50_ms']:9.2f} "
              f"{q['ceiling_p50_ms']:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000", help="comma-separated event counts (e.g. 1000000,10000000)")
    ap.add_argument("--reps", type=int, default=60, help="timed runs per merged query kind")
    ap.add_argument("--raw-reps", type=int, default=15, help="timed runs per raw-master query kind")
    ap.add_argument("--cli-runs", type=int, default=5, help="timed `lambdalake sql` runs (0: skip)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to synthesize lakes (default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the synthesized lakes")
    ap.add_argument("--streams", default="demo,zipf",
                    help="comma-separated event streams to synthesize: demo, zipf (see synthesize)")
    args = ap.parse_args()
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s]
    run = {"bench": "serving", "started_at": datetime.now(UTC).isoformat(), "duckdb": duckdb.__version__,
           "pyarrow": pa.__version__, "machine": platform.machine(), "python": platform.python_version(),
           "cpus": __import__("os").cpu_count(), "sizes": {}}
    streams = [x for x in args.streams.split(",") if x]
    for n in sizes:
        for stream in streams:
            key = str(n) if stream == "demo" else f"{n}-{stream}"
            print(f"size {n:,} ({stream}): synthesizing and timing ...", file=sys.stderr, flush=True)
            run["sizes"][key] = r = bench_size(n, args.reps, args.raw_reps, args.cli_runs, args.workdir, args.keep,
                                               stream)
            report(n, stream, r)
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"serving-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(run, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
