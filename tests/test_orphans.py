"""No orphans: `lambdalake ingest --workers N` and `lambdalake speed --workers N` killed with -9 (what an OOM killer
or a supervisor's stop timeout does) take their worker processes with them, so a restart is accepted at once and
continues exactly (real broker, real CLI processes)."""

from __future__ import annotations

import subprocess
import time

import psutil
import pytest

from tests.conftest import LAMBDALAKE
from tests.test_speed import produce
from tests.test_speed_workers import served_equals_oracle

pytestmark = pytest.mark.integration


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    """The spawned worker processes of a `lambdalake ... --workers N` command."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def _kill_minus_9_once_working(cli_env: dict, *args: str, ready) -> list[psutil.Process]:
    proc = subprocess.Popen([LAMBDALAKE, *args], env=cli_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (len(_workers(proc)) >= 2 and ready()):
            assert proc.poll() is None, f"lambdalake {' '.join(args)} exited {proc.returncode}"
            assert time.monotonic() < deadline, "the workers did not start working"
            time.sleep(0.2)
        workers = _workers(proc)
        proc.kill()  # kill -9 of the command itself; its workers get no signal from it
        proc.wait(10)
        return workers
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _gone(workers: list[psutil.Process], timeout: float = 15.0) -> list[int]:
    _, alive = psutil.wait_procs(workers, timeout=timeout)
    return [p.pid for p in alive]


def test_ingest_and_speed_workers_die_with_their_command_and_a_restart_is_exact(settings, pipeline, cli_env,
                                                                               run_cli):
    produce(settings, pipeline, 3000, seed=91)
    master = settings.home / "master"

    workers = _kill_minus_9_once_working(cli_env, "ingest", "--workers", "2",
                                         ready=lambda: master.exists() and any(master.rglob("*.parquet")))
    assert not _gone(workers), "archiver workers outlived `lambdalake ingest` killed with -9"
    run_cli("ingest", "--until-caught-up", "--workers", "2")  # accepted: no orphan holds a partition

    speed = settings.home / "views" / "speed"
    workers = _kill_minus_9_once_working(cli_env, "speed", "--workers", "2", "--checkpoint-interval", "0.05",
                                         ready=lambda: speed.exists() and any(speed.rglob("snapshot.json")))
    assert not _gone(workers), "speed workers outlived `lambdalake speed` killed with -9"
    run_cli("speed", "--until-caught-up", "--workers", "2", "--checkpoint-interval", "0.05")
    served_equals_oracle(settings, pipeline)
