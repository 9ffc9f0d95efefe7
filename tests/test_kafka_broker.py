"""The embedded broker: real Apache Kafka started, stopped and found by the project's own commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from lambdalake.clients import end_offsets, ensure_topics
from lambdalake.embedded import free_port

LAMBDALAKE = str(Path(sys.executable).parent / "lambdalake")


def test_session_broker_creates_pipeline_topics_with_partitions_and_dlqs(settings, pipeline):
    created = ensure_topics(settings, pipeline)
    assert sorted(created) == sorted([t for s in pipeline.sources for t in (s.topic, s.dlq_topic)])
    assert ensure_topics(settings, pipeline) == []  # idempotent
    ends = end_offsets(settings, created)
    assert sorted({p for (_, p) in ends}) == [0, 1, 2, 3] and set(ends.values()) == {0}


@pytest.mark.integration
def test_kafka_up_status_down_cli_lifecycle(tmp_path):
    """`lambdalake kafka up|status|down` on its own port and lake: no orphan JVM afterwards."""
    env = {k: v for k, v in os.environ.items() if k != "LAMBDALAKE_BOOTSTRAP"}
    env["LAMBDALAKE_HOME"] = str(tmp_path / "lake")
    port, cport = free_port(), free_port()

    def cli(*args, check=True):
        res = subprocess.run([LAMBDALAKE, *args], env=env, capture_output=True, text=True, timeout=180)
        if check:
            assert res.returncode == 0, res.stderr + res.stdout
        return res

    try:
        up = cli("kafka", "up", "--port", str(port), "--controller-port", str(cport))
        assert f"127.0.0.1:{port}" in up.stdout
        state = json.loads((tmp_path / "lake" / "kafka" / "broker.json").read_text())
        pid = state["pid"]
        assert psutil.pid_exists(pid)
        assert "running" in cli("kafka", "status").stdout
        # idempotent: a second `up` reports the running broker instead of starting another
        assert f"pid {pid}" in cli("kafka", "up", "--port", str(port), "--controller-port", str(cport)).stdout
        # other commands find the embedded broker through its state file, no configuration needed
        topics = cli("topics", "--no-count")
        assert "clickstream.pageviews" in topics.stdout
    finally:
        cli("kafka", "down", check=False)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    st = cli("kafka", "status", check=False)
    assert st.returncode == 1 and "not running" in st.stdout
    # a restart reuses the formatted storage and keeps the topics
    try:
        cli("kafka", "up", "--port", str(port), "--controller-port", str(cport))
        res = cli("topics")
        assert "clickstream.pageviews" in res.stdout
    finally:
        cli("kafka", "down", check=False)


def test_port_in_use_is_a_clear_error(tmp_path, kafka_broker):
    env = {k: v for k, v in os.environ.items() if k != "LAMBDALAKE_BOOTSTRAP"}
    env["LAMBDALAKE_HOME"] = str(tmp_path / "lake")
    port = kafka_broker.rsplit(":", 1)[1]
    res = subprocess.run([LAMBDALAKE, "kafka", "up", "--port", port], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0
    assert f"port {port} is already in use" in res.stderr and "Traceback" not in res.stderr
