"""Issue 29's scenario on a live stream (real broker, real processes): three speed members and two archiver members
(``lambdalake speed`` / ``lambdalake ingest`` daemons, one process each); one of each is killed with -9 mid-stream
and the survivors take every partition (waited for: the time goes to ``bench/bench_groups.py``), then a fourth
speed member starts and gets a share. Once the stream stops, serving equals the oracle and master + DLQ account for
every offset exactly once."""

from __future__ import annotations

import signal
import subprocess
import threading

import pytest

from lambdalake.procs import stop_group
from tests.conftest import LAMBDALAKE
from tests.test_archiver import check_exact
from tests.test_group_kill_loop import _caught_up, feeder_of
from tests.test_speed import produce
from tests.test_speed_group import _served, _stop
from tests.test_speed_workers import served_equals_oracle

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _start(cli_env, *args: str) -> subprocess.Popen:
    env = {**cli_env, "LAMBDALAKE_ARCHIVE_ROLL_ROWS": "40", "LAMBDALAKE_ARCHIVE_ROLL_SECONDS": "0.5",
           "LAMBDALAKE_LOG": "INFO"}
    return subprocess.Popen([LAMBDALAKE, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def test_survivors_take_every_partition_and_a_fourth_speed_member_gets_a_share(settings, pipeline, cli_env):
    produce(settings, pipeline, 800, seed=41)
    speed = [_start(cli_env, "speed", "--checkpoint-interval", "0.1") for _ in range(3)]
    ingest = [_start(cli_env, "ingest") for _ in range(2)]
    procs = [*speed, *ingest]
    stop = threading.Event()
    feeder = threading.Thread(target=feeder_of(settings, pipeline, stop, seed=500, events=40, every=0.4), daemon=True)
    try:
        _served(settings, pipeline, 3, procs=speed)  # three members serve
        feeder.start()
        for victim in (speed[0], ingest[0]):
            stop_group(victim, timeout=10, first=signal.SIGKILL)
        _served(settings, pipeline, 2, timeout=120, procs=speed)  # the two survivors serve every partition
        _caught_up(settings, pipeline)  # ... and the surviving archiver archived every partition to its end
        fourth = _start(cli_env, "speed", "--checkpoint-interval", "0.1")
        procs.append(fourth)
        _served(settings, pipeline, 3, timeout=120, procs=[*speed[1:], fourth])  # partitions moved to it
        stop.set()
        feeder.join(timeout=60)
        _caught_up(settings, pipeline)
        served_equals_oracle(settings, pipeline)
        check_exact(settings, pipeline)
    finally:
        stop.set()
        errs = [_stop(proc) for proc in procs]
    assert all("Traceback" not in e for e in errs), [e[-2000:] for e in errs]
