"""Child processes: the one way lambdalake (demo, bench, tests) ends a process group it started (:func:`stop_group`),
and how a command runs N workers of itself (:func:`run_workers`)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from lambdalake.exceptions import LambdalakeError

T = TypeVar("T")


def stop_group(proc: subprocess.Popen, timeout: float = 30.0, kill_timeout: float = 10.0,
               first: int = signal.SIGTERM) -> int | None:
    """Send ``first`` (SIGTERM) to the process group of ``proc`` (started with ``start_new_session=True``), wait
    up to ``timeout`` seconds, then SIGKILL the group and reap. Returns the exit code; a no-op if it already ended.

    A group that outlives the timeout first gets SIGUSR1: lambdalake processes (and their workers) then print every
    thread's stack to their stderr (:func:`lambdalake.options.configure_logging`), so a log shows where it hung."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, first)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if first != signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGUSR1)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(1.0)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(kill_timeout)
    return proc.returncode


def kill_group(proc: subprocess.Popen) -> int | None:
    """SIGKILL the process group of ``proc`` at once (crash tests) and reap it."""
    return stop_group(proc, timeout=10.0, first=signal.SIGKILL)


def run_workers(fn: Callable[..., T], calls: list[tuple]) -> list[T]:
    """Run ``fn(*args)`` for each ``args`` in ``calls``, each in its own process, and return their results in order.

    The workers are *spawned* (a fresh interpreter: nothing of this process's threads, Kafka clients or JVM is
    inherited). SIGTERM/SIGINT to this process are passed on to every worker (which handle them as a clean stop).
    If a worker raises, the other workers are asked to stop and the first error is raised here; a worker that dies
    (kill -9, out of memory) raises :class:`WorkerDied`.
    """
    from lambdalake.session import stop_on_signals

    if not calls:
        return []
    ctx = multiprocessing.get_context("spawn")
    pids: list[int] = []

    def stop_all() -> None:  # runs in a signal handler: only os calls, on pids captured beforehand
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    with ProcessPoolExecutor(max_workers=len(calls), mp_context=ctx, initializer=_init_worker) as pool, \
            stop_on_signals(stop_all):
        futs = [pool.submit(fn, *args) for args in calls]
        pids.extend(child.pid for child in multiprocessing.active_children() if child.pid is not None)
        done, _ = futures.wait(futs, return_when=futures.FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done):
            stop_all()
        futures.wait(futs)
        for i, f in enumerate(futs):
            exc = f.exception()
            if isinstance(exc, BrokenProcessPool):
                raise WorkerDied(f"worker {i} of {len(calls)} died ({exc}); run the command again: every worker "
                                 "resumes from its own durable state") from exc
            if exc is not None:
                raise exc
        return [f.result() for f in futs]


def _init_worker() -> None:
    """A spawned worker starts with Python's defaults: give it the command's logging (``LAMBDALAKE_LOG`` is
    inherited through the environment) and the SIGUSR1 stack dump."""
    from lambdalake.options import configure_logging

    configure_logging()


class WorkerDied(LambdalakeError):
    """A worker process ended without a result (killed, out of memory)."""
