"""Change data capture on this machine: Debezium's own throughput into Kafka, and what reading it as a table's rows
costs against the raw fetch (issue 30, "Measure").

One embedded Kafka broker, PostgreSQL and Kafka Connect (all started here, tied to this process), one captured
table ``orders`` (id, status, amount numeric(10,2), placed_at timestamptz). Figures, each with its ceiling from the
same run:

1. **Debezium → Kafka**: ``--changes`` rows inserted in transactions of ``--tx-rows`` and then each row updated
   once (so half the changes are updates with a before-image), from the first commit until the last change is in
   the topic — against the database doing the same writes alone (no capture can be faster than the commits).
2. **Reading the changes as rows by key**: fetch every message with kafka-python, decide each
   (:func:`lambdalake.tables.decode_change`) and apply it (:class:`lambdalake.tables.TableRows`) — against the raw
   kafka-python fetch of the same messages (the ceiling of any Python consumer here).
3. The same decode + apply on messages already in memory: the CPU cost per change alone.

Results: ``bench/results/bench_cdc-<UTC time>.json`` (with a ``figures`` list that ``bench/run.py`` tabulates).

    .venv/bin/python bench/bench_cdc.py --changes 100000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from results_io import write_result  # noqa: E402

from lambdalake import Field  # noqa: E402
from lambdalake.tables import TOMBSTONE, Table, TableRows, decode_change  # noqa: E402


def fetch(bootstrap: str, topic: str, n: int, on_message=None, timeout: float = 600.0) -> float:
    """Seconds to fetch the first ``n`` messages of ``topic`` (partition 0) from the start."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=8 << 20,
                      fetch_max_bytes=32 << 20)
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek_to_beginning(tp)
    got, t0, deadline = 0, time.perf_counter(), time.monotonic() + timeout
    try:
        while got < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{got} of {n} messages of {topic} after {timeout:.0f} s")
            for recs in c.poll(timeout_ms=500, max_records=100_000).values():
                if on_message is not None:
                    for r in recs:
                        on_message(r.value)
                got += len(recs)
        return time.perf_counter() - t0
    finally:
        c.close()


def end_offset(bootstrap: str, topic: str) -> int:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        if topic not in c.topics():
            return 0
        tp = TopicPartition(topic, 0)
        return c.end_offsets([tp])[tp]
    finally:
        c.close()


def workload(db, table: str, n: int, tx_rows: int) -> float:
    """Insert ``n`` rows, then update each once, ``tx_rows`` per transaction; seconds of the writes alone."""
    t0 = time.perf_counter()
    with db.connect() as conn:
        for start in range(0, n, tx_rows):
            with conn.cursor() as cur:
                cur.executemany(f"INSERT INTO {table} VALUES (%s, 'new', %s, now())",
                                [(i, f"{i % 1000}.25") for i in range(start, min(n, start + tx_rows))])
            conn.commit()
        for start in range(0, n, tx_rows):
            conn.execute(f"UPDATE {table} SET status = 'paid' WHERE id >= %s AND id < %s", (start, start + tx_rows))
            conn.commit()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=100_000, help="rows inserted (each then updated once)")
    ap.add_argument("--tx-rows", type=int, default=1000, help="rows per transaction")
    args = ap.parse_args()
    from lambdalake.broker import EmbeddedBroker
    from lambdalake.connect import Capture, EmbeddedConnect, capture
    from lambdalake.embedded import free_port
    from lambdalake.postgres import EmbeddedPostgres

    work = Path(tempfile.mkdtemp(prefix="bench-cdc-"))
    work.chmod(0o711)  # started by root, PostgreSQL runs as the user `lambdalake`, which must pass through
    broker = EmbeddedBroker(work / "kafka", port=free_port(), controller_port=free_port(), tied_to_parent=True)
    pg = EmbeddedPostgres(work / "pg", tied_to_parent=True)
    connect = None
    n = args.changes
    result: dict = {"started": datetime.now(UTC).isoformat(timespec="seconds"), "changes": 2 * n,
                    "tx_rows": args.tx_rows, "cpus": os.cpu_count(), "load_average_at_start":
                    [round(x, 2) for x in os.getloadavg()]}
    try:
        bootstrap = broker.up(timeout=120)["bootstrap"]
        (work / "pg").mkdir()
        pg.up(timeout=120)
        db = pg.access()
        connect = EmbeddedConnect(work / "connect", bootstrap, tied_to_parent=True)
        connect.up(timeout=120)
        with db.connect(autocommit=True) as conn:
            conn.execute("CREATE TABLE orders (id int PRIMARY KEY, status text NOT NULL, amount numeric(10, 2) NOT "
                         "NULL, placed_at timestamptz NOT NULL)")
            conn.execute("CREATE TABLE orders_alone (LIKE orders INCLUDING ALL)")  # the same writes, not captured
        cap = Capture("bench", ("public.orders",), prefix="bench")
        capture(connect.url, cap, db, password_ref=connect.password_ref(cap, db))
        topic = cap.topic("public.orders")
        alone = workload(db, "orders_alone", n, args.tx_rows)
        t0 = time.perf_counter()
        written = workload(db, "orders", n, args.tx_rows)
        while end_offset(bootstrap, topic) < 2 * n:
            time.sleep(0.05)
        captured = time.perf_counter() - t0
        result["debezium"] = {"seconds": round(captured, 3), "per_second": round(2 * n / captured),
                              "writes_seconds": round(written, 3), "alone_seconds": round(alone, 3),
                              "alone_per_second": round(2 * n / alone)}
        raw = fetch(bootstrap, topic, 2 * n)
        table = Table("orders", topic, ["id"], [Field.integer("id"), Field.string("status"),
                                                Field.decimal("amount", scale=2), Field.timestamp("placed_at")],
                      time="placed_at")
        rows, kept = TableRows(), []

        def apply(value: bytes | None) -> None:
            kept.append(value)
            verdict = decode_change(table, value)
            if verdict is not TOMBSTONE:
                rows.apply(verdict)

        read = fetch(bootstrap, topic, 2 * n, apply)
        assert len(rows) == n and all(r["status"] == "paid" for r in rows.rows()), "the rows are not the table's"
        t1 = time.perf_counter()
        again = TableRows()
        for value in kept:
            verdict = decode_change(table, value)
            if verdict is not TOMBSTONE:
                again.apply(verdict)
        cpu = time.perf_counter() - t1
        result["read"] = {"raw_fetch_per_second": round(2 * n / raw), "rows_per_second": round(2 * n / read),
                          "in_memory_per_second": round(2 * n / cpu), "us_per_change": round(cpu / (2 * n) * 1e6, 2),
                          "rows": len(rows)}
    finally:
        if connect is not None:
            connect.down(timeout=30)
        pg.down(timeout=30)
        broker.down(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    d, r = result["debezium"], result["read"]
    result["figures"] = [
        {"figure": f"Debezium PostgreSQL connector into Kafka ({2 * n:,} changes: inserts, then updates; "
                   f"{args.tx_rows} rows a transaction; one task)", "value": d["per_second"], "unit": "changes/s",
         "baseline": "the database doing the same writes alone", "baseline_value": d["alone_per_second"],
         "note": "the ceiling of table sources here"},
        {"figure": "table source read: kafka-python fetch + decode_change + TableRows.apply", "value":
         r["rows_per_second"], "unit": "changes/s", "baseline": "raw kafka-python fetch of the same messages",
         "baseline_value": r["raw_fetch_per_second"], "note": ""},
        {"figure": "decode_change + TableRows.apply on messages in memory (one core)", "value":
         r["in_memory_per_second"], "unit": "changes/s", "baseline": "Debezium into Kafka, same run",
         "baseline_value": d["per_second"], "note": f"{r['us_per_change']} us a change"},
    ]
    write_result("bench_cdc-", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
