"""The speed layer on a lake on object storage (issue 28): its snapshots and checkpoints are objects written whole
(``snapshot.json`` / ``checkpoint.json`` last), part files of earlier snapshots are referenced, not hard-linked, and
retention deletes what no kept snapshot references — one protocol on both stores (:mod:`speed.snapshot`).

Fast: retention by reference on the local store and on the real S3 server. Slow, real parts (Kafka, the embedded S3
server): ``lambdalake speed --home s3://...`` from a working directory that holds no lake equals the oracle read
back from the bucket, across a kill -9 and a restart.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pytest

from lambdalake.clients import end_offsets
from lambdalake.contracts import Positions, SpeedSnapshotMeta, SpeedView
from lambdalake.dedup import DedupWindow
from lambdalake.layout import Layout, speed_pointer
from lambdalake.procs import stop_group
from lambdalake.storage.local import LocalStore
from speed import snapshot as snapshots
from tests.conftest import LAMBDALAKE, failed_in_one_line, machine_cli
from tests.oracle import read_log
from tests.test_speed import all_positions_at_end, assert_snapshot_equals_oracle, produce, topics

TABLE = pa.table({"_partition": pa.array([0, 0], pa.int32()), "_block_start": pa.array([0, 10], pa.int64()),
                  "n": pa.array([1, 2], pa.int64())})


def _meta(snap: str, files: list[str]) -> SpeedSnapshotMeta:
    return SpeedSnapshotMeta(positions=Positions({("t", 0): 20}), block=10,
                             views={"v": SpeedView("fp", rows=0, files=files)})


def _write(layout: Layout, snap: str, vf: snapshots.ViewFiles) -> SpeedSnapshotMeta:
    meta = _meta(snap, [])
    snapshots.write_snapshot(layout, snap, {"v": vf}, meta)
    return meta


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "lake")
    return request.getfixturevalue("s3_lake")[1]


def test_parts_are_referenced_not_copied_and_retained_while_referenced(any_store, tmp_path):
    layout = Layout(tmp_path / "machine", store=any_store)
    p = layout.speed_prefix
    one = "000000000001"
    _write(layout, one, snapshots.ViewFiles(TABLE.slice(0, 1), new=TABLE, rows=3))
    part = f"{one}/v.{one}.parquet"
    meta2 = _write(layout, "000000000002", snapshots.ViewFiles(TABLE.slice(1, 1), keep=(part,), previous=one, rows=3))
    assert meta2.views["v"].files == [part, "v.parquet"]  # a reference to snapshot 1's part, no copy
    assert not any_store.exists(f"{p}/000000000002/v.{one}.parquet")
    got = snapshots.read_snapshot(layout, "000000000002", ["v"])[1]["v"]
    assert got.num_rows == 3

    # snapshot 1 retired: its snapshot.json and base go, the part snapshot 2 references stays
    assert snapshots.retain(layout, keep=1, keep_seconds=0, protect={"000000000002"}) == [one]
    assert any_store.list(f"{p}/{one}/") == [f"{p}/{part}"]
    assert snapshots.read_snapshot(layout, "000000000002", ["v"])[1]["v"].num_rows == 3

    # snapshot 3 rewrites everything: once 2 is retired, no kept snapshot references the part and it goes too
    _write(layout, "000000000003", snapshots.ViewFiles(TABLE, rows=2))
    snapshots.retain(layout, keep=1, keep_seconds=0, protect={"000000000003"})
    assert any_store.list(f"{p}/") == [f"{p}/000000000003/snapshot.json", f"{p}/000000000003/v.parquet"]
    # a snapshot younger than keep_seconds stays, whatever keep says
    _write(layout, "000000000004", snapshots.ViewFiles(TABLE, rows=2))
    assert snapshots.retain(layout, keep=1, keep_seconds=3600, protect={"000000000004"}) == []


def test_an_orphan_of_a_crashed_commit_is_removed_on_both_stores(any_store, tmp_path):
    layout = Layout(tmp_path / "machine", store=any_store)
    _write(layout, "000000000001", snapshots.ViewFiles(TABLE, rows=2))
    any_store.put(f"{layout.speed_prefix}/000000000002/v.parquet", b"PAR1 half")  # no snapshot.json: a crash
    assert layout.speed_snapshots() == ["000000000001"]
    assert snapshots.remove_after(layout, 1) == ["000000000002"]
    assert any_store.list(f"{layout.speed_prefix}/000000000002/") == []
    assert snapshots.remove_after(layout, 1) == []


def test_a_writer_that_lost_its_claim_publishes_nothing(any_store, tmp_path, request, monkeypatch):
    """Two processes of one speed worker (a paused one that wakes up after a restart elsewhere, or the same share
    started on two machines): the later claim fences the earlier writer, whose next commit and pointer switch
    fail with SpeedFenced; what it wrote is never made visible, and the new writer goes on, exact."""
    from lambdalake.config import Settings
    from speed.consumer import SpeedLayer, SpeedOptions
    from speed.exceptions import SpeedFenced
    from speed.recovery import recover
    from tests.oracle import LogMessage
    from tests.test_speed import EV, EV_PIPE, Rec, _event

    if isinstance(any_store, LocalStore):
        s = Settings(home=any_store.root, pipeline="x", handoff_block=7)
    else:
        url, _, env, _ = request.getfixturevalue("s3_lake")
        for k, v in env.items():
            if k.startswith("AWS_"):
                monkeypatch.setenv(k, v)
        s = Settings(home=tmp_path / "work", pipeline="x", handoff_block=7, lake=url)
    vals = [_event(1000 + o, 1_767_571_200_000_000 + o * 60_000_000, f"u{o % 3}", "a", 1, o) for o in range(60)]

    def feed(layer, lo, hi):
        layer.positions.setdefault((EV.topic, 0), 0)
        layer.windows.setdefault((EV.topic, 0), DedupWindow(10_000))
        layer.new_ids.setdefault((EV.topic, 0), [])
        layer._apply(EV.topic, 0, [Rec(o, vals[o]) for o in range(lo, hi)])

    old = SpeedLayer(s, EV_PIPE, SpeedOptions(background_commit=False))
    recover(old)
    feed(old, 0, 20)
    old.checkpoint_now()
    new = SpeedLayer(s, EV_PIPE, SpeedOptions(background_commit=False))
    recover(new)  # claims the worker: the old writer is fenced from here on
    layout = Layout(s.home, store=any_store)
    visible = speed_pointer(layout)
    feed(old, 20, 40)
    with pytest.raises(SpeedFenced, match="claimed the worker's checkpoint"):
        old.checkpoint_now()
    assert speed_pointer(layout) == visible, "a fenced writer switched the visible snapshot"
    feed(new, 20, 60)
    new.checkpoint_now()
    msgs = [LogMessage(EV.topic, 0, o, None, v) for o, v in enumerate(vals)]
    assert_snapshot_equals_oracle(EV_PIPE, layout, msgs)


# --- real parts ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.integration
def test_speed_on_a_bucket_equals_the_oracle_across_kill_9(settings, pipeline, s3_lake):
    url, store, env, work = s3_lake
    bucket = Layout(Path("/nonexistent-machine-dir"), store=store)  # what any machine reads: the bucket alone
    produce(settings, pipeline, 1500, seed=7)
    res = machine_cli(env, work, "speed", "--until-caught-up", "--checkpoint-interval", "0.05")
    assert "valid" in res.stdout, res.stdout + res.stderr
    msgs = read_log(settings.bootstrap, topics(pipeline))
    meta = assert_snapshot_equals_oracle(pipeline, bucket, msgs)
    all_positions_at_end(meta, end_offsets(settings, topics(pipeline)), pipeline)
    assert store.exists("lake.json") and store.exists("checkpoints/speed/CURRENT")

    # a daemon killed with -9 mid-run, more events, a restart: resumes from the bucket's checkpoint, exact
    produce(settings, pipeline, 1500, seed=8, start="2026-01-05T20:00:00Z")
    daemon = subprocess.Popen([LAMBDALAKE, "speed", "--no-group", "--checkpoint-interval", "0.05"], env=env,
                              cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        first = speed_pointer(bucket)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and speed_pointer(bucket) == first:
            time.sleep(0.1)
        assert speed_pointer(bucket) != first, "the daemon published nothing"
    finally:
        stop_group(daemon, timeout=10, first=signal.SIGKILL)
        daemon.communicate()
    produce(settings, pipeline, 500, seed=9, start="2026-01-06T02:00:00Z")
    machine_cli(env, work, "speed", "--until-caught-up", "--checkpoint-interval", "0.05")
    msgs = read_log(settings.bootstrap, topics(pipeline))
    meta = assert_snapshot_equals_oracle(pipeline, bucket, msgs)
    all_positions_at_end(meta, end_offsets(settings, topics(pipeline)), pipeline)
    assert not list((work / "work").rglob("*.parquet")) and not list((work / "work").rglob("snapshot.json")), \
        "lake data on the machine's local disk"


@pytest.mark.slow
@pytest.mark.integration
def test_a_paused_speed_worker_that_wakes_after_a_takeover_publishes_nothing(settings, pipeline, s3_lake, tmp_path):
    """The zombie: a speed daemon on machine A is paused (SIGSTOP) while machine B runs the same worker (its own
    work directory: A's lock file is not B's); A resumes (SIGCONT) into B's claim and stops with one line,
    nothing it wrote after the takeover is served, and B's state equals the oracle."""
    url, store, env, work = s3_lake
    bucket = Layout(Path("/nonexistent-machine-dir"), store=store)
    other = tmp_path / "machine-b"
    other.mkdir()
    env_b = {**env, "LAMBDALAKE_WORK_DIR": str(other / "work"), "TMPDIR": str(other)}
    produce(settings, pipeline, 1000, seed=31)
    a = subprocess.Popen([LAMBDALAKE, "speed", "--no-group", "--checkpoint-interval", "0.05"], env=env, cwd=work,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and speed_pointer(bucket) is None:
            time.sleep(0.1)
        assert speed_pointer(bucket) is not None, "machine A published nothing"
        produce(settings, pipeline, 500, seed=32, start="2026-01-05T20:00:00Z")
        time.sleep(0.3)  # mid-stream
        a.send_signal(signal.SIGSTOP)
        machine_cli(env_b, other, "speed", "--no-group", "--until-caught-up", "--checkpoint-interval", "0.05")
        taken = speed_pointer(bucket)
        produce(settings, pipeline, 500, seed=33, start="2026-01-06T02:00:00Z")  # work for the zombie
        a.send_signal(signal.SIGCONT)
        _, err = a.communicate(timeout=120)
    finally:
        if a.returncode is None:
            a.send_signal(signal.SIGCONT)
            stop_group(a, timeout=10, first=signal.SIGKILL)
            a.communicate()
    err = err.decode()
    assert a.returncode == 6 and "claimed the worker's checkpoint" in err and "Traceback" not in err, err[-2000:]
    assert speed_pointer(bucket) == taken, "the zombie switched the visible snapshot"
    machine_cli(env_b, other, "speed", "--no-group", "--until-caught-up", "--checkpoint-interval", "0.05")
    msgs = read_log(settings.bootstrap, topics(pipeline))
    meta = assert_snapshot_equals_oracle(pipeline, bucket, msgs)
    all_positions_at_end(meta, end_offsets(settings, topics(pipeline)), pipeline)


@pytest.mark.slow
@pytest.mark.integration
def test_two_machines_share_the_speed_layer_of_a_bucket_and_one_dies(settings, pipeline, s3_lake, tmp_path,
                                                                      monkeypatch):
    """Speed daemons on two machines (own work and working directories, own TMPDIR; one host, so their member
    names differ by work directory) join one group over one bucket; one is killed with -9 and the other takes its
    partitions over; served from a third machine, every view equals the oracle."""
    from lambdalake.speedset import read_speed_set
    from serving.connection import connect, pair_of
    from tests.oracle import assert_rows_equal, oracle_views

    url, store, env, work = s3_lake
    bucket = Layout(Path("/nonexistent-machine-dir"), store=store)
    machines = []
    for name in ("machine-b", "machine-c"):
        d = tmp_path / name
        d.mkdir()
        machines.append((d, {**env, "LAMBDALAKE_WORK_DIR": str(d / "work"), "TMPDIR": str(d)}))
    produce(settings, pipeline, 1200, seed=41)
    procs = [subprocess.Popen([LAMBDALAKE, "speed", "--checkpoint-interval", "0.1"], env=e, cwd=w,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              start_new_session=True) for w, e in ((work, env), machines[0])]
    try:
        deadline, workers = time.monotonic() + 90, set()
        while time.monotonic() < deadline and len(workers) < 2:
            found = read_speed_set(bucket)
            workers = {p.worker for p in found.parts if p.partitions} if found else set()
            time.sleep(0.3)
        assert len(workers) == 2, f"the two machines did not split the partitions: {workers}"
        stop_group(procs[0], timeout=10, first=signal.SIGKILL)
        produce(settings, pipeline, 600, seed=42, start="2026-01-05T20:00:00Z")
        ends = end_offsets(settings, topics(pipeline))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = read_speed_set(bucket)
            if found and all(found.meta.positions.get(k, 0) >= e for k, e in ends.items()) and \
                    len({p.worker for p in found.parts if p.partitions}) == 1:
                break
            time.sleep(0.3)
        assert found and len({p.worker for p in found.parts if p.partitions}) == 1, "the survivor took nothing over"
        assert all(found.meta.positions.get(k, 0) >= e for k, e in ends.items()), dict(found.meta.positions)
    finally:
        for p in procs:
            stop_group(p, timeout=30, first=signal.SIGTERM)
            p.communicate()
    serving_dir, serving_env = machines[1]
    for k, v in serving_env.items():
        if k.startswith(("AWS_", "LAMBDALAKE_WORK_DIR")):
            monkeypatch.setenv(k, v)
    con = connect(pipeline=settings.pipeline, home=url)
    try:
        pair = pair_of(con)
        covered = {k: max(pair.watermark.get(k, 0), pair.positions.get(k, 0))
                   for k in set(pair.watermark) | set(pair.positions)}
        want = oracle_views(pipeline, read_log(settings.bootstrap, topics(pipeline)), below=covered)
        for v in pipeline.views:
            assert_rows_equal(con.execute(f"SELECT * FROM {v.name}").fetchall(), want[v.name], v.name)
    finally:
        con.close()


@pytest.mark.slow
@pytest.mark.integration
def test_the_s3_server_killed_under_a_speed_daemon_fails_in_one_line_and_a_rerun_is_exact(settings, pipeline,
                                                                                         own_s3_lake):
    """A server of its own (the session's one must survive): killed with -9 while the speed layer checkpoints into
    it, then started again on the same port and data; the daemon gave up with one line, the rerun is exact."""
    lake = own_s3_lake
    bucket = Layout(Path("/nonexistent-machine-dir"), store=lake.store)
    produce(settings, pipeline, 1000, seed=51)
    daemon = subprocess.Popen([LAMBDALAKE, "speed", "--no-group", "--checkpoint-interval", "0.05"], env=lake.env,
                              cwd=lake.work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and speed_pointer(bucket) is None:
            time.sleep(0.1)
        assert speed_pointer(bucket) is not None, "nothing published before the kill"
        lake.server.down(timeout=0)  # SIGKILL of the server mid-run
        produce(settings, pipeline, 500, seed=52, start="2026-01-05T20:00:00Z")  # checkpoints to try
    finally:
        failed_in_one_line(daemon, timeout=180)
    assert lake.server.up(timeout=90)["port"] == lake.port
    machine_cli(lake.env, lake.work, "speed", "--until-caught-up", "--checkpoint-interval", "0.05")
    msgs = read_log(settings.bootstrap, topics(pipeline))
    meta = assert_snapshot_equals_oracle(pipeline, bucket, msgs)
    all_positions_at_end(meta, end_offsets(settings, topics(pipeline)), pipeline)
