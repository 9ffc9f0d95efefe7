"""The test that matters most: the merged view equals the independent oracle at every instant.

Real broker, real archiver and speed processes, each partition-parallel (`lambdalake ingest --workers 2`, two
`lambdalake speed --share I/2` workers), real Spark (`lambdalake batch`), DuckDB serving. A stream with late,
duplicated and malformed events flows while a batch version is computed and published mid-stream; one speed
worker is killed (-9) mid-stream and its partitions are taken over by a new worker (`--partitions 1,3`) while the
batch job runs and the workers prune; meanwhile a reader keeps querying the serving layer.

Every sampled query is checked afterwards, exactly: its merged rows must equal the oracle over the events at
positions below ``max(W[p], S[p])`` of the very (batch version, speed snapshot) pair it read — so nothing was
counted twice and nothing was missing at that instant. At quiescence every view equals the oracle over the
whole log.
"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from lambdalake.clients import end_offsets, ensure_topics
from lambdalake.heads import archived_positions
from lambdalake.layout import Layout, read_batch_manifest
from lambdalake.procs import kill_group, stop_group
from lambdalake.speedset import read_speed_set
from serving import connect
from serving.connection import pair_of
from tests.conftest import LAMBDALAKE
from tests.oracle import assert_rows_equal, oracle_views, read_log
from wiring.demo_stream import demo_messages
from wiring.produce import send

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Daemon:
    """A real `lambdalake <command>` process, always stopped (TERM, then KILL) by :meth:`stop`."""

    def __init__(self, args: list[str], env: dict, log_path):
        self.args, self.env, self.log_path = args, env, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> Daemon:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([LAMBDALAKE, *self.args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        return self

    def kill9(self) -> None:
        if self.proc:
            kill_group(self.proc)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        return stop_group(self.proc, timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def tail(path, lines: int = 80) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def served_snapshot(settings, pipeline) -> dict:
    """One query round on a fresh serving connection: every view + the pair's positions."""
    con = connect(settings=settings, pipeline=pipeline)
    try:
        pair = pair_of(con)
        rows = {v.name: con.execute(f"SELECT * FROM {v.name}").fetchall() for v in pipeline.views}
        w, s = dict(pair.watermark), dict(pair.positions)
    finally:
        con.close()
    covered = {k: max(w.get(k, 0), s.get(k, 0)) for k in set(w) | set(s)}
    return {"rows": rows, "covered": covered, "W": w, "S": s, "t": time.monotonic()}


def test_merged_views_equal_the_oracle_at_every_instant(settings, pipeline, cli_env, tmp_path):
    ensure_topics(settings, pipeline)
    topics = [s.topic for s in pipeline.sources]
    env = {**cli_env, "LAMBDALAKE_SPARK_MASTER": "local[2]"}
    # INFO: the archiver logs each file it commits, so a log shows what a worker was doing if it does not stop
    ingest = Daemon(["ingest", "--roll-seconds", "0.5", "--workers", "2"], {**env, "LAMBDALAKE_LOG": "INFO"},
                    tmp_path / "ingest.log")
    speed_args = ["speed", "--checkpoint-interval", "0.2"]
    speed = Daemon([*speed_args, "--share", "0/2"], env, tmp_path / "speed-0.log")
    other = Daemon([*speed_args, "--share", "1/2"], env, tmp_path / "speed-1.log")
    samples: list[dict] = []
    stop_reading = threading.Event()
    reader_errors: list[BaseException] = []

    def reader() -> None:
        while not stop_reading.is_set():
            try:
                samples.append(served_snapshot(settings, pipeline))
            except Exception as exc:  # noqa: BLE001 - reported by the test below
                reader_errors.append(exc)
            time.sleep(0.15)

    messages = list(demo_messages(pipeline, 6000, late_fraction=0.1, duplicate_fraction=0.05,
                                  malformed_fraction=0.02, seed=99))
    first, second = messages[:3500], messages[3500:]
    reader_thread = threading.Thread(target=reader, daemon=True)
    try:
        ingest.start()
        speed.start()
        other.start()
        reader_thread.start()
        send(settings, iter(first), rate=2500, progress=False)

        # batch mid-stream, while events keep flowing
        producer_thread = threading.Thread(target=send, args=(settings, iter(second)),
                                           kwargs={"rate": 600, "progress": False}, daemon=True)
        producer_thread.start()
        # the batch job needs one whole handoff block in master (else it refuses, rightly): on a loaded machine
        # the archiver daemon may still be starting when the first events are sent
        layout = Layout(settings.home)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                end >= settings.handoff_block for s in pipeline.sources
                for end in archived_positions(layout, s.name).values()):
            assert ingest.alive(), "the archiver died; see " + str(tmp_path / "ingest.log")
            time.sleep(0.2)
        # crash one speed worker mid-stream; a new worker takes its partitions over while the batch job runs
        other.kill9()
        assert not other.alive()
        other = Daemon([*speed_args, "--partitions", "1,3"], env, tmp_path / "speed-p1-3.log").start()
        batch = subprocess.run([LAMBDALAKE, "batch"], env=env, capture_output=True, text=True, timeout=300)
        assert batch.returncode == 0, batch.stderr + batch.stdout
        producer_thread.join(120)
        assert not producer_thread.is_alive()

        # a second batch after the stream, then wait for quiescence: speed caught up with the log
        batch2 = subprocess.run([LAMBDALAKE, "batch"], env=env, capture_output=True, text=True, timeout=300)
        assert batch2.returncode == 0, batch2.stderr + batch2.stdout
        # the hourly path: the published version merged with the events archived since (its rows are checked
        # against the oracle with everything else below)
        first_v, second_v = (read_batch_manifest(layout, v) for v in sorted(layout.batch_versions())[-2:])
        assert (first_v.mode, second_v.mode, second_v.based_on) == ("full", "incremental", first_v.version), \
            second_v.mode_reason
        ends = end_offsets(settings, topics)
        deadline = time.monotonic() + 90
        final = served_snapshot(settings, pipeline)
        while time.monotonic() < deadline and any(final["covered"].get(k, 0) < e for k, e in ends.items() if e):
            time.sleep(0.3)
            final = served_snapshot(settings, pipeline)
        assert ingest.alive() and speed.alive() and other.alive(), "a daemon died; see logs in " + str(tmp_path)
    finally:
        stop_reading.set()
        reader_thread.join(30) if reader_thread.is_alive() else None
        rc_speed, rc_other, rc_ingest = speed.stop(), other.stop(), ingest.stop()

    # graceful shutdown on SIGTERM (a daemon still running after 30 s got SIGUSR1 first: its log holds its stacks)
    assert (rc_speed, rc_other, rc_ingest) == (0, 0, 0), "\n".join(
        f"--- {d.log_path.name} (rc {d.proc.returncode}), last lines:\n" + tail(d.log_path)
        for d in (speed, other, ingest) if d.proc is not None and d.proc.returncode != 0)
    assert not reader_errors, reader_errors[:3]
    log = read_log(settings.bootstrap, topics)

    # quiescence: everything, exactly
    assert all(final["covered"].get(k, 0) >= e for k, e in ends.items() if e), (final["covered"], ends)
    expected_all = oracle_views(pipeline, log)
    for v in pipeline.views:
        assert_rows_equal(final["rows"][v.name], expected_all[v.name], v.name)
    assert final["W"] and any(w > 0 for w in final["W"].values()), "the batch layer published nothing"
    # the served speed side is the union of the two live workers: partitions 1 and 3 from their new owner
    found = read_speed_set(Layout(settings.home))
    assert found is not None
    held = {key: part.worker for part in found.parts for key in part.partitions}
    assert held == {(t, p): ("p1-3" if p in (1, 3) else "0-of-2") for t in topics for p in range(4)}, held

    # every instant: each sample equals the oracle at the positions its pair covered
    assert len(samples) >= 10
    handoff_samples = [s for s in samples if any(s["W"].values())]
    assert handoff_samples, "no sample saw a published batch version"
    checked = 0
    cache: dict[tuple, dict] = {}
    for s in samples[:: max(1, len(samples) // 40)] + handoff_samples[:5]:
        key = tuple(sorted(s["covered"].items()))
        if key not in cache:
            cache[key] = oracle_views(pipeline, log, below=s["covered"])
        for v in pipeline.views:
            assert_rows_equal(s["rows"][v.name], cache[key][v.name], f"{v.name} at {s['covered']}")
        checked += 1
    assert checked >= 10
