"""The statement timeout of a serving connection: a watchdog thread interrupts a statement that runs too long.

Step 6 of the build protocol (:mod:`serving.connection`): every statement is bounded by the statement timeout
(:attr:`serving.lockdown.Limits.timeout`); a statement that runs longer is interrupted
(``duckdb.InterruptException``; ``lambdalake sql`` prints one line and exits 124).
"""

from __future__ import annotations

import threading
import time
import weakref

import duckdb

WATCH_INTERVAL_S = 0.05  # how often the statement-timeout watchdog looks at a connection


class Watchdog(threading.Thread):
    """Interrupts a statement of ``con`` that runs longer than ``timeout`` seconds.

    DuckDB has no statement timeout of its own; its progress report (-1 when idle) tells when a statement runs, and
    a drop of the progress marks the next statement. The thread ends when the connection is closed or collected.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, timeout: float):
        super().__init__(name="lambdalake-statement-timeout", daemon=True)
        self._con = weakref.ref(con)
        self.timeout = timeout
        self.fired = 0  # statements interrupted so far
        self.stopped = threading.Event()

    def run(self) -> None:
        since: float | None = None
        last = -1.0
        while not self.stopped.wait(WATCH_INTERVAL_S):
            con = self._con()
            if con is None:
                return
            try:
                progress = con.query_progress()
            except (duckdb.Error, RuntimeError):
                return  # closed
            now = time.monotonic()
            if progress < 0:
                since = None
            elif since is None or progress < last:
                since = now
            last = progress
            if since is not None and now - since >= self.timeout:
                self.fired += 1
                con.interrupt()
                since = None
            del con
