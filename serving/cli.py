"""``lambdalake sql`` and ``lambdalake catalog``: the serving layer's commands (mounted by wiring.cli)."""

from __future__ import annotations

import csv
import json
import sys
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from lambdalake.options import (
    LakeHomeOpt,
    PipelineOpt,
    configure_logging,
    console,
    err_console,
    run_app,
)
from lambdalake.procs import pyarrow_without_pandas
from serving.exceptions import QueryError, QueryTimeout, ViewRebuilding

if TYPE_CHECKING:  # imported lazily: every `lambdalake` command loads this module
    import duckdb
    import pyarrow as pa

    from serving.plans import ViewPlan
    from serving.published import PublishedPair

NOTHING_PUBLISHED_HINT = ("nothing published yet in {home}: the views are empty until the archiver, a batch run and "
                          "the speed layer publish (see `lambdalake --help`)")


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def _one_line(exc: BaseException) -> str:
    """DuckDB's message without the multi-line caret context (the first line carries the reason)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def run_query(con: duckdb.DuckDBPyConnection, query: str) -> pa.Table | None:
    """Run ``query`` (one or more statements); the last statement's rows, or None if it returns none."""
    import duckdb

    from serving.connection import limits_of, timed_out
    from serving.plans import REBUILDING_PHRASE

    try:
        rel = con.sql(query)
        return None if rel is None else rel.to_arrow_table()
    except duckdb.InterruptException:
        if timed_out(con):
            limits = limits_of(con)
            raise QueryTimeout(f"query stopped by the statement timeout after {limits.timeout:g} s (raise it with "
                               "--timeout SECONDS)") from None
        raise QueryError("query interrupted") from None
    except duckdb.Error as exc:
        line = _one_line(exc)
        if REBUILDING_PHRASE in line:  # our own refusal, raised by the view through DuckDB's error(): no prefix
            raise ViewRebuilding(line[line.index("view "):] if "view " in line else line) from None
        if "attached in read-only mode" in line:
            line += " (the lake's views and tables are read-only; CREATE TEMP TABLE / TEMP VIEW for your own)"
        raise QueryError(line) from None


def _jsonable(v: Any) -> Any:
    if isinstance(v, datetime | date):
        return v.isoformat()
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, datetime | date):
        return v.isoformat()
    return str(v)


def _values(column: pa.ChunkedArray) -> list:
    """Python values of a result column. A value Python cannot hold (a date or timestamp outside years 1..9999,
    which user SQL can make, e.g. ``window_start - INTERVAL 9000 YEAR``; the lake itself holds none: see
    ``lambdalake.validation`` rule 6) is rendered as Arrow's text of it instead of failing the whole command."""
    import pyarrow as pa

    try:
        return column.to_pylist()
    except (OverflowError, ValueError):
        pass
    out: list = []
    for chunk in column.chunks:
        for i in range(len(chunk)):
            try:
                out.append(chunk[i].as_py())
            except (OverflowError, ValueError):
                try:
                    out.append(chunk.slice(i, 1).cast(pa.string())[0].as_py())
                except (pa.ArrowException, OverflowError, ValueError):
                    out.append(f"<{chunk.type} value out of range>")
    return out


def _rows(table: pa.Table) -> list[dict]:
    names = table.column_names
    return [dict(zip(names, vals, strict=True)) for vals in zip(*(_values(c) for c in table.columns), strict=True)]


def write_result(table: pa.Table, fmt: OutputFormat) -> None:
    import pyarrow as pa

    rows = _rows(table)
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps([_jsonable(r) for r in rows], ensure_ascii=False) + "\n")
    elif fmt is OutputFormat.csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(table.column_names)
        for r in rows:
            w.writerow([_text(v) for v in r.values()])
    else:
        out = Table(show_lines=False, caption=f"{len(rows)} row{'s' if len(rows) != 1 else ''}")
        for name, typ in zip(table.column_names, table.schema.types, strict=True):
            numeric = pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ)
            out.add_column(name, justify="right" if numeric else "left")
        for r in rows:
            out.add_row(*(_text(v) if v is not None else "[dim]NULL[/]" for v in r.values()))
        console.print(out)


def _hint(pair: PublishedPair | None, home) -> None:
    if pair is None:
        return
    if pair.nothing_published:
        err_console.print(f"hint: {NOTHING_PUBLISHED_HINT.format(home=home)}", highlight=False)
    elif pair.batch_version is None:
        err_console.print("hint: no batch version published yet: views show the speed layer's data only",
                          highlight=False)
    elif pair.speed_snapshot is None:
        err_console.print("hint: no speed snapshot published yet: views show the batch version only "
                          f"({pair.batch_version})", highlight=False)


def _stale_warning(plans: dict[str, ViewPlan], query: str) -> None:
    """One line on stderr if the query names a view served stale (its declared definition is being rebuilt)."""
    import re

    from serving.plans import STALE

    named = [name for name, plan in plans.items()
             if plan.state == STALE and re.search(rf"(?<![\w$]){re.escape(name)}(?![\w$])", query, re.IGNORECASE)]
    if named:
        detail = "; ".join(f"{n} from batch {plans[n].served_pieces[0] or '-'} + speed "
                           f"{plans[n].served_pieces[1] or '-'} ({plans[n].defs.pending})" for n in named)
        err_console.print(f"warning: stale answer, the previous definition of {detail}; see lambdalake.views",
                          highlight=False, soft_wrap=True)


TimeoutOpt = Annotated[float, typer.Option(
    "--timeout", min=0.001, help="Statement timeout in seconds: a longer query is stopped (one line, exit 124).")]
MemoryLimitOpt = Annotated[str | None, typer.Option(
    "--memory-limit", help="DuckDB memory limit, e.g. 2GB (default: a quarter of RAM; never spills to disk).")]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", min=1, help="DuckDB worker threads (default: min(4, CPUs)).")]
DEFAULT_SQL_TIMEOUT_S = 60.0

AllowStaleOpt = Annotated[bool, typer.Option(
    "--allow-stale", help="Serve a view whose definition is being rebuilt from the last complete pair of its "
                          "previous definition (said on stderr and in lambdalake.views) instead of refusing it.")]


def register(app: typer.Typer) -> None:
    """Add the serving commands to the ``lambdalake`` CLI."""

    @app.command("sql")
    def sql(
        query: Annotated[str, typer.Argument(help="SQL to run, e.g. \"SELECT * FROM pageviews_hourly LIMIT 5\". "
                                             "Tables: every view, master.<source>, lambdalake.status/"
                                             "watermarks/views.")],
        fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = OutputFormat.table,
        allow_stale: AllowStaleOpt = False,
        timeout: TimeoutOpt = DEFAULT_SQL_TIMEOUT_S, memory_limit: MemoryLimitOpt = None, threads: ThreadsOpt = None,
        pipeline: PipelineOpt = None, home: LakeHomeOpt = None,
    ) -> None:
        """Query the merged views (batch ⊕ speed) with DuckDB; each call reads the newest published pair.

        Read-only: statements that would change what the lake serves are refused by DuckDB; resources are bounded
        (--timeout, --memory-limit, --threads; SET cannot raise them)."""
        from serving.connection import connect, pair_of, plans_of, resolve

        settings, pipe = resolve(None, pipeline, home)
        # one query: scan lazily rather than copy everything
        con = connect(settings, pipe, materialize=False, allow_stale=allow_stale, timeout=timeout,
                      memory_limit=memory_limit, threads=threads)
        try:
            _hint(pair_of(con), settings.home)
            result = run_query(con, query)
            _stale_warning(plans_of(con), query)
        finally:
            con.close()
        if result is not None:
            write_result(result, fmt)

    @app.command("catalog")
    def catalog(allow_stale: AllowStaleOpt = False, pipeline: PipelineOpt = None, home: LakeHomeOpt = None) -> None:
        """Write <home>/lake.duckdb for the stock DuckDB CLI (a snapshot of the current pair; re-run to
        refresh)."""
        from serving.catalog import write_catalog
        from serving.connection import resolve

        settings, pipe = resolve(None, pipeline, home)
        from serving.plans import REBUILDING, STALE, plan_views

        path, pair = write_catalog(settings, pipe, allow_stale=allow_stale)
        _hint(pair, settings.home)
        plans = plan_views(pipe, pair, allow_stale)
        for state, what in ((REBUILDING, "refused in the file (being rebuilt)"),
                            (STALE, "served stale (previous definition)")):
            names = [n for n, p in plans.items() if p.state == state]
            if names:
                err_console.print(f"note: {what}: {', '.join(names)}; see lambdalake.views", highlight=False)
        console.print(f"wrote {path} (batch version {pair.batch_version or '-'}, speed snapshot "
                      f"{pair.speed_snapshot or '-'}); open it with: duckdb -readonly {path}", highlight=False)


def main(argv: list[str]) -> int:
    """``lambdalake sql|catalog ...`` started fast (the root CLI hands these commands here): only typer, rich,
    DuckDB, pyarrow and the core are imported; no Kafka, Spark, Airflow or audit module, and not pandas."""
    configure_logging()
    pyarrow_without_pandas()
    app = typer.Typer(name="lambdalake", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                      rich_markup_mode=None)
    register(app)
    return run_app(app, argv, prog_name="lambdalake")
