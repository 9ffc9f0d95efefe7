"""Commands of the speed layer: ``lambdalake speed``, ``lambdalake replay`` and ``lambdalake status``."""

from __future__ import annotations

import sys
import threading
from enum import StrEnum
from typing import Annotated

import typer

from lambdalake.exceptions import ConfigError
from lambdalake.options import (
    BootstrapOpt,
    GroupOpt,
    HomeOpt,
    PartitionsOpt,
    PipelineOpt,
    ShareOpt,
    WorkersOpt,
    console,
    context,
    err_console,
    joins_group,
)


class Format(StrEnum):
    table = "table"
    json = "json"


def register(app: typer.Typer) -> None:
    """Add the speed layer's commands to the ``lambdalake`` CLI."""
    @app.command("speed")
    def speed(
        until_caught_up: Annotated[bool, typer.Option(
            "--until-caught-up", help="Stop (with a final checkpoint) once the end offsets seen at start are "
            "consumed.")] = False,
        checkpoint_interval: Annotated[float, typer.Option(
            min=0.001, max=1.0, help="Seconds between checkpoints (= publications of the speed snapshot).")] = 0.25,
        dedup_span: Annotated[int, typer.Option(
            min=10_000, help="Offsets per partition within which duplicates are recognised exactly.")] = 100_000,
        keep_snapshots: Annotated[int, typer.Option(
            min=1, help="Published snapshots kept for readers still on an older one.")] = 20,
        keep_snapshot_seconds: Annotated[float, typer.Option(
            min=0.0, help="...and none younger than this many seconds is deleted.")] = 5.0,
        broker_timeout: Annotated[float, typer.Option(
            min=0.0, help="Seconds to keep retrying (with backoff) while Kafka is unreachable at start.")] = 120.0,
        group_id: Annotated[str | None, typer.Option(
            help="Consumer group for lag monitoring [default: lambdalake-speed-<pipeline>]; of a group member, the "
            "group it joins [default: lambdalake-speed.<pipeline>.<8 hex digits of the lake's location>].")] = None,
        group: GroupOpt = None, workers: WorkersOpt = 1, share: ShareOpt = None, partitions: PartitionsOpt = None,
        pipeline: PipelineOpt = None, home: HomeOpt = None, bootstrap: BootstrapOpt = None,
    ) -> None:
        """Run the speed layer: consume the log, keep incremental views, checkpoint and publish them, hand off
        to published batch versions. Stops with a final checkpoint on SIGTERM/Ctrl-C. Scales out by partition: a
        daemon joins the speed workers' consumer group (start as many as you like, on any machine; --workers N
        here); --share I/N or --partitions pin partitions instead. Serving reads the union of the workers'
        snapshots."""
        from lambdalake.ownership import Share
        from speed.consumer import SpeedLayer, SpeedOptions
        from speed.workers import run_speed_workers

        ctx = context(pipeline, home, bootstrap, object_storage=True)
        owned = Share.parse(partitions, share)
        group = joins_group(group, until_caught_up, not owned.everything)
        opts = SpeedOptions(checkpoint_interval=checkpoint_interval, dedup_span=dedup_span,
                            keep_snapshots=keep_snapshots, keep_snapshot_seconds=keep_snapshot_seconds,
                            broker_timeout=broker_timeout, group_id=group_id, share=owned, group=group)
        if workers > 1:
            if not owned.everything:
                raise ConfigError("--workers starts its own shares 0/N..N-1/N; do not combine it with --share or "
                                  "--partitions (run one process per share instead)")
            results = run_speed_workers(ctx.settings, ctx.pipeline, opts, workers, until_caught_up=until_caught_up)
            for label, messages, checkpoints, snapshot in results:
                console.print(f"speed worker {label}: consumed {messages:,} messages in {checkpoints} checkpoints; "
                              f"snapshot {snapshot}", highlight=False)
            return
        layer = SpeedLayer(ctx.settings, ctx.pipeline, opts,
                           notify=lambda msg: err_console.print(f"[yellow]speed:[/] {msg}", highlight=False))
        done = threading.Event()
        if sys.stderr.isatty():
            def progress() -> None:
                with err_console.status("speed layer starting ...") as st:
                    while not done.wait(0.5):
                        s = layer.stats
                        rb = layer.rebuild
                        st.update(f"speed: {s.messages:,} messages ({s.rate():,.0f}/s), {s.checkpoints} "
                                  f"checkpoints (last {s.last_checkpoint_seconds * 1000:.0f} ms), snapshot "
                                  f"{layer.last.id if layer.last else '-'}"
                                  + ("" if rb is None else f"; rebuilding {', '.join(rb.targets)} "
                                     f"{rb.progress(dict(layer.positions)):.0%}"))

            threading.Thread(target=progress, daemon=True).start()
        try:
            stats = layer.run(until_caught_up=until_caught_up)
        finally:
            done.set()
        console.print(f"speed: consumed {stats.messages:,} messages in {stats.checkpoints} checkpoints; "
                      f"snapshot {layer.last.id if layer.last else '-'}; "
                      + ", ".join(f"{t}: valid {c['valid']}, duplicates {c['duplicates']}, invalid {c['invalid']}"
                                  for t, c in layer.counters.items())
                      + ("" if stats.messages else " (nothing new since the last checkpoint)"), highlight=False)

    @app.command("replay")
    def replay_cmd(
        view: Annotated[list[str] | None, typer.Option(
            "--view", help="Replay only this view (repeatable; at the published version's watermark, the other "
            "views carried over when unchanged).")] = None,
        pipeline: PipelineOpt = None, home: HomeOpt = None, bootstrap: BootstrapOpt = None,
    ) -> None:
        """Kappa replay: rebuild views from the Kafka log alone with the speed-layer interpreter (no master, no
        Spark) up to the block-aligned end of the log, and publish them as a batch version serving can use."""
        from speed.replay import replay

        ctx = context(pipeline, home, bootstrap, object_storage=True)
        m = replay(ctx.settings, ctx.pipeline, view or None,
                   notify=lambda msg: err_console.print(f"[yellow]replay:[/] {msg}", highlight=False))
        console.print(f"replay: published batch version [bold]{m.version}[/] ({m.engine}) at watermark "
                      f"{m.watermark.total():,} offsets in {m.duration_s:.1f}s; "
                      + ", ".join(f"{name} {n:,} rows" for name, n in m.row_counts.items()), highlight=False)

