"""The archiver survives a broker restart: a running daemon reconnects and carries on, and a fresh run after the
restart resumes from the master files — no gap, no duplicate row, no duplicate DLQ record.

Uses its own broker (restarting the session broker would disturb other tests), so it is marked slow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from lambdalake.broker import EmbeddedBroker
from lambdalake.clients import end_offsets
from lambdalake.config import load_settings
from lambdalake.embedded import free_port
from lambdalake.heads import archived_positions
from lambdalake.layout import Layout
from lambdalake.pipeline import load_pipeline
from lambdalake.procs import kill_group
from tests.conftest import LAMBDALAKE, write_pipeline_copy
from tests.test_archiver import check_exact

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def own_broker(tmp_path):
    broker = EmbeddedBroker(tmp_path / "kafka-home", port=free_port(), controller_port=free_port(), heap="512m",
                            tied_to_parent=True)
    broker.up(timeout=120)
    try:
        yield broker
    finally:
        broker.down(timeout=30)


def _caught_up(settings, pipeline) -> bool:
    ends = end_offsets(settings, [s.topic for s in pipeline.sources])
    layout = Layout(settings.home)
    for s in pipeline.sources:
        pos = archived_positions(layout, s.name)
        for (t, p), end in ends.items():
            if t == s.topic and end and pos.get(p, 0) < end:
                return False
    return True


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_archiver_across_broker_restart(own_broker, tmp_path, unique_suffix):
    home = tmp_path / "lake"
    pfile = write_pipeline_copy(tmp_path, "lambdalake.pipelines.clickstream", unique_suffix)
    settings = load_settings(home=home, bootstrap=own_broker.bootstrap, pipeline=str(pfile), partitions=3)
    pipeline = load_pipeline(str(pfile))
    env = {**os.environ, "LAMBDALAKE_HOME": str(home), "LAMBDALAKE_BOOTSTRAP": own_broker.bootstrap,
           "LAMBDALAKE_PIPELINE": str(pfile), "LAMBDALAKE_PARTITIONS": "3", "LAMBDALAKE_ARCHIVE_ROLL_SECONDS": "0.5"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        res = subprocess.run([LAMBDALAKE, *args], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{args}: {res.stderr}"
        return res

    def daemon() -> subprocess.Popen:
        return subprocess.Popen([LAMBDALAKE, "ingest"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    procs: list[subprocess.Popen] = []
    try:
        cli("produce", "--events", "600", "--seed", "1", "--malformed-fraction", "0.05")
        procs.append(daemon())
        _wait(lambda: _caught_up(settings, pipeline), 120, "the daemon to archive the first batch")
        # 1. broker restart under a running daemon: it reconnects and archives what comes after
        own_broker.down(timeout=30)
        time.sleep(3)
        own_broker.up(timeout=120)
        cli("produce", "--events", "600", "--seed", "2", "--malformed-fraction", "0.05")
        _wait(lambda: _caught_up(settings, pipeline), 180, "the daemon to archive after the broker restart")
        assert procs[0].poll() is None, procs[0].stderr.read().decode() if procs[0].stderr else ""
        check_exact(settings, pipeline)
        # 2. kill -9 the daemon while the broker is down with data in flight; restart both; resume from disk
        cli("produce", "--events", "600", "--seed", "3", "--malformed-fraction", "0.05")
        own_broker.down(timeout=30)
        kill_group(procs[0])
        procs[0].communicate(timeout=30)
        own_broker.up(timeout=120)
        cli("ingest", "--until-caught-up")
        check_exact(settings, pipeline)
        # 3. a daemon stopped with SIGTERM exits cleanly
        procs.append(daemon())
        time.sleep(3)
        os.killpg(procs[1].pid, signal.SIGTERM)
        _, err = procs[1].communicate(timeout=60)
        assert procs[1].returncode == 0, err.decode()
    finally:
        for p in procs:
            kill_group(p)
            p.communicate(timeout=30)
