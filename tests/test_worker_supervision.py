"""Worker supervision: `lambdalake ingest --workers N` and `lambdalake speed --workers N` killed with -9 (what an
OOM killer or a supervisor's stop timeout does) take their workers with them, so a restart is accepted at once; a
worker killed on its own is started again while the others keep running; every view stays exact (real broker)."""

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


def test_a_speed_worker_killed_with_minus_9_is_replaced_and_the_views_stay_exact(settings, pipeline, cli_env,
                                                                                 tmp_path):
    from lambdalake.clients import end_offsets
    from lambdalake.layout import Layout
    from lambdalake.procs import stop_group
    from lambdalake.speedset import read_speed_set
    from tests.test_speed import topics

    produce(settings, pipeline, 1500, seed=92)
    speed = settings.home / "views" / "speed"
    log = tmp_path / "speed.log"
    with open(log, "wb") as fh:  # a file, not a pipe: a long run must never block on a full pipe
        proc = subprocess.Popen([LAMBDALAKE, "speed", "--workers", "2", "--checkpoint-interval", "0.05"],
                                env=cli_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fh,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (len(_workers(proc)) >= 2 and speed.exists() and any(speed.rglob("snapshot.json"))):
            assert proc.poll() is None and time.monotonic() < deadline, "the speed workers did not start"
            time.sleep(0.2)
        before = _workers(proc)
        before[0].kill()
        deadline = time.monotonic() + 120
        while not (len(now := _workers(proc)) >= 2 and {p.pid for p in now} != {p.pid for p in before}):
            assert proc.poll() is None, "the command stopped instead of starting the worker again"
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.2)
        assert before[1].is_running(), "the other worker was stopped"
        produce(settings, pipeline, 800, seed=93)  # the replacement and the survivor both keep consuming
        ends = end_offsets(settings, topics(pipeline))
        deadline = time.monotonic() + 180
        while True:
            found = read_speed_set(Layout(settings.home))
            if found is not None and all(found.meta.positions.at(*tp) >= end for tp, end in ends.items()):
                break
            assert proc.poll() is None and time.monotonic() < deadline, "the speed workers did not catch up"
            time.sleep(0.2)
    finally:
        rc = stop_group(proc, timeout=60)
    err = log.read_text(errors="replace")
    assert rc == 0, err[-3000:]
    assert "died (exit code -9)" in err and "starting it again" in err, err[-3000:]
    served_equals_oracle(settings, pipeline)
