"""What every ``lambdalake`` command shares: the consoles, the common options and the per-invocation context.

The root CLI (:mod:`wiring.cli`) and the layer CLIs (``batch.cli``, ``speed.cli``, ``serving.cli``,
``wiring.orchestration.cli``) all import from here; the root mounts the layers' commands, nothing imports the
root back.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from lambdalake.config import Settings, lake_url, load_settings, require_existing_lake
from lambdalake.exceptions import LambdalakeError
from lambdalake.pipeline import Pipeline, load_pipeline

# Piped output (tests, logs, CI) gets a wide console so tables never truncate topic names.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

# Shared options: every command accepts them, each also settable by environment variable.
PipelineOpt = Annotated[str | None, typer.Option(
    "--pipeline", "-p", help="Pipeline file (.py) or module path [env LAMBDALAKE_PIPELINE; default: the "
    "clickstream demo].", show_default=False)]
HomeOpt = Annotated[Path | None, typer.Option(
    "--home", help="Lake directory [env LAMBDALAKE_HOME; default ./data].", show_default=False)]
LakeOpt = Annotated[str | None, typer.Option(
    "--home", help="Lake: a directory or s3://bucket/prefix [env LAMBDALAKE_HOME; default ./data].",
    show_default=False)]


def _existing_lake(value: Path | None) -> Path | None:
    if lake_url(value) is None:  # a lake on object storage: the command itself says whether it runs there
        require_existing_lake(value)  # the same resolution as load_settings: --home > LAMBDALAKE_HOME > ./data
    return value


# --home of the commands that only read a lake (sql, catalog, status): the lake directory must exist.
LakeHomeOpt = Annotated[Path | None, typer.Option(
    "--home", help="Lake directory, which must exist [env LAMBDALAKE_HOME; default ./data].", show_default=False,
    callback=_existing_lake)]
BootstrapOpt = Annotated[str | None, typer.Option(
    "--bootstrap", help="Kafka bootstrap servers host:port[,...] [env LAMBDALAKE_BOOTSTRAP; default: the "
    "embedded broker].", show_default=False)]

# Partition-parallel workers (archiver, speed layer): lambdalake.ownership.
WorkersOpt = Annotated[int, typer.Option(
    "--workers", min=1, max=64, help="Run this many worker processes on this machine (group members, or with "
    "--no-group each owning its share 0/N..N-1/N of the partitions).")]
GroupOpt = Annotated[bool | None, typer.Option(
    "--group/--no-group", help="Join the layer's consumer group: Kafka assigns the partitions and moves them when "
    "a worker starts, stops or dies, on any machine [default: a daemon joins; --until-caught-up, --share and "
    "--partitions pin partitions instead]. --no-group: static shares.", show_default=False)]
ShareOpt = Annotated[str | None, typer.Option(
    "--share", help="Run ONE worker owning partitions p with p % N == I (I/N, e.g. 1/4): one per process or "
    "machine.", show_default=False)]
PartitionsOpt = Annotated[str | None, typer.Option(
    "--partitions", help="Run ONE worker owning exactly these partitions of every source topic (e.g. 0,2,5).",
    show_default=False)]


class Context:
    """Settings and the loaded pipeline for one command invocation."""

    def __init__(self, settings: Settings, pipeline: Pipeline):
        self.settings = settings
        self.pipeline = pipeline


def context(pipeline: str | None = None, home: Path | None = None, bootstrap: str | None = None,
            partitions: int | None = None, spark_master: str | None = None, *,
            object_storage: bool = False) -> Context:
    """``object_storage``: the command also runs on a lake on object storage (``s3://``)."""
    settings = load_settings(home=home, bootstrap=bootstrap, pipeline=pipeline, partitions=partitions,
                             spark_master=spark_master, object_storage=object_storage)
    return Context(settings, load_pipeline(settings.pipeline))


# --- running a CLI app: the one place errors become one line and an exit code -----------------------------------
def configure_logging() -> None:
    """``LAMBDALAKE_LOG`` (default WARNING) on stderr. kafka-python logs every reconnect attempt at WARNING/ERROR;
    our own errors say what matters, so its logger is quiet unless DEBUG.

    Also: ``kill -USR1 <pid>`` prints the stack of every thread to stderr (a daemon that does not stop or seems
    stuck can be looked into without stopping it; :func:`lambdalake.procs.stop_group` does it before a SIGKILL)."""
    import faulthandler
    import logging
    import os
    import signal

    with contextlib.suppress(AttributeError, RuntimeError, ValueError):  # no SIGUSR1 (Windows), or no stderr fd
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    level = os.environ.get("LAMBDALAKE_LOG", "WARNING").upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.CRITICAL if level != "DEBUG" else logging.DEBUG)


def run_app(app: typer.Typer, argv: list[str] | None, *, prog_name: str | None = None,
            translate: Callable[[Exception], LambdalakeError | None] | None = None) -> int:
    """Run ``app``; an actionable error (:class:`LambdalakeError`, or what ``translate`` turns into one, e.g. a
    Kafka client error) prints ``error: ...`` on one line and returns its exit code — never a traceback."""
    from lambdalake.runtime import allow_restart

    allow_restart()
    try:
        app(args=argv, prog_name=prog_name, standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except LambdalakeError as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as exc:
        err = translate(exc) if translate is not None else None
        if err is None:
            raise
        err_console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        return err.exit_code
    return 0


def joins_group(group: bool | None, until_caught_up: bool, pinned: bool) -> bool:
    """Whether a streaming layer's worker joins its consumer group (``--group/--no-group``, :data:`GroupOpt`): a
    daemon does unless told not to; a run pinned to partitions (``--share``/``--partitions``) or to the end offsets
    seen at start (``--until-caught-up``) does not, and asking for both is refused in one line."""
    if group and (until_caught_up or pinned):
        from lambdalake.exceptions import ConfigError

        raise ConfigError("--group takes the partitions the group assigns: not with --until-caught-up, --share or "
                          "--partitions (those pin partitions)")
    return (not until_caught_up and not pinned) if group is None else group
