"""Kafka clients made from the settings: admin, producers, consumers (kafka-python, librdkafka), topics, end offsets.

Every client is built here so the connection, timeouts and the one producer configuration are decided once; an
unreachable broker becomes a :class:`BrokerError` that says how to fix it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from lambdalake.config import Settings
from lambdalake.exceptions import BrokerError
from lambdalake.pipeline import Pipeline

log = logging.getLogger(__name__)


def unreachable(settings: Settings, exc: Exception) -> BrokerError:
    hint = ("start the embedded broker with `lambdalake kafka up`" if settings.bootstrap_is_embedded
            else "check LAMBDALAKE_BOOTSTRAP and that the cluster is up")
    return BrokerError(f"cannot reach Kafka at {settings.bootstrap} ({type(exc).__name__}); {hint}")


def admin_client(settings: Settings):
    """A KafkaAdminClient, or a BrokerError that says how to fix the connection."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        return KafkaAdminClient(bootstrap_servers=settings.bootstrap, client_id="lambdalake-admin",
                                request_timeout_ms=15000, bootstrap_timeout_ms=5000)
    except (KafkaError, OSError) as exc:
        raise unreachable(settings, exc) from exc


def producer(settings: Settings, **overrides):
    """An idempotent producer with acks=all (no duplicates from producer retries)."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    conf = dict(bootstrap_servers=settings.bootstrap, acks="all", enable_idempotence=True,
                linger_ms=5, batch_size=256 * 1024, max_request_size=2 * 1024 * 1024,
                bootstrap_timeout_ms=5000, client_id="lambdalake-producer")
    conf.update(overrides)
    try:
        return KafkaProducer(**conf)
    except (KafkaError, OSError) as exc:
        raise unreachable(settings, exc) from exc


def producer_config(settings: Settings, **overrides: object) -> dict[str, object]:
    """The configuration of the librdkafka (confluent-kafka) producer: ``lambdalake produce`` / ``load``, the
    archiver's dead letters and the benchmarks. It sends ~10x what kafka-python's producer does per core
    (``bench/bench_speed.py`` measures both producers).

    Same delivery semantics as every other producer of lambdalake: idempotent with acks=all (retries neither
    duplicate nor reorder), and keyed messages go to the partition Kafka's Java client and kafka-python choose
    (murmur2 of the key), so a subject's events share a partition whichever producer sent them."""
    conf: dict[str, object] = {
        "bootstrap.servers": settings.bootstrap, "client.id": "lambdalake-producer",
        "enable.idempotence": True, "acks": "all", "partitioner": "murmur2_random",
        "linger.ms": 20, "batch.size": 1024 * 1024, "compression.type": "none",
        "message.max.bytes": 2 * 1024 * 1024,  # like the broker's limit (a > 1 MiB malformed message fits)
        "message.timeout.ms": 120_000,  # a message not acknowledged within 2 minutes is a failure
        "queue.buffering.max.messages": 200_000, "queue.buffering.max.kbytes": 256 * 1024,
        # librdkafka's retry chatter (a fresh broker's PID, reconnects) under the "kafka" logger, which the CLI keeps
        # quiet unless LAMBDALAKE_LOG=DEBUG (lambdalake.options.configure_logging): failures surface as BrokerError
        "logger": logging.getLogger("kafka.librdkafka"),
    }
    conf.update(overrides)
    return conf


def librdkafka_producer(settings: Settings, *, connect_timeout: float = 5.0, **overrides: object):
    """A librdkafka producer (:func:`producer_config` plus ``overrides``), checked reachable (cluster metadata
    within ``connect_timeout`` seconds), else a :class:`BrokerError`."""
    from confluent_kafka import KafkaException, Producer

    p = Producer(producer_config(settings, **overrides))
    try:
        p.list_topics(timeout=connect_timeout)
    except KafkaException as exc:
        raise unreachable(settings, exc) from exc
    return p


def consumer(settings: Settings, group_id: str | None = None, **overrides):
    """A consumer with auto-commit off: positions come from our own durable state, never from Kafka."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    conf = dict(bootstrap_servers=settings.bootstrap, group_id=group_id, enable_auto_commit=False,
                auto_offset_reset="earliest", bootstrap_timeout_ms=5000,
                max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024,
                client_id=f"lambdalake-{group_id or 'reader'}")
    conf.update(overrides)
    try:
        return KafkaConsumer(**conf)
    except (KafkaError, OSError) as exc:
        raise unreachable(settings, exc) from exc


def librdkafka_consumer(settings: Settings, group_id: str | None = None, *, connect_timeout: float = 5.0,
                        **overrides):
    """A librdkafka (confluent-kafka) consumer reading like :func:`consumer`: auto-commit off, earliest reset, every
    record including those of aborted transactions (kafka-python's default isolation), manual assignment only.
    Checked reachable (cluster metadata within ``connect_timeout`` seconds), else a :class:`BrokerError`."""
    from confluent_kafka import Consumer, KafkaException

    quiet = logging.getLogger("kafka.librdkafka")  # reconnect chatter; the CLI keeps "kafka" quiet unless DEBUG
    conf: dict[str, object] = {
        "bootstrap.servers": settings.bootstrap, "group.id": group_id or "lambdalake-reader",
        "client.id": f"lambdalake-{group_id or 'reader'}",
        "enable.auto.commit": False, "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
        "isolation.level": "read_uncommitted", "fetch.wait.max.ms": 100,
        "max.partition.fetch.bytes": 4 * 1024 * 1024, "fetch.max.bytes": 64 * 1024 * 1024,
        # No group is ever joined (manual assignment): this only bounds how long a commit waits for an unreachable
        # group coordinator, and close() for such a commit still in flight
        "session.timeout.ms": 5000,
        "logger": quiet, "error_cb": lambda err: quiet.debug("librdkafka: %s", err),
    }
    conf.update(overrides)
    c = Consumer(conf)
    try:
        c.list_topics(timeout=connect_timeout)
    except KafkaException as exc:
        c.close()
        raise unreachable(settings, exc) from exc
    return c


def ensure_topics(settings: Settings, pipeline: Pipeline) -> list[str]:
    """Create every source topic and its dead-letter topic (same partition count). Returns those created."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    wanted: list[str] = []
    for s in pipeline.sources:
        wanted += [s.topic, s.dlq_topic]
    admin = admin_client(settings)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        created = []
        for t in missing:
            try:
                admin.create_topics([NewTopic(t, settings.partitions, 1 if settings.bootstrap_is_embedded
                                              else _replication(admin))])
                created.append(t)
            except TopicAlreadyExistsError:
                pass
        _wait_for_leaders(settings, wanted)
        return created
    finally:
        admin.close()


def _replication(admin) -> int:
    try:
        brokers = admin.describe_cluster().get("brokers", [])
        return min(3, max(1, len(brokers)))
    except Exception:  # noqa: BLE001 - best effort; 1 always works
        return 1


def _wait_for_leaders(settings: Settings, topics: Iterable[str], timeout: float = 30.0) -> None:
    """Block until every partition of ``topics`` has a leader, so the first produce does not fail."""
    c = consumer(settings)
    try:
        deadline = time.monotonic() + timeout
        pending = set(topics)
        while pending and time.monotonic() < deadline:
            for t in list(pending):
                parts = c.partitions_for_topic(t)
                if parts:
                    pending.discard(t)
            if pending:
                time.sleep(0.2)
        if pending:
            raise BrokerError(f"topics {sorted(pending)} have no partition leaders after {timeout:.0f}s")
    finally:
        c.close()


def end_offsets(settings: Settings, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """Current end offset of every partition of ``topics``: {(topic, partition): end}."""
    from kafka import TopicPartition

    c = consumer(settings)
    try:
        tps = []
        for t in topics:
            for p in sorted(c.partitions_for_topic(t) or ()):
                tps.append(TopicPartition(t, p))
        return {(tp.topic, tp.partition): off for tp, off in c.end_offsets(tps).items()} if tps else {}
    finally:
        c.close()


def committed_counts(settings: Settings, topics: Iterable[str], timeout: float = 60.0) -> dict[tuple[str, int], int]:
    """The number of committed records in every partition of ``topics``, read to the end: what a dead-letter topic
    holds (its offsets also number transaction markers and aborted records, so ``end - start`` over-counts).
    Reads every record: meant for the small dead-letter topics. Raises :class:`BrokerError`."""
    from confluent_kafka import KafkaError, KafkaException, TopicPartition

    c = librdkafka_consumer(settings, **{"isolation.level": "read_committed", "enable.partition.eof": True})
    try:
        counts: dict[tuple[str, int], int] = {}
        tps = []
        for t in topics:
            meta = c.list_topics(t, timeout=timeout).topics.get(t)
            if meta is None or meta.error is not None:
                continue
            for p in sorted(meta.partitions):
                lo, hi = c.get_watermark_offsets(TopicPartition(t, p), timeout=timeout, cached=False)
                counts[(t, p)] = 0
                if hi > lo:
                    tps.append(TopicPartition(t, p, lo))
        if tps:
            c.assign(tps)
        waiting = {(tp.topic, tp.partition) for tp in tps}
        deadline = time.monotonic() + timeout
        while waiting:
            if time.monotonic() > deadline:
                raise BrokerError(f"could not count the records of {sorted(waiting)} within {timeout:.0f}s")
            for m in c.consume(10_000, timeout=0.5):
                key = (m.topic(), m.partition())
                if m.error() is None:
                    counts[key] += 1
                elif m.error().code() == KafkaError._PARTITION_EOF:
                    waiting.discard(key)
        return counts
    except KafkaException as exc:
        raise unreachable(settings, exc) from exc
    finally:
        c.close()
