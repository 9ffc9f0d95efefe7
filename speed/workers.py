"""Running several speed workers as processes (``lambdalake speed --workers N``; docs/design.md, "Ownership is per
partition")."""

from __future__ import annotations

import dataclasses
import sys

from lambdalake.config import Settings
from lambdalake.ownership import Share
from lambdalake.pipeline import Pipeline
from lambdalake.procs import Restarts, run_workers
from speed.consumer import SpeedLayer, SpeedOptions


def run_speed_workers(settings: Settings, pipeline: Pipeline, options: SpeedOptions, workers: int, *,
                      until_caught_up: bool = False) -> list[tuple[str, int, int, str]]:
    """``lambdalake speed --workers N``: N worker processes with shares ``0/N .. N-1/N`` (each a
    :class:`SpeedLayer`), or N members of the speed workers' group (``options.group``), until they all stop;
    (share or member, messages, checkpoints, last snapshot) per worker. A worker that dies is started again
    (:class:`lambdalake.procs.Restarts`): it takes its partitions over from its own last checkpoint."""
    if options.group:
        calls = [(settings, pipeline, options, until_caught_up) for _ in range(workers)]  # each picks its name
    else:
        calls = [(settings, pipeline, dataclasses.replace(options, share=share), until_caught_up)
                 for share in Share.split(workers)]
    return run_workers(_run_worker, calls, restarts=Restarts(),
                       notify=lambda msg: print(f"speed: {msg}", file=sys.stderr, flush=True))


def _run_worker(settings: Settings, pipeline: Pipeline, options: SpeedOptions,
                until_caught_up: bool) -> tuple[str, int, int, str]:
    layer = SpeedLayer(settings, pipeline, options,
                       notify=lambda msg: print(f"speed worker {label}: {msg}", file=sys.stderr, flush=True))
    label = layer.worker if options.group else options.share.label
    stats = layer.run(until_caught_up=until_caught_up)
    return label, stats.messages, stats.checkpoints, layer.last.id if layer.last else "-"
