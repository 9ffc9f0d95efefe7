"""The ``lambdalake`` command line: the foundation commands, and the layers' commands mounted from ``batch.cli``,
``speed.cli``, ``serving.cli``, ``wiring.orchestration.cli`` and ``audit.cli``. Shared options live in
:mod:`lambdalake.options`.

Errors a user can act on (:class:`lambdalake.exceptions.LambdalakeError`, Kafka connectivity) print one line
``error: ...`` on stderr and exit non-zero — never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lambdalake.config import load_settings
from lambdalake.exceptions import BrokerError, ConfigError, LambdalakeError
from lambdalake.options import (
    BootstrapOpt,
    Context,
    HomeOpt,
    LakeHomeOpt,
    PipelineOpt,
    configure_logging,
    console,
    context,
    err_console,
    run_app,
)
from lambdalake.procs import pyarrow_without_pandas

app = typer.Typer(
    name="lambdalake",
    help="Lambda-architecture engine: Kafka log -> Parquet master + Spark batch views + speed layer -> DuckDB.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts show "[env NAME; default X]" literally (not as rich markup)
    add_completion=False,
)
kafka_app = typer.Typer(help="Run the embedded Apache Kafka broker (KRaft, single node).", no_args_is_help=True)
app.add_typer(kafka_app, name="kafka")
s3_app = typer.Typer(help="Run the embedded S3 server (SeaweedFS; 127.0.0.1 only, credentials required).",
                     no_args_is_help=True)
app.add_typer(s3_app, name="s3")

# --- kafka ------------------------------------------------------------------------------------------------------
def _broker(home: Path | None, port: int, controller_port: int | None):
    from lambdalake.broker import EmbeddedBroker

    settings = load_settings(home=home)
    return EmbeddedBroker(settings.home, port=port, controller_port=controller_port)


PortOpt = Annotated[int, typer.Option("--port", min=1, max=65535, help="Broker (PLAINTEXT) port.")]
CPortOpt = Annotated[int | None, typer.Option("--controller-port", min=1, max=65535,
                                               help="KRaft controller port [default: port+1].")]


@kafka_app.command("up")
def kafka_up(home: HomeOpt = None, port: PortOpt = 9092, controller_port: CPortOpt = None,
             timeout: Annotated[float, typer.Option(help="Seconds to wait for the broker.")] = 90.0) -> None:
    """Start the embedded broker in the background (formats storage on first start). Idempotent."""
    if os.environ.get("LAMBDALAKE_BOOTSTRAP"):
        err_console.print(f"note: LAMBDALAKE_BOOTSTRAP={os.environ['LAMBDALAKE_BOOTSTRAP']} is set, so other "
                          "commands will use that cluster, not this broker")
    broker = _broker(home, port, controller_port)
    with console.status("starting Kafka broker ..."):
        state = broker.up(timeout=timeout)
    console.print(f"Kafka broker up: bootstrap [bold]{state['bootstrap']}[/] (pid {state['pid']}, "
                  f"log {state['log']})")


@kafka_app.command("down")
def kafka_down(home: HomeOpt = None) -> None:
    """Stop the embedded broker (clean shutdown; killed after 30 s)."""
    from lambdalake.broker import EmbeddedBroker

    settings = load_settings(home=home)
    stopped = EmbeddedBroker(settings.home).down()
    console.print("Kafka broker stopped" if stopped else "no embedded Kafka broker was running")


@kafka_app.command("status")
def kafka_status(home: HomeOpt = None) -> None:
    """Show whether the embedded broker runs, its pid, address and log file. Exit 1 if it is not running."""
    from lambdalake.broker import EmbeddedBroker

    settings = load_settings(home=home)
    st = EmbeddedBroker(settings.home).status()
    if st["running"]:
        console.print(f"running: pid {st['pid']}, bootstrap {st.get('bootstrap')}, "
                      f"accepting connections: {st.get('serving')}, log {st.get('log')}")
    else:
        console.print(f"not running (broker directory {st['dir']})")
        raise typer.Exit(1)


# --- s3 ---------------------------------------------------------------------------------------------------------
def _s3_server(home: Path | None, port: int | None = None):
    from lambdalake.config import resolve_home
    from lambdalake.s3server import EmbeddedS3

    return EmbeddedS3(resolve_home(home) / "s3", port=port)


def _print_s3(headline: str, server) -> None:
    """The server's state as comment lines, then the variables a client needs: `eval "$(lambdalake s3 up)"`."""
    console.print(f"# {headline}\n{server.access().exports()}", markup=False, highlight=False, soft_wrap=True)


@s3_app.command("up")
def s3_up(home: HomeOpt = None,
          port: Annotated[int, typer.Option("--port", min=1, max=65535, help="S3 API port.")] = 8333,
          timeout: Annotated[float, typer.Option(help="Seconds to wait for the server.")] = 60.0,
          bucket: Annotated[list[str] | None, typer.Option(
              "--bucket", help="Create this bucket if it is missing (repeatable), e.g. for "
              "LAMBDALAKE_HOME=s3://<bucket>/lake.")] = None) -> None:
    """Start the embedded S3 server in the background under <home>/s3 (its access key and secret are generated on
    first start and kept there, 0600). Idempotent. Prints the `export AWS_...` lines clients need."""
    from lambdalake.storage.s3 import parse_url

    for name in bucket or ():
        parse_url(f"s3://{name}/x")  # a bucket name S3 accepts, or one line saying why not
    server = _s3_server(home, port)
    with console.status("starting the S3 server ..."):
        state = server.up(timeout=timeout)
        for name in bucket or ():
            server.create_bucket(name)
    made = f"; buckets {', '.join(bucket)}" if bucket else "; create a bucket with --bucket or any S3 client"
    _print_s3(f"S3 server up: endpoint {state['endpoint']} (pid {state['pid']}, data {server.data_dir}, "
              f"log {state['log']}){made}", server)


@s3_app.command("down")
def s3_down(home: HomeOpt = None) -> None:
    """Stop the embedded S3 server (clean shutdown; killed after 20 s). Its data and credentials stay."""
    stopped = _s3_server(home).down()
    console.print("S3 server stopped" if stopped else "no embedded S3 server was running")


@s3_app.command("status")
def s3_status(home: HomeOpt = None) -> None:
    """Show whether the embedded S3 server runs, its pid, endpoint, credentials file and log, and the `export AWS_...`
    lines. Exit 1 if it is not running."""
    server = _s3_server(home)
    st = server.status()
    if not st["running"]:
        console.print(f"not running (server directory {st['dir']})")
        raise typer.Exit(1)
    _print_s3(f"running: pid {st['pid']}, endpoint {st.get('endpoint')}, accepting connections: "
              f"{st.get('serving')}, credentials {st.get('credentials')}, log {st.get('log')}", server)


# --- topics / produce / load -------------------------------------------------------------------------------------
@app.command("topics")
def topics(pipeline: PipelineOpt = None, home: HomeOpt = None, bootstrap: BootstrapOpt = None,
           partitions: Annotated[int | None, typer.Option(min=1, help="Partitions for topics created now "
                                                          "[env LAMBDALAKE_PARTITIONS; default 4].")] = None,
           count: Annotated[bool, typer.Option("--count/--no-count", help="Read the topics back and classify "
                                               "every message.")] = True) -> None:
    """Create the pipeline's topics (and dead-letter topics) if missing; show message counts."""
    from lambdalake.clients import ensure_topics

    ctx = context(pipeline, home, bootstrap, partitions, object_storage=True)  # only the log: any lake
    created = ensure_topics(ctx.settings, ctx.pipeline)
    if created:
        console.print(f"created topics: {', '.join(created)}")
    if count:
        print_topic_counts(ctx)


def print_topic_counts(ctx: Context) -> None:
    from wiring.topic_counts import count_topics, reason_summary

    table = Table(title=f"topics of pipeline {ctx.pipeline.name!r} at {ctx.settings.bootstrap}")
    for col in ("topic", "messages", "valid", "duplicates", "invalid", "invalid by reason"):
        table.add_column(col, justify="left" if col in ("topic", "invalid by reason") else "right")
    for tc in count_topics(ctx.settings, ctx.pipeline):
        is_dlq = tc.topic.endswith(".dlq")
        reasons = ", ".join(f"{k} {v}" for k, v in reason_summary(tc.reasons))
        table.add_row(tc.topic, str(tc.messages), "" if is_dlq else str(tc.valid),
                      "" if is_dlq else str(tc.duplicates), "" if is_dlq else str(tc.invalid), reasons)
    console.print(table)


@app.command("produce")
def produce(
    events: Annotated[int, typer.Option("--events", "-n", min=0, help="Distinct valid events to send.")],
    rate: Annotated[float | None, typer.Option(min=0.001, help="Messages per second (default: as fast as "
                                               "possible).")] = None,
    late_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of events stamped up to 3 h "
                                                 "late.")] = 0.05,
    duplicate_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Duplicates on top, as a "
                                                      "fraction of --events.")] = 0.02,
    malformed_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Malformed messages on top, "
                                                      "as a fraction of --events.")] = 0.01,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same stream).")] = 42,
    start: Annotated[str, typer.Option(help="Event time of the first event (RFC 3339).")] = "2026-01-05T00:00:00Z",
    span_hours: Annotated[float, typer.Option(min=0.001, help="Event-time span of the stream, hours.")] = 72.0,
    pipeline: PipelineOpt = None, home: HomeOpt = None, bootstrap: BootstrapOpt = None,
) -> None:
    """Send the demo clickstream: N valid events plus duplicates and malformed messages (deterministic)."""
    from datetime import timedelta

    from lambdalake.clients import ensure_topics
    from wiring.demo_stream import demo_messages
    from wiring.produce import send

    ctx = context(pipeline, home, bootstrap, object_storage=True)  # only the log: any lake
    messages = demo_messages(ctx.pipeline, events, late_fraction=late_fraction,
                             duplicate_fraction=duplicate_fraction, malformed_fraction=malformed_fraction,
                             seed=seed, start=start, span=timedelta(hours=span_hours))
    ensure_topics(ctx.settings, ctx.pipeline)
    total = events + round(events * duplicate_fraction) + round(events * malformed_fraction)
    report = send(ctx.settings, messages, rate=rate, total=total, progress=sys.stderr.isatty())
    print_report(report)


def print_report(report) -> None:
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(report.sent.items()))
    console.print(f"sent {report.total} messages in {report.seconds:.1f}s ({kinds})")
    if report.malformed:
        console.print("  malformed by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(report.malformed.items())))
    console.print("  per topic: " + ", ".join(f"{k} {v}" for k, v in sorted(report.per_topic.items())))


@app.command("load")
def load(
    file: Annotated[Path, typer.Argument(help="CSV, TSV, Parquet or JSON-lines file.")],
    source: Annotated[str, typer.Option("--source", "-s", help="Source name in the pipeline.")],
    rate: Annotated[float | None, typer.Option(min=0.001, help="Messages per second.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Dry run: convert and validate every row, send nothing; "
                                        "list the rows that would be refused (exit 1 if any).")] = False,
    pipeline: PipelineOpt = None, home: HomeOpt = None, bootstrap: BootstrapOpt = None,
) -> None:
    """Send the rows of a file to a source's topic (backfill or replay). CSV, TSV and Parquet columns are converted
    to the declared field types and the whole file is checked first: if a row cannot be converted or is invalid,
    nothing is sent. JSON lines are sent as they are (consumers dead-letter invalid ones)."""
    from lambdalake.clients import ensure_topics
    from wiring.load_file import check_file, file_messages
    from wiring.produce import send

    if check:
        ctx = context(pipeline, home, bootstrap, object_storage=True)  # only the log: any lake
        result = check_file(ctx.pipeline, file, source)
        for where, reason in result.problems:
            console.print(f"{file.name} {where}: {reason}", markup=False, highlight=False)
        shown = "" if result.bad_rows == len(result.problems) else f" (first {len(result.problems)} listed)"
        console.print(f"checked {result.rows} rows of {file.name}: {result.rows - result.bad_rows} ok, "
                      f"{result.bad_rows} refused{shown}; nothing was sent", markup=False, highlight=False)
        raise typer.Exit(1 if result.bad_rows else 0)
    ctx = context(pipeline, home, bootstrap, object_storage=True)  # only the log: any lake
    messages = file_messages(ctx.pipeline, file, source)
    ensure_topics(ctx.settings, ctx.pipeline)
    print_report(send(ctx.settings, messages, rate=rate, progress=sys.stderr.isatty()))


class Format(StrEnum):
    table = "table"
    json = "json"


@app.command("status")
def status(
    format: Annotated[Format, typer.Option("--format", "-f", help="table or json.")] = Format.table,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 if a partition is stalled (a layer behind the "
                                        "log on it has not moved for --stall-seconds).")] = False,
    stall_seconds: Annotated[float | None, typer.Option(
        min=1.0, help="How long a layer behind the log may stand still on a partition [env "
        "LAMBDALAKE_STALL_SECONDS; default 300].")] = None,
    pipeline: PipelineOpt = None, home: LakeHomeOpt = None, bootstrap: BootstrapOpt = None,
) -> None:
    """Per source and partition: end offset, archiver position, speed position, batch watermark, lag,
    freshness, DLQ count, current batch version; who owns each partition (archiver and speed worker, epochs,
    idle time) and which are stalled; each master partition's head (owner, epoch, end, files)."""
    from lambdalake.status import collect
    from wiring.cdc_cli import replication_slots

    ctx = context(pipeline, home, bootstrap, object_storage=True)
    st = collect(ctx.settings, ctx.pipeline, stall_seconds)
    cdc = replication_slots(ctx.settings.home)
    if format is Format.json:
        sys.stdout.write(json.dumps({**st.to_json(), "stalled": st.stalled, "cdc": cdc}, indent=1) + "\n")
        if check and st.stalled:
            raise typer.Exit(1)
        return
    fresh = "-" if st.speed_freshness_seconds is None else f"{st.speed_freshness_seconds:.1f}s ago"
    console.print(f"pipeline [bold]{st.pipeline}[/] at {st.bootstrap}; batch version "
                  f"[bold]{st.batch_version or '-'}[/]; speed snapshot [bold]{st.speed_snapshot or '-'}[/] "
                  f"published {fresh}; speed layer "
                  + (f"running (pid {st.speed_running_pid})" if st.speed_running_pid else "not running"))
    table = Table()
    for col in ("source", "partition", "end offset", "archived", "speed position", "batch watermark", "lag",
                "DLQ"):
        table.add_column(col, justify="left" if col == "source" else "right")

    def n(x: int | None) -> str:
        return "-" if x is None else f"{x:,}"

    for p in st.partitions:
        table.add_row(p.source, str(p.partition), n(p.end_offset), n(p.archived), n(p.speed_position),
                      n(p.batch_watermark), n(p.lag), n(p.dlq))
    console.print(table)
    views = Table()
    for col in ("view", "declared", "batch", "speed", "state"):
        views.add_column(col)
    for v in st.views:
        views.add_row(v.view, v.declared, v.batch or "-", v.speed or "-",
                      v.state + (f" ({v.detail})" if v.detail else ""))
    console.print(views)
    owners = Table(title="owners")
    for col in ("source", "partition", "archiver (epoch)", "idle", "speed worker (epoch)", "idle"):
        owners.add_column(col, justify="right" if col in ("partition", "idle") else "left")

    def idle(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}s"

    for p in st.partitions:
        owners.add_row(p.source, str(p.partition),
                       "-" if p.archiver_owner is None else f"{p.archiver_owner} ({p.archiver_epoch})",
                       idle(p.archiver_idle_seconds),
                       "-" if p.speed_worker is None else f"{p.speed_worker} ({p.speed_epoch})",
                       idle(p.speed_idle_seconds))
    console.print(owners)
    for line in st.stalled:
        console.print(f"[red]stalled:[/] {line}", highlight=False)
    if st.heads:  # per master partition (docs/design.md, "Master heads")
        heads = Table(title="master heads")
        for col in ("source", "partition", "owner", "epoch", "archived end", "files", "generation"):
            heads.add_column(col, justify="left" if col in ("source", "owner") else "right")
        for h in st.heads:
            if h.owner is None:
                heads.add_row(h.source, str(h.partition), "no head (release 0.2 files)", "-", "-", "-", "-")
            else:
                heads.add_row(h.source, str(h.partition), h.owner, str(h.epoch), n(h.end),
                              f"{h.files}" + (f" (+{h.rejected} rejected)" if h.rejected else ""), str(h.generation))
        console.print(heads)
    if st.erasures:  # lambdalake forget requests
        forgotten = Table(title="erasures (lambdalake forget)")
        for col in ("source", "subject", "requested", "stage", "messages erased"):
            forgotten.add_column(col, justify="right" if col == "messages erased" else "left")
        for e in st.erasures:
            forgotten.add_row(e.source, e.subject, e.requested_at, e.stage, f"{e.messages_erased:,}")
        console.print(forgotten)
    if cdc is not None:  # the database CDC reads: the WAL each replication slot holds back (docs/cdc.md)
        if "error" in cdc:
            console.print(f"[yellow]PostgreSQL[/] at {cdc['database']}: {cdc['error']}", highlight=False)
        slots = Table(title=f"replication slots ({cdc['database']})")
        for col in ("slot", "active", "WAL held back", "wal_status"):
            slots.add_column(col, justify="right" if col == "WAL held back" else "left")
        for sl in cdc.get("slots", []):
            slots.add_row(sl["slot"], str(sl["active"]), f"{sl['lag_bytes'] or 0:,} bytes", str(sl["wal_status"]))
        console.print(slots)
    if st.dlq_total:
        console.print("DLQ totals: " + ", ".join(f"{t} {n(v)}" for t, v in st.dlq_total.items()))
    if st.kafka_error:
        console.print(f"[yellow]Kafka:[/] {st.kafka_error}", highlight=False)
    for e in st.errors:
        console.print(f"[red]error:[/] {e}", highlight=False)
    if check and st.stalled:
        raise typer.Exit(1)


@app.command("demo")
def demo(
    events: Annotated[int, typer.Option("--events", "-n", min=1, help="Valid events to produce.")] = 24_000,
    rate: Annotated[float | None, typer.Option(min=1, help="Messages per second (default: a one-minute "
                                               "stream).")] = 400,
    port: Annotated[int | None, typer.Option(help="Broker port for the demo [default: a free port].")] = None,
    s3: Annotated[bool, typer.Option("--s3", help="The lake in a bucket of the embedded S3 server "
                                     "(s3://lake/demo; `make run-s3`).")] = False,
    home: HomeOpt = None,
) -> None:
    """The demo behind `make run`: starts Kafka, runs the pipeline on a demo stream, shows results, stops."""
    from wiring.demo import run_demo

    run_demo(events=events, rate=rate, port=port, home=home, console=console, s3=s3)


# --- layers ------------------------------------------------------------------------------------------------------
def _mount_layers() -> None:
    """Add each layer's commands (imports are cheap: the layer CLIs import their engines inside the commands)."""
    from audit.cli import register as audit_commands
    from batch.cli import register as batch_commands
    from serving.cli import register as serving_commands
    from speed.cli import register as speed_commands
    from wiring.orchestration.cli import register as airflow_commands

    for register in (batch_commands, speed_commands, serving_commands, airflow_commands, audit_commands):
        register(app)
    from wiring.cdc_cli import register as cdc_commands  # PostgreSQL + Kafka Connect/Debezium (docs/cdc.md)

    cdc_commands(app)


# Commands that never convert to pandas: pyarrow is told so at start (lambdalake.procs.pyarrow_without_pandas),
# which saves ~0.5 s a start (its pandas probe). Not `batch` (PySpark), `airflow` or the notebooks' helpers.
WITHOUT_PANDAS = frozenset({"speed", "ingest", "produce", "load", "replay", "status", "topics", "compact"})


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: runs the CLI, turning actionable errors into one line on stderr."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] in (["sql"], ["catalog"]):  # start fast: no Kafka, Spark, Airflow or audit imports (serving.cli)
        from serving.cli import main as serving_main

        return serving_main(args)

    def library_error(exc: Exception) -> LambdalakeError | None:
        if isinstance(exc, OSError) and "AWS Error" in str(exc):  # pyarrow's S3 file system (lake data files)
            from lambdalake.storage.base import StorageError

            return StorageError(f"object storage: {' '.join(str(exc).split())}; is the S3 endpoint up and the "
                                "bucket reachable with these credentials?")
        if "kafka.errors" not in sys.modules:  # nothing imported kafka-python, so it raised nothing (saves ~0.2 s)
            return None
        from kafka.errors import KafkaError

        if not isinstance(exc, KafkaError):
            return None
        return BrokerError(f"Kafka: {type(exc).__name__}: {exc}; is the broker at the configured bootstrap up?")

    configure_logging()
    if args[:1] and args[0] in WITHOUT_PANDAS:
        pyarrow_without_pandas()
    _mount_layers()
    return run_app(app, argv, translate=library_error)


__all__ = ["app", "main", "context", "Context", "ConfigError"]
