"""Stopping child processes: the one way lambdalake (demo, bench, tests) ends a process group it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen, timeout: float = 30.0, kill_timeout: float = 10.0,
               first: int = signal.SIGTERM) -> int | None:
    """Send ``first`` (SIGTERM) to the process group of ``proc`` (started with ``start_new_session=True``), wait
    up to ``timeout`` seconds, then SIGKILL the group and reap. Returns the exit code; a no-op if it already ended."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, first)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(kill_timeout)
    return proc.returncode


def kill_group(proc: subprocess.Popen) -> int | None:
    """SIGKILL the process group of ``proc`` at once (crash tests) and reap it."""
    return stop_group(proc, timeout=10.0, first=signal.SIGKILL)
