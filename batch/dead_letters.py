"""The dead-letter writer: the archiver's invalid messages into the ``<topic>.dlq`` topics, exactly once.

Step 1 of the archiver's roll protocol (:mod:`batch.archiver`) sends a range's invalid messages here before its
master file is written; the DLQ high-water mark, re-read from the last record of each DLQ partition, is what lets a
restart (or a retry) skip the ones already sent. Dead letters are written with a librdkafka producer
(:func:`lambdalake.clients.librdkafka_producer`).
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

import orjson

from batch.exceptions import DeadLetterError
from batch.partition_buffer import PartitionBuffer
from lambdalake.clients import consumer as make_consumer
from lambdalake.clients import librdkafka_producer
from lambdalake.config import Settings
from lambdalake.exceptions import BrokerError
from lambdalake.fields import Source
from lambdalake.pipeline import Pipeline

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 120.0  # a roll's dead letters must be acknowledged within this (and message.timeout.ms)
DLQ_MAX_ORIGINAL_BYTES = 1024 * 1024  # original bytes kept in a DLQ record (base64 grows it by 4/3)
DLQ_SCHEMA = 1


class DeadLetters:
    """Writer of the dead-letter topics, exactly once per source position.

    A DLQ record goes to partition ``p`` of ``<topic>.dlq`` for a message of partition ``p`` of ``<topic>``; its
    value is JSON::

        {"schema": 1, "reason": "...", "source": "pageviews", "topic": "...", "partition": 3, "offset": 1234,
         "timestamp_ms": ..., "key_b64": "..."|null, "value_b64": "..."|null, "value_bytes": 57,
         "value_truncated": false, "headers": [["name", "<base64>"], ...]}

    Records are written in source-offset order, so the last record of a DLQ partition names the highest source
    offset dead-lettered so far (the *high-water mark*); :meth:`load_high_water` reads it on start.
    """

    def __init__(self, settings: Settings, pipeline: Pipeline):
        self.settings = settings
        self.pipeline = pipeline
        self.high: dict[tuple[str, int], int] = {}  # (source topic, partition) -> highest offset dead-lettered
        self._producer = None
        self._failed: list = []  # errors of the records of the current send that were not delivered

    def load_high_water(self, partitions: dict[str, list[int]], timeout: float = 30.0) -> None:
        """Read the last record of every DLQ partition; check DLQ partitions match the source partitions."""
        from kafka import TopicPartition

        c = make_consumer(self.settings)
        try:
            for src in self.pipeline.sources:
                dlq_parts = c.partitions_for_topic(src.dlq_topic) or set()
                missing = [p for p in partitions.get(src.topic, []) if p not in dlq_parts]
                if missing:
                    raise DeadLetterError(f"dead-letter topic {src.dlq_topic!r} has partitions {sorted(dlq_parts)} "
                                          f"but source partitions {missing} need one each; add partitions to the "
                                          f"DLQ topic so it has at least as many as {src.topic!r}")
                tps = [TopicPartition(src.dlq_topic, p) for p in sorted(dlq_parts)]
                ends = c.end_offsets(tps) if tps else {}
                for tp in tps:
                    self.high[(src.topic, tp.partition)] = self._last_source_offset(c, tp, ends[tp], timeout)
        finally:
            c.close()

    @staticmethod
    def _last_source_offset(c, tp, end: int, timeout: float) -> int:
        if end == 0:
            return -1
        c.assign([tp])
        c.seek(tp, max(0, end - 16))  # a few records back, in case the tail holds control markers
        best = -1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            recs = c.poll(timeout_ms=500).get(tp, [])
            for r in recs:
                try:
                    best = max(best, int(orjson.loads(r.value)["offset"]))
                except (ValueError, KeyError, TypeError):
                    log.warning("DLQ record %s@%s is not an archiver record; ignored", tp, r.offset)
            if c.position(tp) >= end:
                return best
        raise DeadLetterError(f"could not read the tail of dead-letter partition {tp.topic}[{tp.partition}] "
                              f"within {timeout:.0f}s; is the broker healthy?")

    @property
    def producer(self):
        """The librdkafka producer of the dead letters (idempotent, acks=all;
        :func:`lambdalake.clients.producer_config`),
        opened on first use and again after :meth:`reset`."""
        if self._producer is None:
            try:
                self._producer = librdkafka_producer(self.settings, **{
                    "client.id": "lambdalake-archiver-dlq", "linger.ms": 5,
                    "delivery.report.only.error": True, "on_delivery": self._delivery_failed})
            except BrokerError as exc:  # the broker is away: the roll is retried like any failed send
                raise DeadLetterError(str(exc)) from exc
        return self._producer

    def _delivery_failed(self, err: object, msg: object) -> None:  # noqa: ARG002 (librdkafka's callback)
        self._failed.append(err)

    def send_range(self, buf: PartitionBuffer) -> tuple[int, int]:
        """Steps 1 of the roll protocol (:mod:`batch.archiver`) for one buffer: send what is missing, flush,
        verify. (sent, skipped)."""
        from confluent_kafka import KafkaException

        src, p = buf.source, buf.partition
        high = self.high.get((src.topic, p), -1)
        todo = [(r, reason) for r, reason in buf.invalid if r.offset > high]
        if not todo:
            return 0, len(buf.invalid)
        producer = self.producer
        self._failed.clear()  # delivery reports of failed records only (delivery.report.only.error)
        try:
            for r, reason in todo:
                value = self.record_value(src, r, reason)
                headers = [("lambdalake.reason", reason[:200].encode())]
                while True:
                    try:
                        producer.produce(src.dlq_topic, value, r.key, partition=p, headers=headers)
                        break
                    except BufferError:  # the local queue is full: let the producer send some
                        producer.poll(0.05)
            left = producer.flush(FLUSH_TIMEOUT_S)
        except KafkaException as exc:
            raise DeadLetterError(f"dead-letter topic {src.dlq_topic!r} refused a record ({exc}); the master range "
                                  f"[{buf.start}, {buf.end}) of partition {p} was not written, rerun ingest") from exc
        if left:  # not acknowledged in time: no file gets written, the roll is retried or the run stops
            raise DeadLetterError(f"dead-letter topic {src.dlq_topic!r} did not acknowledge {left} of {len(todo)} "
                                  f"records within {FLUSH_TIMEOUT_S:.0f}s; the master range [{buf.start}, {buf.end}) "
                                  f"of partition {p} was not written, rerun ingest")
        if self._failed:
            raise DeadLetterError(f"dead-letter record for {src.topic}[{p}] was rejected: {self._failed[0]}; "
                                  f"the master range [{buf.start}, {buf.end}) was not written, rerun ingest")
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

    def reload_high_water(self, src: Source, partition: int, timeout: float = 15.0) -> None:
        """Re-read one DLQ partition's high-water mark from the broker (after a failed send)."""
        from kafka import TopicPartition

        try:
            c = make_consumer(self.settings)
        except BrokerError as exc:
            raise DeadLetterError(str(exc)) from exc
        try:
            tp = TopicPartition(src.dlq_topic, partition)
            try:
                end = c.end_offsets([tp], timeout_ms=int(timeout * 1000))[tp]
            except Exception as exc:  # KafkaTimeoutError while the broker is away
                raise DeadLetterError(f"cannot read the end of {src.dlq_topic}[{partition}]: {exc}") from exc
            self.high[(src.topic, partition)] = self._last_source_offset(c, tp, end, timeout)
        finally:
            c.close()

    def reset(self) -> None:
        """Drop the producer and whatever it still buffers (after a failed flush)."""
        if self._producer is not None:
            try:
                self._producer.purge()
                self._producer.flush(0)  # serve the purged records' delivery reports
            except Exception:  # noqa: BLE001 - it is being discarded
                pass
            self._producer = None

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None

