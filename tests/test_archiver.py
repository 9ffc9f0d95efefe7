"""The archiver against the real broker: master files equal the valid messages of the log, exactly once.

Expected content is derived from the log read back with the independent oracle (``tests/oracle.py``), never from
``lambdalake.validation``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import threading
import time

import pyarrow.parquet as pq
import pytest

from batch.archiver import ingest
from batch.compact import compact
from batch.master import master_schema
from batch.partition_buffer import RollPolicy
from lambdalake.heads import archived_positions, master_files, stored_head
from lambdalake.layout import Layout
from lambdalake.procs import stop_group
from tests.conftest import LAMBDALAKE
from tests.oracle import parse_event, read_log

pytestmark = pytest.mark.integration


def produce(run_cli, events: int, seed: int = 7, **kw) -> None:
    args = ["produce", "--events", str(events), "--seed", str(seed)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    run_cli(*args)


def expected_master(pipeline, messages) -> dict[str, list[tuple]]:
    """Per source: sorted (partition, offset, event_id) of every valid message (duplicates included)."""
    out: dict[str, list[tuple]] = {}
    for s in pipeline.sources:
        rows = []
        for m in messages:
            if m.topic != s.topic:
                continue
            ev = parse_event(s, m.value)
            if ev is not None:
                rows.append((m.partition, m.offset, ev[s.event_id]))
        out[s.name] = sorted(rows)
    return out


def expected_invalid(pipeline, messages) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for s in pipeline.sources:
        out[s.name] = sorted((m.partition, m.offset) for m in messages
                             if m.topic == s.topic and parse_event(s, m.value) is None)
    return out


def actual_master(settings, pipeline) -> dict[str, list[tuple]]:
    layout = Layout(settings.home)
    out: dict[str, list[tuple]] = {}
    for s in pipeline.sources:
        rows = []
        files = master_files(layout, s.name)  # also checks files tile with no gap / overlap
        for f in files:
            t = pq.read_table(f.path)
            assert t.schema.equals(master_schema(s), check_metadata=False), f.path
            offs = t.column("_offset").to_pylist()
            assert all(f.start <= o < f.end for o in offs), f.path
            rows += zip(t.column("_partition").to_pylist(), offs, t.column(s.event_id).to_pylist(), strict=True)
        out[s.name] = sorted(rows)
    return out


def dlq_records(settings, pipeline) -> dict[str, list[dict]]:
    topics = [s.dlq_topic for s in pipeline.sources]
    msgs = read_log(settings.bootstrap, topics)
    out: dict[str, list[dict]] = {s.name: [] for s in pipeline.sources}
    for m in msgs:
        rec = json.loads(m.value)
        assert rec["partition"] == m.partition  # same partition number as the source message
        out[rec["source"]].append(rec)
    return out


def check_exact(settings, pipeline) -> None:
    """Master == valid messages, DLQ == invalid messages, each exactly once, files tiling [0, end)."""
    log = read_log(settings.bootstrap, [s.topic for s in pipeline.sources])
    assert actual_master(settings, pipeline) == expected_master(pipeline, log)
    dlq = dlq_records(settings, pipeline)
    for name, want in expected_invalid(pipeline, log).items():
        got = sorted((r["partition"], r["offset"]) for r in dlq[name])
        assert got == want, f"DLQ of {name}: {len(got)} records, expected {len(want)} (duplicates or gaps)"
    # positions: every partition archived up to its end offset, starting at 0
    ends: dict[tuple[str, int], int] = {}
    for m in log:
        ends[(m.topic, m.partition)] = max(ends.get((m.topic, m.partition), 0), m.offset + 1)
    layout = Layout(settings.home)
    for s in pipeline.sources:
        files = master_files(layout, s.name)
        assert archived_positions(layout, s.name) == {p: e for (t, p), e in ends.items() if t == s.topic}
        firsts = {}
        for f in files:
            firsts.setdefault(f.partition, f.start)
        assert set(firsts.values()) <= {0}


def test_ingest_until_caught_up_is_exact(settings, pipeline, run_cli):
    produce(run_cli, 1500, malformed_fraction=0.03, duplicate_fraction=0.03)
    report = ingest(settings, pipeline, until_caught_up=True, policy=RollPolicy(max_rows=97))
    assert report.invalid > 0 and report.dead_lettered == report.invalid
    check_exact(settings, pipeline)
    # files are rolled by rows: no file holds more than 97 rows, and several exist per partition
    layout = Layout(settings.home)
    for s in pipeline.sources:
        for f in master_files(layout, s.name):
            assert pq.ParquetFile(f.path).metadata.num_rows <= 97
    # a rerun with nothing new writes nothing and sends nothing
    again = ingest(settings, pipeline, until_caught_up=True)
    assert (again.messages, again.files, again.dead_lettered) == (0, 0, 0)
    # more data: resumes exactly where the files end
    produce(run_cli, 400, seed=8)
    ingest(settings, pipeline, until_caught_up=True)
    check_exact(settings, pipeline)


def test_dlq_record_content(settings, pipeline, run_cli):
    produce(run_cli, 200, malformed_fraction=0.2, duplicate_fraction=0.0)
    ingest(settings, pipeline, until_caught_up=True)
    log = {(m.topic, m.partition, m.offset): m for m in read_log(settings.bootstrap,
                                                                  [s.topic for s in pipeline.sources])}
    recs = [r for rs in dlq_records(settings, pipeline).values() for r in rs]
    assert len(recs) >= 30
    for r in recs:
        orig = log[(r["topic"], r["partition"], r["offset"])]
        assert r["reason"]
        value = None if r["value_b64"] is None else base64.b64decode(r["value_b64"])
        if r["value_truncated"]:
            assert r["value_bytes"] == len(orig.value) and orig.value.startswith(value)
        else:
            assert value == orig.value
        assert (None if r["key_b64"] is None else base64.b64decode(r["key_b64"])) == orig.key


def test_compaction_preserves_content_and_positions(settings, pipeline, run_cli):
    produce(run_cli, 800)
    ingest(settings, pipeline, until_caught_up=True, policy=RollPolicy(max_rows=20))
    layout = Layout(settings.home)
    before = actual_master(settings, pipeline)
    n_before = sum(len(master_files(layout, s.name)) for s in pipeline.sources)
    rep = run_cli("compact", "--target-rows", "150")
    assert "compacted" in rep.stdout
    n_after = sum(len(master_files(layout, s.name)) for s in pipeline.sources)
    assert n_after < n_before
    assert actual_master(settings, pipeline) == before
    records = sorted(layout.master_log().glob("*-compact-*.json"))
    assert records and all(json.loads(r.read_text())["status"] == "done" for r in records)
    # archiving continues after the compacted files
    produce(run_cli, 100, seed=9)
    ingest(settings, pipeline, until_caught_up=True)
    check_exact(settings, pipeline)


def test_interrupted_compaction_is_recovered(settings, pipeline, run_cli):
    """Crash during step 4 (merged file renamed, old files still there): readers skip them, recovery deletes them."""
    produce(run_cli, 300)
    ingest(settings, pipeline, until_caught_up=True, policy=RollPolicy(max_rows=10))
    layout = Layout(settings.home)
    before = actual_master(settings, pipeline)
    src = pipeline.sources[0]
    files = [f for f in master_files(layout, src.name) if f.partition == master_files(layout, src.name)[0].partition]
    group = files[:3]
    import pyarrow as pa

    from batch.master import sha256_file, write_parquet_atomic

    merged = pa.concat_tables([pq.read_table(f.path) for f in group])
    final = layout.master_file(src.name, group[0].partition, group[0].start, group[-1].end)
    write_parquet_atomic(merged, final)
    rec = {"kind": "compact", "status": "started", "source": src.name, "partition": group[0].partition,
           "replaced": [{"name": f.path.name} for f in group],
           "merged": {"name": final.name, "tmp": None, "sha256": sha256_file(final)}}
    layout.master_log().mkdir(parents=True, exist_ok=True)
    (layout.master_log() / "20260101T000000000000Z-compact-x.json").write_text(json.dumps(rec))
    # a reader sees every offset once even before recovery
    assert actual_master(settings, pipeline) == before
    compact(settings.home, pipeline, target_rows=1)  # runs recovery; nothing else to merge at 1 row
    assert not any(f.path.exists() for f in group)
    assert json.loads((layout.master_log() / "20260101T000000000000Z-compact-x.json").read_text())["status"] == "done"
    assert actual_master(settings, pipeline) == before


class _Crash(Exception):
    """Stands for the process dying at this point (nothing after it runs)."""


def _sql_master_rows(layout: Layout, source) -> tuple[int, int]:
    """(rows, distinct (partition, offset)) of the master dataset as a SQL reader sees it: the files of
    ``Layout.master_files`` read with DuckDB."""
    import duckdb

    files = [str(f.path) for f in master_files(layout, source.name)]
    con = duckdb.connect()
    try:
        return con.execute("SELECT count(*), count(DISTINCT (_partition, _offset)) FROM read_parquet($files)",
                           {"files": files}).fetchone()
    finally:
        con.close()


def test_compaction_killed_between_rename_and_done_counts_every_event_once(settings, pipeline, run_cli, monkeypatch):
    """The real compaction, stopped right after its rename (merged file in place, replaced files still on disk, the
    record still ``started``): ``Layout.master_files`` and a SQL reader of those files count every event once."""
    import batch.rewrite as rewrite

    produce(run_cli, 300)
    ingest(settings, pipeline, until_caught_up=True, policy=RollPolicy(max_rows=10))
    layout = Layout(settings.home)
    before = actual_master(settings, pipeline)
    src = pipeline.sources[0]
    n_rows = len(before[src.name])
    assert _sql_master_rows(layout, src) == (n_rows, n_rows)
    real_replace = os.replace

    def replace_then_die(a, b):  # the rename of step 4 happens, then the process "dies"
        real_replace(a, b)
        if str(b).endswith(".parquet"):
            raise _Crash

    monkeypatch.setattr(rewrite.os, "replace", replace_then_die)
    with pytest.raises(_Crash):
        compact(settings.home, pipeline, source=src.name, target_rows=1000)
    monkeypatch.undo()
    records = [json.loads(r.read_text()) for r in layout.master_log().glob("*-compact-*.json")]
    assert [r["status"] for r in records] == ["started"]
    on_disk = layout.master_files_on_disk(src.name)
    merged = {f.path.name for f in on_disk} & {records[0]["merged"]["name"]}
    replaced = {f.path.name for f in on_disk} & {r["name"] for r in records[0]["replaced"]}
    assert merged and len(replaced) >= 2, "the crash must leave the merged file and the files it replaces"
    # the one rule hides the replaced files: every event once, for the engine's readers and for SQL
    assert actual_master(settings, pipeline) == before
    assert _sql_master_rows(layout, src) == (n_rows, n_rows)
    on_disk_rows = sum(pq.ParquetFile(f.path).metadata.num_rows for f in on_disk)
    assert on_disk_rows > n_rows, "reading every file on disk would count some events twice"
    # recovery (run by the next compaction or ingest) finishes it
    compact(settings.home, pipeline, target_rows=1)
    assert [json.loads(r.read_text())["status"] for r in layout.master_log().glob("*-compact-*.json")] == ["done"]
    assert len(layout.master_files_on_disk(src.name)) == len(master_files(layout, src.name))
    assert actual_master(settings, pipeline) == before and _sql_master_rows(layout, src) == (n_rows, n_rows)


def _start_ingest(cli_env, *args: str, roll_rows: int = 25) -> subprocess.Popen:
    env = {**cli_env, "LAMBDALAKE_ARCHIVE_ROLL_ROWS": str(roll_rows)}
    return subprocess.Popen([LAMBDALAKE, "ingest", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)


def _kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    stop_group(proc, timeout=60, first=sig)
    proc.communicate()  # close the pipes


def _file_count(settings, pipeline) -> int:
    layout = Layout(settings.home)
    return sum(len(master_files(layout, s.name)) for s in pipeline.sources)


def test_kill_9_at_several_points_then_restart_is_exact(settings, pipeline, run_cli, cli_env):
    """kill -9 the real `lambdalake ingest` at several points (incl. mid-file); restarts leave no gap, no dup."""
    produce(run_cli, 3000, malformed_fraction=0.03, duplicate_fraction=0.03)
    kills = 0
    for wait_files in (1, 9, 23, 40):
        proc = _start_ingest(cli_env)
        try:
            deadline = time.monotonic() + 60
            while _file_count(settings, pipeline) < wait_files and proc.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            was_running = proc.poll() is None
            _kill(proc)
        kills += was_running
        # whatever is on disk after a kill -9 tiles the offset space and is readable
        for s in pipeline.sources:
            master_files(Layout(settings.home), s.name)
    assert kills >= 2, "the archiver finished before it could be killed; raise the event count"
    # also kill one while temporary files may exist, then leave stray temp files like a crash would
    stray = Layout(settings.home).master_partition(pipeline.sources[0].name, 0) / ".000-stray.parquet.ab.tmp"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"half written")
    done = run_cli("ingest", "--until-caught-up", env={"LAMBDALAKE_ARCHIVE_ROLL_ROWS": "25"})
    assert "archived" in done.stdout
    assert not stray.exists()
    check_exact(settings, pipeline)


def test_sigterm_finishes_current_file(settings, pipeline, run_cli, cli_env):
    produce(run_cli, 600)
    proc = _start_ingest(cli_env, roll_rows=1_000_000)  # daemon; only the time limit or a stop rolls files
    try:
        layout = Layout(settings.home)
        deadline = time.monotonic() + 60  # a group member: its partitions are assigned (and claimed) first
        while time.monotonic() < deadline and sum(1 for s in pipeline.sources for p in range(4)
                                                  if stored_head(layout, s.name, p)[0] is not None) < 8:
            time.sleep(0.2)
        time.sleep(3)  # the daemon consumes everything but rolls nothing: rows and age stay below the limits
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert _file_count(settings, pipeline) == 0
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    finally:
        _kill(proc)
    check_exact(settings, pipeline)


def test_crash_between_dlq_flush_and_head_swap_sends_no_dlq_duplicate(settings, pipeline, run_cli, monkeypatch):
    """Deterministic version of the worst kill -9 window: DLQ records acknowledged, the roll's files written, the
    head not swapped yet. The files are garbage (no head lists them), the rerun's claim deletes them, and it
    archives the range again without a second DLQ record."""
    from batch.dead_letters import DeadLetters
    from lambdalake.heads import PartitionHead, stored_head

    produce(run_cli, 600, malformed_fraction=0.1, duplicate_fraction=0.0)
    real = PartitionHead.commit
    real_send = DeadLetters.send_range
    state = {"rolls": 0, "armed": False}

    class Crash(BaseException):
        pass

    def sending(self, buf):
        sent, skipped = real_send(self, buf)
        state["rolls"] += 1
        state["armed"] = sent > 0 and state["rolls"] >= 3  # crash a roll that really dead-lettered something
        return sent, skipped

    def crashing(self, start, end, master, rejected=None):
        if state["armed"]:
            state["unlisted"] = (master.name, rejected.name if rejected else None)
            raise Crash(f"simulated crash before the head lists {master.name}")
        return real(self, start, end, master, rejected)

    monkeypatch.setattr(DeadLetters, "send_range", sending)
    monkeypatch.setattr(PartitionHead, "commit", crashing)
    with pytest.raises(Crash):
        ingest(settings, pipeline, until_caught_up=True, policy=RollPolicy(max_rows=30))
    layout = Layout(settings.home)
    on_disk = {f.path.name for s in pipeline.sources for f in layout.master_files_on_disk(s.name)}
    assert state["unlisted"][0] in on_disk, "the crashed roll's master file was written, only not listed"
    assert state["unlisted"][0] not in {f.path.name for s in pipeline.sources for f in master_files(layout, s.name)}
    monkeypatch.setattr(PartitionHead, "commit", real)
    monkeypatch.setattr(DeadLetters, "send_range", real_send)
    report = ingest(settings, pipeline, until_caught_up=True, policy=RollPolicy(max_rows=30))
    assert report.dlq_skipped > 0, "the rerun should have found the crashed range's invalid messages in the DLQ"
    check_exact(settings, pipeline)
    on_disk = {f.path.name for s in pipeline.sources for f in layout.master_files_on_disk(s.name)}
    assert state["unlisted"][0] not in on_disk, "the next claim deletes the fenced epoch's unlisted files"
    for s in pipeline.sources:
        for p in range(4):
            head, _ = stored_head(layout, s.name, p)
            assert head is None or head.epoch >= 2


def test_workers_own_disjoint_partitions_and_resplit_exactly(settings, pipeline, run_cli, cli_env):
    """Partition-parallel archiving: a daemon worker owning share 0/2, a second worker 1/2 beside it, an
    overlapping worker refused (naming the partition), then a re-split into 3 workers after more data — each
    partition continues from its files under its new owner: master and DLQ stay exact."""
    produce(run_cli, 600, malformed_fraction=0.05, duplicate_fraction=0.05)
    daemon = _start_ingest(cli_env, "--share", "0/2")
    try:
        res = run_cli("ingest", "--until-caught-up", "--share", "1/2")
        assert "archived" in res.stdout
        busy = run_cli("ingest", "--until-caught-up", "--partitions", "2,3", check=False)
        assert busy.returncode != 0 and "another archiver" in busy.stderr and "partition 2 of" in busy.stderr
        assert "Traceback" not in busy.stderr
        assert daemon.poll() is None
    finally:
        _kill(daemon, signal.SIGTERM)
    assert daemon.returncode == 0
    check_exact(settings, pipeline)
    produce(run_cli, 400, seed=9, malformed_fraction=0.05, duplicate_fraction=0.05)
    res = run_cli("ingest", "--until-caught-up", "--workers", "3")
    assert "archived" in res.stdout
    check_exact(settings, pipeline)
    bad = run_cli("ingest", "--share", "2/2", check=False)
    assert bad.returncode != 0 and "--share '2/2'" in bad.stderr and "Traceback" not in bad.stderr


def test_daemon_takes_new_partitions_and_until_caught_up_ends_at_a_transaction_marker(settings, pipeline,
                                                                                        monkeypatch):
    """The archiver's librdkafka session: partitions added to the topics while the daemon runs are archived too
    (every partition is assigned again mid-stream: no offset twice, none lost), and ``until_caught_up`` finishes
    when a partition's log ends with a transaction's commit marker (an offset no record holds)."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewPartitions

    import batch.archiver as archiver
    from lambdalake.clients import end_offsets, ensure_topics
    from wiring.demo_stream import demo_messages
    from wiring.produce import send

    def archived() -> bool:
        ends = end_offsets(settings, [s.topic for s in pipeline.sources])
        layout = Layout(settings.home)
        done = {(s.topic, p): e for s in pipeline.sources for p, e in archived_positions(layout, s.name).items()}
        return all(done.get(k, 0) >= e for k, e in ends.items() if e)

    def wait(what: str) -> None:
        deadline = time.monotonic() + 60
        while not archived():
            assert time.monotonic() < deadline and thread.is_alive(), f"the daemon did not archive {what}"
            time.sleep(0.1)

    ensure_topics(settings, pipeline)
    send(settings, demo_messages(pipeline, 300, seed=1, malformed_fraction=0.05), progress=False)
    monkeypatch.setattr(archiver.Archiver, "REFRESH_PARTITIONS_S", 0.3)
    daemon = archiver.Archiver(settings, pipeline, RollPolicy(max_seconds=0.2))
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        wait("the first messages")
        admin = AdminClient({"bootstrap.servers": settings.bootstrap})
        for topics in ([s.dlq_topic for s in pipeline.sources], [s.topic for s in pipeline.sources]):
            for f in admin.create_partitions([NewPartitions(t, 6) for t in topics]).values():
                f.result(30)
        deadline = time.monotonic() + 30
        while any(len(admin.list_topics(s.topic, timeout=10).topics[s.topic].partitions) < 6
                  for s in pipeline.sources):
            assert time.monotonic() < deadline, "the broker never showed the new partitions"
            time.sleep(0.1)
        send(settings, demo_messages(pipeline, 300, seed=2, malformed_fraction=0.05), progress=False)
        assert all(end_offsets(settings, [s.topic])[(s.topic, p)] for s in pipeline.sources for p in (4, 5))
        wait("the messages of the new partitions")
    finally:
        daemon.stop()
        thread.join(60)
    assert not thread.is_alive()
    assert {p for s in pipeline.sources for p in archived_positions(Layout(settings.home), s.name)} == set(range(6))
    check_exact(settings, pipeline)
    # a transaction's records, then its commit marker last in their partitions
    prod = Producer({"bootstrap.servers": settings.bootstrap, "transactional.id": f"t-{settings.home.name}",
                     "logger": logging.getLogger("kafka.librdkafka")})
    prod.init_transactions(30)
    prod.begin_transaction()
    msgs = list(demo_messages(pipeline, 40, seed=3))
    last: dict[tuple[str, int], int] = {}  # the transaction's last record in each partition it wrote to

    def delivered(err, m) -> None:
        last[(m.topic(), m.partition())] = max(m.offset(), last.get((m.topic(), m.partition()), -1))

    for m in msgs:
        prod.produce(m.topic, m.value, m.key, on_delivery=delivered)
    prod.commit_transaction(30)
    deadline = time.monotonic() + 30  # the coordinator writes the commit markers after commit_transaction returns
    while True:
        ends = end_offsets(settings, [s.topic for s in pipeline.sources])
        if all(ends[k] == off + 2 for k, off in last.items()):
            break
        assert time.monotonic() < deadline, f"commit markers not written: {ends} vs {last}"
        time.sleep(0.1)
    report = ingest(settings, pipeline, until_caught_up=True)
    assert report.messages == len(msgs)
    assert {(s.topic, p): e for s in pipeline.sources for p, e in report.positions[s.name].items() if e} == \
        {k: e for k, e in ends.items() if e}
    plain = Producer({"bootstrap.servers": settings.bootstrap, "logger": logging.getLogger("kafka.librdkafka")})
    for s in pipeline.sources:  # a plain record after every marker (the oracle reads up to a record)
        m = next(m for m in msgs if m.topic == s.topic)
        for p in range(6):
            plain.produce(s.topic, m.value, m.key, partition=p)
    assert plain.flush(30) == 0
    ingest(settings, pipeline, until_caught_up=True)
    check_exact(settings, pipeline)


def test_dead_letters_the_broker_refuses_write_no_file_then_a_rerun_is_exact(settings, pipeline, run_cli, monkeypatch):
    """Step 1 of the roll protocol checks every dead letter was acknowledged: when the broker refuses them (here the
    pageviews DLQ topic only takes records of a few hundred bytes), the roll fails with a DeadLetterError naming the
    DLQ topic and writes no master file over the refused messages; once the topic takes them, a rerun archives
    everything exactly once (no gap, no duplicate DLQ record)."""
    from kafka.admin import ConfigResource, ConfigResourceType, NewTopic

    import batch.archiver as archiver
    from batch.exceptions import DeadLetterError
    from lambdalake.clients import admin_client

    pv = pipeline.source("pageviews")
    admin = admin_client(settings)
    try:  # created before anything else creates it, with the source's partition count
        admin.create_topics([NewTopic(pv.dlq_topic, settings.partitions, 1,
                                      topic_configs={"max.message.bytes": "300"})])
    finally:
        admin.close()
    produce(run_cli, 400, malformed_fraction=0.05, duplicate_fraction=0.0)
    invalid = expected_invalid(pipeline, read_log(settings.bootstrap, [pv.topic]))["pageviews"]
    assert invalid
    monkeypatch.setattr(archiver.Archiver, "MAX_BACKOFF_S", 0.05)  # the retries of a failed roll, quickly
    with pytest.raises(DeadLetterError, match=rf"dead-letter record for {pv.topic}\[\d\] was rejected: .*"
                                              r"(SIZE_TOO_LARGE|too large).*was not written, rerun ingest"):
        ingest(settings, pipeline, until_caught_up=True)
    archived = archived_positions(Layout(settings.home), pv.name)
    assert all(archived.get(p, 0) <= o for p, o in invalid), "a master file covers a message the DLQ refused"
    assert dlq_records(settings, pipeline)["pageviews"] == []

    admin = admin_client(settings)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, pv.dlq_topic,
                                            configs={"max.message.bytes": str(2 * 1024 * 1024)})])
    finally:
        admin.close()
    deadline = time.monotonic() + 30  # topic configs reach the partition leader asynchronously
    while True:
        try:
            report = ingest(settings, pipeline, until_caught_up=True)
            break
        except DeadLetterError:
            assert time.monotonic() < deadline, "the DLQ topic still refuses records after its limit was raised"
    assert report.dead_lettered >= len(invalid)
    check_exact(settings, pipeline)
