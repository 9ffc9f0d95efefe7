"""Partition ownership: which partitions a worker reads (:class:`Share`) and the lock that makes it their only
owner (:class:`PartitionLocks`).

docs/design.md, "Ownership is per partition": the exactness invariant holds partition by partition, so a streaming
component (archiver, speed layer) may run as many workers, each owning a disjoint set of partitions of every source
topic. A worker's share is either ``i/N`` (partitions ``p`` with ``p % N == i``: a fixed rule, so partitions added
to a topic later get an owner without any coordination) or an explicit list of partition numbers.

Each owned partition is held with an exclusive ``flock`` on ``checkpoints/<component>/partitions/<topic>-<p>.lock``
for the worker's lifetime (released by the OS when it dies, kill -9 included). Two workers whose shares overlap
therefore cannot both run: the second one stops with a message naming the partition and the holder's pid. The
locks need a file system with working ``flock`` shared by all workers (local disk; on NFS only v4 locks work).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lambdalake.exceptions import ConfigError, LambdalakeError
from lambdalake.layout import Layout
from lambdalake.locks import PidLock

TP = tuple[str, int]
_SHARE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Share:
    """The partitions one worker owns: ``p % count == index``, or exactly ``explicit`` (of every source topic)."""

    index: int = 0
    count: int = 1
    explicit: frozenset[int] | None = None

    def __post_init__(self) -> None:
        if self.explicit is None and not 0 <= self.index < self.count:
            raise ConfigError(f"share {self.index}/{self.count}: need 0 <= index < count")

    @property
    def everything(self) -> bool:
        return self.explicit is None and self.count == 1

    def owns(self, partition: int) -> bool:
        if self.explicit is not None:
            return partition in self.explicit
        return partition % self.count == self.index

    def select(self, keys: Iterable[TP]) -> list[TP]:
        return [k for k in keys if self.owns(k[1])]

    @property
    def worker(self) -> str:
        """The worker's name in paths (``views/speed/workers/<name>``): ``""`` for every partition, ``1-of-4``,
        ``p0-2-5``."""
        if self.explicit is not None:
            return "p" + "-".join(str(p) for p in sorted(self.explicit))
        return "" if self.count == 1 else f"{self.index}-of-{self.count}"

    @property
    def label(self) -> str:
        """``all``, ``1/4`` or ``p0,2,5``: how logs, reports and worker names refer to the share."""
        if self.explicit is not None:
            return "p" + ",".join(str(p) for p in sorted(self.explicit))
        return "all" if self.count == 1 else f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, partitions: str | None = None, share: str | None = None) -> Share:
        """From the CLI: ``--partitions 0,2,5`` or ``--share 1/4`` (not both); neither: every partition."""
        if partitions is not None and share is not None:
            raise ConfigError("give --partitions or --share, not both")
        if partitions is not None:
            try:
                nums = frozenset(int(x) for x in partitions.split(",") if x.strip())
            except ValueError:
                raise ConfigError(f"--partitions {partitions!r}: expected partition numbers like 0,2,5") from None
            if not nums or min(nums) < 0:
                raise ConfigError(f"--partitions {partitions!r}: expected partition numbers >= 0 like 0,2,5")
            return cls(explicit=nums)
        if share is not None:
            m = _SHARE.match(share)
            if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
                raise ConfigError(f"--share {share!r}: expected INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 1/4")
            return cls(int(m.group(1)), int(m.group(2)))
        return cls()

    @classmethod
    def split(cls, workers: int) -> list[Share]:
        """The shares of ``workers`` workers started together (``--workers N``)."""
        return [cls(i, workers) for i in range(workers)]


class PartitionLocks:
    """Exclusive per-partition owner locks of one worker of ``component`` (see the module docstring)."""

    def __init__(self, layout: Layout, component: str, on_busy: Callable[[TP, str], LambdalakeError]):
        self.dir = layout.checkpoints(component) / "partitions"
        self.on_busy = on_busy
        self.held: dict[TP, PidLock] = {}

    def acquire(self, keys: Iterable[TP]) -> None:
        """Take the lock of every partition in ``keys`` not held yet; all or nothing for this call."""
        taken: list[TP] = []
        try:
            for key in keys:
                if key in self.held:
                    continue
                lock = PidLock(self.dir / f"{key[0]}-{key[1]}.lock",
                               lambda holder, key=key: self.on_busy(key, holder))
                lock.acquire()
                self.held[key] = lock
                taken.append(key)
        except BaseException:
            for key in taken:
                self.held.pop(key).release()
            raise

    def release(self) -> None:
        for lock in self.held.values():
            lock.release()
        self.held.clear()

    def __enter__(self) -> PartitionLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
