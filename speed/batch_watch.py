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

from lambdalake.contracts import Positions
from lambdalake.layout import BATCH_POINTER_KEY, Layout, current_batch_manifest
from lambdalake.storage.base import ObjectMissing
from speed.exceptions import HandoffContractError


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


REMOTE_POLL_S = 1.0  # on object storage a check is a GET: at most one a second


class BatchWatcher:
    """Notices when ``views/batch/CURRENT`` changes (a cheap ``stat`` per check — on object storage a GET of the
    pointer, at most every :data:`REMOTE_POLL_S`; the manifest is read on change)."""

    def __init__(self, layout: Layout, block: int):
        self.layout = layout
        self.block = block
        self._stamp: tuple | None = None
        self._asked = -REMOTE_POLL_S
        self.current: BatchVersion = NO_BATCH

    def _stat(self) -> tuple | None:
        if getattr(self.layout.store, "path", None) is None:  # object storage: the pointer's ETag, once a second
            now = time.monotonic()
            if now - self._asked < REMOTE_POLL_S:
                return self._stamp
            self._asked = now
            try:
                return ("etag", self.layout.store.get_versioned(BATCH_POINTER_KEY).etag)
            except ObjectMissing:
                return None
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
