"""The dead-letter writer: the archiver's invalid messages into the ``<topic>.dlq`` topics, exactly once.

Step 1 of the archiver's roll protocol (:mod:`batch.archiver`) sends a range's invalid messages here before its
master file is written; the DLQ high-water mark, re-read from the last committed record of each DLQ partition, is
what lets a restart (or a retry) skip the ones already sent.

**Fencing.** Dead letters of source partition ``p`` are written in Kafka transactions by a producer whose
``transactional.id`` belongs to that partition of this lake (:func:`transactional_id`). A writer initialises it on
its first roll with invalid messages after each claim of the partition, which fences every older producer of the
partition (Kafka aborts its open transaction and refuses its later commits), and only then re-reads the high-water
mark. So a zombie writer (paused past its session, its partition claimed by another) either committed its dead
letters before the new owner's initialisation — then the new owner sees them and skips them — or cannot commit them
at all: "every offset exactly once in master or DLQ" holds whoever wakes up when. Readers of the DLQ read committed
records only (``isolation.level=read_committed``); offsets include transaction markers, so counts are counts of
records (:func:`lambdalake.clients.committed_counts`), never differences of offsets.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

import orjson

from batch.exceptions import DeadLetterError
from batch.partition_buffer import PartitionBuffer
from lambdalake.clients import librdkafka_consumer, librdkafka_producer
from lambdalake.config import Settings
from lambdalake.exceptions import BrokerError
from lambdalake.fields import Source
from lambdalake.heads import Fenced
from lambdalake.pipeline import Pipeline

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 120.0  # a roll's dead letters must be committed within this (and message.timeout.ms)
TRANSACTION_TIMEOUT_MS = 150_000  # an open transaction of a dead writer is aborted after this (> message.timeout.ms)
DLQ_MAX_ORIGINAL_BYTES = 1024 * 1024  # original bytes kept in a DLQ record (base64 grows it by 4/3)
DLQ_SCHEMA = 1
TAIL_WINDOW = 16  # offsets read back from a DLQ partition's end first (records, markers, aborted records)
FENCED_CODES = ("_FENCED", "PRODUCER_FENCED", "INVALID_PRODUCER_EPOCH", "TRANSACTIONAL_ID_AUTHORIZATION_FAILED")


def transactional_id(settings: Settings, pipeline: Pipeline, src: Source, partition: int) -> str:
    """The ``transactional.id`` of the dead letters of one source partition of this lake: every writer of the
    partition uses it, whoever and wherever it is, so each new one fences the previous."""
    return f"{settings.group_id('archiver', pipeline.name)}.dlq.{src.topic}.{partition}"


class DeadLetters:
    """Writer of the dead-letter topics, exactly once per source position (module docstring: fencing).

    A DLQ record goes to partition ``p`` of ``<topic>.dlq`` for a message of partition ``p`` of ``<topic>``; its
    value is JSON::

        {"schema": 1, "reason": "...", "source": "pageviews", "topic": "...", "partition": 3, "offset": 1234,
         "timestamp_ms": ..., "key_b64": "..."|null, "value_b64": "..."|null, "value_bytes": 57,
         "value_truncated": false, "headers": [["name", "<base64>"], ...]}

    Records are committed in source-offset order, so the last committed record of a DLQ partition names the highest
    source offset dead-lettered so far (the *high-water mark*); :meth:`load_high_water` reads it on start.
    """

    def __init__(self, settings: Settings, pipeline: Pipeline):
        self.settings = settings
        self.pipeline = pipeline
        self.high: dict[tuple[str, int], int] = {}  # (source topic, partition) -> highest offset dead-lettered
        self._producers: dict[tuple[str, int], Any] = {}  # initialised transactional producer per source partition
        self._failed: list = []  # errors of the records of the current send that were not delivered

    def load_high_water(self, partitions: dict[str, list[int]], timeout: float = 30.0) -> None:
        """Read the last committed record of every DLQ partition; check DLQ partitions match the source
        partitions."""
        keys: list[tuple[Source, int]] = []
        c = self._reader()
        try:
            for src in self.pipeline.sources:
                try:
                    meta = c.list_topics(src.dlq_topic, timeout=timeout).topics.get(src.dlq_topic)
                except Exception as exc:  # noqa: BLE001 - KafkaException while the broker is away
                    raise DeadLetterError(f"cannot read the partitions of {src.dlq_topic!r}: {exc}") from exc
                dlq_parts = set(meta.partitions) if meta is not None and meta.error is None else set()
                missing = [p for p in partitions.get(src.topic, []) if p not in dlq_parts]
                if missing:
                    raise DeadLetterError(f"dead-letter topic {src.dlq_topic!r} has partitions {sorted(dlq_parts)} "
                                          f"but source partitions {missing} need one each; add partitions to the "
                                          f"DLQ topic so it has at least as many as {src.topic!r}")
                keys += [(src, p) for p in sorted(dlq_parts)]
            self.high.update(self._tails(c, keys, timeout))
        finally:
            c.close()

    def reload_high_water(self, src: Source, partition: int, timeout: float = 15.0) -> None:
        """Re-read one DLQ partition's high-water mark from the broker (after a failed send, or a claim)."""
        c = self._reader()
        try:
            self.high.update(self._tails(c, [(src, partition)], timeout))
        finally:
            c.close()

    def _reader(self):
        try:
            return librdkafka_consumer(self.settings, **{"isolation.level": "read_committed",
                                                         "enable.partition.eof": True})
        except BrokerError as exc:
            raise DeadLetterError(str(exc)) from exc

    @staticmethod
    def _tails(c, keys: list[tuple[Source, int]], timeout: float) -> dict[tuple[str, int], int]:
        """The highest source offset named by a committed record near the end of each DLQ partition of ``keys``
        (``-1``: none). All partitions are read at once; one whose window holds no committed record (markers,
        aborted transactions) is read again with a 16 times larger window, down to its first offset."""
        from confluent_kafka import KafkaError, TopicPartition

        deadline = time.monotonic() + timeout
        best: dict[tuple[str, int], int] = {}
        bounds: dict[tuple[str, int], tuple[int, int]] = {}
        for src, p in keys:
            try:
                bounds[(src.dlq_topic, p)] = c.get_watermark_offsets(TopicPartition(src.dlq_topic, p),
                                                                     timeout=timeout, cached=False)
            except Exception as exc:  # noqa: BLE001 - KafkaException while the broker is away
                raise DeadLetterError(f"cannot read the end of {src.dlq_topic}[{p}]: {exc}") from exc
        sources = {(src.dlq_topic, p): (src.topic, p) for src, p in keys}
        window = TAIL_WINDOW
        todo = {k for k, (lo, hi) in bounds.items() if hi > lo}
        out = {sources[k]: -1 for k in bounds}
        while todo:
            starts = {k: max(bounds[k][0], bounds[k][1] - window) for k in todo}
            c.assign([TopicPartition(t, p, starts[(t, p)]) for t, p in sorted(todo)])
            waiting = set(todo)
            while waiting:
                if time.monotonic() > deadline:
                    t, p = sorted(waiting)[0]
                    raise DeadLetterError(f"could not read the tail of dead-letter partition {t}[{p}] within "
                                          f"{timeout:.0f}s; is the broker healthy?")
                for m in c.consume(500, timeout=0.5):
                    k = (m.topic(), m.partition())
                    if m.error() is not None:
                        if m.error().code() == KafkaError._PARTITION_EOF:
                            waiting.discard(k)
                        continue
                    try:
                        best[k] = max(best.get(k, -1), int(orjson.loads(m.value())["offset"]))
                    except (ValueError, KeyError, TypeError):
                        log.warning("DLQ record %s[%s]@%s is not an archiver record; ignored", *k, m.offset())
            c.unassign()
            for k in list(todo):
                if k in best or starts[k] <= bounds[k][0]:
                    out[sources[k]] = best.get(k, -1)
                    todo.discard(k)
            window *= 16
        return out

    def producer(self, src: Source, partition: int, timeout: float = FLUSH_TIMEOUT_S):
        """The transactional producer of ``partition``'s dead letters, initialised on first use after each claim
        (:meth:`claimed`): which fences every older writer of the partition; the high-water mark is then read
        again, so whatever a fenced writer committed before is skipped."""
        key = (src.topic, partition)
        if key not in self._producers:
            from confluent_kafka import KafkaException

            try:
                producer = librdkafka_producer(self.settings, **{
                    "client.id": "lambdalake-archiver-dlq", "linger.ms": 5,
                    "transactional.id": transactional_id(self.settings, self.pipeline, src, partition),
                    "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
                    "delivery.report.only.error": True, "on_delivery": self._delivery_failed})
                producer.init_transactions(timeout)
            except BrokerError as exc:  # the broker is away: the roll is retried like any failed send
                raise DeadLetterError(str(exc)) from exc
            except KafkaException as exc:
                raise DeadLetterError(f"cannot start dead-letter transactions for {src.topic}[{partition}] "
                                      f"({exc}); the cluster must allow transactions (a transaction state log "
                                      "with enough brokers; with ACLs, Write on TransactionalId "
                                      f"{transactional_id(self.settings, self.pipeline, src, partition)!r})") from exc
            self.reload_high_water(src, partition, timeout=min(timeout, 15.0))
            self._producers[key] = producer
        return self._producers[key]

    def claimed(self, keys, sources: dict[str, Source]) -> None:
        """This writer claimed ``keys`` (again): each gets a newly initialised producer now, all at once (each
        initialisation is a few round trips to the transaction coordinator; one after another they delayed a
        takeover by seconds), which fences the older writers at once. One that fails is retried by the partition's
        next roll with invalid messages."""
        from concurrent.futures import ThreadPoolExecutor

        for key in keys:
            self._producers.pop(tuple(key), None)

        def prepare(key) -> None:
            try:
                self.producer(sources[key[0]], key[1])
            except DeadLetterError as exc:
                log.info("dead-letter producer of %s[%s] not ready (%s): its next roll starts it", *key, exc)

        with ThreadPoolExecutor(max_workers=min(8, max(1, len(keys))), thread_name_prefix="dlq-claim") as pool:
            list(pool.map(prepare, [tuple(k) for k in keys]))

    def _delivery_failed(self, err: object, msg: object) -> None:  # noqa: ARG002 (librdkafka's callback)
        self._failed.append(err)

    def send_range(self, buf: PartitionBuffer, timeout: float = FLUSH_TIMEOUT_S) -> tuple[int, int]:
        """Steps 1 of the roll protocol (:mod:`batch.archiver`) for one buffer: send what is missing in one
        transaction and commit it, each Kafka call within ``timeout`` seconds. (sent, skipped);
        :class:`~lambdalake.heads.Fenced` if a newer writer of the partition fenced this one."""
        from confluent_kafka import KafkaException

        src, p = buf.source, buf.partition
        if not buf.invalid:
            return 0, 0
        producer = self.producer(src, p, timeout)
        high = self.high.get((src.topic, p), -1)
        todo = [(r, reason) for r, reason in buf.invalid if r.offset > high]
        if not todo:
            return 0, len(buf.invalid)
        self._failed.clear()  # delivery reports of failed records only (delivery.report.only.error)
        try:
            producer.begin_transaction()
            for r, reason in todo:
                value = self.record_value(src, r, reason)
                headers = [("lambdalake.reason", reason[:200].encode())]
                while True:
                    try:
                        producer.produce(src.dlq_topic, value, r.key, partition=p, headers=headers)
                        break
                    except BufferError:  # the local queue is full: let the producer send some
                        producer.poll(0.05)
            producer.commit_transaction(timeout)
        except KafkaException as exc:
            self._producers.pop((src.topic, p), None)  # a retry starts a new producer (fencing this one)
            err = exc.args[0] if exc.args else None
            code = err.code() if hasattr(err, "code") else None
            if code in _fenced_codes():
                raise Fenced(f"a newer writer of {src.topic}[{p}] fenced its dead letters ({err})") from exc
            if self._failed:
                raise DeadLetterError(f"dead-letter record for {src.topic}[{p}] was rejected: {self._failed[0]}; "
                                      f"the master range [{buf.start}, {buf.end}) was not written, rerun "
                                      "ingest") from exc
            raise DeadLetterError(f"dead-letter topic {src.dlq_topic!r} did not commit {len(todo)} records "
                                  f"({exc}); the master range [{buf.start}, {buf.end}) of partition {p} was not "
                                  "written, rerun ingest") from exc
        self.high[(src.topic, p)] = todo[-1][0].offset
        return len(todo), len(buf.invalid) - len(todo)

    @staticmethod
    def record_value(src: Source, r: Any, reason: str) -> bytes:
        value = r.value
        truncated = value is not None and len(value) > DLQ_MAX_ORIGINAL_BYTES
        kept = value[:DLQ_MAX_ORIGINAL_BYTES] if truncated else value
        return orjson.dumps({
            "schema": DLQ_SCHEMA, "reason": reason, "source": src.name, "topic": src.topic,
            "partition": r.partition, "offset": r.offset, "timestamp_ms": r.timestamp,
            "key_b64": None if r.key is None else base64.b64encode(r.key).decode(),
            "value_b64": None if kept is None else base64.b64encode(kept).decode(),
            "value_bytes": None if value is None else len(value), "value_truncated": truncated,
            "headers": [[k, None if v is None else base64.b64encode(v).decode()] for k, v in (r.headers or [])],
        })

    def reset(self) -> None:
        """Drop the producers (after a failed send): the next send initialises a new one, which aborts whatever
        the old one left open."""
        self._producers.clear()

    def close(self) -> None:
        self._producers.clear()  # every send commits (or fails) its transaction before it returns


def _fenced_codes() -> set[int]:
    from confluent_kafka import KafkaError

    return {getattr(KafkaError, n) for n in FENCED_CODES}
