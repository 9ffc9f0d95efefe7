"""Speed-bench baselines: the producers and the raw Kafka fetches the speed layer is measured against.

``produce_all`` is ``lambdalake produce``'s sender (librdkafka), ``produce_kafka_python`` the previous one;
``raw_fetch`` reads with kafka-python (the speed layer's consumer settings), alone or plus the validator and the
dedup window; ``raw_fetch_confluent*`` read with librdkafka (the archiver's client), in one process or several.
A sibling module of ``bench_speed.py`` (the script's directory is on ``sys.path``), not a script.
"""

from __future__ import annotations

import time

from lambdalake.clients import consumer, end_offsets, producer
from lambdalake.dedup import DedupWindow
from lambdalake.pipeline import load_pipeline
from lambdalake.validation import Validator
from wiring.demo_stream import demo_messages
from wiring.produce import send


def produce_all(settings, pipe, n: int) -> dict:
    """``lambdalake produce``'s sender (:func:`wiring.produce.send`, librdkafka) over pre-generated messages."""
    msgs = list(demo_messages(pipe, n, seed=1))
    report = send(settings, iter(msgs), progress=False)
    return {"messages": report.total, "seconds": round(report.seconds, 3),
            "per_second": round(report.total / report.seconds)}


def produce_kafka_python(settings, pipe, n: int) -> dict:
    """The previous sender: one kafka-python producer (acks=all, idempotent) — the baseline of ``produce_all``."""
    msgs = list(demo_messages(pipe, n, seed=1))
    prod = producer(settings)
    t0 = time.perf_counter()
    for m in msgs:
        prod.send(m.topic, key=m.key, value=m.value)
    prod.flush()
    dt = time.perf_counter() - t0
    prod.close()
    return {"messages": len(msgs), "seconds": round(dt, 3), "per_second": round(len(msgs) / dt)}


def read_all(settings, topics: list[str], each, max_poll_records: int = 20_000) -> tuple[int, float]:
    """kafka-python (the speed layer's consumer settings) reading every partition of ``topics`` from offset 0 to the
    end offsets seen now, calling ``each(tp, records)`` per polled batch: (messages, seconds from the first poll)."""
    from kafka import TopicPartition

    ends = end_offsets(settings, topics)
    c = consumer(settings, fetch_max_wait_ms=100, max_poll_records=max_poll_records, check_crcs=False)
    try:
        tps = [TopicPartition(t, p) for (t, p) in ends]
        c.assign(tps)
        for tp in tps:
            c.seek(tp, 0)
        todo = {tp for tp in tps if ends[(tp.topic, tp.partition)] > 0}
        n = 0
        t0 = time.perf_counter()
        while todo:
            for tp, recs in c.poll(timeout_ms=200).items():
                n += len(recs)
                each(tp, recs)
                if recs[-1].offset + 1 >= ends[(tp.topic, tp.partition)]:
                    todo.discard(tp)
        return n, time.perf_counter() - t0
    finally:
        c.close()


def raw_fetch(settings, pipe, validate: bool, dedup: bool = False) -> dict:
    """kafka-python reading every partition from offset 0 to its end (:func:`read_all`); with ``validate`` plus the
    compiled validator on every message; with ``dedup`` also the dedup rule's window
    (:class:`lambdalake.dedup.DedupWindow`, the speed layer's span) on every valid one: the least per-event work the
    speed layer owes before it aggregates anything."""
    from speed.consumer import SpeedOptions

    validators = {s.topic: Validator(s) for s in pipe.sources}
    event_ids = {s.topic: s.event_id for s in pipe.sources}
    windows: dict = {}

    def each(tp, recs) -> None:
        if dedup:
            key = (tp.topic, tp.partition)
            if key not in windows:
                windows[key] = DedupWindow(SpeedOptions().dedup_span)
            v, eid, seen = validators[tp.topic], event_ids[tp.topic], windows[key].seen
            for r in recs:
                verdict = v(r.value)
                if verdict.ok:
                    seen(verdict.record[eid], r.offset)
        elif validate:
            v = validators[tp.topic]
            for r in recs:
                v(r.value)

    n, dt = read_all(settings, [s.topic for s in pipe.sources], each)
    return {"messages": n, "seconds": round(dt, 3), "per_second": round(n / dt)}


def raw_fetch_confluent(settings, pipe, validate: bool) -> dict:
    """The same topics read by librdkafka (confluent-kafka): manual ``assign`` at offset 0 (no group rebalance),
    auto-commit off, ``consume(num_messages=...)`` batches — the other client's ceiling on this machine; with
    ``validate``, plus the compiled validator on every message."""
    ends = end_offsets(settings, [s.topic for s in pipe.sources])
    n, t0, t1 = _confluent_fetch(settings, pipe, ends, validate)
    return {"messages": n, "seconds": round(t1 - t0, 3), "per_second": round(n / (t1 - t0))}


def _confluent_fetch(settings, pipe, ends: dict, validate: bool) -> tuple[int, float, float]:
    """Read the partitions ``ends`` from offset 0 to their end: (messages, start, end) on the wall clock."""
    from confluent_kafka import Consumer, TopicPartition

    validators = {s.topic: Validator(s) for s in pipe.sources}
    c = Consumer({"bootstrap.servers": settings.bootstrap, "group.id": "bench-raw-fetch",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    c.assign([TopicPartition(t, p, 0) for (t, p) in ends])
    total = sum(ends.values())  # fresh topics from a non-transactional producer: every offset holds a record
    n = 0
    t0 = time.time()
    while n < total:
        msgs = c.consume(num_messages=20_000, timeout=0.2)
        n += len(msgs)
        if validate:
            for m in msgs:
                validators[m.topic()](m.value())
    t1 = time.time()
    c.close()
    return n, t0, t1


def _confluent_fetch_share(settings, share: int, of: int, validate: bool) -> tuple[int, float, float]:
    pipe = load_pipeline(settings.pipeline)
    ends = end_offsets(settings, [s.topic for s in pipe.sources])
    return _confluent_fetch(settings, pipe, {k: e for k, e in ends.items() if k[1] % of == share}, validate)


def raw_fetch_confluent_processes(settings, processes: int, validate: bool) -> dict:
    """``processes`` librdkafka readers at once, each over its share of the partitions (like ``ingest --workers``):
    what this machine fetches in all, from the first reader's start to the last one's end (process start-up not
    included)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        got = pool.starmap(_confluent_fetch_share, [(settings, i, processes, validate) for i in range(processes)])
    n = sum(g[0] for g in got)
    dt = max(g[2] for g in got) - min(g[1] for g in got)
    return {"processes": processes, "messages": n, "seconds": round(dt, 3), "per_second": round(n / dt)}


def read_values(settings, topic: str) -> list[tuple[str, bytes | None]]:
    """Every message value of ``topic`` (:func:`read_all`)."""
    out: list[tuple[str, bytes | None]] = []
    read_all(settings, [topic], lambda tp, recs: out.extend((tp.topic, r.value) for r in recs), 50_000)
    return out
