"""One Kafka consumer session for every reader of the log (archiver, speed layer, speed rebuild).

lambdalake's readers keep their own positions durably (the archiver in master file names, the speed layer in its
checkpoints) and never read committed group offsets back. What they have in common, and what this module owns:

- :func:`connect`: a consumer (auto-commit off), retrying with exponential backoff while Kafka is unreachable;
- :meth:`LogSession.assign`: manual assignment of every partition of the topics read, each seeked to the reader's
  own position (a partition it has no position for starts at the log start). Offsets below the log start were
  deleted by Kafka retention before the reader got to them: said once per partition, worded the same everywhere,
  and the read starts at the log start;
- :meth:`LogSession.new_partitions`: partitions added to a topic while running (assign again to pick them up);
- :meth:`LogSession.reached`: "read up to a target" also across offsets that hold no record (transaction markers,
  compacted-away offsets), where only the consumer's own position moves;
- :meth:`LogSession.commit`: the group-offset commit, for lag monitoring tools only (asynchronous while running,
  synchronous at shutdown; a failure never stops a reader);
- :func:`stop_on_signals`: SIGTERM / SIGINT ask the reader to stop cleanly (finish files, write a checkpoint).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

from lambdalake.config import Settings
from lambdalake.exceptions import BrokerError, LambdalakeError
from lambdalake.ownership import Share

log = logging.getLogger(__name__)

TP = tuple[str, int]


class TopicMissing(LambdalakeError):
    """A topic the pipeline reads has no partitions at the broker."""

    exit_code = 2


class BrokerUnreachable(BrokerError):
    """Kafka stayed unreachable for the whole connect timeout."""


@contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT call ``stop`` (which must be signal-safe, e.g. ``Event.set``); the previous
    handlers come back on exit. Off the main thread (signals cannot be handled there) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, lambda *_: stop())
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def connect(settings: Settings, *, group_id: str | None, timeout: float = 0.0,
            stop: threading.Event | None = None, notify: Callable[[str], None] | None = None, **overrides):
    """A consumer for ``settings``; while Kafka is unreachable, retry with exponential backoff for up to ``timeout``
    seconds (0: one attempt), telling ``notify`` about each retry. Raises :class:`BrokerUnreachable`."""
    from lambdalake.kafka import consumer

    deadline = time.monotonic() + timeout
    delay, attempt = 0.5, 0
    while True:
        attempt += 1
        if timeout > 0:
            per_attempt = min(5.0, max(1.0, (deadline - time.monotonic()) / 2))
            overrides["bootstrap_timeout_ms"] = int(1000 * per_attempt)
        try:
            return consumer(settings, group_id=group_id, **overrides)
        except BrokerError as exc:
            left = deadline - time.monotonic()
            if left <= 0 or (stop is not None and stop.is_set()):
                hint = (f" (gave up after {attempt} attempt(s) in {timeout:.0f}s; raise --broker-timeout to wait "
                        "longer)") if timeout > 0 else ""
                raise BrokerUnreachable(f"{exc}{hint}") from exc
            wait = min(delay, left)
            (notify or log.warning)(f"Kafka at {settings.bootstrap} is unreachable (attempt {attempt}); "
                                    f"retrying in {wait:.1f}s")
            if stop is not None:
                stop.wait(wait)
            else:
                time.sleep(wait)
            delay = min(delay * 2, 30.0)


class LogSession:
    """Manual assignment of every partition of ``topics`` that the reader's ``share`` owns (default: all) on one
    consumer, positioned by the reader's own positions (:mod:`lambdalake.ownership`).

    ``reader`` and ``lost_means`` word the retention message: ``"{topic}[{p}]: offsets [a, b) were deleted by Kafka
    retention before {reader} read them; {lost_means}"``, sent to ``notify`` (``None``: say nothing, e.g. a replay
    whose live side already said it).
    """

    def __init__(self, consumer, topics: Iterable[str], *, bootstrap: str, reader: str, lost_means: str,
                 notify: Callable[[str], None] | None, share: Share | None = None):
        self.consumer = consumer
        self.share = share or Share()
        self.topics = list(topics)
        self.bootstrap = bootstrap
        self.reader = reader
        self.lost_means = lost_means
        self.notify = notify
        self.tps: dict[TP, object] = {}  # what is assigned: (topic, partition) -> kafka TopicPartition

    def partitions(self) -> list[TP]:
        """Every partition of the topics the share owns, as the broker sees them now. Raises :class:`TopicMissing`."""
        out: list[TP] = []
        for topic in self.topics:
            parts = self.consumer.partitions_for_topic(topic)
            if not parts:
                raise TopicMissing(f"topic {topic!r} does not exist at {self.bootstrap}; create it with "
                                   "`lambdalake topics`")
            out += [(topic, p) for p in sorted(parts) if self.share.owns(p)]
        return out

    def assign(self, positions: Mapping[TP, int], covered: Mapping[TP, int] | None = None,
               partitions: Iterable[TP] | None = None) -> dict[TP, int]:
        """Assign ``partitions`` (default: every partition of the topics) and seek each to ``positions`` (absent:
        the log start). Returns where each partition reads from: its position, or the log start when retention
        deleted offsets at or above it — those offsets are reported unless ``covered[tp]`` (offsets below which the
        reader's data is held elsewhere, e.g. by a batch version) already reaches the log start.

        Every partition is seeked, not only new ones: a re-assignment may forget fetch positions, and the reader's
        own positions are the authoritative ones."""
        from kafka import TopicPartition

        keys = list(self.partitions() if partitions is None else partitions)
        self.tps = {k: TopicPartition(*k) for k in keys}
        tps = list(self.tps.values())
        self.consumer.assign(tps)
        begins = self.consumer.beginning_offsets(tps) if tps else {}
        covered = covered or {}
        starts: dict[TP, int] = {}
        for key, tp in self.tps.items():
            first = begins.get(tp, 0)
            start = positions.get(key, first)
            if start < first:
                lost_from = max(start, covered.get(key, 0))
                if lost_from < first and self.notify is not None and key in positions:
                    self.notify(f"{key[0]}[{key[1]}]: offsets [{lost_from}, {first}) were deleted by Kafka retention "
                                f"before {self.reader} read them; {self.lost_means}")
                start = first
            starts[key] = start
            self.consumer.seek(tp, start)
        return starts

    def new_partitions(self) -> set[TP]:
        """Partitions of the topics not assigned yet (added while running); empty when the broker cannot say."""
        try:
            return set(self.partitions()) - set(self.tps)
        except (TopicMissing, Exception):  # noqa: BLE001 - a metadata hiccup: check again next time
            return set()

    def end_offsets(self) -> dict[TP, int]:
        ends = self.consumer.end_offsets(list(self.tps.values()))
        return {(tp.topic, tp.partition): n for tp, n in ends.items()}

    def reached(self, key: TP, target: int) -> bool:
        """Has the consumer's own position reached ``target`` on a partition the reader has not paused? True across
        offsets without records (transaction markers), which the reader's record-based position never passes."""
        tp = self.tps.get(key)
        if tp is None or tp in self.consumer.paused():
            return False
        return self.consumer.position(tp) >= target

    def commit(self, positions: Mapping[TP, int], wait: bool = False) -> None:
        """Group offsets for lag monitoring tools only (never read back). Never raises."""
        from kafka.structs import OffsetAndMetadata

        offsets = {self.tps[k]: OffsetAndMetadata(n, "", -1) for k, n in positions.items() if k in self.tps}
        if not offsets:
            return
        try:
            if wait:
                self.consumer.commit(offsets, timeout_ms=5000)
            else:
                self.consumer.commit_async(offsets)
        except Exception as exc:  # noqa: BLE001 - monitoring only; positions live in the reader's own files
            log.debug("lag-monitoring commit failed: %s", exc)

    def close(self) -> None:
        self.consumer.close(autocommit=False)
