"""File locks: the one ``flock`` helper (:func:`flock`) and single-writer pid locks (:class:`PidLock`).

- :func:`flock` — a shared or exclusive ``flock`` on a lock file, blocking, with an optional timeout (the master
  readers lock, the compaction lock).
- :class:`PidLock` — one archiver, one speed layer per lake: an exclusive, non-blocking ``flock`` on a file that also
  holds the owner's pid (for error messages and ``lambdalake status``).

The OS releases a ``flock`` when the process dies, kill -9 included, so a crash never leaves a stale lock; a clean
release of a :class:`PidLock` clears the pid so nobody reports a stopped process as running.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lambdalake.exceptions import LambdalakeError


class LockBusy(LambdalakeError):
    """A lock could not be taken within its timeout (another process holds it)."""

    exit_code = 5


@contextmanager
def flock(path: Path, shared: bool = False, timeout: float | None = None, what: str = "",
          on_busy: Callable[[str], Exception] | None = None) -> Iterator[None]:
    """Hold a ``flock`` on ``path`` (created if missing) for the ``with`` block: shared or exclusive.

    ``timeout`` None waits as long as it takes; a number (0 = try once) raises ``on_busy(message)`` (default
    :class:`LockBusy`) when the lock is still held by another process after that many seconds.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if timeout is None:
            fcntl.flock(fd, mode)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        msg = f"{what or 'the lock'} is held by another process ({path}); try again later"
                        raise (on_busy or LockBusy)(msg) from None
                    time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class PidLock:
    """``with PidLock(path, on_busy):`` — ``on_busy(holder_pid_text)`` returns the exception to raise if taken."""

    def __init__(self, path: Path, on_busy: Callable[[str], Exception]):
        self.path = path
        self.on_busy = on_busy
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise self.on_busy(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> PidLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def group_presence(path: Path, member: bool, what: str, refusal: Callable[[], Exception]):
    """The presence of a streaming layer's group members on this machine, as a lock: members hold ``path`` shared
    while they run (the context returned); a pinned worker probes it and gets ``refusal()`` raised when members run
    (its claims would take their partitions). The probe is exclusive, so a member's shared hold fails it; pinned
    workers probe for an instant each, hence a second of retries before concluding that members run."""
    import contextlib

    if member:
        return flock(path, shared=True)
    with flock(path, timeout=1.0, what=what, on_busy=lambda _msg: refusal()):
        pass
    return contextlib.nullcontext()
