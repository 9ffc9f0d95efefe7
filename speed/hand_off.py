"""The handoff step of the batch DAG: make the speed layer drop, now, what the published batch version covers.

The speed layer hands off by itself when it notices a new published version (:mod:`speed.batch_watch`); this step
waits for a running one or runs it once until caught up, so the DAG's run ends with the handoff done.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from lambdalake.config import Settings
from lambdalake.contracts import Positions
from lambdalake.layout import Layout, current_batch_manifest
from lambdalake.pipeline import Pipeline
from lambdalake.speedset import current_speed_snapshot
from lambdalake.status import speed_pid
from speed.consumer import SpeedLayer
from speed.exceptions import HandoffTimeout


@dataclass
class HandoffResult:
    """What :func:`hand_off_now` did: ``none`` (no speed layer), ``done`` (already handed off), ``waited``
    (a running speed layer handed off) or ``ran`` (the speed layer was run once here)."""

    mode: str
    version: str | None
    pruned_to: Positions

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "version": self.version, "pruned_to": self.pruned_to.nested()}


def hand_off_now(settings: Settings, pipeline: Pipeline, *, wait_timeout: float = 300.0,
                  poll_interval: float = 1.0) -> HandoffResult:
    """Make sure the speed layer has dropped what the published batch version covers.

    The speed layer prunes by itself when it notices a new published version; this step only makes that happen
    now: nothing to do if the speed layer never ran on this lake; wait for a running one; otherwise run it once
    until caught up (it hands off to the published version on start).
    """
    layout = Layout.of(settings.home, settings.lake)
    manifest = current_batch_manifest(layout)
    version = None if manifest is None else manifest.version
    topics = {s.topic for s in pipeline.sources}
    watermark = {} if manifest is None else {tp: w for tp, w in manifest.watermark.items() if tp[0] in topics}
    snap = current_speed_snapshot(layout)

    def pruned() -> Positions:
        return Positions() if snap is None else snap.pruned_to

    def handed_off() -> bool:
        return all(pruned().at(*tp) >= w for tp, w in watermark.items())

    if manifest is None or (snap is None and speed_pid(layout) is None):
        return HandoffResult("none", version, pruned())
    if handed_off():
        return HandoffResult("done", version, pruned())
    pid = speed_pid(layout)
    if pid is not None and pid != os.getpid():
        deadline = time.monotonic() + wait_timeout
        while time.monotonic() < deadline:
            time.sleep(poll_interval)
            snap = current_speed_snapshot(layout)
            if handed_off():
                return HandoffResult("waited", version, pruned())
            if speed_pid(layout) is None:
                break  # it stopped meanwhile: run it once below
        else:
            raise HandoffTimeout(f"the running speed layer (pid {pid}) did not hand off to batch version "
                                     f"{version} within {wait_timeout:.0f}s; see `lambdalake status`")
    SpeedLayer(settings, pipeline).run(until_caught_up=True)
    snap = current_speed_snapshot(layout)
    if not handed_off():
        raise HandoffTimeout(f"the speed layer ran but its snapshot is not handed off to batch version {version} "
                                 f"(pruned_to {pruned().nested()}, watermark {Positions(watermark).nested()})")
    return HandoffResult("ran", version, pruned())
