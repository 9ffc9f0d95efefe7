"""Single-writer locks: one archiver, one speed layer per lake.

An exclusive, non-blocking ``flock`` on a file that also holds the owner's pid (for error messages and
``lambdalake status``). The OS releases it when the process dies, kill -9 included, so a crash never leaves a
stale lock; a clean release clears the pid so nobody reports a stopped process as running.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path


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
