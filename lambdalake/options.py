"""What every ``lambdalake`` command shares: the consoles, the common options and the per-invocation context.

The root CLI (:mod:`lambdalake.cli`) and the layer CLIs (``batch.cli``, ``speed.cli``, ``serving.cli``,
``lambdalake.orchestration.cli``) all import from here; the root mounts the layers' commands, nothing imports the
root back.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lambdalake.config import Settings, load_settings, require_existing_lake
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


def _existing_lake(value: Path | None) -> Path | None:
    require_existing_lake(value)  # the same resolution as load_settings: --home > LAMBDALAKE_HOME > ./data
    return value


# --home of the commands that only read a lake (sql, catalog, status): the lake directory must exist.
LakeHomeOpt = Annotated[Path | None, typer.Option(
    "--home", help="Lake directory, which must exist [env LAMBDALAKE_HOME; default ./data].", show_default=False,
    callback=_existing_lake)]
BootstrapOpt = Annotated[str | None, typer.Option(
    "--bootstrap", help="Kafka bootstrap servers host:port[,...] [env LAMBDALAKE_BOOTSTRAP; default: the "
    "embedded broker].", show_default=False)]


class Context:
    """Settings and the loaded pipeline for one command invocation."""

    def __init__(self, settings: Settings, pipeline: Pipeline):
        self.settings = settings
        self.pipeline = pipeline


def context(pipeline: str | None = None, home: Path | None = None, bootstrap: str | None = None,
            partitions: int | None = None, spark_master: str | None = None) -> Context:
    settings = load_settings(home=home, bootstrap=bootstrap, pipeline=pipeline, partitions=partitions,
                             spark_master=spark_master)
    return Context(settings, load_pipeline(settings.pipeline))
