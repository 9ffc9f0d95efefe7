"""`lambdalake.procs.run_workers`, the process model of `ingest --workers N` and `speed --workers N`: results in
order, the first error wins and stops the others, a killed worker is reported, and a stop (SIGTERM to the whole
process group, as `stop_group`, systemd or a terminal's Ctrl-C send it) ends every worker cleanly at any moment —
while workers are still starting, running, or sending their results (no fakes: real spawned processes)."""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lambdalake.exceptions import LambdalakeError
from lambdalake.procs import Restarts, WorkerDied, run_workers, stop_group
from lambdalake.runtime import STREAMING_GC_THRESHOLD, STREAMING_SWITCH_INTERVAL, streaming_runtime
from lambdalake.session import stop_on_signals

REPO = Path(__file__).resolve().parent.parent


class Refused(LambdalakeError):
    exit_code = 3


def square(x: int) -> int:
    return x * x


def fail_or_wait(i: int, marker: str) -> int:
    """Worker 0 fails; the others run until stopped (and leave a marker saying they stopped cleanly)."""
    if i == 0:
        time.sleep(0.3)
        raise Refused(f"worker {i} refuses")
    return until_stopped(i, marker)


def until_stopped(i: int, marker: str) -> int:
    """Like a daemon worker: runs until SIGTERM/SIGINT (handled while running), then returns."""
    stop = threading.Event()
    with stop_on_signals(stop.set):
        Path(f"{marker}.{i}.running").write_text(str(os.getpid()))
        stop.wait(120)
    Path(f"{marker}.{i}.stopped").touch()
    return i


def test_results_come_back_in_order():
    assert run_workers(square, [(3,), (4,), (5,)]) == [9, 16, 25]
    assert run_workers(square, []) == []


def test_the_first_error_is_raised_and_stops_the_other_workers(tmp_path):
    marker = str(tmp_path / "m")
    t0 = time.monotonic()
    with pytest.raises(Refused, match="worker 0 refuses"):
        run_workers(fail_or_wait, [(0, marker), (1, marker), (2, marker)])
    assert time.monotonic() - t0 < 60, "the other workers were not stopped"
    for i in (1, 2):  # they got the stop and finished cleanly (they may have been stopped before running)
        assert Path(f"{marker}.{i}.stopped").exists() or not Path(f"{marker}.{i}.running").exists()


def test_a_killed_worker_is_reported_after_the_others_stopped(tmp_path):
    marker = str(tmp_path / "m")
    t, result = _in_thread(lambda: run_workers(until_stopped, [(0, marker), (1, marker)]))
    _wait_for(f"{marker}.0.running")
    os.kill(int(Path(f"{marker}.0.running").read_text()), signal.SIGKILL)
    t.join(60)
    assert not t.is_alive()
    assert isinstance(result.get("exc"), WorkerDied), result
    assert "worker 0 of 2 died" in str(result["exc"])
    assert Path(f"{marker}.1.stopped").exists() or not Path(f"{marker}.1.running").exists()


CHILD = """
import sys
sys.path.insert(0, {repo!r})
from lambdalake.procs import run_workers
from tests.test_procs import until_stopped
if __name__ == "__main__":
    open({marker!r} + ".parent", "w").close()
    print("results", run_workers(until_stopped, [(0, {marker!r}), (1, {marker!r})]), flush=True)
"""


@pytest.mark.parametrize("seed", range(4))
def test_a_stop_of_the_group_at_any_moment_ends_every_worker_cleanly(tmp_path, seed):
    """SIGTERM to the process group while workers start, run or return: exit 0 with every result, never a hang
    (regression: a pool worker killed by the second SIGTERM while holding the result queue's lock)."""
    marker = str(tmp_path / "m")
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO), marker=marker))
    delay = random.Random(seed).uniform(0.05, 2.5) if seed else 0.05
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not Path(f"{marker}.parent").exists() and time.monotonic() < deadline:  # a process stopped while Python
        time.sleep(0.01)  # itself starts just dies (-15): nothing of it ran yet
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGTERM)
    rc = stop_group(proc, timeout=60)
    out = proc.stdout.read().decode()
    assert rc == 0, f"exit {rc} after a stop {delay:.2f}s in:\n{out[-3000:]}"
    assert "results [0, 1]" in out, out[-3000:]


STORM = """
import os, signal, sys, threading, time
sys.path.insert(0, {repo!r})
from lambdalake.session import stop_on_signals

stop = threading.Event()
with stop_on_signals(stop.set):
    # the main thread works the event's lock (set/wait) while stops land in bursts, as a group stop and the
    # parent's relay do: a handler that took the lock itself deadlocked on its own thread
    def storm():
        for _ in range(300):
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.001)
    t = threading.Thread(target=storm)
    t.start()
    while t.is_alive():
        stop.set()
        stop.wait(0)
        stop.clear()
    t.join()
time.sleep(0.2)
print("signal handlers back:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
"""


def test_stops_in_bursts_while_the_main_thread_holds_the_events_lock_never_deadlock(tmp_path):
    """Regression (CI, session 7): a worker deadlocked when a second SIGTERM arrived while the first handler was
    inside ``Event.set`` — the handler now only queues the signal; ``stop`` runs on a helper thread."""
    script = tmp_path / "storm.py"
    script.write_text(STORM.format(repo=str(REPO)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "signal handlers back: True" in out.stdout


def test_streaming_runtime_paces_collector_and_gil_only_inside_and_restores_them_on_error():
    before = gc.get_threshold(), sys.getswitchinterval()
    assert before[0] != STREAMING_GC_THRESHOLD and before[1] != STREAMING_SWITCH_INTERVAL
    alive = [[i] for i in range(1000)]  # objects alive at entry are frozen (never traversed while inside)
    with pytest.raises(RuntimeError, match="inside"), streaming_runtime():
        assert gc.get_threshold() == STREAMING_GC_THRESHOLD
        assert sys.getswitchinterval() == STREAMING_SWITCH_INTERVAL
        assert gc.get_freeze_count() >= len(alive)
        with streaming_runtime():  # a second loop (another thread) inside the first: the outer one restores
            pass
        assert gc.get_threshold() == STREAMING_GC_THRESHOLD
        raise RuntimeError("inside")
    assert (gc.get_threshold(), sys.getswitchinterval()) == before
    assert gc.get_freeze_count() == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is dead, only not reaped yet
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_workers_die_with_a_parent_killed_with_minus_9(tmp_path):
    """kill -9 of the command (an OOM killer, a supervisor's stop timeout) leaves no orphan worker behind."""
    marker = str(tmp_path / "m")
    script = ("import sys; from lambdalake.procs import run_workers; from tests.test_procs import until_stopped\n"
              f"run_workers(until_stopped, [(0, {marker!r}), (1, {marker!r})])\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True)
    try:
        for i in (0, 1):
            _wait_for(f"{marker}.{i}.running")
        pids = [int(Path(f"{marker}.{i}.running").read_text()) for i in (0, 1)]
        assert all(_alive(p) for p in pids)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if _alive(p)], "workers outlived their parent"
    finally:
        stop_group(parent, timeout=5)


def until_stopped_once_restarted(i: int, marker: str) -> str:
    """Counts its starts (a file per start), then runs like a daemon worker; returns how many times it started."""
    n = len(list(Path(marker).parent.glob(f"{Path(marker).name}.{i}.start.*")))
    Path(f"{marker}.{i}.start.{n}").touch()
    until_stopped(i, marker)
    return f"{i}:{n + 1}"


def always_dies(i: int, marker: str) -> int:
    if i == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return until_stopped(i, marker)


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            result["exc"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, result


def _wait_for(path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_a_worker_that_dies_is_started_again_and_the_others_keep_running(tmp_path):
    marker = str(tmp_path / "m")
    told: list[str] = []
    t, result = _in_thread(lambda: run_workers(
        until_stopped_once_restarted, [(0, marker), (1, marker)], notify=told.append,
        restarts=Restarts(first_delay=0.1, max_delay=0.2, healthy_after=60, give_up_after=5)))
    for i in (0, 1):
        _wait_for(f"{marker}.{i}.running")
    first, other = (int(Path(f"{marker}.{i}.running").read_text()) for i in (0, 1))
    os.kill(first, signal.SIGKILL)
    _wait_for(f"{marker}.0.start.1")  # started again with the same arguments
    deadline = time.monotonic() + 60
    while int(Path(f"{marker}.0.running").read_text() or first) == first:
        assert time.monotonic() < deadline, "the worker was not started again"
        time.sleep(0.05)
    assert told and "worker 0 of 2 died (exit code -9)" in told[0] and "starting it again" in told[0]
    assert not Path(f"{marker}.1.stopped").exists(), "the other worker was stopped"
    os.kill(other, 0)  # the other worker is still the same process
    for i in (0, 1):
        os.kill(int(Path(f"{marker}.{i}.running").read_text()), signal.SIGTERM)  # a clean stop: both return
    t.join(60)
    assert not t.is_alive()
    assert result.get("value") == ["0:2", "1:1"], result


def test_a_worker_that_keeps_dying_is_given_up(tmp_path):
    marker = str(tmp_path / "m")
    told: list[str] = []
    t, result = _in_thread(lambda: run_workers(
        always_dies, [(0, marker), (1, marker)], notify=told.append,
        restarts=Restarts(first_delay=0.05, max_delay=0.1, healthy_after=60, give_up_after=3)))
    t.join(120)
    assert not t.is_alive()
    assert isinstance(result.get("exc"), WorkerDied), result
    assert len(told) == 2, told  # two restarts, then given up at the third death
    assert Path(f"{marker}.1.stopped").exists() or not Path(f"{marker}.1.running").exists()
