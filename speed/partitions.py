"""The partitions this speed worker owns: their owner locks and ownership epochs (docs/design.md, "Ownership is per
partition").

A worker holds the owner lock of every partition it reads (:mod:`lambdalake.ownership`); an overlapping worker stops
with an error naming the partition and the holder's pid. Each owned partition has an ownership epoch, recorded in
every checkpoint and snapshot: a partition this worker takes over gets one more than any published snapshot holds
for it (:mod:`lambdalake.speedset`), so readers take each partition from exactly one worker's snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from lambdalake.layout import SPEED_COMPONENT, Layout
from lambdalake.locks import PidLock
from lambdalake.ownership import PartitionLocks
from lambdalake.speedset import best_epochs, worker_snapshots
from speed.checkpoint import TP, Checkpoint
from speed.exceptions import SpeedAlreadyRunning


class OwnedPartitions:
    """One speed worker's partitions: the owner lock and the ownership epoch of each (``layout``: the worker's)."""

    def __init__(self, home: Path, layout: Layout):
        self.layout = layout
        self.locks = PartitionLocks(Layout(home), SPEED_COMPONENT, lambda key, holder: SpeedAlreadyRunning(
            f"another speed worker (pid {holder}) owns partition {key[1]} of {key[0]!r} in {home}; stop "
            "it first, or give each speed worker its own partitions (--share I/N or --partitions)"))
        self.epochs: dict[TP, int] = {}  # ownership epoch of each partition this worker holds
        self._published_epochs: dict[TP, int] = {}

    @property
    def held(self) -> dict[TP, PidLock]:
        return self.locks.held

    def own(self, keys: list[TP]) -> None:
        """Take the owner lock of ``keys`` (this worker's partitions) and note the highest ownership epoch any
        published snapshot holds for each: a partition this worker takes over gets one more
        (:mod:`lambdalake.speedset`)."""
        self.locks.acquire(keys)
        for attempt in range(5):
            try:
                self._published_epochs = best_epochs(worker_snapshots(self.layout))
                break
            except FileNotFoundError:  # another worker pruned a snapshot meanwhile: read again
                if attempt == 4:
                    raise

    def claim(self, keys: Iterable[TP]) -> None:
        for key in keys:
            if key not in self.epochs:
                self.epochs[key] = self._published_epochs.get(key, -1) + 1

    def in_checkpoint(self, cp: Checkpoint) -> dict[TP, int]:
        """The epoch ``cp`` holds for each owned partition (``-1``: not in it)."""
        return {tp: (cp.epochs.get(tp, 0) if tp in cp.positions else -1) for tp in set(self.locks.held)}

    def taken_over(self, mine: dict[TP, int]) -> list[TP]:
        """The partitions another worker claimed since (a higher published epoch than ``mine``)."""
        return sorted(tp for tp in mine if self._published_epochs.get(tp, -1) > mine[tp])

    def resume(self, mine: dict[TP, int]) -> None:
        """Keep the epochs a restored checkpoint holds (:meth:`in_checkpoint`)."""
        self.epochs = dict(mine)

    def claim_anew(self) -> None:
        """Claim every owned partition as a new worker does (one more than any published epoch)."""
        self.epochs = {}
        self.claim(set(self.locks.held))

    def release(self) -> None:
        self.locks.release()
