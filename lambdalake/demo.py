"""``make run``: the end-to-end demo on embedded defaults.

It starts the embedded Kafka broker (unless one is running or ``LAMBDALAKE_BOOTSTRAP`` points elsewhere),
creates the topics, produces a demo stream, runs whatever layers are installed, prints what happened, and stops
what it started — also on Ctrl-C or failure.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from lambdalake.config import Settings, load_settings
from lambdalake.kafka import EmbeddedBroker, ensure_topics, free_port, port_open


@contextlib.contextmanager
def embedded_kafka(home: Path | None, port: int | None, console: Console) -> Iterator[Settings]:
    """Settings pointing at a running broker; starts (and later stops) the embedded one if needed."""
    if os.environ.get("LAMBDALAKE_BOOTSTRAP"):
        settings = load_settings(home=home)
        console.print(f"using the Kafka cluster at {settings.bootstrap} (LAMBDALAKE_BOOTSTRAP)")
        yield settings
        return
    base = load_settings(home=home, bootstrap="127.0.0.1:1")
    broker = EmbeddedBroker(base.home)
    if broker.running_pid() is not None:
        settings = load_settings(home=home)
        console.print(f"using the embedded Kafka broker already running at {settings.bootstrap}")
        yield settings
        return
    if port is None:
        port = 9092 if not (port_open("127.0.0.1", 9092) or port_open("127.0.0.1", 9093)) else free_port()
    broker = EmbeddedBroker(base.home, port=port, controller_port=free_port() if port != 9092 else None,
                            tied_to_parent=True)
    with console.status(f"starting the embedded Kafka broker (Apache Kafka, KRaft) on port {port} ..."):
        state = broker.up()
    console.print(f"started Kafka broker pid {state['pid']} at {state['bootstrap']} (log: {state['log']})")
    try:
        yield load_settings(home=home, bootstrap=state["bootstrap"])
    finally:
        with console.status("stopping the Kafka broker ..."):
            broker.down()
        console.print("stopped the Kafka broker")


def run_demo(events: int, rate: float | None, port: int | None, home: Path | None, console: Console) -> None:
    from lambdalake.cli import Context, print_report, print_topic_counts
    from lambdalake.pipeline import load_pipeline
    from lambdalake.produce import demo_messages, send

    console.print(Rule("lambdalake demo"))
    with embedded_kafka(home, port, console) as settings:
        pipeline = load_pipeline(settings.pipeline)
        ctx = Context(settings, pipeline)
        created = ensure_topics(settings, pipeline)
        if created:
            console.print(f"created topics: {', '.join(created)}")
        console.print(Rule("1. producing the demo stream (late, duplicated and malformed events included)"))
        # A new seed per run on the same log, so a second `make run` adds new events instead of duplicates.
        from lambdalake.kafka import end_offsets

        seed = 42 + sum(end_offsets(settings, [s.topic for s in pipeline.sources]).values())
        messages = demo_messages(pipeline, events, seed=seed)
        total = events + round(events * 0.02) + round(events * 0.01)
        print_report(send(settings, messages, rate=rate, total=total, progress=True))
        console.print(Rule("2. what is in the log now"))
        print_topic_counts(ctx)
        console.print("Each valid event counts once; duplicates (same event_id in the same partition) and invalid "
                      "messages do not. The archiver writes invalid ones to <topic>.dlq with the reason.")
