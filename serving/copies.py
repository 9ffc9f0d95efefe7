"""Batch versions' serving copies (:mod:`lambdalake.servingcopy`), read natively by a locked-down connection.

A copy is a DuckDB database file written once at publish in the version's prefix. DuckDB never attaches it where
it lies: attaching a file adds it (and its ``.wal`` names) to the connection's ``allowed_paths``, so a user's
``COPY ... TO '<that file>' (USE_TMP_FILE false)`` would overwrite it and ``COPY ... TO '<that file>.wal'`` create
a file in the lake. :func:`attach_copy` copies it instead into the connection's private scratch directory (the one
directory the lock-down allows, :mod:`serving.lockdown`), attaches that READ_ONLY and unlinks it: no lake path ever
becomes readable or writable by user SQL, and the attached file has no name anyone can reach. Before that the file
is checked to lie inside the lake (:meth:`Layout.inside`); after, each table's row count against the manifest (a
table that does not match is not used: the view is served from its parquet files, whose own checks then decide).
A user who DETACHes it and attaches a database of their own under its name gets an error from every view reading
it (:func:`guarded_copy`), never an answer.

Cost: one file copy per process and copy (page cache to RAM when the scratch root is ``/dev/shm``): the first
connection of a process to a version copies the file into a private directory of the process next to the scratch
directories (:func:`private_copy`, ``lambdalake-copies-<pid>-…``, mode 0700, removed at exit; one left by a killed
process is removed by the next process that makes its own); every connection then attaches a hard link of it made
in its own scratch directory and unlinked at once, so no name of it is ever reachable from user SQL either (a user
recreating that name makes a new file; the shared file is never writable through DuckDB, which attaches it
READ_ONLY). At most :data:`CACHED` copies are kept per process (an evicted one lives on, unnamed, while a
connection still has it attached). A copy larger than ``LAMBDALAKE_SERVING_COPY_MAX_MB`` (default 256) is not used.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from lambdalake.config import env_int
from lambdalake.pipeline import Pipeline, View
from lambdalake.schema import view_columns
from lambdalake.servingcopy import copy_path, estimate_column, table_name
from lambdalake.viewsql import FN, ident, literal
from serving.published import PublishedPair

log = logging.getLogger(__name__)
CACHE_PREFIX = "lambdalake-copies-"  # + pid: a process's private directory of copies
CACHED = 2  # serving copies a process keeps (the newest versions it attached)
_cache_lock = threading.Lock()
_cache: dict[tuple[int, ...], Path] = {}  # (pid, dev, inode, size, mtime) of a lake's copy -> the process's copy
_names = itertools.count(1)
_cache_dirs: dict[int, Path] = {}  # pid -> the process's private directory of copies
TAMPERED_COPY = "the batch copy this connection attached was detached or replaced; reconnect (serving.connect())"


@dataclass(frozen=True)
class Copy:
    """One attached serving copy: its database name and oid, and per table its columns ({name: DuckDB type})."""

    version: str
    alias: str
    oid: int
    tables: dict[str, dict[str, str]] = field(default_factory=dict)

    def usable(self, pipeline: Pipeline, view: View) -> bool:
        """Whether the copy holds ``view`` with every contract column (read cast to the contract's type, as the
        parquet side is: :func:`lambdalake.viewsql.typed_select`)."""
        cols = self.tables.get(table_name(view.name))
        return cols is not None and all(c.name in cols for c in view_columns(pipeline.source_of(view), view))

    def estimates(self, view: View) -> frozenset[str]:
        """The approx_distinct columns of ``view`` whose estimate is stored in the copy."""
        cols = self.tables.get(table_name(view.name), {})
        return frozenset(a.name for a in view.stored_aggregates
                         if a.merge == "union" and cols.get(estimate_column(a.name)) == "BIGINT")


def max_copy_bytes() -> int:
    return env_int("LAMBDALAKE_SERVING_COPY_MAX_MB", 256, minimum=0, why="") * 2**20


def attach_copy(con: duckdb.DuckDBPyConnection, pair: PublishedPair, scratch: Path, alias: str) -> Copy | None:
    """Attach a private copy of the serving copy of ``pair``'s batch version READ_ONLY as ``alias``; None if there is
    none or it cannot be used (logged)."""
    if pair.batch_version is None or pair.manifest is None:
        return None
    layout = pair.layout
    path = copy_path(pair.batch_dir or layout.batch_version(pair.batch_version))
    if not (path.is_file() or path.is_symlink()):
        return None
    real = layout.inside(path)  # a symlink out of the lake is refused, naming it
    if real.stat().st_size > max_copy_bytes():
        return None
    private = scratch / f"{alias}.duckdb"
    try:
        try:
            os.link(private_copy(real, scratch.parent), private)
        except OSError:  # another file system, no hard links: a copy of its own
            shutil.copyfile(real, private)
        con.execute(f"ATTACH {literal(str(private))} AS {ident(alias)} (READ_ONLY)")
    except (OSError, duckdb.Error) as exc:
        log.warning("serving copy %s not used (its version is served from parquet): %s", path,
                    str(exc).splitlines()[0])
        return None
    finally:
        private.unlink(missing_ok=True)  # DuckDB keeps it open; nothing else may open it
    oid = con.execute("SELECT database_oid FROM duckdb_databases() WHERE database_name = ?", [alias]).fetchall()[0][0]
    tables: dict[str, dict[str, str]] = {}
    for view, expected in pair.manifest.row_counts.items():  # DESCRIBE each: duckdb_columns() costs ~15 ms
        table = f"{ident(alias)}.main.{ident(table_name(view))}"
        try:
            cols = {name: typ for name, typ, *_ in con.execute(f"DESCRIBE {table}").fetchall()}
        except duckdb.CatalogException:
            continue  # not in the copy (no rows): served from parquet
        rows = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
        if rows != expected:
            log.warning("serving copy %s: table %s holds %s rows, the manifest says %s; served from parquet", path,
                        table_name(view), rows, expected)
            continue
        tables[table_name(view)] = cols
    return Copy(pair.batch_version, alias, int(oid), tables)


def private_copy(real: Path, root: Path) -> Path:
    """This process's copy of the lake file ``real`` in its private directory under ``root`` (made on first use;
    a changed file — other inode, size or mtime — is copied anew)."""
    st = real.stat()
    key = (os.getpid(), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None and cached.is_file():
            return cached
        directory = _cache_dirs.get(key[0])
        if directory is None or not directory.is_dir():
            _sweep(root)
            directory = Path(tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}{key[0]}-", dir=root))  # mode 0700
            _cache_dirs[key[0]] = directory
            atexit.register(shutil.rmtree, str(directory), True)
        target = directory / f"{next(_names)}-{st.st_ino}.duckdb"
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(real, tmp)
        os.chmod(tmp, 0o400)
        os.replace(tmp, target)
        _cache[key] = target
        for old in [k for k in _cache if k[0] != key[0]] + list(_cache)[:-CACHED]:  # a forked child's, the oldest
            gone = _cache.pop(old, None)
            if gone is not None and old[0] == key[0]:
                gone.unlink(missing_ok=True)  # attached connections keep the file open
        return target


def _sweep(root: Path) -> None:
    """Remove the private directories of copies left by processes of this user that are gone (killed: no atexit)."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        pid = entry.name.removeprefix(CACHE_PREFIX).split("-", 1)[0]
        if not entry.name.startswith(CACHE_PREFIX) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid() or not entry.is_dir(follow_symlinks=False):
                continue
            os.kill(int(pid), 0)  # alive (or not ours to signal): kept
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            continue


def guarded_copy(copy: Copy, view: View) -> str:
    """A parenthesized subquery over the copy's table of ``view`` (every column, estimates included) that fails
    (:data:`TAMPERED_COPY`) unless the database under the copy's name is still the one attached at connect."""
    guard = (f"EXISTS (SELECT 1 FROM {FN}duckdb_databases() WHERE database_name = {literal(copy.alias)} "
             f"AND database_oid = {copy.oid}) OR {FN}error({literal(TAMPERED_COPY)})")
    return f"(SELECT * FROM {ident(copy.alias)}.main.{ident(table_name(view.name))} WHERE {guard})"
