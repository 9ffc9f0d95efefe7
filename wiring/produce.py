"""Sending messages to Kafka: what ``lambdalake produce`` (the demo stream, :mod:`wiring.demo_stream`) and
``lambdalake load`` (a file's rows, :mod:`wiring.load_file`) hand to :func:`send`, and what it reports.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from lambdalake.clients import producer_config
from lambdalake.config import Settings
from lambdalake.exceptions import ConfigError


@dataclass(slots=True)
class Message:
    topic: str
    key: bytes | None
    value: bytes | None
    kind: str  # "valid" | "duplicate" | "malformed:<what>"


@dataclass
class ProduceReport:
    sent: Counter = field(default_factory=Counter)  # valid | duplicate | malformed | row -> messages
    malformed: Counter = field(default_factory=Counter)  # what was wrong -> messages
    per_topic: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.sent.values())


def send(settings: Settings, messages: Iterable[Message], *, rate: float | None = None,
         total: int | None = None, progress: bool = True) -> ProduceReport:
    """Send messages (acks=all, idempotent producer; per-key order kept) at up to ``rate`` messages/s; returns what
    was sent once every message is acknowledged, or raises :class:`BrokerError` if any was not."""
    from confluent_kafka import KafkaException, Producer
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lambdalake.clients import unreachable
    from lambdalake.exceptions import BrokerError

    if rate is not None and rate <= 0:
        raise ConfigError(f"--rate {rate} must be > 0 (messages per second)")
    failures: list[object] = []

    def on_error(err: object, msg: object) -> None:  # called for failed deliveries only
        failures.append(err)

    prod = Producer(producer_config(settings, **{"delivery.report.only.error": True, "on_delivery": on_error}))
    try:
        prod.list_topics(timeout=5)
    except KafkaException as exc:
        raise unreachable(settings, exc) from exc
    report = ProduceReport()
    sent, malformed, per_topic = report.sent, report.malformed, report.per_topic
    produce, poll = prod.produce, prod.poll
    t0 = time.monotonic()
    bar = Progress(TextColumn("producing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress, transient=True)
    left, flushed = 0, False
    try:
        with bar:
            task = bar.add_task("produce", total=total)
            i = 0
            for i, m in enumerate(messages, 1):
                while True:
                    try:
                        produce(m.topic, m.value, m.key)
                        break
                    except BufferError:  # the local queue is full: let the producer send some
                        poll(0.05)
                kind = m.kind
                if kind == "valid" or kind == "row":
                    sent[kind] += 1
                else:
                    kind, _, what = kind.partition(":")
                    sent[kind] += 1
                    if what:
                        malformed[what] += 1
                per_topic[m.topic] += 1
                if rate is not None:
                    ahead = i / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
                if i % 1024 == 0:
                    poll(0)
                    bar.update(task, completed=i)
            left, flushed = prod.flush(150), True
            bar.update(task, completed=report.total)
    except KafkaException as exc:
        raise BrokerError(f"Kafka refused a message: {exc}") from exc
    finally:
        if not flushed:
            prod.flush(30)  # interrupted or failed: what was handed over still goes out
    if failures or left:
        first = f"; first error: {failures[0]}" if failures else ""
        raise BrokerError(f"{len(failures) + left} messages were not acknowledged by Kafka{first}")
    report.seconds = time.monotonic() - t0
    return report

