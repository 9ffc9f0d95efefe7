"""A table's rows by key (lambdalake/tables.py) from the change events of real parts — PostgreSQL, Debezium's
PostgreSQL connector on Kafka Connect, the Kafka broker — against the database itself: after every step of a random
workload (inserts, group-moving updates, primary-key changes, deletes), the rows and a GROUP BY of the changes
committed so far equal the table and the same GROUP BY computed by SQL in PostgreSQL; changes sent again and a
split at any offset change nothing."""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal

import pytest

from lambdalake import Field
from lambdalake.connect import Capture, capture, remove
from lambdalake.tables import TOMBSTONE, Change, Table, TableRows, decode_change
from tests.conftest import reachable_tmp_dir
from tests.test_cdc import _drop_slot

pytestmark = [pytest.mark.slow, pytest.mark.integration]
STATUSES = ("new", "paid", "sent", "void")


def _consume(bootstrap: str, topic: str, done: Callable[[list], bool], timeout: float = 120.0) -> list[bytes | None]:
    """The values of ``topic``'s messages (one partition) in offset order, from the first until ``done(values)``."""
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
        while not done(out):
            assert time.monotonic() < deadline, f"{len(out)} change events in {topic} after {timeout:.0f} s"
            for records in consumer.poll(timeout_ms=500).values():
                out += [r.value for r in records]
    finally:
        consumer.close()
    return out


def _end_offset(bootstrap: str, topic: str) -> int:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        return consumer.end_offsets([tp])[tp]
    finally:
        consumer.close()


def _sentinel(conn, table: str) -> None:
    """A row inserted and deleted at once: its delete is the last change of the log (key 0)."""
    conn.execute(f"INSERT INTO {table} VALUES (0, 'new', 0, now())")
    conn.execute(f"DELETE FROM {table} WHERE id = 0")
    conn.commit()


def _ends_with_sentinel(values: list) -> bool:
    return any(v is not None and b'"op":"d"' in v and b'"before":{"id":0,' in v for v in values[-3:])


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


def _orders(postgres) -> tuple[str, str, Table]:
    """A fresh orders table in PostgreSQL: (its suffix, its name, its table source)."""
    suffix = uuid.uuid4().hex[:8]
    name = f"orders_{suffix}"
    with postgres.connect(autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, status text NOT NULL, amount numeric(10, 2) NOT NULL,"
                     " placed_at timestamptz NOT NULL)")
    return suffix, name, Table(name, f"p{suffix}.public.{name}", primary_key=["id"],
                               columns=[Field.integer("id"), Field.string("status"), Field.decimal("amount", scale=2),
                                        Field.timestamp("placed_at")], time="placed_at")


def _aggregate(rows) -> dict[str, tuple[int, Decimal]]:
    out: dict[str, list] = defaultdict(lambda: [0, Decimal(0)])
    for r in rows:
        out[r["status"]][0] += 1
        out[r["status"]][1] += Decimal(r["amount"]) / 100
    return {k: (n, s) for k, (n, s) in out.items()}


def test_rows_by_key_equal_postgres_after_every_step(postgres, kafka_connect, kafka_broker):
    suffix, name, table = _orders(postgres)
    rng = random.Random(20261208)
    ids: set[int] = set()
    next_id = [1]
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
                steps.append(_table_now(conn, name))
        log = _consume(kafka_broker, table.topic, lambda values: len(values) >= n_events)
    finally:
        remove(kafka_connect.url, cap.name)
        _drop_slot(postgres, cap.slot)

    verdicts = [decode_change(table, v) for v in log]
    assert all(v is TOMBSTONE or isinstance(v, Change) for v in verdicts), [v for v in verdicts if v is not TOMBSTONE
                                                                            and not isinstance(v, Change)][:3]
    changes = [v for v in verdicts if v is not TOMBSTONE]
    assert {c.op for c in changes} == {"r", "c", "u", "d"}
    for end_lsn, table_rows, by_sql in steps:  # the changes committed by each step's end: the table then
        _assert_table(TableRows().apply_all(c for c in changes if c.lsn < end_lsn), table_rows, by_sql)
    full = TableRows().apply_all(changes)
    for _ in range(12):  # Connect sending a suffix again, read up to any point of it: nothing goes back
        b = rng.randrange(len(changes))
        c = rng.randrange(b, len(changes)) + 1
        assert TableRows().apply_all(changes + changes[b:c]) == full
    for w in sorted(rng.sample(range(len(changes) + 1), 12)):  # a batch watermark anywhere
        assert TableRows().apply_all(changes[:w]).merged(TableRows().apply_all(changes[w:])) == full


def test_connect_killed_9_resnapshots_or_resends_and_the_rows_still_equal_postgres(postgres, kafka_broker, tmp_path):
    """Kafka Connect killed with -9 twice while it sends a step's changes: first with no position stored (killed
    before its first offset flush, or its offsets file lost: started again, it snapshots the table anew and streams
    from there — the changes it had not sent, deletes included, are never sent, so the snapshot's end must delete
    the rows it did not read), then after storing it at
    the previous step's end (started again, it sends the changes since again). After every step, and at the end,
    the rows by key — and their GROUP BY — equal the table in PostgreSQL."""
    from lambdalake.connect import EmbeddedConnect

    suffix, name, table = _orders(postgres)
    rng = random.Random(7)
    ids: set[int] = set()
    next_id = [1]
    cap = Capture(f"k{suffix}", (f"public.{name}",), prefix=f"p{suffix}")
    offsets = tmp_path / "connect" / "offsets.dat"
    worker = EmbeddedConnect(tmp_path / "connect", kafka_broker, tied_to_parent=True)

    def kill_and_restart(sent_before: int, position_lost: bool = False) -> EmbeddedConnect:
        _consume(kafka_broker, table.topic, lambda values: len(values) > sent_before)  # the step is being sent
        os.kill(worker.running_pid(), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while worker.running_pid() is not None:
            assert time.monotonic() < deadline, "Kafka Connect did not die"
            time.sleep(0.1)
        if position_lost:  # killed before its first flush (1 s), or its offsets file lost: the same state
            offsets.unlink(missing_ok=True)
        again = EmbeddedConnect(tmp_path / "connect", kafka_broker, tied_to_parent=True)
        again.up(timeout=120)
        capture(again.url, cap, postgres, password_ref=again.password_ref(cap, postgres))
        return again

    steps, in_topic = [], 0
    try:
        worker.up(timeout=120)
        capture(worker.url, cap, postgres, password_ref=worker.password_ref(cap, postgres))
        with postgres.connect() as conn:
            for i in range(4):
                _step(conn, name, rng, ids, next_id)
                steps.append(_table_now(conn, name))
                if i == 0:  # its first changes sent, no position stored
                    worker = kill_and_restart(0, position_lost=True)
                elif i == 1:  # let it send this step and store its position (every 1 s), then kill it in the next
                    time.sleep(3)
                    assert offsets.exists() and offsets.stat().st_size > 0
                    in_topic = _end_offset(kafka_broker, table.topic)
                elif i == 2:
                    worker = kill_and_restart(in_topic)
            _sentinel(conn, name)
        log = _consume(kafka_broker, table.topic, _ends_with_sentinel)
    finally:
        try:
            remove(worker.url, cap.name)
        finally:
            worker.down(timeout=30)
            _drop_slot(postgres, cap.slot)

    changes = [v for v in (decode_change(table, m) for m in log) if v is not TOMBSTONE]
    assert all(isinstance(c, Change) for c in changes), [c for c in changes if not isinstance(c, Change)][:3]
    assert any(c.op == "r" and c.lsn >= steps[0][0] for c in changes), "no second snapshot after the first kill"
    assert len({(c.key, c.position) for c in changes}) < len(changes), "no change was sent twice after the second kill"
    _assert_steps(changes, steps)
    full = TableRows().apply_all(changes)
    for w in sorted(rng.sample(range(len(changes) + 1), 12)):  # a batch watermark anywhere
        assert TableRows().apply_all(changes[:w]).merged(TableRows().apply_all(changes[w:])) == full


def _assert_table(rows: TableRows, table_rows: list[tuple], by_sql: dict) -> None:
    got = [(r["id"], r["status"], Decimal(r["amount"]) / 100) for r in rows.rows()]
    assert got == [(i, s, a) for i, s, a in table_rows]
    assert _aggregate(rows.rows()) == by_sql


def test_postgres_restarted_mid_stream_and_the_rows_still_equal_it(kafka_broker, tmp_path):
    """PostgreSQL stopped (fast shutdown) and started again between two steps while Debezium streams from it: the
    connector's task fails on the lost replication connection, restarts on its own and resumes from the slot's
    confirmed position. After every step the rows by key and their GROUP BY equal the table."""
    import shutil

    from lambdalake.connect import EmbeddedConnect
    from lambdalake.postgres import EmbeddedPostgres

    pg = EmbeddedPostgres(reachable_tmp_dir("lambdalake-pg-restart-"), tied_to_parent=True)
    worker = EmbeddedConnect(tmp_path / "connect", kafka_broker, tied_to_parent=True)
    try:
        pg.up(timeout=90)
        db = pg.access()
        suffix, name, table = _orders(db)
        rng = random.Random(3)
        ids: set[int] = set()
        next_id = [1]
        worker.up(timeout=120)
        cap = Capture(f"r{suffix}", (f"public.{name}",), prefix=f"p{suffix}",
                      extra={"retriable.restart.connector.wait.ms": 1000})  # Debezium's default waits 10 s
        capture(worker.url, cap, db, password_ref=worker.password_ref(cap, db))
        steps = []
        for i in range(4):
            if i == 2:  # the server goes away under the connector, and comes back on the same port
                pg.down(timeout=30)
                pg.up(timeout=90)
                assert pg.access().port == db.port
            with db.connect() as conn:
                _step(conn, name, rng, ids, next_id)
                steps.append(_table_now(conn, name))
        with db.connect() as conn:
            _sentinel(conn, name)
        log = _consume(kafka_broker, table.topic, _ends_with_sentinel)
        changes = [v for v in (decode_change(table, m) for m in log) if v is not TOMBSTONE]
        assert all(isinstance(c, Change) for c in changes)
        _assert_steps(changes, steps)
    finally:
        worker.down(timeout=30)
        pg.down(timeout=30)
        shutil.rmtree(pg.dir, ignore_errors=True)


def _table_now(conn, name: str) -> tuple[int, list[tuple], dict]:
    """(the WAL position now, the table's rows, its GROUP BY status) right after a step committed."""
    lsn = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]
    table_rows = conn.execute(f"SELECT id, status, amount FROM {name} ORDER BY id").fetchall()
    by_sql = conn.execute(f"SELECT status, count(*), sum(amount) FROM {name} GROUP BY status").fetchall()
    conn.commit()
    return int(lsn), table_rows, {s: (n, total) for s, n, total in by_sql}


def _assert_steps(changes: list[Change], steps: list[tuple[int, list[tuple], dict]]) -> None:
    """Read in log order: before the first change streamed after each step's end (a snapshot between included),
    the rows are that step's table; at the end, the last one's."""
    pending, rows = list(steps), TableRows()
    for c in changes:
        while pending and c.op != "r" and c.lsn >= pending[0][0]:
            _assert_table(rows, *pending.pop(0)[1:])
        rows.apply(c)
    for step in pending:
        _assert_table(rows, *step[1:])
