"""Archiver daemons as members of one consumer group (real Kafka, real processes): Kafka splits the partitions
between them, a member killed with -9 has its partitions taken over, a member that joins gets a share, a member
paused past its session and woken again writes nothing that counts — and master and DLQ stay exact throughout."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from lambdalake.heads import archived_positions, stored_head
from lambdalake.layout import Layout
from lambdalake.procs import stop_group
from tests.conftest import LAMBDALAKE
from tests.oracle import read_log
from tests.test_archiver import check_exact, produce

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _member(cli_env) -> subprocess.Popen:
    env = {**cli_env, "LAMBDALAKE_ARCHIVE_ROLL_ROWS": "25", "LAMBDALAKE_ARCHIVE_ROLL_SECONDS": "0.5",
           "LAMBDALAKE_LOG": "INFO"}
    return subprocess.Popen([LAMBDALAKE, "ingest"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> str:
    if proc.returncode is None:
        proc.send_signal(signal.SIGCONT)
        stop_group(proc, timeout=60, first=sig)
    _, err = proc.communicate()
    return err.decode()


def _wait_archived(settings, pipeline, timeout: float = 120.0) -> None:
    names = {s.topic: s.name for s in pipeline.sources}
    want: dict[str, dict[int, int]] = {n: {} for n in names.values()}
    for m in read_log(settings.bootstrap, list(names)):
        want[names[m.topic]][m.partition] = max(want[names[m.topic]].get(m.partition, 0), m.offset + 1)
    layout = Layout(settings.home)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(archived_positions(layout, n) == want[n] for n in names.values()):
            return
        time.sleep(0.3)
    got = {n: archived_positions(layout, n) for n in names.values()}
    raise AssertionError(f"not archived within {timeout}s: {got} != {want}")


def _owners(settings, pipeline) -> dict[tuple[str, int], tuple[str, int]]:
    layout = Layout(settings.home)
    out = {}
    for s in pipeline.sources:
        for p in range(settings.partitions):
            head, _ = stored_head(layout, s.name, p)
            if head is not None:
                out[(s.name, p)] = (head.owner, head.epoch)
    return out


def _wait_owners(settings, pipeline, n: int, timeout: float = 60.0) -> dict:
    """The heads' owners once ``n`` members own partitions (a claim comes with the assignment, data or not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owners = _owners(settings, pipeline)
        if len({o for o, _ in owners.values()}) == n and len(owners) == settings.partitions * len(pipeline.sources):
            return owners
        time.sleep(0.3)
    raise AssertionError(f"not {n} owners within {timeout}s: {_owners(settings, pipeline)}")


def test_members_split_the_partitions_take_over_a_killed_one_and_share_with_a_new_one(settings, pipeline, run_cli,
                                                                                     cli_env):
    produce(run_cli, 600, malformed_fraction=0.05, duplicate_fraction=0.05)
    a, b = _member(cli_env), _member(cli_env)
    c = None
    try:
        _wait_archived(settings, pipeline)
        first = _wait_owners(settings, pipeline, 2)

        a.send_signal(signal.SIGKILL)  # no revoke, no goodbye: its session expires
        produce(run_cli, 400, seed=8, malformed_fraction=0.05, duplicate_fraction=0.05)
        _wait_archived(settings, pipeline)
        after_kill = _owners(settings, pipeline)
        assert len({owner for owner, _ in after_kill.values()}) == 1, after_kill
        moved = [k for k in first if first[k][0] != after_kill[k][0]]
        assert moved and all(after_kill[k][1] == first[k][1] + 1 for k in moved)  # claimed with a new epoch

        c = _member(cli_env)  # joins: the group gives it a share, cooperatively
        _wait_owners(settings, pipeline, 2)
        produce(run_cli, 300, seed=10, malformed_fraction=0.05, duplicate_fraction=0.05)
        _wait_archived(settings, pipeline)
        assert len({o for o, _ in _owners(settings, pipeline).values()}) == 2
    finally:
        errs = [_stop(p) for p in (a, b, c) if p is not None]
    assert all("Traceback" not in e for e in errs), errs
    check_exact(settings, pipeline)


def test_a_member_paused_past_its_session_writes_nothing_that_counts(settings, pipeline, run_cli, cli_env):
    produce(run_cli, 400, malformed_fraction=0.05, duplicate_fraction=0.05)
    a, b = _member(cli_env), _member(cli_env)
    try:
        _wait_archived(settings, pipeline)
        _wait_owners(settings, pipeline, 2)
        a.send_signal(signal.SIGSTOP)
        produce(run_cli, 300, seed=8, malformed_fraction=0.0, duplicate_fraction=0.0)
        _wait_owners(settings, pipeline, 1)  # b took a's partitions over once a's session expired
        _wait_archived(settings, pipeline)  # only b can have done it: a is stopped
        a.send_signal(signal.SIGCONT)  # wakes with the old assignment and a buffer of nothing new
        produce(run_cli, 300, seed=9, malformed_fraction=0.0, duplicate_fraction=0.0)
        _wait_archived(settings, pipeline)
        time.sleep(2.0)
    finally:
        err_a, err_b = _stop(a), _stop(b)
    assert "Traceback" not in err_a + err_b
    assert "to another archiver" in err_a or "stopped archiving" in err_a, err_a[-3000:]
    check_exact(settings, pipeline)


def test_a_pinned_run_next_to_group_members_waits_for_them(settings, pipeline, run_cli, cli_env):
    """Airflow's archive step (a pinned run) next to running members: it refuses to claim their partitions and
    waits until they have archived up to the log's end instead; the CLI's pinned run says why in one line."""
    from batch.catch_up import archive

    produce(run_cli, 300, malformed_fraction=0.05, duplicate_fraction=0.0)
    member = _member(cli_env)
    try:
        _wait_owners(settings, pipeline, 1)
        res = run_cli("ingest", "--until-caught-up", check=False)
        assert res.returncode != 0 and "archiver daemons" in res.stderr and "Traceback" not in res.stderr
        produce(run_cli, 200, seed=8, malformed_fraction=0.05, duplicate_fraction=0.0)
        done = archive(settings, pipeline, wait_timeout=120, poll_interval=0.3)
        assert done.mode == "waited"
        assert {o for o, _ in _owners(settings, pipeline).values()} == {o for o, _ in _wait_owners(
            settings, pipeline, 1).values()}  # nobody took the member's partitions
    finally:
        err = _stop(member)
    assert "Traceback" not in err and "stopped archiving" not in err
    check_exact(settings, pipeline)
