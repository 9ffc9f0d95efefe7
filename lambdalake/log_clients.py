"""The two Kafka consumer clients behind the log session's seam (:mod:`lambdalake.session`): kafka-python
(:class:`KafkaPythonClient`, the speed layer's) and librdkafka via confluent-kafka (:class:`LibrdkafkaClient`, the
archiver's). Each adapter only translates calls; every rule is the session's."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

from lambdalake.config import Settings
from lambdalake.exceptions import BrokerError

log = logging.getLogger(__name__)

TP = tuple[str, int]


class LogRecord(NamedTuple):
    """One record of the log, whichever client read it (what a dead-letter record keeps of it)."""

    topic: str
    partition: int
    offset: int
    timestamp: int  # ms since the epoch (-1: none)
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] | None


# One poll's records of one partition in offset order: (key, offsets, values, the client's own records).
Run = tuple[TP, list[int], list, list]


class GroupWatch:
    """Mends or restarts a group member whose membership is stuck in kafka-python 3.0.12 (the newest release).

    Two hangs are known. (1) An orphaned join: a poll gives up waiting for its JoinGroup/SyncGroup round trip and
    leaves it running; if ``need_rejoin()`` turns false meanwhile (the leader's own assignment, made inside that
    round trip, matches its metadata again; seen when the first assignment was computed before the topics'
    metadata arrived), no later poll collects the finished round trip: the member stays ``REBALANCING`` with no
    partitions, while heartbeating, for good. Seen in about one start in eight on 2 loaded cores. The watch sees
    ``REBALANCING`` with ``need_rejoin()`` false for ``ORPHANED_JOIN_S`` and asks the coordinator to rejoin: the
    next poll starts a new round trip and waits for it, as the client meant to. (2) The coordinator lost for good:
    every ``poll`` returns early ("timeout in ensure_coordinator_ready") while the client's IO thread sits idle.

    So a member not stable for ``limit`` seconds (30 s; ``LAMBDALAKE_GROUP_STUCK_SECONDS``; a join takes a few
    seconds, a rebalance with a dead member the session timeout, 6 s) while a fresh connection to the broker works
    is restarted (:func:`lambdalake.runtime.restart_self`), which resumes exactly from its checkpoint like after a
    crash. While the broker does not answer, the member waits, as it always did. Reads kafka-python's coordinator
    (a private attribute): without it, nothing is watched."""

    def __init__(self, consumer, limit: float, reachable: Callable[[], bool], on_stuck: Callable[[str], None]):
        self.consumer, self.limit, self.reachable, self.on_stuck = consumer, limit, reachable, on_stuck
        self._unstable_since: float | None = None
        self._orphan_since: float | None = None

    def check(self) -> None:
        """After a poll: note whether the member is in a stable group; mend or restart it (class docstring)."""
        coordinator = getattr(self.consumer, "_coordinator", None)
        state = getattr(coordinator, "state", None)
        name = str(getattr(state, "name", state)).strip("<>").upper()
        if state is None or name == "STABLE":
            self._unstable_since = self._orphan_since = None
            return
        now = time.monotonic()
        if self._unstable_since is None:
            self._unstable_since = now
        self._mend_orphaned_join(coordinator, name, now)
        if now - self._unstable_since > self.limit:
            if self.reachable():
                msg = (f"kafka-python group member: not in a stable group for {now - self._unstable_since:.0f}s "
                       f"while the broker answers (state {getattr(state, 'name', state)}; a known kafka-python hang)")
                log.error("%s", msg)
                self.on_stuck(msg)
            self._unstable_since = now  # the broker is away: wait as always, look again later

    def _mend_orphaned_join(self, coordinator, state: str, now: float) -> None:
        """Hang (1) of the class docstring: ``REBALANCING`` while no poll will rejoin, for ``ORPHANED_JOIN_S``."""
        need_rejoin = getattr(coordinator, "need_rejoin", None)
        if state != "REBALANCING" or need_rejoin is None or need_rejoin():
            self._orphan_since = None
            return
        if self._orphan_since is None:
            self._orphan_since = now
        elif now - self._orphan_since >= ORPHANED_JOIN_S:
            log.warning("kafka-python group member: its finished join was left uncollected (a known kafka-python "
                        "hang); joining the group again")
            coordinator.request_rejoin()
            self._orphan_since = None


ORPHANED_JOIN_S = 1.0  # GroupWatch: how long REBALANCING with nothing to rejoin lasts before the member rejoins


class KafkaPythonClient:
    """kafka-python's ``KafkaConsumer`` behind the session's seam: the speed layer's client (the user's choice),
    which also reads ``LogSession.consumer`` directly."""

    name = "kafka-python"

    def __init__(self, consumer):
        self.consumer = consumer
        self._pending: list[tuple[str, list]] = []  # assignment changes queued by the group listener (subscribe)
        self._callbacks: tuple = ()
        self._watch: GroupWatch | None = None  # a group member's membership is watched (GroupWatch)
        self._settings: Settings | None = None

    @classmethod
    def open(cls, settings: Settings, group_id: str | None, connect_timeout: float | None, **overrides):
        from lambdalake.clients import consumer

        if connect_timeout is not None:
            overrides["bootstrap_timeout_ms"] = int(1000 * connect_timeout)
        client = cls(consumer(settings, group_id=group_id, **overrides))
        client._settings = settings
        return client

    def topic_partition(self, key: TP):
        from kafka import TopicPartition

        return TopicPartition(*key)

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(self.consumer.partitions_for_topic(topic) or ())

    def beginning_offsets(self, tps: Mapping[TP, object]) -> dict[TP, int]:
        got = self.consumer.beginning_offsets(list(tps.values()))
        return {(tp.topic, tp.partition): n for tp, n in got.items()}

    def end_offsets(self, tps: Mapping[TP, object]) -> dict[TP, int]:
        got = self.consumer.end_offsets(list(tps.values()))
        return {(tp.topic, tp.partition): n for tp, n in got.items()}

    def assign(self, tps: Mapping[TP, object], starts: Mapping[TP, int]) -> None:
        self.consumer.assign(list(tps.values()))
        for key, tp in tps.items():
            self.consumer.seek(tp, starts[key])

    def subscribe(self, topics: list[str], assigned, revoked, lost) -> None:
        """The group protocol through a ``ConsumerRebalanceListener``. kafka-python calls it on its network thread,
        where no blocking call is allowed: the listener only pauses newly assigned partitions (nothing is fetched
        for them before the reader says where they start) and queues the change; :meth:`rebalanced`, called by
        the reader after each poll, hands the changes over and seeks and resumes the new partitions."""
        from kafka import ConsumerRebalanceListener

        consumer, pending = self.consumer, self._pending
        self._callbacks = (assigned, revoked, lost)

        class Listener(ConsumerRebalanceListener):
            def on_partitions_assigned(self, tps):
                if tps:
                    consumer.pause(*tps)
                    pending.append(("assigned", list(tps)))

            def on_partitions_revoked(self, tps):
                if tps:
                    pending.append(("revoked", list(tps)))

            def on_partitions_lost(self, tps):
                if tps:
                    pending.append(("lost", list(tps)))

        consumer.subscribe(topics=topics, listener=Listener())
        if self._settings is not None:
            from lambdalake.config import env_float
            from lambdalake.runtime import restart_self

            self._watch = GroupWatch(consumer, env_float("LAMBDALAKE_GROUP_STUCK_SECONDS", 30.0, minimum=1.0),
                                     self._reachable, restart_self)

    def _reachable(self) -> bool:
        from lambdalake.clients import librdkafka_consumer

        try:
            librdkafka_consumer(self._settings, connect_timeout=5.0).close()
            return True
        except BrokerError:
            return False

    def rebalanced(self) -> bool:
        """Hand the queued assignment changes to the reader (:meth:`subscribe`); whether there were any."""
        if self._watch is not None:
            self._watch.check()
        if not self._pending:
            return False
        assigned, revoked, lost = self._callbacks
        while self._pending:
            what, tps = self._pending.pop(0)
            keys = sorted((tp.topic, tp.partition) for tp in tps)
            if what == "assigned":
                owned = set(self.consumer.assignment())
                tps = [tp for tp in tps if tp in owned]  # a later rebalance may have taken some back already
                starts = assigned(sorted((tp.topic, tp.partition) for tp in tps)) if tps else {}
                for tp in tps:
                    self.consumer.seek(tp, starts[(tp.topic, tp.partition)])
                if tps:
                    self.consumer.resume(*tps)
            else:
                (revoked if what == "revoked" else lost)(keys)
        return True

    def position(self, tp) -> int:
        return self.consumer.position(tp)

    def is_paused(self, tp) -> bool:
        return tp in self.consumer.paused()

    def pause(self, tp) -> None:
        self.consumer.pause(tp)

    def poll(self, timeout: float, max_records: int) -> list[Run]:
        polled = self.consumer.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        return [((tp.topic, tp.partition), [r.offset for r in recs], [r.value for r in recs], recs)
                for tp, recs in polled.items() if recs]

    @staticmethod
    def record(r) -> LogRecord:
        return LogRecord(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value, r.headers)

    def commit(self, offsets: Mapping[object, int], wait: bool) -> None:
        from kafka.structs import OffsetAndMetadata

        meta = {tp: OffsetAndMetadata(n, "", -1) for tp, n in offsets.items()}
        if wait:
            self.consumer.commit(meta, timeout_ms=COMMIT_TIMEOUT_MS)
        else:
            self.consumer.commit_async(meta)

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class LibrdkafkaClient:
    """librdkafka's consumer (confluent-kafka) behind the same seam: the archiver's client. It fetches ~3x what
    kafka-python does per process here (``bench/bench_speed.py``), in its own threads, ahead of the reader.

    Its consumer position already passes transaction markers and compacted-away offsets; a commit that waits for an
    unreachable coordinator gives up after ``session.timeout.ms`` (:func:`lambdalake.clients.librdkafka_consumer`)."""

    name = "librdkafka"
    REQUEST_TIMEOUT_S = 15.0

    def __init__(self, consumer, bootstrap: str):
        self.consumer = consumer
        self.bootstrap = bootstrap
        self._paused: set[TP] = set()

    @classmethod
    def open(cls, settings: Settings, group_id: str | None, connect_timeout: float | None, **overrides):
        from lambdalake.clients import librdkafka_consumer

        return cls(librdkafka_consumer(settings, group_id, connect_timeout=connect_timeout or 5.0, **overrides),
                   settings.bootstrap)

    def topic_partition(self, key: TP):
        from confluent_kafka import TopicPartition

        return TopicPartition(*key)

    def _failed(self, what: str, exc: Exception) -> BrokerError:
        err = exc.args[0] if exc.args else exc
        return BrokerError(f"cannot {what} from Kafka at {self.bootstrap} "
                           f"({getattr(err, 'str', lambda: str(err))()}); is the broker up?")

    def partitions_for_topic(self, topic: str) -> set[int]:
        from confluent_kafka import KafkaException

        try:
            meta = self.consumer.list_topics(topic, timeout=self.REQUEST_TIMEOUT_S).topics.get(topic)
        except KafkaException as exc:
            raise self._failed(f"read the partitions of {topic!r}", exc) from exc
        return set() if meta is None or meta.error is not None else set(meta.partitions)

    def _watermarks(self, tps: Mapping[TP, object], index: int) -> dict[TP, int]:
        from confluent_kafka import KafkaException

        out: dict[TP, int] = {}
        for key, tp in tps.items():
            try:
                got = self.consumer.get_watermark_offsets(tp, timeout=self.REQUEST_TIMEOUT_S)
            except KafkaException as exc:
                raise self._failed(f"read the offsets of {key[0]}[{key[1]}]", exc) from exc
            if got is None:
                raise BrokerError(f"cannot read the offsets of {key[0]}[{key[1]}] from Kafka at {self.bootstrap} "
                                  f"within {self.REQUEST_TIMEOUT_S:.0f}s; is the broker up?")
            out[key] = got[index]
        return out

    def beginning_offsets(self, tps: Mapping[TP, object]) -> dict[TP, int]:
        return self._watermarks(tps, 0)

    def end_offsets(self, tps: Mapping[TP, object]) -> dict[TP, int]:
        return self._watermarks(tps, 1)

    def assign(self, tps: Mapping[TP, object], starts: Mapping[TP, int]) -> None:
        from confluent_kafka import TopicPartition

        # assign() replaces the whole assignment, each partition at the offset given (records fetched before are
        # dropped by librdkafka); as with kafka-python, a partition in both assignments stays paused
        self._paused &= set(tps)
        self.consumer.assign([TopicPartition(key[0], key[1], starts[key]) for key in tps])
        if self._paused:
            self.consumer.pause([TopicPartition(*key) for key in self._paused])

    def subscribe(self, topics: list[str], assigned, revoked, lost) -> None:
        """The group's cooperative protocol (incremental assign / unassign) around the session's callbacks."""
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        def keys(tps) -> list[TP]:
            return [(tp.topic, tp.partition) for tp in tps]

        def on_assign(consumer, tps) -> None:
            starts = assigned(keys(tps)) if tps else {}
            consumer.incremental_assign([TopicPartition(t.topic, t.partition, starts.get((t.topic, t.partition),
                                                                                        OFFSET_BEGINNING))
                                         for t in tps])

        def on_revoke(consumer, tps) -> None:
            if tps:
                revoked(keys(tps))
                self._paused -= set(keys(tps))
                consumer.incremental_unassign(tps)

        def on_lost(consumer, tps) -> None:
            if tps:
                lost(keys(tps))
                self._paused -= set(keys(tps))
                consumer.incremental_unassign(tps)

        self.consumer.subscribe(topics, on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)

    def rebalanced(self) -> bool:
        return False  # librdkafka calls the rebalance callbacks inside consume(), on the reader's thread

    def position(self, tp) -> int:
        return self.consumer.position([tp])[0].offset  # < 0 (OFFSET_INVALID) until something was fetched

    def is_paused(self, tp) -> bool:
        return (tp.topic, tp.partition) in self._paused

    def pause(self, tp) -> None:
        self.consumer.pause([tp])
        self._paused.add((tp.topic, tp.partition))

    def poll(self, timeout: float, max_records: int) -> list[Run]:
        """One ``consume``, batch-converted into runs of one partition each (in the order they came)."""
        runs: list[Run] = []
        last = None
        offsets: list[int] = []
        values: list = []
        records: list = []
        for m in self.consumer.consume(max_records, timeout):
            err = m.error()
            if err is not None:  # fetch-level errors: librdkafka retries / reconnects by itself
                if err.fatal():
                    raise BrokerError(f"Kafka consumer failed fatally ({err.str()}); restart the command")
                log.debug("librdkafka consume error: %s", err)
                last = None
                continue
            key = (m.topic(), m.partition())
            if key != last:
                last = key
                offsets, values, records = [], [], []
                runs.append((key, offsets, values, records))
            offsets.append(m.offset())
            values.append(m.value())
            records.append(m)
        return runs

    @staticmethod
    def record(m) -> LogRecord:
        from confluent_kafka import TIMESTAMP_NOT_AVAILABLE

        kind, ts = m.timestamp()
        return LogRecord(m.topic(), m.partition(), m.offset(), -1 if kind == TIMESTAMP_NOT_AVAILABLE else ts,
                         m.key(), m.value(), m.headers())

    def commit(self, offsets: Mapping[object, int], wait: bool) -> None:
        from confluent_kafka import TopicPartition

        self.consumer.commit(offsets=[TopicPartition(tp.topic, tp.partition, n) for tp, n in offsets.items()],
                             asynchronous=not wait)

    def close(self) -> None:
        self.consumer.close()


COMMIT_TIMEOUT_MS = 5000
CLIENTS = {c.name: c for c in (KafkaPythonClient, LibrdkafkaClient)}
