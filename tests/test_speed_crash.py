"""Speed layer crash safety: ``kill -9`` of the real ``lambdalake speed`` process — at random instants of a live
stream, and deterministically at every step of the checkpoint commit protocol — followed by a restart gives exactly
the oracle's result. Every snapshot a reader could see in between is exact for its own positions.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from lambdalake import contracts
from lambdalake.clients import end_offsets, ensure_topics
from lambdalake.layout import Layout, read_speed_snapshot_meta, speed_pointer, tmp_name
from speed.checkpoint import Checkpoint, CheckpointPointer
from speed.snapshot import snapshot_id
from tests.oracle import read_log
from tests.test_speed import (
    all_positions_at_end,
    assert_snapshot_equals_oracle,
    kill,
    produce,
    start_speed,
    topics,
    wait_for,
)


def committed_checkpoint(layout: Layout) -> str:
    return contracts.read(layout.checkpoints("speed") / "CURRENT", CheckpointPointer).checkpoint


def _no_orphans(home) -> None:
    """After recovery nothing of an interrupted commit is left: no staging dirs, nothing newer than the checkpoint."""
    layout = Layout(home)
    cp = committed_checkpoint(layout)
    assert speed_pointer(layout) == cp
    for d in (layout.speed_views, layout.checkpoints("speed")):
        names = [p.name for p in d.iterdir()]
        assert not [n for n in names if n.endswith(".tmp")], names
        assert not [n for n in names if n.isdigit() and n > cp], (cp, names)


@pytest.mark.integration
@pytest.mark.slow
def test_kill9_at_random_points_of_a_live_stream(settings, pipeline, cli_env, tmp_path):
    rng = random.Random(1234)
    ensure_topics(settings, pipeline)
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            produce(settings, pipeline, 4000, seed=21, rate=900)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=stream)
    t.start()
    layout = Layout(settings.home)
    kills = 0
    proc = None
    try:
        while t.is_alive() or kills < 4:
            proc = start_speed(cli_env, tmp_path / "logs", "--no-group", "--checkpoint-interval", "0.02")
            time.sleep(rng.uniform(0.5, 1.5))  # start-up (imports, connect) takes ~0.5-1 s
            assert proc.poll() is None, (tmp_path / "logs").glob("*.out")
            kill(proc)  # SIGKILL: no final checkpoint, possibly mid-commit
            kills += 1
            if speed_pointer(layout) is not None:
                # Whatever is visible after a crash is exact for its own positions.
                assert_snapshot_equals_oracle(pipeline, settings.home, read_log(settings.bootstrap, topics(pipeline)))
        t.join()
        assert not errors, errors
        proc = start_speed(cli_env, tmp_path / "logs", "--until-caught-up", "--checkpoint-interval", "0.02")
        assert proc.wait(120) == 0
    finally:
        if proc is not None:
            kill(proc)
        t.join(120)
    assert kills >= 4
    msgs = read_log(settings.bootstrap, topics(pipeline))
    meta = assert_snapshot_equals_oracle(pipeline, settings.home, msgs)
    all_positions_at_end(meta, end_offsets(settings, topics(pipeline)), pipeline)
    _no_orphans(settings.home)


@pytest.mark.integration
@pytest.mark.parametrize("step", [2, 3, 4, 5, 6, 7])
def test_kill9_at_each_commit_step(settings, pipeline, cli_env, tmp_path, step):
    """LAMBDALAKE_SPEED_FAULT makes the process SIGKILL itself right before commit step <step> of its 2nd
    checkpoint (ids are a sequence: a fresh lake's checkpoints are 1, 2, ...)."""
    produce(settings, pipeline, 900, seed=31)
    layout = Layout(settings.home)
    proc = start_speed(cli_env, tmp_path / "logs", "--no-group", "--checkpoint-interval", "0.05",
                       env={"LAMBDALAKE_SPEED_FAULT": f"{step}:2"})
    try:
        wait_for(lambda: speed_pointer(layout), 60, "the first checkpoint")
        produce(settings, pipeline, 600, seed=32, start="2026-01-05T12:00:00Z")
        assert proc.wait(60) == -9, (tmp_path / "logs" / "speed-0.out").read_text()
    finally:
        kill(proc)
    visible = speed_pointer(layout)
    committed = committed_checkpoint(layout)
    # Before step 5 the first checkpoint stays in force; visible state is never ahead of durable state.
    assert committed == snapshot_id(1 if step <= 5 else 2)
    assert visible == snapshot_id(1 if step <= 6 else 2)
    assert_snapshot_equals_oracle(pipeline, settings.home, read_log(settings.bootstrap, topics(pipeline)))

    proc = start_speed(cli_env, tmp_path / "logs", "--until-caught-up", "--checkpoint-interval", "0.05")
    try:
        assert proc.wait(120) == 0, (tmp_path / "logs" / "speed-1.out").read_text()
    finally:
        kill(proc)
    msgs = read_log(settings.bootstrap, topics(pipeline))
    meta = assert_snapshot_equals_oracle(pipeline, settings.home, msgs)
    all_positions_at_end(meta, end_offsets(settings, topics(pipeline)), pipeline)
    _no_orphans(settings.home)
    cp = contracts.read(layout.checkpoints("speed") / meta.snapshot / "checkpoint.json", Checkpoint)
    assert cp.positions == meta.positions


@pytest.mark.integration
@pytest.mark.slow
def test_broker_outage_mid_run_is_survived(tmp_path, unique_suffix):
    """A broker that goes away while the speed layer runs: it says so, keeps reconnecting with backoff (no crash),
    and carries on exactly once the broker is back."""
    from lambdalake.broker import EmbeddedBroker
    from lambdalake.config import load_settings
    from lambdalake.embedded import free_port
    from lambdalake.pipeline import load_pipeline
    from tests.conftest import write_pipeline_copy

    broker = EmbeddedBroker(tmp_path / "kafka-home", port=free_port(), controller_port=free_port(), heap="512m",
                            tied_to_parent=True)
    broker.up(timeout=120)
    proc = None
    try:
        lake = tmp_path / "lake"
        lake.mkdir()
        settings = load_settings(home=lake, bootstrap=broker.bootstrap, partitions=2,
                                 pipeline=str(write_pipeline_copy(tmp_path, "lambdalake.pipelines.clickstream",
                                                                  unique_suffix))).with_(handoff_block=50)
        pipeline = load_pipeline(settings.pipeline)
        env = {**__import__("os").environ, "LAMBDALAKE_HOME": str(lake), "LAMBDALAKE_BOOTSTRAP": broker.bootstrap,
               "LAMBDALAKE_PIPELINE": settings.pipeline, "LAMBDALAKE_HANDOFF_BLOCK": "50"}
        produce(settings, pipeline, 300, seed=41)
        log = tmp_path / "logs"
        proc = start_speed(env, log, "--no-group", "--checkpoint-interval", "0.1")
        layout = Layout(lake)

        def at_end() -> bool:
            ends = end_offsets(settings, topics(pipeline))
            snap = speed_pointer(layout)
            if snap is None:
                return False
            meta = read_speed_snapshot_meta(layout, snap)
            return all(meta.positions.get((t, p), -1) >= e for (t, p), e in ends.items())

        wait_for(at_end, 60, "speed to consume the first events")
        broker.down(timeout=30)
        wait_for(lambda: "lost the connection to Kafka" in (log / "speed-0.out").read_text(), 60,
                 "the speed layer to report the outage", interval=0.5)
        time.sleep(3)
        assert proc.poll() is None, (log / "speed-0.out").read_text()
        broker.up(timeout=120)
        produce(settings, pipeline, 300, seed=42)
        wait_for(at_end, 120, "speed to catch up after the outage", interval=0.2)
        proc.send_signal(15)
        assert proc.wait(30) == 0
        out = (log / "speed-0.out").read_text()
        assert "reconnected to Kafka" in out and "Traceback" not in out, out
        msgs = read_log(settings.bootstrap, topics(pipeline))
        assert_snapshot_equals_oracle(pipeline, lake, msgs)
    finally:
        if proc is not None:
            kill(proc)
        broker.down(timeout=30)


@pytest.mark.integration
def test_restart_removes_a_pointer_switch_killed_before_its_rename(settings, pipeline, cli_env, tmp_path):
    """A kill -9 inside an atomic write leaves its temp file (``.CURRENT.<hex>.tmp``: written, not yet renamed) next
    to the pointer, in the checkpoint and the snapshot directories; a restart removes them (and a staging directory
    of an unfinished snapshot) and changes nothing else. (A random kill in the test above once hit that window.)"""
    produce(settings, pipeline, 600, seed=41)
    proc = start_speed(cli_env, tmp_path / "logs", "--until-caught-up", "--checkpoint-interval", "0.05")
    try:
        assert proc.wait(120) == 0
    finally:
        kill(proc)
    layout = Layout(settings.home)
    committed = committed_checkpoint(layout)
    left = [tmp_name(layout.checkpoints("speed") / "CURRENT"), tmp_name(layout.speed_pointer)]
    for f in left:
        f.write_bytes(b'{"checkpoint": "0000')  # a torn write: never renamed, never read
    staging = tmp_name(layout.speed_views / "000000009999")
    staging.mkdir()
    (staging / "pageviews_hourly.parquet").write_bytes(b"PAR1")
    produce(settings, pipeline, 300, seed=42, start="2026-01-05T12:00:00Z")
    proc = start_speed(cli_env, tmp_path / "logs", "--until-caught-up", "--checkpoint-interval", "0.05")
    try:
        assert proc.wait(120) == 0, (tmp_path / "logs" / "speed-1.out").read_text()
    finally:
        kill(proc)
    assert not [p for p in [*left, staging] if p.exists()]
    assert committed_checkpoint(layout) > committed
    _no_orphans(settings.home)
    meta = assert_snapshot_equals_oracle(pipeline, settings.home, read_log(settings.bootstrap, topics(pipeline)))
    all_positions_at_end(meta, end_offsets(settings, topics(pipeline)), pipeline)
