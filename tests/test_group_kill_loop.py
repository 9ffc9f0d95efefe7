"""The random kill -9 loop over consumer-group members of both streaming layers (real broker, real processes): per
layer one command with ``--workers 2`` and one single worker (``ingest`` and ``speed`` daemons join their group), 50
kills of a random command at random moments while messages keep arriving, each killed command started again at once.
Every restart is accepted (no orphan holds anything), no process of a killed command is left, and once the stream
stops master + DLQ account for every offset exactly once and serving equals the oracle."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time

import psutil
import pytest

from lambdalake.clients import end_offsets
from lambdalake.heads import archived_positions
from lambdalake.layout import Layout
from lambdalake.procs import stop_group
from lambdalake.speedset import read_speed_set
from tests.conftest import LAMBDALAKE
from tests.test_archiver import check_exact
from tests.test_speed import produce, topics
from tests.test_speed_workers import served_equals_oracle

pytestmark = [pytest.mark.slow, pytest.mark.integration]

KILLS = 50
COMMANDS = {("ingest", 0): ["ingest", "--workers", "2"], ("ingest", 1): ["ingest"],
            ("speed", 0): ["speed", "--workers", "2", "--checkpoint-interval", "0.1"],
            ("speed", 1): ["speed", "--checkpoint-interval", "0.1"]}


def _start(cli_env, key: tuple[str, int]) -> subprocess.Popen:
    env = {**cli_env, "LAMBDALAKE_ARCHIVE_ROLL_ROWS": "40", "LAMBDALAKE_ARCHIVE_ROLL_SECONDS": "0.5"}
    return subprocess.Popen([LAMBDALAKE, *COMMANDS[key]], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)


def _family(proc: subprocess.Popen) -> list[int]:
    try:
        return [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.Error:
        return [proc.pid]


def _caught_up(settings, pipeline, timeout: float = 120.0) -> None:
    ends = end_offsets(settings, topics(pipeline))
    layout = Layout(settings.home)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        archived = {(s.topic, p): e for s in pipeline.sources for p, e in archived_positions(layout, s.name).items()}
        found = read_speed_set(layout)
        served = {} if found is None else dict(found.meta.positions)
        if all(archived.get(k, 0) >= e and served.get(k, 0) >= e for k, e in ends.items()):
            return
        time.sleep(0.5)
    raise AssertionError(f"not caught up with {ends} within {timeout}s")


def feeder_of(settings, pipeline, stop: threading.Event, seed: int, events: int, every: float):
    """A stream for a thread: ``events`` messages every ``every`` seconds (a new seed each time) until ``stop``."""
    def stream() -> None:
        n = seed
        while not stop.is_set():
            produce(settings, pipeline, events, seed=n)
            n += 1
            stop.wait(every)

    return stream


def test_fifty_random_kills_of_group_members_stay_exact(settings, pipeline, cli_env):
    rng = random.Random(29)
    produce(settings, pipeline, 1000, seed=1)
    stop = threading.Event()
    stream = feeder_of(settings, pipeline, stop, seed=100, events=60, every=0.5)
    members = {key: _start(cli_env, key) for key in COMMANDS}
    feeder = threading.Thread(target=stream, daemon=True)
    feeder.start()
    killed_families: list[list[int]] = []
    errors: list[str] = []
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.3, 2.0))
            key = rng.choice(sorted(members))
            proc = members[key]
            if proc.poll() is not None:  # it stopped by itself: a refused restart or an error shows here
                errors.append(f"{key} exited {proc.returncode}: {proc.stderr.read().decode()[-1500:]}")
            killed_families.append(_family(proc))
            stop_group(proc, timeout=10, first=signal.SIGKILL)
            proc.communicate()
            members[key] = _start(cli_env, key)
        stop.set()
        feeder.join(timeout=60)
        _caught_up(settings, pipeline)
    finally:
        stop.set()
        current = {pid for proc in members.values() for pid in _family(proc)}  # a pid reused by a restart
        for proc in members.values():
            stop_group(proc, timeout=60, first=signal.SIGTERM)
            _, err = proc.communicate()
            if proc.returncode not in (0, -signal.SIGTERM) or b"Traceback" in err:
                errors.append(f"exit {proc.returncode}: {err.decode()[-1500:]}")
    assert not errors, errors
    left = [pid for fam in killed_families for pid in fam if psutil.pid_exists(pid) and pid not in current
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            and any("lambdalake" in part for part in psutil.Process(pid).cmdline())]
    assert not left, f"processes of killed commands left running: {left}"
    check_exact(settings, pipeline)
    served_equals_oracle(settings, pipeline)
