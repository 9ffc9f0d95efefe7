"""The archiver on a lake on object storage (real Kafka, the real embedded S3 server): ``lambdalake ingest --home
s3://bucket/prefix`` from a working directory that holds no lake. The master dataset is read back from the bucket
through the heads alone; with kill -9 and a rerun, master and DLQ stay exact. Commands that cannot run on object
storage yet, and a wrong endpoint or bucket, say so in one line."""

from __future__ import annotations

import io
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lambdalake.heads import file_key, stored_head
from lambdalake.layout import Layout
from lambdalake.procs import stop_group
from lambdalake.storage.s3 import S3Store
from tests.conftest import LAMBDALAKE, failed_in_one_line, machine_cli
from tests.oracle import read_log
from tests.test_archiver import dlq_records, expected_invalid, expected_master, produce
from tests.test_archiver_fencing import stays_fenced, stop_zombie

pytestmark = [pytest.mark.slow, pytest.mark.integration]



def _start_when_archiving(env, work, store, *args) -> subprocess.Popen:
    """An ``ingest`` daemon of the machine ``work``, returned once a head is in the bucket (it is archiving)."""
    daemon = subprocess.Popen([LAMBDALAKE, "ingest", *args], env=env, cwd=work, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(k.endswith("/HEAD") for k in store.list("master/")):
        time.sleep(0.2)
    return daemon


def _master_in_bucket(store: S3Store, pipeline) -> dict[str, list[tuple]]:
    """Per source: sorted (partition, offset, event_id) of every row the heads list, read from the bucket."""
    layout = Layout(Path("/nonexistent-machine-dir"), store=store)
    out: dict[str, list[tuple]] = {}
    for s in pipeline.sources:
        rows = []
        for p in range(8):
            head, _ = stored_head(layout, s.name, p)
            if head is None:
                continue
            end = 0
            for f in head.files:
                assert f.start == end or (end == 0 and f.start >= 0), f"{s.name}[{p}]: files do not tile"
                end = f.end
                t = pq.read_table(io.BytesIO(store.get(file_key("master", s.name, p, f.name))))
                rows += zip(t.column("_partition").to_pylist(), t.column("_offset").to_pylist(),
                            t.column("event_id").to_pylist(), strict=True)
        out[s.name] = sorted(rows)
    return out


def _check_exact(settings, pipeline, store) -> None:
    log = read_log(settings.bootstrap, [s.topic for s in pipeline.sources])
    assert _master_in_bucket(store, pipeline) == expected_master(pipeline, log)
    dlq = dlq_records(settings, pipeline)
    for name, want in expected_invalid(pipeline, log).items():
        assert sorted((r["partition"], r["offset"]) for r in dlq[name]) == want, f"DLQ of {name}"


def test_ingest_into_a_bucket_is_exact_across_kill_9(settings, pipeline, run_cli, s3_lake):
    url, store, env, work = s3_lake
    produce(run_cli, 800, malformed_fraction=0.05, duplicate_fraction=0.05)
    daemon = _start_when_archiving({**env, "LAMBDALAKE_ARCHIVE_ROLL_ROWS": "30"}, work, store)
    try:
        time.sleep(0.5)  # mid-run
    finally:
        stop_group(daemon, timeout=30, first=signal.SIGKILL)
        daemon.communicate()
    assert any(k.endswith("/HEAD") for k in store.list("master/")), "nothing archived before the kill"
    produce(run_cli, 400, seed=9, malformed_fraction=0.05, duplicate_fraction=0.05)
    res = machine_cli(env, work, "ingest", "--until-caught-up", "--workers", "2")
    assert "archived" in res.stdout
    _check_exact(settings, pipeline, store)
    assert not list((work / "work").rglob("*.parquet")), "lake data on the machine's local disk"
    heads = [stored_head(Layout(work, store=store), s.name, 0)[0] for s in pipeline.sources]
    assert all(h is not None and h.epoch >= 2 for h in heads)  # claimed again after the kill


def test_commands_not_on_object_storage_and_wrong_buckets_say_so_in_one_line(s3_lake, s3_server):
    url, store, env, work = s3_lake
    for args in (["kafka", "status"], ["cdc", "status"]):
        res = machine_cli(env, work, *args, check=False)
        assert res.returncode != 0 and "Traceback" not in res.stderr, (args, res.stderr)
        assert "object storage" in res.stderr and url in res.stderr, (args, res.stderr)
    res = machine_cli({**env, "LAMBDALAKE_HOME": "gs://bucket/x"}, work, "ingest", "--until-caught-up", check=False)
    assert res.returncode != 0 and "gs://" in res.stderr and "Traceback" not in res.stderr
    res = machine_cli({**env, "LAMBDALAKE_HOME": "s3://no-such-bucket-here/x"}, work, "ingest", "--until-caught-up",
               check=False)
    assert res.returncode != 0 and "no-such-bucket-here" in res.stderr and "Traceback" not in res.stderr
    assert not (work / "s3:").exists()


def test_the_s3_server_killed_mid_run_fails_in_one_line_and_a_rerun_is_exact(settings, pipeline, run_cli,
                                                                            own_s3_lake):
    """A server of its own (the session's one must survive): killed with -9 while the archiver rolls, then started
    again on the same port and data; the archiver gave up with one line, the rerun archives exactly."""
    lake = own_s3_lake
    env = {**lake.env, "LAMBDALAKE_ARCHIVE_ROLL_ROWS": "20", "LAMBDALAKE_ARCHIVE_ROLL_SECONDS": "0.2"}
    produce(run_cli, 600, malformed_fraction=0.05, duplicate_fraction=0.05)
    daemon = _start_when_archiving(env, lake.work, lake.store, "--partitions", "0,1,2,3")
    try:
        lake.server.down(timeout=0)  # SIGKILL of the server mid-run
        produce(run_cli, 300, seed=9, malformed_fraction=0.05, duplicate_fraction=0.05)  # more rolls to try
    finally:
        failed_in_one_line(daemon, timeout=120)
    assert lake.server.up(timeout=90)["port"] == lake.port
    res = machine_cli(env, lake.work, "ingest", "--until-caught-up")
    assert "archived" in res.stdout
    _check_exact(settings, pipeline, lake.store)


def test_two_machines_archive_one_bucket_as_a_group_and_one_dies(settings, pipeline, run_cli, s3_lake, tmp_path):
    """Two archiver daemons with nothing local in common (own working and work directories, own TMPDIR), sharing
    only the Kafka address and the bucket, split the partitions as group members; one is killed with -9 and the
    other takes its partitions over by a new epoch in each head: the bucket's master and the DLQ stay exact."""
    url, store, env, work = s3_lake
    other = tmp_path / "machine-b"
    other.mkdir()
    env_b = {**env, "LAMBDALAKE_WORK_DIR": str(other / "work"), "TMPDIR": str(other)}
    fast = {"LAMBDALAKE_ARCHIVE_ROLL_ROWS": "25", "LAMBDALAKE_ARCHIVE_ROLL_SECONDS": "0.5"}
    produce(run_cli, 600, malformed_fraction=0.05, duplicate_fraction=0.05)
    a = _start_when_archiving({**env, **fast}, work, store)
    b = _start_when_archiving({**env_b, **fast}, other, store)
    layout = Layout(work, store=store)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            owners = {stored_head(layout, s.name, p)[0].owner for s in pipeline.sources for p in range(4)
                      if stored_head(layout, s.name, p)[0] is not None}
            if len(owners) == 2:
                break
            time.sleep(0.3)
        assert len(owners) == 2, f"the two machines did not split the partitions: {owners}"
        stop_group(a, timeout=10, first=signal.SIGKILL)
        a.communicate()
        produce(run_cli, 400, seed=9, malformed_fraction=0.05, duplicate_fraction=0.05)
        ends = {}
        for m in read_log(settings.bootstrap, [s.topic for s in pipeline.sources]):
            ends[(m.topic, m.partition)] = max(ends.get((m.topic, m.partition), 0), m.offset + 1)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            heads = {(s.topic, p): stored_head(layout, s.name, p)[0] for s in pipeline.sources for p in range(4)}
            if all(h is not None and h.end == ends.get(k) for k, h in heads.items() if k in ends):
                break
            time.sleep(0.3)
        assert len({h.owner for h in heads.values() if h is not None}) == 1, "b took everything over"
    finally:
        stop_group(b, timeout=30, first=signal.SIGTERM)
        _, err = b.communicate()
    assert "Traceback" not in err.decode()
    _check_exact(settings, pipeline, store)
    assert not list(work.rglob("*.parquet")) and not list(other.rglob("*.parquet")), "lake data on a machine"


def test_a_paused_archiver_is_fenced_by_the_bucket_after_a_handover(settings, pipeline, run_cli, s3_lake, tmp_path):
    """Machine A archives every partition (pinned), is paused (SIGSTOP) while machine B — nothing local in common,
    so no lock of A's can stop it — claims partition 0 of each source, then resumed: A's next roll of partition 0 is
    refused by the head's epoch (here A's check before dead-lettering the roll's invalid messages finds epoch 2; a
    roll past that check would lose the head's compare-and-swap), nothing A writes after is listed, A stops
    archiving partition 0 and goes on with the others, and the bucket's master and the DLQ stay exact."""
    url, store, env, work = s3_lake
    other = tmp_path / "machine-b"
    other.mkdir()
    env_b = {**env, "LAMBDALAKE_WORK_DIR": str(other / "work"), "TMPDIR": str(other)}
    produce(run_cli, 400, malformed_fraction=0.05, duplicate_fraction=0.05)
    zombie = _start_when_archiving({**env, "LAMBDALAKE_ARCHIVE_ROLL_ROWS": "20",
                                    "LAMBDALAKE_ARCHIVE_ROLL_SECONDS": "0.5"}, work, store, "--partitions", "0,1,2,3")
    layout, src = Layout(work, store=store), pipeline.sources[0]
    try:
        deadline = time.monotonic() + 90
        while (stored_head(layout, src.name, 0)[0] is None or stored_head(layout, src.name, 0)[0].epoch != 1) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        zombie.send_signal(signal.SIGSTOP)  # paused: a GC pause, a stopped VM, a partition from the network
        produce(run_cli, 300, seed=8, malformed_fraction=0.0, duplicate_fraction=0.0)
        machine_cli(env_b, other, "ingest", "--until-caught-up", "--partitions", "0")  # the handover
        head = stored_head(layout, src.name, 0)[0]
        assert head.epoch == 2 and head.owner != stored_head(layout, src.name, 1)[0].owner
        listed_at_handover = {f.name for f in head.files}
        zombie.send_signal(signal.SIGCONT)  # it wakes with partition 0's new messages buffered, and rolls them
        want = {(m.topic, m.partition): m.offset + 1 for m in read_log(settings.bootstrap, [s.topic for s in
                                                                                            pipeline.sources])}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                (h := stored_head(layout, s.name, p)[0]) is not None and (h.end or 0) >= want[(s.topic, p)]
                for s in pipeline.sources for p in range(1, 4) if (s.topic, p) in want):
            time.sleep(0.3)
        stays_fenced(layout, src, listed_at_handover)
    finally:
        stop_zombie(zombie, src)
    _check_exact(settings, pipeline, store)
