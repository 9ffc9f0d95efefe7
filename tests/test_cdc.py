"""Change data capture on real parts (docs/cdc.md): PostgreSQL 15, Kafka Connect standalone with Debezium's
PostgreSQL connector, the real Kafka broker — and the errors of their settings and arguments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from lambdalake.connect import Capture, capture, connect_url, remove
from lambdalake.exceptions import ConfigError
from lambdalake.postgres import EmbeddedPostgres, PostgresError, parse_postgres_url, postgres_url
from tests.conftest import LAMBDALAKE, reachable_tmp_dir


def _events(bootstrap: str, topic: str, n: int, timeout: float = 60.0) -> list[tuple[dict, dict | None]]:
    """The first ``n`` messages of ``topic`` as (key, value) with JSON decoded (value None for a tombstone)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                             consumer_timeout_ms=1000)
    out: list = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            if not consumer.subscription():
                if topic in consumer.topics():
                    consumer.subscribe([topic])
                else:
                    time.sleep(0.5)
                    continue
            for m in consumer:
                out.append((json.loads(m.key), json.loads(m.value) if m.value is not None else None))
                if len(out) >= n:
                    break
    finally:
        consumer.close()
    assert len(out) >= n, f"{len(out)} of {n} change events in {topic} after {timeout:.0f}s: {out}"
    return out


@pytest.mark.slow
@pytest.mark.integration
def test_inserts_updates_deletes_arrive_as_debezium_change_events(postgres, kafka_connect, kafka_broker):
    suffix = uuid.uuid4().hex[:8]
    table = f"orders_{suffix}"
    with postgres.connect(autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, status text NOT NULL, amount numeric(10, 2))")
        conn.execute(f"INSERT INTO {table} VALUES (1, 'new', 5.00)")  # before the capture: the snapshot's row
    cap = Capture(f"t{suffix}", (f"public.{table}",), prefix=f"p{suffix}")
    try:
        capture(kafka_connect.url, cap, postgres, password_ref=kafka_connect.password_ref(cap, postgres))
        with postgres.connect() as conn:
            conn.execute(f"INSERT INTO {table} VALUES (2, 'new', 10.25)")
            conn.execute(f"UPDATE {table} SET status = 'paid' WHERE id = 2")
            conn.commit()
            conn.execute(f"DELETE FROM {table} WHERE id = 1")
            conn.execute(f"UPDATE {table} SET id = 3 WHERE id = 2")  # a primary-key change
            conn.commit()
        events = _events(kafka_broker, cap.topic(f"public.{table}"), 8)
    finally:
        remove(kafka_connect.url, cap.name)
        _drop_slot(postgres, cap.slot)

    ops = [(key["id"], value and value["op"]) for key, value in events]
    # a snapshot read, then insert + update (one transaction), delete (+ its tombstone) and a primary-key change
    # (delete of the old key + tombstone, create of the new one) in a second transaction
    assert ops == [(1, "r"), (2, "c"), (2, "u"), (1, "d"), (1, None), (2, "d"), (2, None), (3, "c")], ops
    snap, ins, upd, dele = (events[i][1] for i in range(4))
    assert snap["before"] is None and snap["after"] == {"id": 1, "status": "new", "amount": "5.00"}
    assert ins["before"] is None and ins["after"] == {"id": 2, "status": "new", "amount": "10.25"}
    # REPLICA IDENTITY FULL: an update's and a delete's before-image is the whole old row
    assert upd["before"] == {"id": 2, "status": "new", "amount": "10.25"}
    assert upd["after"] == {"id": 2, "status": "paid", "amount": "10.25"}
    assert dele["before"] == {"id": 1, "status": "new", "amount": "5.00"} and dele["after"] is None
    moved_from, moved_to = events[5][1], events[7][1]
    assert moved_from["before"]["id"] == 2 and moved_to["after"] == {"id": 3, "status": "paid", "amount": "10.25"}
    streamed = [v for _, v in events[1:] if v is not None]
    for v in streamed:
        assert v["source"]["table"] == table and v["source"]["snapshot"] == "false"
        assert isinstance(v["source"]["lsn"], int) and isinstance(v["source"]["txId"], int)
    lsns = [v["source"]["lsn"] for v in streamed]
    assert lsns == sorted(lsns) and lsns[0] < lsns[1] < lsns[2] < lsns[3]  # a key change: one LSN, two events
    tx = [v["source"]["txId"] for v in streamed]
    assert tx[0] == tx[1] and tx[2] == tx[3] == tx[4] and tx[1] < tx[2]  # two transactions


def _drop_slot(db, slot: str) -> None:
    with db.connect(autocommit=True) as conn:
        for _ in range(40):  # the connector's task lets go of the slot shortly after its removal
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
            if row is None:
                return
            if not row[0]:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                return
            time.sleep(0.25)


OWNER = """
import sys, time
from pathlib import Path
from lambdalake.connect import EmbeddedConnect
from lambdalake.postgres import EmbeddedPostgres
pg = EmbeddedPostgres(Path(sys.argv[1]), tied_to_parent=True)
pg.up(timeout=90)
worker = EmbeddedConnect(Path(sys.argv[2]), sys.argv[3], tied_to_parent=True)
worker.up(timeout=120)
print(pg.running_pid(), worker.running_pid(), pg.status()["port"], worker.status()["port"], flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.integration
def test_postgres_and_connect_die_when_their_owner_is_killed_9(kafka_broker, tmp_path):
    d = reachable_tmp_dir("lambdalake-pg-owner-")
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(d), str(tmp_path / "connect"), kafka_broker],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = owner.stdout.readline().split()
        assert len(line) == 4, f"the owner did not start its servers (exit {owner.poll()})"
        pg_pid, connect_pid, pg_port, connect_port = map(int, line)
        pg_proc, connect_proc = psutil.Process(pg_pid), psutil.Process(connect_pid)
        assert pg_proc.username() != "root", "PostgreSQL must not run as root"
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        gone, alive = psutil.wait_procs([pg_proc, connect_proc], timeout=30)
        assert not alive, f"still running after their owner was killed: {alive}"
        from lambdalake.embedded import port_open

        assert not port_open("127.0.0.1", pg_port) and not port_open("127.0.0.1", connect_port)
        assert EmbeddedPostgres(d).status()["running"] is False
    finally:
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGKILL)
        import shutil

        shutil.rmtree(d, ignore_errors=True)


# --- settings and arguments ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("url, says", [
    ("mysql://u:p@h/db", "must start with postgresql://"),
    ("postgresql://u:p@h:5432", "lacks the database"),
    ("postgresql://h:5432/db", "lacks the user"),
    ("postgresql://u:secret@h:notaport/db", "is not a URL"),
])
def test_a_wrong_postgres_url_is_one_actionable_error_without_its_password(monkeypatch, url, says):
    monkeypatch.setenv("LAMBDALAKE_POSTGRES", url)
    with pytest.raises(ConfigError, match=says) as err:
        postgres_url()
    assert "secret" not in str(err.value) and "\n" not in str(err.value)


def test_a_postgres_url_is_parsed():
    db = parse_postgres_url("postgresql://app%40x:p%2Fw@db.example:6543/shop")
    assert (db.host, db.port, db.user, db.password, db.database) == ("db.example", 6543, "app@x", "p/w", "shop")
    assert parse_postgres_url(db.url) == db and "p/w" not in db.shown


@pytest.mark.parametrize("raw, ok", [("http://127.0.0.1:8083", True), ("https://connect.example/", True),
                                     ("localhost:8083", False), ("http://h:8083/connectors", False)])
def test_connect_url(monkeypatch, raw, ok):
    monkeypatch.setenv("LAMBDALAKE_CONNECT", raw)
    if ok:
        assert connect_url() == raw.rstrip("/")
    else:
        with pytest.raises(ConfigError, match="LAMBDALAKE_CONNECT"):
            connect_url()


@pytest.mark.parametrize("kwargs, says", [
    ({"tables": ("orders",)}, "schema.table"),
    ({"tables": ()}, "no table to capture"),
    ({"tables": ("public.t",), "name": "bad name"}, "connector name"),
    ({"tables": ("public.t",), "prefix": "a b"}, "topic prefix"),
])
def test_a_wrong_capture_is_refused(kwargs, says):
    with pytest.raises(ConfigError, match=says):
        Capture(**{"name": "c", **kwargs})


def test_cli_errors_are_one_line_without_a_traceback(tmp_path):
    env = {**os.environ, "LAMBDALAKE_HOME": str(tmp_path)}
    env.pop("LAMBDALAKE_POSTGRES", None)
    env.pop("LAMBDALAKE_CONNECT", None)
    cases = [(["cdc", "up", "--table", "orders"], {}, "schema.table"),
             (["cdc", "up"], {"LAMBDALAKE_POSTGRES": "mysql://x"}, "LAMBDALAKE_POSTGRES"),
             (["cdc", "status"], {"LAMBDALAKE_CONNECT": "localhost:8083"}, "LAMBDALAKE_CONNECT"),
             (["cdc", "up"], {"LAMBDALAKE_CONNECT": "http://127.0.0.1:1"}, "does not answer")]
    for args, extra, says in cases:
        res = subprocess.run([LAMBDALAKE, *args], capture_output=True, text=True, env={**env, **extra}, timeout=60)
        assert res.returncode != 0 and says in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "postgres").exists(), "nothing is started before the arguments are checked"


def test_missing_postgres_binaries_say_how_to_install_them(monkeypatch, tmp_path):
    monkeypatch.setenv("LAMBDALAKE_PG_BIN", str(tmp_path / "nowhere"))
    with pytest.raises(PostgresError, match="make postgresql"):
        EmbeddedPostgres(tmp_path / "pg").up()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another user")
def test_a_directory_the_server_user_cannot_enter_is_refused(tmp_path):
    locked = tmp_path / "locked"  # pytest's base temp dir is 0700 root-owned
    with pytest.raises(PostgresError, match="cannot enter"):
        EmbeddedPostgres(Path(locked) / "pg").up()


@pytest.mark.slow
@pytest.mark.integration
def test_cli_captures_a_table_of_the_users_own_postgres_and_connect(postgres, kafka_connect, kafka_broker, tmp_path):
    """LAMBDALAKE_POSTGRES and LAMBDALAKE_CONNECT (here: the session's servers, as a user's own): `cdc up --table`
    starts nothing, registers the connector there (REPLICA IDENTITY FULL set first); `cdc status` shows it running
    and its slot."""
    suffix = uuid.uuid4().hex[:8]
    table, name = f"items_{suffix}", f"cli{suffix}"
    with postgres.connect(autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (sku text PRIMARY KEY, qty int)")
    env = {**os.environ, "LAMBDALAKE_HOME": str(tmp_path), "LAMBDALAKE_POSTGRES": postgres.url,
           "LAMBDALAKE_CONNECT": kafka_connect.url, "LAMBDALAKE_BOOTSTRAP": kafka_broker}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([LAMBDALAKE, "cdc", *args], capture_output=True, text=True, env=env, timeout=120)

    try:
        up = cli("up", "--table", f"public.{table}", "--name", name, "--prefix", f"cli{suffix}")
        assert up.returncode == 0, up.stderr
        assert f"into cli{suffix}.public.{table}" in up.stdout and postgres.password not in up.stdout
        assert not (tmp_path / "postgres").exists() and not (tmp_path / "connect").exists()
        with postgres.connect() as conn:
            assert conn.execute("SELECT relreplident FROM pg_class WHERE relname = %s", (table,)).fetchone() == ("f",)
            conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
            conn.commit()
        (key, value), = _events(kafka_broker, f"cli{suffix}.public.{table}", 1)
        assert key == {"sku": "a"} and value["op"] == "c" and value["after"] == {"sku": "a", "qty": 1}
        st = cli("status")
        assert st.returncode == 0, st.stdout + st.stderr
        assert f"connector {name}: RUNNING; task 0 RUNNING" in st.stdout and f"slot {name}: active True" in st.stdout
        # `lambdalake status` shows the slot too, with the WAL it holds back (never the password)
        st = subprocess.run([LAMBDALAKE, "status", "--format", "json"], capture_output=True, text=True, env=env,
                            timeout=120)
        assert st.returncode == 0, st.stdout + st.stderr
        cdc = json.loads(st.stdout)["cdc"]
        assert cdc["database"] == postgres.shown and postgres.password not in st.stdout
        slot, = [s for s in cdc["slots"] if s["slot"] == name]
        assert slot["active"] is True and slot["lag_bytes"] >= 0 and slot["wal_status"] in ("reserved", "extended")
        table = subprocess.run([LAMBDALAKE, "status"], capture_output=True, text=True, env=env, timeout=120)
        assert "replication slots" in table.stdout and name in table.stdout, table.stdout
    finally:
        remove(kafka_connect.url, name)
        _drop_slot(postgres, name)


@pytest.mark.slow
@pytest.mark.integration
def test_cli_embedded_up_down_up_resumes_without_a_new_snapshot(kafka_broker):
    """`cdc up` starts the embedded PostgreSQL and Kafka Connect (detached) under the lake home; `cdc down` stops
    both; `cdc up --table` again resumes the connector from its offsets file: no second snapshot, no duplicate."""
    import shutil

    home = reachable_tmp_dir("lambdalake-cdc-home-")
    env = {k: v for k, v in os.environ.items() if k not in ("LAMBDALAKE_POSTGRES", "LAMBDALAKE_CONNECT")}
    env.update(LAMBDALAKE_HOME=str(home), LAMBDALAKE_BOOTSTRAP=kafka_broker)
    prefix = f"emb{uuid.uuid4().hex[:8]}"
    capture_args = ("--table", "public.things", "--name", prefix, "--prefix", prefix)

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([LAMBDALAKE, "cdc", *args], capture_output=True, text=True, env=env, timeout=180)
        assert not check or res.returncode == 0, res.stdout + res.stderr
        return res

    def db():
        access = json.loads((home / "postgres" / "access.json").read_text())
        return parse_postgres_url(f"postgresql://{access['user']}:{access['password']}@127.0.0.1:{access['port']}/"
                                  f"{access['database']}")

    try:
        assert "no table captured" in cli("up").stdout
        with db().connect(autocommit=True) as conn:
            conn.execute("CREATE TABLE things (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO things VALUES (1, 'snapshot')")
        cli("up", *capture_args)
        with db().connect(autocommit=True) as conn:
            conn.execute("INSERT INTO things VALUES (2, 'before the restart')")
        _events(kafka_broker, f"{prefix}.public.things", 2)
        time.sleep(1.5)  # one offset flush (offset.flush.interval.ms=1000): a clean stop flushes too
        assert "PostgreSQL stopped" in cli("down").stdout
        st = cli("status", check=False)
        assert st.returncode == 1 and "PostgreSQL: not running" in st.stdout
        cli("up", *capture_args)
        with db().connect(autocommit=True) as conn:
            conn.execute("INSERT INTO things VALUES (3, 'after the restart')")
        events = _events(kafka_broker, f"{prefix}.public.things", 3)
        time.sleep(2)  # anything sent twice or snapshotted again would arrive now
        events = _events(kafka_broker, f"{prefix}.public.things", 3)
        from kafka import KafkaConsumer, TopicPartition

        c = KafkaConsumer(bootstrap_servers=kafka_broker)
        tp = TopicPartition(f"{prefix}.public.things", 0)
        assert c.end_offsets([tp])[tp] == 3, "a second snapshot or a duplicate after the restart"
        c.close()
        assert [(v["op"], v["after"]["id"]) for _, v in events] == [("r", 1), ("c", 2), ("c", 3)]
    finally:
        cli("down", check=False)
        shutil.rmtree(home, ignore_errors=True)
