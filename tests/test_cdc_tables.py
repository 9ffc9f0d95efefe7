"""A table's rows by key (lambdalake/tables.py) from the change events of real parts — PostgreSQL, Debezium's
PostgreSQL connector on Kafka Connect, the Kafka broker — against the database itself: after every step of a random
workload (inserts, group-moving updates, primary-key changes, deletes), the rows and a GROUP BY of the changes
committed so far equal the table and the same GROUP BY computed by SQL in PostgreSQL; changes sent again and a
split at any offset change nothing."""

from __future__ import annotations

import random
import time
import uuid
from collections import defaultdict
from decimal import Decimal

import pytest

from lambdalake import Field
from lambdalake.connect import Capture, capture, remove
from lambdalake.tables import TOMBSTONE, Change, Table, TableRows, decode_change
from tests.test_cdc import _drop_slot

pytestmark = [pytest.mark.slow, pytest.mark.integration]
STATUSES = ("new", "paid", "sent", "void")


def _consume(bootstrap: str, topic: str, n: int, timeout: float = 120.0) -> list[bytes | None]:
    """The values of the first ``n`` messages of ``topic`` (one partition), in offset order."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    out: list[bytes | None] = []
    deadline = time.monotonic() + timeout
    try:
        while topic not in consumer.topics():
            assert time.monotonic() < deadline, f"no topic {topic}"
            time.sleep(0.5)
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        while len(out) < n:
            assert time.monotonic() < deadline, f"{len(out)} of {n} change events in {topic}"
            for records in consumer.poll(timeout_ms=500).values():
                out += [r.value for r in records]
    finally:
        consumer.close()
    assert len(out) == n, f"{len(out)} change events, {n} expected"
    return out


def _step(conn, table: str, rng: random.Random, ids: set[int], next_id: list[int]) -> int:
    """One transaction-rich step of the workload; returns the number of change events it makes."""
    events = 0
    for _ in range(120):
        op = rng.choices(["insert", "move", "amount", "delete", "rekey"], [40, 30, 10, 12, 8])[0]
        if op == "insert" or not ids:
            i = next_id[0]
            next_id[0] += 1
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s, now() - %s * interval '1 hour')",
                         (i, rng.choice(STATUSES), Decimal(rng.randint(0, 10**6)) / 100, rng.randint(0, 200)))
            ids.add(i)
            events += 1
        else:
            i = rng.choice(sorted(ids))
            if op == "move":  # moves the row's contribution to another group
                conn.execute(f"UPDATE {table} SET status = %s WHERE id = %s", (rng.choice(STATUSES), i))
                events += 1
            elif op == "amount":
                conn.execute(f"UPDATE {table} SET amount = amount + 1.01 WHERE id = %s", (i,))
                events += 1
            elif op == "delete":
                conn.execute(f"DELETE FROM {table} WHERE id = %s", (i,))
                ids.discard(i)
                events += 2  # the delete and its tombstone
            else:  # a primary-key change: a delete of the old key (+ tombstone) and a create of the new one
                j = next_id[0]
                next_id[0] += 1
                conn.execute(f"UPDATE {table} SET id = %s WHERE id = %s", (j, i))
                ids.discard(i)
                ids.add(j)
                events += 3
        if rng.random() < 0.2:
            conn.commit()
    conn.commit()
    return events


def _aggregate(rows) -> dict[str, tuple[int, Decimal]]:
    out: dict[str, list] = defaultdict(lambda: [0, Decimal(0)])
    for r in rows:
        out[r["status"]][0] += 1
        out[r["status"]][1] += Decimal(r["amount"]) / 100
    return {k: (n, s) for k, (n, s) in out.items()}


def test_rows_by_key_equal_postgres_after_every_step(postgres, kafka_connect, kafka_broker):
    suffix = uuid.uuid4().hex[:8]
    name = f"orders_{suffix}"
    table = Table(name, f"p{suffix}.public.{name}", primary_key=["id"],
                  columns=[Field.integer("id"), Field.string("status"), Field.decimal("amount", scale=2),
                           Field.timestamp("placed_at")], time="placed_at")
    rng = random.Random(20261208)
    ids: set[int] = set()
    next_id = [1]
    with postgres.connect(autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, status text NOT NULL, amount numeric(10, 2) NOT NULL,"
                     " placed_at timestamptz NOT NULL)")
    with postgres.connect() as conn:
        _step(conn, name, rng, ids, next_id)  # before the capture: the snapshot reads the rows left (op r)
    n_events = len(ids)
    cap = Capture(f"t{suffix}", (f"public.{name}",), prefix=f"p{suffix}")
    steps: list[tuple[int, list[tuple], dict]] = []  # per step: (its end LSN, the table's rows, the SQL GROUP BY)
    try:
        capture(kafka_connect.url, cap, postgres, password_ref=kafka_connect.password_ref(cap, postgres))
        with postgres.connect() as conn:
            for _ in range(4):
                n_events += _step(conn, name, rng, ids, next_id)
                lsn = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]
                table_rows = conn.execute(f"SELECT id, status, amount FROM {name} ORDER BY id").fetchall()
                by_sql = conn.execute(f"SELECT status, count(*), sum(amount) FROM {name} GROUP BY status").fetchall()
                conn.commit()
                steps.append((int(lsn), table_rows, {s: (n, total) for s, n, total in by_sql}))
        log = _consume(kafka_broker, table.topic, n_events)
    finally:
        remove(kafka_connect.url, cap.name)
        _drop_slot(postgres, cap.slot)

    verdicts = [decode_change(table, v) for v in log]
    assert all(v is TOMBSTONE or isinstance(v, Change) for v in verdicts), [v for v in verdicts if v is not TOMBSTONE
                                                                            and not isinstance(v, Change)][:3]
    changes = [v for v in verdicts if v is not TOMBSTONE]
    assert {c.op for c in changes} == {"r", "c", "u", "d"}
    for end_lsn, table_rows, by_sql in steps:  # the changes committed by each step's end: the table then
        rows = TableRows().apply_all(c for c in changes if c.lsn < end_lsn)
        got = [(r["id"], r["status"], Decimal(r["amount"]) / 100) for r in rows.rows()]
        assert got == [(i, s, a) for i, s, a in table_rows]
        assert _aggregate(rows.rows()) == by_sql
    full = TableRows().apply_all(changes)
    for _ in range(12):  # Connect sending a suffix again, read up to any point of it: nothing goes back
        b = rng.randrange(len(changes))
        c = rng.randrange(b, len(changes)) + 1
        assert TableRows().apply_all(changes + changes[b:c]) == full
    for w in sorted(rng.sample(range(len(changes) + 1), 12)):  # a batch watermark anywhere
        assert TableRows().apply_all(changes[:w]).merged(TableRows().apply_all(changes[w:])) == full
