"""Child processes: the one way lambdalake (demo, bench, tests) ends a process group it started (:func:`stop_group`),
how a command runs N workers of itself (:func:`run_workers`) and what a command's process skips at
start (:func:`pyarrow_without_pandas`)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from lambdalake.exceptions import LambdalakeError

T = TypeVar("T")
log = logging.getLogger(__name__)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when the thread that started it ends — its parent exiting or being
    killed with -9 included — so nothing lambdalake starts outlives what started it (no orphans). A no-op where
    ``prctl`` is missing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def new_session_tied_to_parent(sig: int = signal.SIGTERM) -> None:  # pragma: no cover - child, before exec
    """``preexec_fn`` of a child process the product starts: its own session and process group (a terminal's Ctrl-C
    reaches only the parent, which stops it in order), SIGINT obeyed even when started from a background job (which
    inherits it ignored), and ``sig`` (SIGTERM) when the parent dies (:func:`die_with_parent`)."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    die_with_parent(sig)


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


@dataclass(frozen=True)
class Restarts:
    """How :func:`run_workers` replaces a worker that died without a result (kill -9, out of memory): after a pause
    of ``first_delay`` seconds, doubled after each death up to ``max_delay``; a worker that ran ``healthy_after``
    seconds before dying starts again from ``first_delay``. After ``give_up_after`` deaths in a row, each within
    ``healthy_after`` of its start, the worker is given up: the others stop and :class:`WorkerDied` is raised."""

    first_delay: float = 1.0
    max_delay: float = 30.0
    healthy_after: float = 60.0
    give_up_after: int = 5


def run_workers(fn: Callable[..., T], calls: list[tuple], *, restarts: Restarts | None = None,
                notify: Callable[[str], None] | None = None) -> list[T]:
    """Run ``fn(*args)`` for each ``args`` in ``calls``, each in its own process, and return their results in order.

    The workers are *spawned* (a fresh interpreter: nothing of this process's threads, Kafka clients or JVM is
    inherited), get the command's logging, and are killed when this process dies (no orphans). SIGTERM/SIGINT to
    this process (or to its whole process group) are a clean stop of every worker: ``fn`` must handle them while
    it runs (e.g. with :func:`lambdalake.session.stop_on_signals`); before and after ``fn`` a worker ignores them,
    so a signal can never kill a worker half-way through sending its result. A stop is passed on to the workers
    again every second until they are all done, so one that was still starting up when the stop came gets it too.
    If a worker raises, the other workers are asked to stop and the first error is raised here. A worker that dies
    (kill -9, out of memory) is started again with the same arguments under ``restarts`` (it resumes from its own
    durable state), told to ``notify``; without ``restarts``, or once it is given up, the others are stopped and
    :class:`WorkerDied` is raised.

    Each worker is a plain :class:`multiprocessing.Process` with its own result pipe, not a process pool: in a pool
    the workers share one result queue and its lock, so a worker killed while sending its result blocks the others
    (and the pool's shutdown) for ever.
    """
    from multiprocessing import resource_tracker
    from multiprocessing.connection import wait

    from lambdalake.session import stop_on_signals

    if not calls:
        return []
    ctx = multiprocessing.get_context("spawn")
    stop = threading.Event()
    procs: dict[int, multiprocessing.Process] = {}  # worker index -> its current process
    pipes: dict[int, object] = {}
    started: dict[int, float] = {}
    quick_deaths: dict[int, int] = {}  # deaths in a row, each soon after its start
    pending: dict[int, float] = {}  # worker index -> when to start it again
    results: dict[int, tuple[bool, object]] = {}  # worker index -> (ok, result or exception)
    given_up: dict[int, int | None] = {}  # worker index -> exit code of its last process
    say = notify or log.warning

    def start(i: int) -> None:
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker_main, args=(fn, calls[i], writer, pandas_refused(), os.getpid()),
                           name=f"lambdalake-worker-{i}")
        # started with SIGTERM/SIGINT blocked (the mask survives exec): a stop while the new interpreter starts
        # stays pending until _worker_main has its handler, instead of killing the worker
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        writer.close()
        procs[i], pipes[i], started[i] = proc, reader, time.monotonic()

    def died(i: int, code: int | None) -> None:
        """Worker ``i`` ended without a result: start it again later, or give it up."""
        ran = time.monotonic() - started[i]
        quick_deaths[i] = 1 if ran >= restarts.healthy_after else quick_deaths.get(i, 0) + 1
        if stop.is_set() or quick_deaths[i] >= restarts.give_up_after:
            given_up[i] = code
            stop.set()
            return
        delay = min(restarts.max_delay, restarts.first_delay * 2 ** (quick_deaths[i] - 1))
        say(f"worker {i} of {len(calls)} died (exit code {code}) after {ran:.1f}s; starting it again in "
            f"{delay:.1f}s (it resumes from its own durable state)")
        pending[i] = time.monotonic() + delay

    with stop_on_signals(stop.set):
        # started first: its launch unblocks SIGTERM/SIGINT in this thread, which would undo the mask in start()
        resource_tracker.ensure_running()
        try:
            for i in range(len(calls)):
                start(i)
            running = set(range(len(calls)))
            relayed = 0.0
            while running or (pending and not stop.is_set()):
                now = time.monotonic()
                for i in [i for i, at in pending.items() if at <= now and not stop.is_set()]:
                    del pending[i]
                    start(i)
                    running.add(i)
                if stop.is_set() and now - relayed >= 1.0:
                    relayed = now
                    for i in running:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(procs[i].pid, signal.SIGTERM)
                ready = wait([pipes[i] for i in running if i not in results]
                             + [procs[i].sentinel for i in running], timeout=0.2)
                for i in list(running):
                    proc = procs[i]
                    if i not in results and (pipes[i] in ready or proc.sentinel in ready):
                        with contextlib.suppress(EOFError, OSError):
                            if pipes[i].poll():
                                results[i] = pickle.loads(pipes[i].recv_bytes())
                    if proc.sentinel in ready:
                        running.discard(i)
                        proc.join()
                        pipes[i].close()
                        if i in results and results[i][0]:
                            continue
                        if i in results or restarts is None:
                            given_up[i] = proc.exitcode
                            stop.set()  # one failed: the others stop too
                        else:
                            died(i, proc.exitcode)
        finally:
            for proc in procs.values():  # only if this process itself fails: never leave workers behind
                if proc.is_alive():
                    proc.kill()
                    proc.join()
            for r in pipes.values():
                r.close()
    for i in range(len(calls)):
        ok, value = results.get(i, (False, None))
        if not ok and value is None:
            code = given_up.get(i, procs[i].exitcode)
            raise WorkerDied(f"worker {i} of {len(calls)} died (exit code {code}); run the command "
                             "again: every worker resumes from its own durable state")
        if not ok:
            raise value  # type: ignore[misc]
    return [results[i][1] for i in range(len(calls))]  # type: ignore[misc]


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _worker_main(fn: Callable[..., T], args: tuple, conn, without_pandas: bool = False,
                 parent: int | None = None) -> None:
    """A spawned worker: killed when its parent dies (a kill -9 of the command leaves no orphan worker holding its
    partitions; every worker restarts exactly from its own durable state); the command's logging and SIGUSR1 stack
    dump; SIGTERM/SIGINT ignored outside ``fn`` (which installs its own clean-stop handler; the parent relays a stop
    until the worker is done); the result, or the exception, sent back once."""
    from lambdalake.options import configure_logging

    die_with_parent(signal.SIGKILL)
    if parent is not None and os.getppid() != parent:  # the parent died before the line above: no one to serve
        os._exit(1)

    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one that came while starting: the relay repeats it
    configure_logging()
    if without_pandas:  # as the command that started this worker
        pyarrow_without_pandas()
    try:
        out: tuple[bool, object] = (True, fn(*args))
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
        out = (False, exc)
    try:
        payload = pickle.dumps(out)
        pickle.loads(payload)  # what the parent will do: an exception class that cannot be rebuilt fails here
    except Exception as exc:  # noqa: BLE001
        payload = pickle.dumps((False, LambdalakeError(f"{type(out[1]).__name__}: {out[1]} (from a worker; "
                                                       f"not passed on as is: {exc})")))
    try:
        conn.send_bytes(payload)
    finally:
        conn.close()


class WorkerDied(LambdalakeError):
    """A worker process ended without a result (killed, out of memory)."""


class _RefusePandas:
    """Import hook: ``import pandas`` fails while it is on ``sys.meta_path`` (see :func:`pyarrow_without_pandas`)."""

    def find_spec(self, name, path=None, target=None):  # noqa: ARG002 (importlib protocol)
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"No module named {name!r} (not needed by this lambdalake command)")
        return None


def pyarrow_without_pandas() -> None:
    """Tell pyarrow, once per process, that there is no pandas: its pandas shim imports pandas (~0.5 s here) on the
    first array-like check of any kind (``pa.array``, ``pa.concat_tables``, ``import pyarrow.dataset``, ...), and
    remembers the outcome. The commands that call this never convert to pandas (the serving fast path, the log
    readers and writers); pandas itself stays importable afterwards. Does nothing when pandas is already loaded."""
    global _pandas_refused
    if "pandas" in sys.modules:
        return
    hook = _RefusePandas()
    sys.meta_path.insert(0, hook)
    try:
        import pyarrow as pa

        pa.array([0])  # the probe: pyarrow records "no pandas" for this process
        _pandas_refused = True
    finally:
        sys.meta_path.remove(hook)


def pandas_refused() -> bool:
    """Whether :func:`pyarrow_without_pandas` ran in this process (the workers :func:`run_workers` spawns do it
    too)."""
    return _pandas_refused


_pandas_refused = False
