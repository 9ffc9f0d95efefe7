"""The demo generator and the file loader, against the real broker; counts checked by the oracle."""

from __future__ import annotations

import json
from datetime import timedelta

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lambdalake.clients import ensure_topics
from lambdalake.instants import parse_rfc3339_us
from lambdalake.pipeline import load_pipeline
from tests.oracle import oracle_counts, read_log
from wiring.demo_stream import LATE_MAX, demo_messages
from wiring.produce import Message, send

DEMO = load_pipeline("lambdalake.pipelines.clickstream")


def test_generator_is_deterministic_and_has_the_promised_shape():
    a = list(demo_messages(DEMO, 4000, seed=3))
    b = list(demo_messages(DEMO, 4000, seed=3))
    c = list(demo_messages(DEMO, 4000, seed=4))
    assert [(m.topic, m.key, m.value) for m in a] == [(m.topic, m.key, m.value) for m in b]
    assert [m.value for m in a] != [m.value for m in c]
    kinds = [m.kind.split(":")[0] for m in a]
    assert kinds.count("valid") == 4000 and kinds.count("duplicate") == 80 and kinds.count("malformed") == 40
    valid = [orjson.loads(m.value) for m in a if m.kind == "valid"]
    assert len({d["event_id"] for d in valid}) == 4000
    times = [parse_rfc3339_us(d["event_time"]) for d in valid]
    span = max(times) - min(times)
    assert span >= 2 * 86_400 * 10**6  # several days
    # late events: behind the running maximum, never by more than 3 hours
    running, late = times[0], 0
    for t in times:
        if t < running:
            late += 1
            assert running - t <= LATE_MAX // timedelta(microseconds=1) + span // 4000 * 2
        running = max(running, t)
    assert 0.02 * 4000 < late < 0.1 * 4000
    # duplicates are byte-identical re-sends of a recent valid message with the same key
    recent = {}
    for i, m in enumerate(a):
        if m.kind == "valid":
            recent[m.value] = (i, m.key)
        elif m.kind == "duplicate":
            j, key = recent[m.value]
            assert key == m.key and i - j < 400
    # zipf: the most popular url is far more common than the median one
    urls = [d["url"] for d in valid if "url" in d]
    counts = sorted((urls.count(u) for u in set(urls)), reverse=True)
    assert counts[0] > 10 * counts[len(counts) // 2]


def test_produce_cli_sends_exactly_what_it_promises(run_cli, settings, pipeline):
    res = run_cli("produce", "--events", "3000", "--duplicate-fraction", "0.05", "--malformed-fraction", "0.02",
                  "--seed", "11")
    assert "sent 3210 messages" in res.stdout
    counts = oracle_counts(pipeline, read_log(settings.bootstrap, [s.topic for s in pipeline.sources]))
    assert sum(c["valid"] for c in counts.values()) == 3000
    assert sum(c["duplicates"] for c in counts.values()) == 150
    assert sum(c["invalid"] for c in counts.values()) == 60
    topics = run_cli("topics")
    pv = counts[pipeline.source("pageviews").topic]
    assert f"{pv['messages']}" in topics.stdout and f"{pv['valid']}" in topics.stdout


def test_load_sends_csv_parquet_and_jsonl_rows(run_cli, settings, pipeline, tmp_path):
    rows = [{"event_id": f"l{i}", "event_time": f"2026-01-0{1 + i % 3}T10:00:00Z", "user_id": f"u{i % 7}",
             "product_id": "sku-1", "amount_cents": 100 + i, "currency": "EUR"} for i in range(30)]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows[:10]) + "\nnot json\n")
    csv = tmp_path / "p.csv"
    csv.write_text("event_id,event_time,user_id,product_id,amount_cents,currency\n" + "".join(
        f"{r['event_id']},{r['event_time']},{r['user_id']},{r['product_id']},{r['amount_cents']},{r['currency']}\n"
        for r in rows[10:20]))
    table = pa.Table.from_pylist(rows[20:])
    table = table.set_column(1, "event_time", pa.array([parse_rfc3339_us(r["event_time"]) for r in rows[20:]],
                                                       pa.timestamp("us", tz="UTC")))
    pq.write_table(table, tmp_path / "p.parquet")
    for f in ("p.jsonl", "p.csv", "p.parquet"):
        run_cli("load", str(tmp_path / f), "--source", "purchases")
    topic = pipeline.source("purchases").topic
    counts = oracle_counts(pipeline, read_log(settings.bootstrap, [topic]))[topic]
    assert counts == {"messages": 31, "valid": 30, "duplicates": 0, "invalid": 1}
    msgs = read_log(settings.bootstrap, [topic])
    assert {m.key for m in msgs if m.value != b"not json"} == {f"u{i}".encode() for i in range(7)}


def test_load_sends_declared_string_columns_as_strings(run_cli, settings, pipeline, tmp_path):
    # numeric-looking ids in a CSV and an integer id column in Parquet: declared strings, so sent as strings
    csv = tmp_path / "ids.csv"
    csv.write_text("event_id,event_time,user_id,product_id,amount_cents,currency\n"
                   + "".join(f"{100 + i},2026-01-01T10:00:00Z,{i:05d},{7 + i},{10 + i},EUR\n" for i in range(5)))
    pq.write_table(pa.table({"event_id": [200, 201], "event_time": ["2026-01-01T11:00:00Z"] * 2,
                             "user_id": [1, 2], "product_id": [3, 4], "amount_cents": [5, 6],
                             "currency": ["USD", "USD"]}), tmp_path / "ids.parquet")
    for f in ("ids.csv", "ids.parquet"):
        run_cli("load", str(tmp_path / f), "--source", "purchases")
    topic = pipeline.source("purchases").topic
    msgs = read_log(settings.bootstrap, [topic])
    counts = oracle_counts(pipeline, msgs)[topic]
    assert counts == {"messages": 7, "valid": 7, "duplicates": 0, "invalid": 0}
    docs = [json.loads(m.value) for m in msgs]
    assert {d["user_id"] for d in docs} >= {"00000", "00004", "1", "2"}  # leading zeros kept
    assert all(isinstance(d["amount_cents"], int) for d in docs)


def test_send_keeps_each_key_in_order_on_the_partition_kafka_clients_choose(settings, pipeline):
    """The producer of `produce`/`load` (librdkafka) puts a key where Kafka's Java client and kafka-python do
    (murmur2), so a subject's events share a partition whoever sent them, and keeps their order."""
    from kafka.partitioner.default import murmur2

    ensure_topics(settings, pipeline)
    msgs = list(demo_messages(pipeline, 3000, seed=5))
    report = send(settings, iter(msgs), progress=False)
    assert report.total == len(msgs) == sum(report.per_topic.values())
    topics = [s.topic for s in pipeline.sources]
    log = read_log(settings.bootstrap, topics)
    assert len(log) == len(msgs)
    sent_order: dict[tuple[str, bytes], list[bytes]] = {}
    for m in msgs:
        sent_order.setdefault((m.topic, m.key), []).append(m.value)
    logged: dict[tuple[str, bytes], list[bytes]] = {}
    for r in sorted(log, key=lambda r: (r.topic, r.partition, r.offset)):
        assert r.partition == (murmur2(r.key) & 0x7FFFFFFF) % 4, r
        logged.setdefault((r.topic, r.key), []).append(r.value)
    assert logged == sent_order


def test_a_message_the_broker_refuses_fails_the_send(settings, unique_suffix):
    """Delivery is checked: a message the broker does not acknowledge (here: above the topic's size limit) makes
    `send` raise a BrokerError, so `lambdalake produce` / `load` exit with an error."""
    from kafka.admin import NewTopic

    from lambdalake.clients import admin_client
    from lambdalake.exceptions import BrokerError

    topic = f"small.{unique_suffix}"
    admin = admin_client(settings)
    try:
        admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": "2000"})])
    finally:
        admin.close()
    assert send(settings, iter([Message(topic, b"k", b"small", "row")]), progress=False).total == 1
    with pytest.raises(BrokerError, match="1 messages were not acknowledged by Kafka; first error: .*SIZE_TOO_LARGE"):
        send(settings, iter([Message(topic, b"k", b"x" * 20_000, "row")]), progress=False)
    assert [m.value for m in read_log(settings.bootstrap, [topic])] == [b"small"]
