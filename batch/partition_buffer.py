"""One partition's buffer of consumed-but-not-yet-archived messages, and when it rolls into a master file.

Per partition the archiver (:mod:`batch.archiver`) buffers consumed messages; the buffer covers the contiguous
offsets ``[start, end)`` (valid *and* invalid ones, so the files tile the offset space without gaps). A buffer is
*rolled* into a file when it reaches ``max_rows`` rows, ``max_bytes`` message bytes or ``max_seconds`` of age
(:class:`RollPolicy`), and when the archiver stops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from lambdalake.config import env_float, env_int
from lambdalake.exceptions import ConfigError
from lambdalake.fields import Source
from lambdalake.session import LogRecord


@dataclass(frozen=True)
class RollPolicy:
    """When a partition buffer becomes a master file. Whichever limit is reached first rolls the file.

    Environment: ``LAMBDALAKE_ARCHIVE_ROLL_ROWS``, ``LAMBDALAKE_ARCHIVE_ROLL_BYTES``,
    ``LAMBDALAKE_ARCHIVE_ROLL_SECONDS``.
    """

    max_rows: int = 500_000
    max_bytes: int = 128 * 1024 * 1024
    max_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_bytes < 1 or self.max_seconds <= 0:
            raise ConfigError(f"roll policy {self} must have positive limits (rows >= 1, bytes >= 1, seconds > 0)")

    @classmethod
    def from_env(cls, **overrides: Any) -> RollPolicy:
        d = cls()
        values = dict(max_rows=env_int("LAMBDALAKE_ARCHIVE_ROLL_ROWS", d.max_rows),
                      max_bytes=env_int("LAMBDALAKE_ARCHIVE_ROLL_BYTES", d.max_bytes),
                      max_seconds=env_float("LAMBDALAKE_ARCHIVE_ROLL_SECONDS", d.max_seconds, minimum=0.001))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class PartitionBuffer:
    """Consumed-but-not-yet-archived messages of one partition: offsets ``[start, end)``."""

    __slots__ = ("source", "partition", "start", "end", "columns", "appenders", "offsets", "ingest", "invalid",
                 "nbytes", "opened")

    def __init__(self, source: Source, partition: int, start: int):
        self.source = source
        self.partition = partition
        self.start = start
        self.end = start
        self.reset(start)

    def reset(self, start: int) -> None:
        self.start = self.end = start
        self.columns: dict[str, list] = {f.name: [] for f in self.source.fields}  # the valid messages' values
        self.appenders = [(name, col.append) for name, col in self.columns.items()]
        self.offsets: list[int] = []
        self.ingest: list[int] = []
        self.invalid: list[tuple[LogRecord, str]] = []  # (record, reason)
        self.nbytes = 0
        self.opened = time.monotonic()

    @property
    def rows(self) -> int:
        return len(self.offsets)

    @property
    def empty(self) -> bool:
        return self.end == self.start
