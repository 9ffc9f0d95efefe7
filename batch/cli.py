"""CLI commands of the batch layer: ``ingest``, ``compact``, ``batch``, ``forget`` (mounted by
:mod:`wiring.cli`)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from lambdalake.exceptions import ConfigError
from lambdalake.options import (
    BootstrapOpt,
    GroupOpt,
    HomeOpt,
    LakeOpt,
    PartitionsOpt,
    PipelineOpt,
    ShareOpt,
    WorkersOpt,
    console,
    context,
    joins_group,
)


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest_cmd)
    app.command("compact")(compact_cmd)
    app.command("batch")(batch_cmd)
    app.command("forget")(forget_cmd)


def ingest_cmd(
    until_caught_up: Annotated[bool, typer.Option("--until-caught-up", help="Stop once the end offsets seen at "
                                                  "start are archived (default: run as a daemon).")] = False,
    roll_rows: Annotated[int | None, typer.Option(min=1, help="Roll a file at this many rows "
                                                  "[env LAMBDALAKE_ARCHIVE_ROLL_ROWS; default 500000].")] = None,
    roll_bytes: Annotated[int | None, typer.Option(min=1, help="... or this many message bytes "
                                                   "[env LAMBDALAKE_ARCHIVE_ROLL_BYTES; default 128 MiB].")] = None,
    roll_seconds: Annotated[float | None, typer.Option(min=0.001, help="... or this age in seconds "
                                                       "[env LAMBDALAKE_ARCHIVE_ROLL_SECONDS; default 60].")] = None,
    group: GroupOpt = None, workers: WorkersOpt = 1, share: ShareOpt = None, partitions: PartitionsOpt = None,
    pipeline: PipelineOpt = None, home: LakeOpt = None, bootstrap: BootstrapOpt = None,
) -> None:
    """Archive the source topics into the master dataset (Parquet), exactly once; invalid messages to the DLQ.

    Resumes where each partition's master head ends. SIGTERM/SIGINT finish the current files and exit. A daemon joins
    the archivers' consumer group: start as many as you like, on any machine; Kafka assigns the partitions and
    moves them when one stops or dies. --share I/N or --partitions pin partitions instead.
    """
    from rich.live import Live
    from rich.text import Text

    from batch.archiver import ArchiveReport, ingest
    from batch.ingest_workers import ingest_workers
    from batch.partition_buffer import RollPolicy
    from lambdalake.ownership import Share

    ctx = context(pipeline, home, bootstrap, object_storage=True)
    policy = RollPolicy.from_env(max_rows=roll_rows, max_bytes=roll_bytes, max_seconds=roll_seconds)
    owned = Share.parse(partitions, share)
    group = joins_group(group, until_caught_up, not owned.everything)
    if workers > 1:
        if not owned.everything:
            raise ConfigError("--workers starts its own shares 0/N..N-1/N; do not combine it with --share or "
                              "--partitions (run one process per share instead)")
        report = ingest_workers(ctx.settings, ctx.pipeline, workers, until_caught_up=until_caught_up,
                                policy=policy, group=group)
        _print_ingest(report)
        return
    live = Live(Text(""), console=console, transient=True, auto_refresh=False) if sys.stdout.isatty() else None

    def progress(r: ArchiveReport) -> None:
        if live is not None:
            live.update(Text(f"archiving: {r.messages} messages, {r.valid} valid, {r.invalid} invalid, "
                             f"{r.files} files"), refresh=True)

    if live is not None:
        live.start()
    try:
        report = ingest(ctx.settings, ctx.pipeline, until_caught_up=until_caught_up, policy=policy,
                        handle_signals=True, on_progress=progress, share=owned, group=group)
    finally:
        if live is not None:
            live.stop()
    _print_ingest(report)


def _print_ingest(report) -> None:
    console.print(f"archived {report.messages} messages ({report.valid} valid, {report.invalid} invalid: "
                  f"{report.dead_lettered} dead-lettered, {report.dlq_skipped} already in the DLQ) into "
                  f"{report.files} files in {report.seconds:.1f}s")
    for src, parts in report.positions.items():
        console.print(f"  {src}: " + ", ".join(f"p{p}<{end}" for p, end in sorted(parts.items())), highlight=False)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}")


def compact_cmd(
    source: Annotated[str | None, typer.Option("--source", "-s", help="Only this source.")] = None,
    partition: Annotated[int | None, typer.Option(min=0, help="Only this partition.")] = None,
    target_rows: Annotated[int, typer.Option(min=1, help="Largest merged file, rows.")] = 2_000_000,
    target_bytes: Annotated[int, typer.Option(min=1, help="Largest merged file, bytes.")] = 256 * 1024 * 1024,
    gc_grace: Annotated[str | None, typer.Option("--gc-grace", metavar="SECONDS", help="Delete master files no "
                                                 "head lists once older than this [env LAMBDALAKE_MASTER_GC_GRACE; "
                                                 "default 21600 = 6 h].", show_default=False)] = None,
    gc_only: Annotated[bool, typer.Option("--gc-only", help="Only delete the garbage (no compaction).")] = False,
    pipeline: PipelineOpt = None, home: LakeOpt = None,
) -> None:
    """Rewrite runs of small adjacent master files into one file each (atomic, recorded under master/_log/), then
    delete the master files no head lists that are older than the grace period (a fenced writer's garbage; on object
    storage also the files a compaction replaced, a grace period after it)."""
    from batch.compact import compact
    from lambdalake.heads import collect_master_garbage
    from lambdalake.heads import gc_grace as grace_of
    from lambdalake.layout import Layout

    grace = grace_of(gc_grace, "--gc-grace") if gc_grace is not None else grace_of()
    ctx = context(pipeline, home, object_storage=True)
    if source is not None:
        ctx.pipeline.source(source)  # an unknown source is one line
    layout = Layout.of(ctx.settings.home, ctx.settings.lake)
    if gc_only:
        names = [source] if source else [s.name for s in ctx.pipeline.sources]
        garbage = [k for name in names for k in collect_master_garbage(layout, name, grace, partition=partition)]
    else:
        report = compact(ctx.settings.home, ctx.pipeline, source=source, partition=partition,
                         target_rows=target_rows, target_bytes=target_bytes, gc_grace=grace, lake=ctx.settings.lake)
        console.print(f"compacted {report.files_replaced} files into {report.files_written} "
                      f"({report.rows} rows, {report.groups} groups)")
        for r in report.records:
            console.print(f"  recorded {r}", highlight=False)
        for s in report.skipped:
            console.print(f"  skipped {s}", highlight=False)
        garbage = report.garbage
    console.print(f"removed {len(garbage)} garbage files (listed by no head, last written more than {grace:g} s "
                  "ago)", highlight=False)
    for key in garbage:
        console.print(f"  deleted {key}", highlight=False)
    uploads = layout.store.abort_stale_uploads("", grace)  # a crashed Spark or pyarrow writer's parts
    if uploads:
        console.print(f"aborted {len(uploads)} incomplete multipart uploads (started more than {grace:g} s ago)",
                      highlight=False)
    for key in uploads:
        console.print(f"  aborted the upload of {key}", highlight=False)


def forget_cmd(
    subjects: Annotated[list[str] | None, typer.Argument(metavar="VALUE...", help="Values of the source's key field "
                                                         "(e.g. user ids) to forget.", show_default=False)] = None,
    source: Annotated[str | None, typer.Option("--source", "-s", help="The source whose key field the values "
                                               "are (required).", show_default=False)] = None,
    pipeline: PipelineOpt = None, home: HomeOpt = None, bootstrap: BootstrapOpt = None,
) -> None:
    """Forget subjects: record the request (topic lambdalake.erasures + the lake), rewrite the master files holding
    their events without them (atomic, recorded under master/_log/), hide their rows from serving at once; the next
    batch version and the speed layer correct the aggregates. Idempotent: run it again to resume. Prints how long
    the log itself keeps the raw messages (its retention)."""
    from batch.erase import forget
    from lambdalake.config import lake_url, require_existing_lake
    from lambdalake.erasure import log_dropped_by

    if not source:
        raise ConfigError("--source is required: the source whose key field the values are, e.g. "
                          "`lambdalake forget --source pageviews u42`")
    if not subjects:
        raise ConfigError("no subject given; pass one or more key values, e.g. `lambdalake forget --source "
                          f"{source} u42`")
    if not lake_url(home):
        require_existing_lake(home)
    ctx = context(pipeline, home, bootstrap, object_storage=True)
    report = forget(ctx.settings, ctx.pipeline, source, subjects)
    key = ctx.pipeline.source(source).key
    for rec in report.recovered:
        console.print(f"recovered an interrupted rewrite: {rec}", highlight=False)
    for r in report.requests:
        what = (f"{r.messages_erased} archived messages erased" if r.messages_erased
                else "no archived event of it: nothing rewritten (the request is recorded, so its events not "
                     "archived yet are skipped too)")
        console.print(f"forgot {key}={r.subject!r} of source {source!r}: {what}; stage: {r.stage}", highlight=False)
    if report.files_rewritten:
        console.print(f"rewrote {len(report.files_rewritten)} files ({report.master_rows} master rows, "
                      f"{report.rejected_messages} rejected messages), recorded under master/_log/",
                      highlight=False)
    console.print("served rows of views keyed by the subject are gone now; aggregates are corrected by the next "
                  "batch version and the speed layer's rebuild (see `lambdalake status`)", highlight=False)
    if report.retention_error:
        console.print(f"[yellow]warning:[/] could not read the topics' retention ({report.retention_error})")
    for topic, conf in report.retention.items():
        until = log_dropped_by(conf)
        if until is None:
            console.print(f"[yellow]the log keeps the raw messages:[/] topic {topic!r} has no retention limit "
                          "(retention.ms=-1): Kafka never deletes them; set retention.ms on the topic "
                          "(docs/operations.md, Forgetting a subject)", highlight=False)
        else:
            console.print(f"topic {topic!r}: retention.ms={conf['retention.ms']} -> Kafka will have deleted the raw "
                          f"messages by {until.isoformat(timespec='seconds')}", highlight=False)


def batch_cmd(
    spark_master: Annotated[str | None, typer.Option("--spark-master", help="Spark master URL "
                                                     "[env LAMBDALAKE_SPARK_MASTER; default local[*]].")] = None,
    view: Annotated[list[str] | None, typer.Option("--view", help="Recompute only this view (repeatable) at the "
                                                   "published watermark; other views are carried over if "
                                                   "their definition is unchanged.")] = None,
    rollback: Annotated[bool, typer.Option("--rollback", help="Re-point CURRENT to the previous version and "
                                           "exit (no Spark).")] = False,
    keep: Annotated[int | None, typer.Option(min=2, help="Versions to keep [env LAMBDALAKE_BATCH_KEEP; "
                                             "default 5].")] = None,
    force: Annotated[bool, typer.Option("--force", help="With --rollback: even if the speed layer may have "
                                        "pruned what the previous version needs.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Recompute every view from all master data, even when the "
                                       "published version could be extended incrementally.")] = False,
    pipeline: PipelineOpt = None, home: HomeOpt = None,
) -> None:
    """Compute every view with Spark and publish a new batch version: incrementally (the published version merged
    with the events archived since) when possible, else a full recompute from the master dataset."""
    from lambdalake.layout import Layout
    from lambdalake.versions import default_keep
    from lambdalake.versions import rollback as do_rollback

    ctx = context(pipeline, home, spark_master=spark_master, object_storage=True)
    if rollback:
        frm, to = do_rollback(ctx.settings.home, force=force, layout=Layout.of(ctx.settings.home, ctx.settings.lake))
        console.print(f"rolled back: CURRENT {frm} -> {to}")
        return
    from batch.job import run_batch

    with console.status(f"computing batch views with Spark ({ctx.settings.spark_master}) ..."):
        manifest = run_batch(ctx.settings, ctx.pipeline, views=view or None, spark_master=spark_master,
                             keep=keep if keep is not None else default_keep(), full=full)
    wm = ", ".join(f"{t}: " + " ".join(f"p{p}<{w}" for p, w in sorted(manifest.watermark.of_topic(t).items()))
                   for t in manifest.watermark.topics)
    console.print(f"published batch version [bold]{manifest.version}[/] in {manifest.duration_s:.1f}s "
                  f"({manifest.engine}, {manifest.spark_master})")
    console.print(f"  {manifest.mode}: {manifest.mode_reason}", highlight=False)
    console.print(f"  watermark: {wm or '(empty)'}", highlight=False)
    console.print("  rows: " + ", ".join(f"{v} {n}" for v, n in manifest.row_counts.items()), highlight=False)
