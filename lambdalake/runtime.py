"""The interpreter's pace while a streaming loop runs (:func:`streaming_runtime`) and the crash-test hook
(:func:`crash_point`) the batch job and the master rewrites use to die at a named step."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading

# While a streaming loop runs: the cyclic collector's thresholds (CPython's default is 700, 10, 10) and how long a
# thread may hold the GIL before another one waiting gets it (CPython's default is 5 ms).
STREAMING_GC_THRESHOLD = (50_000, 20, 20)
STREAMING_SWITCH_INTERVAL = 0.001


@contextlib.contextmanager
def streaming_runtime(threshold: tuple[int, int, int] = STREAMING_GC_THRESHOLD,
                      switch_interval: float = STREAMING_SWITCH_INTERVAL):
    """Run the block with a slower-paced cyclic garbage collector (the objects alive at entry frozen, never
    traversed) and a shorter GIL switch interval; both undone at exit.

    - The archiver and the speed layer allocate a few container objects per message (decoded records, row keys,
      aggregate lists) and keep hundreds of thousands alive (open blocks, dedup windows), none of them in reference
      cycles. With CPython's default threshold a young collection ran every 700 allocations and the older ones
      re-traversed the growing state: 19% of the speed layer's time (``bench/bench_speed.py``, in-process runs
      interleaved: 23.0k vs 27.3k events/s). Reference counting still frees everything at once; only cycles wait
      longer (up to ``threshold[0]`` allocations).
    - The speed layer's checkpoint writer thread does short Python steps between file writes and fsyncs while the
      consuming thread holds the GIL: each step waited up to the 5 ms default for it. At 1 ms a commit during a
      catch-up took half the wall time (median 164-201 vs 363-396 ms) at the same throughput.
    """
    global _streaming_before, _streaming_depth
    with _streaming_lock:  # loops of several threads (tests, notebooks): the outermost sets and restores
        if _streaming_depth == 0:
            _streaming_before = (gc.get_threshold(), sys.getswitchinterval())
            gc.freeze()
            gc.set_threshold(*threshold)
            sys.setswitchinterval(switch_interval)
        _streaming_depth += 1
    try:
        yield
    finally:
        with _streaming_lock:
            _streaming_depth -= 1
            if _streaming_depth == 0:
                gc.set_threshold(*_streaming_before[0])
                sys.setswitchinterval(_streaming_before[1])
                gc.unfreeze()


_streaming_lock = threading.Lock()
_streaming_depth = 0
_streaming_before = (gc.get_threshold(), sys.getswitchinterval())


def crash_point(variable: str, step: str) -> None:
    """Crash-test hook: SIGKILL this process, like a kill -9 from outside at this instant (nothing cleaned up),
    when the environment variable ``variable`` names ``step`` (``LAMBDALAKE_BATCH_FAULT``,
    ``LAMBDALAKE_ERASE_FAULT``)."""
    if os.environ.get(variable) == step:
        os.kill(os.getpid(), signal.SIGKILL)


_restartable = False  # set by the CLI (lambdalake.options.run_app): only a lambdalake command restarts itself


def allow_restart() -> None:
    """This process is a ``lambdalake`` command (or one of its workers): :func:`restart_self` may restart it."""
    global _restartable
    _restartable = True


def restart_self(reason: str) -> None:
    """Start this process again from scratch, as a crash and a restart would (every streaming worker restarts
    exactly from its own durable state): a worker of ``--workers N`` exits and its command starts it again
    (:class:`lambdalake.procs.Restarts`); a command of its own executes itself anew (same pid, same arguments;
    its locks, opened close-on-exec, are released by the exec). Any other process (a library user's, a test's) is
    never executed anew: :class:`~lambdalake.exceptions.BrokerError` is raised instead."""
    import multiprocessing

    from lambdalake.exceptions import BrokerError

    command = _restartable and os.path.basename(sys.argv[0]) == "lambdalake"  # not a test calling the CLI's main
    if not command and multiprocessing.parent_process() is None:  # a library user's process: never exec it
        raise BrokerError(f"{reason}; restart this process")
    print(f"lambdalake: {reason}; restarting this process", file=sys.stderr, flush=True)
    if multiprocessing.parent_process() is not None:
        os._exit(75)  # EX_TEMPFAIL
    os.execv(sys.executable, sys.orig_argv)
