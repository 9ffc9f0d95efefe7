"""``lambdalake audit``: the end-to-end integrity check (mounted by :mod:`wiring.cli`).

Exit status: 0 everything holds, 1 differences found (the first ones are listed), 2 the audit could not run
(one line on stderr: broker unreachable, unreadable lake, bad option).
"""

from __future__ import annotations

import json
import logging
import sys
from enum import StrEnum
from typing import Annotated

import typer
from rich.table import Table

from lambdalake.options import BootstrapOpt, HomeOpt, PipelineOpt, console, err_console

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DIFFERENCES, EXIT_CANNOT_RUN = 0, 1, 2


class AuditFormat(StrEnum):
    table = "table"
    json = "json"


def register(app: typer.Typer) -> None:
    app.command("audit")(audit_cmd)


def audit_cmd(
    view: Annotated[list[str] | None, typer.Option("--view", help="Audit only this view (repeatable); the "
                                                   "log/master check then covers only its source.")] = None,
    sample: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of the archived offsets re-validated from "
                                          "the log and compared field by field (deterministic; 1 = all). Offset "
                                          "accounting and the view checks always cover everything.")] = 1.0,
    format: Annotated[AuditFormat, typer.Option("--format", "-f", help="table or json.")] = AuditFormat.table,
    pipeline: PipelineOpt = None, home: HomeOpt = None, bootstrap: BootstrapOpt = None,
) -> None:
    """Check the lake end to end at the served (batch version, speed snapshot) pair: log vs master (every offset
    accounted for, rows equal to the log messages), master vs batch views, log vs speed rows, and what serving
    returns vs an independent DuckDB recomputation. Exit 0: all holds; 1: differences (listed); 2: could not run."""
    from kafka.errors import KafkaError

    from audit.check import audit
    from lambdalake.config import lake_url, require_existing_lake
    from lambdalake.exceptions import LambdalakeError
    from lambdalake.options import context

    try:
        if not lake_url(home):
            require_existing_lake(home)  # a mistyped --home is an error, not an empty lake that "holds"
        ctx = context(pipeline, home, bootstrap, object_storage=True)
        report = audit(ctx.settings, ctx.pipeline, views=view or None, sample=sample)
    except (LambdalakeError, KafkaError, OSError) as exc:
        log.debug("audit could not run", exc_info=True)
        _drop_frames(exc)
        err_console.print(f"[red]error:[/] audit could not run: {_one_line(exc)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_CANNOT_RUN) from None
    if format is AuditFormat.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=1, default=str) + "\n")
    else:
        print_report(report)
    raise typer.Exit(EXIT_OK if report.ok else EXIT_DIFFERENCES)


def _drop_frames(exc: BaseException | None) -> None:
    """Clear the locals of the frames an error went through: kafka-python keeps its own errors alive until exit,
    and with them every calling frame — DuckDB objects there would be reported as leaked at interpreter exit."""
    import traceback

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _one_line(exc: BaseException) -> str:
    from lambdalake.exceptions import LambdalakeError

    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, LambdalakeError) else f"{type(exc).__name__}: {text}"


def print_report(report) -> None:
    from audit.check import positions_text

    console.print(f"audit of pipeline [bold]{report.pipeline}[/] in {report.home}: batch version "
                  f"[bold]{report.batch_version or '-'}[/] (W: {positions_text(report.watermark) or '-'}), speed "
                  f"snapshot [bold]{report.speed_snapshot or '-'}[/] (S: {positions_text(report.positions) or '-'})"
                  + (f", sample {report.sample:g}" if report.sample < 1 else ""), highlight=False)
    table = Table()
    for col in ("check", "compared", "seconds", "differences"):
        table.add_column(col, justify="right" if col in ("seconds", "differences") else "left")
    for name, res in report.checks.items():
        compared = ", ".join(f"{k} {v:,}" for k, v in res.compared.items() if isinstance(v, int))
        table.add_row(name, compared or "-", f"{res.seconds:.2f}", str(res.differences))
    console.print(table)
    for name, res in report.checks.items():
        positions = res.compared.get("positions")
        if positions:
            console.print(f"{name} positions: " + "; ".join(positions), highlight=False, soft_wrap=True)
        for note in res.notes:
            console.print(f"{name}: {note}", highlight=False, soft_wrap=True)
    if report.ok:
        console.print(f"[green]OK[/]: everything holds ({report.seconds:.2f}s)")
        return
    for d in report.differences:
        console.print(f"[red]DIFFERENCE[/] {d}", highlight=False, soft_wrap=True)
    more = report.total_differences - len(report.differences)
    console.print(f"[red]{report.total_differences} differences[/]" + (f" ({more} not listed)" if more else "")
                  + f" ({report.seconds:.2f}s)")
