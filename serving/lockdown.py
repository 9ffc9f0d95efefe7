"""The lock-down of a serving connection: an in-memory DuckDB opened with fixed limits and no way out (step 1).

Step 1 of the build protocol (:mod:`serving.connection`): open an in-memory DuckDB with the connection's resource
limits (:class:`Limits`: threads, memory) and lock it down *first* (:func:`lock_down`): no external access (no COPY
TO, EXPORT, read_csv('/etc/passwd'), INSTALL/LOAD, URLs), no extension auto-install/auto-load, no spilling to disk,
configuration locked (only display knobs stay settable: ``SET memory_limit``/``threads`` are refused). The only
directory DuckDB may touch is the connection's own private scratch directory (where step 5 builds its catalog;
removed with the connection). The statement timeout of :class:`Limits` is enforced by :mod:`serving.watchdog`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from lambdalake import sketches
from lambdalake.exceptions import ConfigError
from lambdalake.viewsql import literal

# Settings a user may still change on a locked connection: display knobs only. Resources (threads, memory_limit)
# are fixed when the connection is opened (Limits) and refused from SQL.
ALLOWED_CONFIGS = ("TimeZone", "Calendar", "errors_as_json")
log = logging.getLogger(__name__)
_said_no_timeout = False
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_THREADS = max(1, min(4, os.cpu_count() or 1))


def default_memory_limit() -> str:
    """A quarter of the machine's RAM (DuckDB's own default is 80%), at least 256 MB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "1GB"
    return f"{max(256, total // 4 // 2**20)}MB"


@dataclass(frozen=True)
class Limits:
    """What one serving connection may use: ``timeout`` seconds per statement (None: unbounded), DuckDB's
    ``memory_limit`` (e.g. ``"2GB"``; no spilling, a query over it fails) and worker ``threads``. Fixed at connect
    time; SQL cannot change them."""

    timeout: float | None = DEFAULT_TIMEOUT_S
    memory_limit: str = field(default_factory=default_memory_limit)
    threads: int = DEFAULT_THREADS

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"timeout {self.timeout!r} must be a positive number of seconds (or None)")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"threads {self.threads!r} must be a positive integer")


def lock_down(con: duckdb.DuckDBPyConnection, scratch: Path | None = None) -> bool:
    """Make ``con`` unable to touch the file system (but its own ``scratch`` directory), the network or extensions,
    or to change its configuration (but display knobs), for good (step 1). Returns whether DuckDB's progress report
    (what the statement-timeout watchdog reads) is available."""
    con.execute("SET TimeZone = 'UTC'")  # window_start is UTC; users may still change the display zone
    con.execute("SET temp_directory = ''")  # never spill to disk
    # the statement-timeout watchdog reads the progress report; nothing is printed. Inside a Jupyter kernel DuckDB
    # refuses every progress-bar setting unless ipywidgets is installed: no watchdog there (connect() says so).
    try:
        con.execute("SET enable_progress_bar = true")
        con.execute("SET enable_progress_bar_print = false")
        con.execute("SET progress_bar_time = 0")
        progress = True
    except duckdb.Error:
        progress = False
    if scratch is not None:
        con.execute(f"SET allowed_directories = [{literal(str(scratch) + os.sep)}]")
    con.execute(f"SET allowed_configs = [{', '.join(literal(c) for c in ALLOWED_CONFIGS)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return progress


def open_locked(scratch: Path | None = None, limits: Limits | None = None) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB connection with extensions frozen, resources bounded and external access disabled."""
    limits = limits or Limits()
    try:
        con = duckdb.connect(":memory:", config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
            "allow_unsigned_extensions": False,
            "threads": limits.threads,
            "memory_limit": limits.memory_limit,
            # a commit to a database file checkpoints at once instead of writing its WAL first, and stores its
            # columns uncompressed (no compression analysis: 116 -> 41 ms for the 10M bench's tails): the catalog
            # file (serving.install) is built in one transaction, lives in the scratch directory (RAM) and is
            # read-only after. In-memory tables are not compressed anyway; a user's own file is small
            "checkpoint_threshold": "0b",
            "force_compression": "uncompressed",
        })
    except duckdb.Error as exc:
        raise ConfigError(f"cannot open a serving connection with {limits}: {str(exc).splitlines()[0]}") from None
    sketches.register(con)  # approx_distinct's functions, before the lock-down
    global _said_no_timeout
    if not lock_down(con, scratch) and limits.timeout is not None and not _said_no_timeout:
        _said_no_timeout = True  # once per process
        log.warning("statement timeout not enforced on this connection: DuckDB refuses its progress report here "
                    "(inside Jupyter it needs the ipywidgets package); memory and thread limits still hold")
    return con
