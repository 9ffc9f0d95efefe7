"""Synthetic master dataset of the clickstream pipeline for the batch bench: whole lakes and 1 % appends.

Same schema and layout as the archiver's (:func:`batch.master.master_schema`, files per partition and offset
range), with duplicates re-sent a few offsets later and late events. A sibling module of ``bench_batch.py`` (the
script's directory is on ``sys.path``), not a script.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from batch.master import master_schema, write_parquet_atomic
from lambdalake.heads import archived_positions, master_files
from lambdalake.layout import Layout
from lambdalake.pipeline import Pipeline

PARTITIONS = 4
FILE_ROWS = 500_000
START_US = 1_767_571_200_000_000  # 2026-01-05T00:00:00Z


# --- synthetic master dataset -----------------------------------------------------------------------------------------
def _master_table(source, rng, event_ids: pa.Array, et, users, partition: int, first_offset: int,
                  ingest_us: int) -> pa.Table:
    """One partition's master rows of the demo ``source`` (pageviews or purchases): the given ids, event times
    and users, the other fields drawn from ``rng``, offsets from ``first_offset``."""
    n = len(event_ids)
    cols: dict[str, pa.Array] = {
        "event_id": event_ids,
        "event_time": pa.array(et, type=pa.timestamp("us", tz="UTC")),
        "user_id": pa.array([f"user-{u:06d}" for u in users]),
    }
    if source.name == "pageviews":
        urls = rng.zipf(1.1, n) % 405
        cols["url"] = pa.array([f"https://shop.example/product/{u}" for u in urls])
        cols["referrer"] = pa.array(np.where(rng.random(n) < 0.5, "https://www.google.com/", None))
        cols["duration_ms"] = pa.array(rng.integers(0, 120_000, n), type=pa.int64())
    else:
        prods = rng.zipf(1.2, n) % 300
        cols["product_id"] = pa.array([f"sku-{x:05d}" for x in prods])
        cols["amount_cents"] = pa.array(rng.integers(99, 100_000, n), type=pa.int64())
        cols["currency"] = pa.array(np.array(["EUR", "USD", "GBP", "JPY"])[rng.integers(0, 4, n)])
    cols["_partition"] = pa.array(np.full(n, partition, dtype=np.int32))
    cols["_offset"] = pa.array(np.arange(first_offset, first_offset + n, dtype=np.int64))
    cols["_ingest_time"] = pa.array(np.full(n, ingest_us, dtype=np.int64), type=pa.timestamp("us", tz="UTC"))
    return pa.table([cols[f.name] for f in master_schema(source)], schema=master_schema(source))


def write_master(home: Path, pipeline: Pipeline, n: int, seed: int = 1) -> None:
    """``n`` rows of master data (85 % pageviews), 2 % duplicates re-sent a few offsets later, 5 % late."""
    rng = np.random.default_rng(seed)
    layout = Layout(home)
    span_us = 72 * 3600 * 1_000_000
    for src, share in (("pageviews", 0.85), ("purchases", 0.15)):
        source = pipeline.source(src)
        total = int(n * share)
        per_p = total // PARTITIONS
        for p in range(PARTITIONS):
            ids_base = rng.integers(0, 1 << 62)
            et = START_US + np.sort(rng.integers(0, span_us, per_p))
            late = rng.random(per_p) < 0.05
            et = np.where(late, et - rng.integers(0, 3 * 3600 * 1_000_000, per_p), et)
            ids = np.arange(per_p, dtype=np.int64)
            dup = rng.random(per_p) < 0.02
            ids = np.where(dup & (ids > 64), ids - rng.integers(1, 64, per_p), ids)  # re-sent earlier event ids
            users = rng.zipf(1.3, per_p) % max(50, n // 20)
            table = _master_table(source, rng, pa.array([f"{src[:2]}-{ids_base}-{i}" for i in ids]), et, users, p,
                                  0, START_US + span_us)
            for start in range(0, per_p, FILE_ROWS):
                end = min(per_p, start + FILE_ROWS)
                write_parquet_atomic(table.slice(start, end - start), layout.master_file(src, p, start, end))


def append_master(home: Path, pipeline: Pipeline, n: int, seed: int = 2, late: float = 0.05,
                  duplicates: float = 0.02) -> int:
    """Append ``n`` events (85 % pageviews) after the archived end of every partition, one new file each: event
    times in the hour after the lake's span, ``late`` of them up to 3 h earlier, ``duplicates`` of them re-sending
    ids archived before. Returns the events written."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    layout = Layout(home)
    span_us, hour_us = 72 * 3600 * 1_000_000, 3600 * 1_000_000
    written = 0
    for src, share in (("pageviews", 0.85), ("purchases", 0.15)):
        source = pipeline.source(src)
        per_p = int(n * share) // PARTITIONS
        ends = archived_positions(layout, src)
        for p in range(PARTITIONS):
            start = ends.get(p, 0)
            last = [f for f in master_files(layout, src) if f.partition == p][-1]
            old_ids = pq.read_table(last.path, columns=["event_id"]).column("event_id").to_numpy(zero_copy_only=False)
            et = START_US + span_us + np.sort(rng.integers(0, hour_us, per_p))
            is_late = rng.random(per_p) < late
            et = np.where(is_late, et - rng.integers(hour_us, 3 * hour_us, per_p), et)
            ids = np.array([f"{src[:2]}-new{seed}-{p}-{i}" for i in range(per_p)], dtype=object)
            dup = rng.random(per_p) < duplicates
            ids[dup] = rng.choice(old_ids, int(dup.sum()))
            users = rng.zipf(1.3, per_p) % max(50, n * 5)
            table = _master_table(source, rng, pa.array(ids.tolist(), pa.string()), et, users, p, start,
                                  START_US + span_us + hour_us)
            write_parquet_atomic(table, layout.master_file(src, p, start, start + per_p))
            written += per_p
    return written
