"""The serving copy of a batch version: its views in DuckDB's own storage, each sketch's estimate stored with it.

Written once at publish (:func:`lambdalake.versions.publish` calls :func:`write_serving_copy` on the staged prefix,
before anything can point at it) as ``<version>/_serving.duckdb``: per view a table ``batch_<view>`` holding the
version's rows exactly as its parquet files hold them (same columns, types and order), plus, for every sketch
column (the only BLOB type of the contract, :mod:`lambdalake.schema`), ``__estimate_<column>``: the canonical
estimate of that row's sketch alone — ``hll_count([sketch])`` (:func:`lambdalake.sketches.estimate`), NULL for a
NULL sketch — which is exactly what the merge serves for a row without a speed part.

Serving (``serving.connect()``) attaches the file READ_ONLY *before* it locks its connection down, so DuckDB scans
the rows natively while no lake path is ever readable or writable by user SQL (docs/serving.md, "Security"). The
copy is optional: a version without one (published by an earlier release, on an S3 lake, a failed write, or with
``LAMBDALAKE_SERVING_COPY=0``) is served from its parquet files, as before, with the same answers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from lambdalake.viewsql import estimate_column

COPY_NAME = "_serving.duckdb"
TABLE_PREFIX = "batch_"
ENV = "LAMBDALAKE_SERVING_COPY"  # "0": publish without a serving copy
RECENT = 0.03  # the share of a table's rows (its newest windows) stored after the others
log = logging.getLogger(__name__)


def copy_path(version_dir: Path) -> Path:
    """Where a batch version's serving copy lives."""
    return version_dir / COPY_NAME


def table_name(view: str) -> str:
    return TABLE_PREFIX + view


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def view_files(version_dir: Path, view: str) -> list[Path]:
    """A view's parquet files in a version directory, as serving lists them (hidden and ``_`` files skipped)."""
    d = version_dir / view
    if not d.is_dir():
        return []
    return sorted(f for f in d.glob("*.parquet") if f.is_file() and not f.name.startswith((".", "_")))


def write_serving_copy(version_dir: Path, row_counts: Mapping[str, int]) -> Path | None:
    """Write ``<version_dir>/_serving.duckdb`` for the views of ``row_counts`` (their manifest row counts; a table
    whose count differs fails the write). Returns its path, or None if it could not be written (logged: the version
    is then served from its parquet files). Atomic: built under a temporary name, fsync'd, renamed."""
    if not enabled():
        return None
    final = copy_path(version_dir)
    tmp = version_dir / f".{COPY_NAME}.tmp"
    try:
        _build(tmp, version_dir, row_counts)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        return final
    except Exception as exc:  # an optimisation only: never fail a publish for it
        log.warning("no serving copy for %s (served from its parquet files): %s", version_dir,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            leftover.unlink(missing_ok=True)


def _build(path: Path, version_dir: Path, row_counts: Mapping[str, int]) -> None:
    import duckdb

    from lambdalake import sketches
    from lambdalake.pipeline import WINDOW_START
    from lambdalake.viewsql import estimate_sql, ident, sql_list

    path.unlink(missing_ok=True)
    con = duckdb.connect(str(path), config={"autoinstall_known_extensions": False,
                                            "autoload_known_extensions": False})
    try:
        con.execute("SET enable_progress_bar = false")  # nothing on stderr (the batch job's log)
        sketches.register(con)
        con.execute("BEGIN TRANSACTION")
        for view, expected in sorted(row_counts.items()):
            files = view_files(version_dir, view)
            if not files:
                continue  # no rows (or no files): served from the parquet side, which checks the manifest
            relation = f"read_parquet({sql_list([str(f) for f in files])})"
            described = con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()
            estimates = [f"CASE WHEN {ident(name)} IS NULL THEN NULL "
                         f"ELSE {estimate_sql(f'system.main.list_value({ident(name)})')} END "
                         f"AS {ident(estimate_column(name))}" for name, typ, *_ in described if typ == "BLOB"]
            # the newest windows (RECENT of the rows) after all others, each part in the files' order (by keys):
            # a connection merges the rows from the earliest window of its speed rows on, and their row groups'
            # window_start ranges let it skip all the others; a key lookup reads one range in each part
            ws = ident(WINDOW_START)
            newest = f"{ws} >= (SELECT quantile_disc({ws}, {1 - RECENT}) FROM {relation})"
            ordered = relation.removesuffix(")") + ", filename = '__file', file_row_number = true)"
            con.execute(f"CREATE TABLE {ident(table_name(view))} AS SELECT * EXCLUDE (__file, file_row_number)"
                        f"{''.join(', ' + e for e in estimates)} FROM {ordered} "
                        f"ORDER BY {newest}, __file, file_row_number")
            got = con.execute(f"SELECT count(*) FROM {ident(table_name(view))}").fetchone()[0]
            if got != expected:
                raise ValueError(f"view {view}: the parquet files hold {got} rows, the manifest says {expected}")
        con.execute("COMMIT")
    finally:
        con.close()  # checkpoints: no WAL left
