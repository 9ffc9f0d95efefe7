"""One Kafka consumer session for every reader of the log (archiver, speed layer, speed rebuild).

lambdalake's readers keep their own positions durably (the archiver in master heads, the speed layer in its
checkpoints) and never read committed group offsets back. What they have in common, and what this module owns:

- :func:`connect`: a consumer (auto-commit off), retrying with exponential backoff while Kafka is unreachable, of
  one of two clients behind one small seam (:mod:`lambdalake.log_clients`: kafka-python, the speed layer's and its
  rebuild's; librdkafka via confluent-kafka, the archiver's, ~3x kafka-python's fetch rate here). Each adapter
  only translates calls; every rule below is written once, here;
- :meth:`LogSession.assign`: manual assignment of every partition of the topics read, each seeked to the reader's
  own position (a partition it has no position for starts at the log start). Offsets below the log start were
  deleted by Kafka retention before the reader got to them: said once per partition, worded the same everywhere,
  and the read starts at the log start;
- :meth:`LogSession.subscribe`: or membership of a consumer group (cooperative rebalancing): the group assigns the
  partitions, the reader is told of each one assigned (and answers where it reads from), revoked or lost
  (:mod:`lambdalake.log_clients` adapts each client's rebalance callbacks);
- :meth:`LogSession.new_partitions`: partitions added to a topic while running (assign again to pick them up);
- :meth:`LogSession.poll`: the records fetched, as runs of one partition (offsets and values as lists; the full
  :class:`LogRecord` only when asked, e.g. for a dead letter);
- :meth:`LogSession.reached`: "read up to a target" also across offsets that hold no record (transaction markers,
  compacted-away offsets), where only the consumer's own position moves;
- :meth:`LogSession.read_until`: a bounded read (the audit's and ``lambdalake topics``' read of the log back): every
  assigned partition up to a stop offset, then done, or a :class:`BrokerError` naming the partitions left;
- :meth:`LogSession.commit`: the group-offset commit, for lag monitoring tools only (asynchronous while running,
  synchronous at shutdown and bounded to a few seconds; a failure never stops a reader);
- :func:`stop_on_signals`: SIGTERM / SIGINT ask the reader to stop cleanly (finish files, write a checkpoint).
"""

from __future__ import annotations

import bisect
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

from lambdalake.config import Settings
from lambdalake.exceptions import BrokerError, LambdalakeError
from lambdalake.log_clients import CLIENTS, TP, KafkaPythonClient, LibrdkafkaClient, LogRecord, Run
from lambdalake.ownership import Share

log = logging.getLogger(__name__)

__all__ = ["CLIENTS", "TP", "BrokerUnreachable", "KafkaPythonClient", "LibrdkafkaClient", "LogRecord", "LogSession",
           "Run", "TopicMissing", "connect", "stop_on_signals"]



class TopicMissing(LambdalakeError):
    """A topic the pipeline reads has no partitions at the broker."""

    exit_code = 2


class BrokerUnreachable(BrokerError):
    """Kafka stayed unreachable for the whole connect timeout."""


@contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT call ``stop`` (e.g. ``Event.set``); the previous handlers come back on exit.
    Off the main thread (signals cannot be handled there) this does nothing.

    ``stop`` runs on a small helper thread, not in the signal handler: a Python handler runs in the main thread
    between any two bytecodes, so calling ``Event.set`` there deadlocks when the main thread is itself inside
    ``set``/``wait`` holding the event's lock, or when a second signal (a group stop plus a relayed one) lands
    while the first handler is inside ``set``. The handler only puts the signal on a ``queue.SimpleQueue``, whose
    ``put`` is documented reentrant."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals: queue.SimpleQueue[int | None] = queue.SimpleQueue()

    def relay() -> None:
        while signals.get() is not None:
            stop()

    helper = threading.Thread(target=relay, name="lambdalake-stop-on-signal", daemon=True)
    helper.start()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, lambda signum, _frame: signals.put(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        signals.put(None)
        helper.join()





def connect(settings: Settings, *, group_id: str | None, timeout: float = 0.0,
            stop: threading.Event | None = None, notify: Callable[[str], None] | None = None,
            client: str = "kafka-python", **overrides):
    """A consumer of ``client`` (``"kafka-python"`` or ``"librdkafka"``, :data:`CLIENTS`) for ``settings``, behind
    the session's seam; while Kafka is unreachable, retry with exponential backoff for up to ``timeout`` seconds
    (0: one attempt), telling ``notify`` about each retry. ``overrides``: the client's own configuration. Raises
    :class:`BrokerUnreachable`."""
    kind = CLIENTS[client]
    deadline = time.monotonic() + timeout
    delay, attempt = 0.5, 0
    while True:
        attempt += 1
        per_attempt = min(5.0, max(1.0, (deadline - time.monotonic()) / 2)) if timeout > 0 else None
        try:
            return kind.open(settings, group_id, per_attempt, **overrides)
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
    consumer (a client from :func:`connect`), positioned by the reader's own positions
    (:mod:`lambdalake.ownership`). ``consumer`` is the client's own consumer object, for readers written against
    that client (the speed layer's kafka-python loop); ``tps`` maps each assigned (topic, partition) to the
    client's ``TopicPartition``.

    ``reader`` and ``lost_means`` word the retention message: ``"{topic}[{p}]: offsets [a, b) were deleted by Kafka
    retention before {reader} read them; {lost_means}"``, sent to ``notify`` (``None``: say nothing, e.g. a replay
    whose live side already said it).
    """

    def __init__(self, client, topics: Iterable[str], *, bootstrap: str, reader: str, lost_means: str,
                 notify: Callable[[str], None] | None, share: Share | None = None):
        self.client = client
        self.consumer = client.consumer
        self.share = share or Share()
        self.topics = list(topics)
        self.bootstrap = bootstrap
        self.reader = reader
        self.lost_means = lost_means
        self.notify = notify
        self.tps: dict[TP, object] = {}  # what is assigned: (topic, partition) -> the client's TopicPartition
        self.record = client.record  # a polled record as a LogRecord (for dead letters)

    def partitions(self) -> list[TP]:
        """Every partition of the topics the share owns, as the broker sees them now. Raises :class:`TopicMissing`."""
        out: list[TP] = []
        for topic in self.topics:
            parts = self.client.partitions_for_topic(topic)
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
        keys = list(self.partitions() if partitions is None else partitions)
        self.tps = {k: self.client.topic_partition(k) for k in keys}
        starts = self.starts(keys, positions, covered)
        self.client.assign(self.tps, starts)
        return starts

    def starts(self, keys: list[TP], positions: Mapping[TP, int], covered: Mapping[TP, int] | None = None
               ) -> dict[TP, int]:
        """Where each of ``keys`` reads from (:meth:`assign`: its position, or the log start, said once)."""
        begins = self.client.beginning_offsets({k: self.client.topic_partition(k) for k in keys}) if keys else {}
        covered = covered or {}
        starts: dict[TP, int] = {}
        for key in keys:
            first = begins.get(key, 0)
            start = positions.get(key, first)
            if start < first:
                lost_from = max(start, covered.get(key, 0))
                if lost_from < first and self.notify is not None and key in positions:
                    self.notify(f"{key[0]}[{key[1]}]: offsets [{lost_from}, {first}) were deleted by Kafka retention "
                                f"before {self.reader} read them; {self.lost_means}")
                start = first
            starts[key] = start
        return starts

    def subscribe(self, assigned: Callable[[list[TP]], Mapping[TP, int]], revoked: Callable[[list[TP]], None],
                  lost: Callable[[list[TP]], None]) -> None:
        """Join the consumer group (:mod:`lambdalake.membership`) instead of :meth:`assign`: from the next
        :meth:`poll` on, ``assigned`` gets each partition the group gives this member and answers where it reads
        from (:meth:`starts`), ``revoked`` each one it must hand over (finish it, then return), ``lost`` each one
        already given to another member (drop it). :attr:`tps` follows the assignment."""
        def on_assigned(keys: list[TP]) -> Mapping[TP, int]:
            self.tps.update({k: self.client.topic_partition(k) for k in keys})
            return assigned(keys)

        def on_gone(keys: list[TP], then: Callable[[list[TP]], None]) -> None:
            then(keys)
            for k in keys:
                self.tps.pop(k, None)

        self.client.subscribe(self.topics, on_assigned, lambda keys: on_gone(keys, revoked),
                              lambda keys: on_gone(keys, lost))

    def rebalanced(self) -> bool:
        """After a poll of a group member: hand over assignment changes the client queued (whether any)."""
        return self.client.rebalanced()

    def new_partitions(self) -> set[TP]:
        """Partitions of the topics not assigned yet (added while running); empty when the broker cannot say."""
        try:
            return set(self.partitions()) - set(self.tps)
        except (TopicMissing, Exception):  # noqa: BLE001 - a metadata hiccup: check again next time
            return set()

    def end_offsets(self, partitions: Iterable[TP] | None = None) -> dict[TP, int]:
        """The end offset of each of ``partitions`` (default: the assigned ones). Asked before :meth:`assign` it is
        quicker with librdkafka, whose offset requests otherwise wait behind the in-flight fetch of the partitions."""
        tps = self.tps if partitions is None else {k: self.client.topic_partition(k) for k in partitions}
        return self.client.end_offsets(tps)

    def poll(self, timeout: float, max_records: int) -> list[Run]:
        """Records fetched since the last poll (waiting up to ``timeout`` seconds for some), as runs of one
        partition each: ``(key, offsets, values, records)``; ``self.record(records[i])`` is the full record."""
        return self.client.poll(timeout, max_records)

    def pause(self, key: TP) -> None:
        """Fetch nothing more of this partition (until it is assigned again)."""
        self.client.pause(self.tps[key])

    def reached(self, key: TP, target: int) -> bool:
        """Has the consumer's own position reached ``target`` on a partition the reader has not paused? True across
        offsets without records (transaction markers), which the reader's record-based position never passes."""
        tp = self.tps.get(key)
        if tp is None or self.client.is_paused(tp):
            return False
        return self.client.position(tp) >= target

    def read_until(self, starts: Mapping[TP, int], stops: Mapping[TP, int], timeout: float, what: str,
                   on_run: Callable[[TP, list[int], list], None], max_records: int = 20_000) -> None:
        """Poll the assigned partitions until each one's position reaches its offset in ``stops`` (a partition whose
        stop is not above its start in ``starts`` — what :meth:`assign` returned — is paused at once). ``on_run``
        gets each polled run's offsets below the stop and their values, in offset order. Raises
        :class:`BrokerError` after ``timeout`` seconds, naming the partitions left."""
        todo = {key for key in self.tps if stops.get(key, 0) > starts.get(key, 0)}
        for key in self.tps:
            if key not in todo:
                self.pause(key)
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                left = ", ".join(f"{t}[{p}] at {self.client.position(self.tps[(t, p)])} of {stops[(t, p)]}"
                                 for t, p in sorted(todo))
                raise BrokerError(f"could not read {what} within {timeout:.0f}s ({left}); is the broker healthy?")
            for key, offsets, values, _ in self.poll(0.5, max_records):
                stop = stops.get(key, 0)
                n = bisect.bisect_left(offsets, stop)
                if n:
                    on_run(key, offsets[:n], values[:n])
            for key in list(todo):
                if self.client.position(self.tps[key]) >= stops[key]:
                    todo.discard(key)
                    self.pause(key)

    def commit(self, positions: Mapping[TP, int], wait: bool = False) -> None:
        """Group offsets for lag monitoring tools only (never read back): asynchronous, or with ``wait`` bounded
        by a few seconds. Never raises."""
        offsets = {self.tps[k]: n for k, n in positions.items() if k in self.tps}
        if not offsets:
            return
        try:
            self.client.commit(offsets, wait)
        except Exception as exc:  # noqa: BLE001 - monitoring only; positions live in the reader's own files
            log.debug("lag-monitoring commit failed: %s", exc)

    def close(self) -> None:
        self.client.close()
