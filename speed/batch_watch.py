"""Watching published batch versions: the speed side of the handoff rule (:mod:`lambdalake.handoff`).

The speed layer reads ``views/batch/CURRENT`` only through :func:`lambdalake.layout.current_batch_manifest`, i.e.
a version that is already *published* (visible to serving). Then, per partition, it drops exactly the blocks the
version's watermark covers (:func:`lambdalake.handoff.speed_block_prunable`) and publishes a snapshot whose
``pruned_to`` records that watermark. Between the batch publish and that speed publish serving is still exact: it
filters speed rows by the batch watermark.

Paranoid checks (a violation would make the split inexact, so it is a named error, never a guess): the manifest's
``block`` equals ``LAMBDALAKE_HANDOFF_BLOCK`` and every watermark is a multiple of it.
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
from speed.exceptions import HandoffContractError, HandoffTimeout


@dataclass(frozen=True)
class BatchVersion:
    """A published batch version as the speed layer needs it."""

    version: str | None
    watermark: Positions


NO_BATCH = BatchVersion(None, Positions())


def published_batch(layout: Layout, block: int) -> BatchVersion:
    """The published batch version (or :data:`NO_BATCH`), checked against the handoff contract."""
    manifest = current_batch_manifest(layout)
    if manifest is None:
        return NO_BATCH
    version = str(manifest.version)
    mblock = manifest.block
    if mblock != block:
        raise HandoffContractError(f"batch version {version} was cut at handoff block {mblock}, but the speed "
                                   f"layer uses {block} (LAMBDALAKE_HANDOFF_BLOCK); both sides must agree or the "
                                   "speed state cannot be split exactly at the watermark")
    watermark = manifest.watermark
    for (topic, p), w in watermark.items():
        if w < 0 or w % block:
            raise HandoffContractError(f"batch version {version}: watermark {w} of {topic}[{p}] is not a "
                                       f"non-negative multiple of the handoff block {block}")
    return BatchVersion(version, watermark)


class BatchWatcher:
    """Notices when ``views/batch/CURRENT`` changes (a cheap ``stat`` per check; the manifest is read on change)."""

    def __init__(self, layout: Layout, block: int):
        self.layout = layout
        self.block = block
        self._stamp: tuple | None = None
        self.current: BatchVersion = NO_BATCH

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.layout.batch_pointer)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def poll(self) -> BatchVersion | None:
        """The newly published version if ``CURRENT`` changed since the last call, else None."""
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        version = published_batch(self.layout, self.block)
        if version == self.current:
            return None
        self.current = version
        return version


# --- speed handoff -------------------------------------------------------------------------------------------------
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
    from lambdalake.status import speed_pid
    from speed.consumer import SpeedLayer  # the run loop imports this module: import it late

    layout = Layout(settings.home)
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
