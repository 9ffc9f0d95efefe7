"""The log session's two clients (lambdalake/session.py) against the real broker: kafka-python (the speed layer's)
and librdkafka (the archiver's) must give every reader the same answers — where a read starts after Kafka retention
deleted offsets (said once), "read up to" across transaction markers, pause, new partitions, the full record kept
for a dead letter — and an unreachable broker is one line."""

from __future__ import annotations

import logging
import time
import uuid

import pytest

from lambdalake.config import load_settings
from lambdalake.exceptions import BrokerError
from lambdalake.session import CLIENTS, LibrdkafkaClient, LogRecord, LogSession, connect

pytestmark = pytest.mark.integration


@pytest.fixture
def admin(settings):
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": settings.bootstrap})


def new_topic(admin, partitions: int = 1) -> str:
    from confluent_kafka.admin import NewTopic

    name = f"logclient.{uuid.uuid4().hex[:10]}"
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(30)
    return name


def send(settings, topic: str, values: list[bytes], *, partition: int = 0, transactional: bool = False,
         **kw) -> None:
    from confluent_kafka import Producer

    conf = {"bootstrap.servers": settings.bootstrap, "logger": logging.getLogger("kafka.librdkafka")}
    if transactional:
        conf["transactional.id"] = f"test-{uuid.uuid4().hex[:8]}"
    p = Producer(conf)
    if transactional:
        p.init_transactions(30)
        p.begin_transaction()
    for v in values:
        p.produce(topic, v, partition=partition, **kw)
    if transactional:
        p.commit_transaction(30)
    assert p.flush(30) == 0


def session(settings, client: str, topic: str, notify=None) -> LogSession:
    return LogSession(connect(settings, group_id=f"test-{client}", client=client), [topic],
                      bootstrap=settings.bootstrap, reader="the test", lost_means="gone", notify=notify)


def read(s: LogSession, key, until: int, timeout: float = 20.0) -> list:
    """(offset, value, record) polled on ``key`` until the session's position reaches ``until``."""
    got: list = []
    deadline = time.monotonic() + timeout
    while not s.reached(key, until):
        assert time.monotonic() < deadline, f"position of {key} never reached {until}; read {len(got)}"
        for k, offsets, values, records in s.poll(0.2, 1000):
            assert k == key
            got += zip(offsets, values, records, strict=True)
    return got


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_retention_start_reached_across_a_transaction_marker_and_pause(settings, admin, client):
    from confluent_kafka import TopicPartition

    topic = new_topic(admin)
    key = (topic, 0)
    send(settings, topic, [b"v%d" % i for i in range(6)])
    admin.delete_records([TopicPartition(topic, 0, 4)])[TopicPartition(topic, 0, 4)].result(30)
    send(settings, topic, [b"t0", b"t1"], transactional=True)  # offsets 6, 7 and the commit marker at 8
    said: list[str] = []
    s = session(settings, client, topic, notify=said.append)
    try:
        assert s.partitions() == [key]
        assert s.assign({key: 2}) == {key: 4}  # offsets 2, 3 were deleted by retention: said once
        assert said == [f"{topic}[0]: offsets [2, 4) were deleted by Kafka retention before the test read them; "
                        "gone"]
        assert s.end_offsets() == {key: 9}
        got = read(s, key, 9)  # only the consumer's position passes the marker: no record has offset 8
        assert [(o, v) for o, v, _ in got] == [(4, b"v4"), (5, b"v5"), (6, b"t0"), (7, b"t1")]
        # covered offsets (held elsewhere) are not reported; from the marker on, only the position moves
        assert s.assign({key: 2}, covered={key: 4}) == {key: 4} and len(said) == 1
        assert s.assign({key: 8}) == {key: 8}
        assert read(s, key, 9) == []
        # a paused partition has not reached anything, and stays paused when assigned again
        s.pause(key)
        assert not s.reached(key, 0)
        s.assign({key: 8})
        assert not s.reached(key, 0) and s.poll(0.5, 1000) == []
    finally:
        s.close()


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_records_new_partitions_and_commit(settings, admin, client):
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import NewPartitions

    topic = new_topic(admin)
    send(settings, topic, [b"a", None], key=b"k1", headers=[("h", b"x"), ("n", None)], timestamp=1_700_000_000_123)
    s = session(settings, client, topic)
    try:
        s.assign({})
        got = read(s, (topic, 0), 2)
        assert [s.record(r) for _, _, r in got] == [
            LogRecord(topic, 0, 0, 1_700_000_000_123, b"k1", b"a", [("h", b"x"), ("n", None)]),
            LogRecord(topic, 0, 1, 1_700_000_000_123, b"k1", None, [("h", b"x"), ("n", None)])]
        assert s.new_partitions() == set()
        admin.create_partitions([NewPartitions(topic, 2)])[topic].result(30)
        deadline = time.monotonic() + 15
        while not s.new_partitions():
            assert time.monotonic() < deadline, "the new partition never showed"
            time.sleep(0.2)
        assert s.new_partitions() == {(topic, 1)}
        send(settings, topic, [b"p1"], partition=1)
        assert s.assign({(topic, 0): 2}) == {(topic, 0): 2, (topic, 1): 0}
        assert [(o, v) for o, v, _ in read(s, (topic, 1), 1)] == [(0, b"p1")]
        s.commit({(topic, 0): 2, (topic, 1): 1}, wait=True)
    finally:
        s.close()
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": settings.bootstrap, "group.id": f"test-{client}"})
    try:  # the lag-monitoring commit landed (never read back by lambdalake)
        got = c.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=15)
        assert [tp.offset for tp in got] == [2, 1]
    finally:
        c.close()


def test_unreachable_broker_is_one_line(lake):
    t0 = time.monotonic()
    with pytest.raises(BrokerError) as err:
        LibrdkafkaClient.open(load_settings(home=lake, bootstrap="127.0.0.1:1"), "test", 1.0)
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("cannot reach Kafka at 127.0.0.1:1 (KafkaException)")
