"""A paused archiver that wakes after its partition was handed over is fenced by the partition's head (real Kafka,
a real archiver process): nothing it archives for that partition afterwards is listed, it stops archiving it and
goes on with its other partitions, and master and DLQ stay exact.

The handover itself is simulated here — the new owner archives the partition without the zombie's partition lock,
which is what a group rebalance does once ownership comes from Kafka's group protocol instead of a lock."""

from __future__ import annotations

import signal
import time

import pytest

from batch.archiver import ingest
from batch.partition_buffer import RollPolicy
from lambdalake.heads import archived_positions, stored_head
from lambdalake.layout import Layout
from lambdalake.ownership import PartitionLocks, Share
from lambdalake.procs import stop_group
from tests.oracle import read_log
from tests.test_archiver import _start_ingest, check_exact, produce

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _log_ends(settings, pipeline) -> dict[str, dict[int, int]]:
    ends: dict[str, dict[int, int]] = {s.name: {} for s in pipeline.sources}
    names = {s.topic: s.name for s in pipeline.sources}
    for m in read_log(settings.bootstrap, list(names)):
        ends[names[m.topic]][m.partition] = max(ends[names[m.topic]].get(m.partition, 0), m.offset + 1)
    return ends


def _wait_archived(settings, pipeline, timeout: float = 90.0) -> None:
    layout, want = Layout(settings.home), _log_ends(settings, pipeline)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(archived_positions(layout, s.name) == want[s.name] for s in pipeline.sources):
            return
        time.sleep(0.3)
    raise AssertionError(f"the archiver did not catch up with the log in {timeout}s")


def stays_fenced(layout, src, listed_at_handover: set[str]) -> None:
    """A few roll periods after the zombie woke: partition 0's head is still epoch 2, listing what it did then."""
    time.sleep(1.5)  # its partition-0 roll is tried and refused meanwhile
    head = stored_head(layout, src.name, 0)[0]
    assert head.epoch == 2 and {f.name for f in head.files} == listed_at_handover


def stop_zombie(zombie, src) -> None:
    """Stop the zombie (resumed first); it said it stopped archiving partition 0 (epoch 2), with no traceback."""
    zombie.send_signal(signal.SIGCONT)
    stop_group(zombie, timeout=60, first=signal.SIGTERM)
    err = zombie.communicate()[1].decode()
    assert f"stopped archiving {src.topic}[0]" in err and "epoch 2" in err, err[-2000:]
    assert "Traceback" not in err


def test_a_paused_archiver_is_fenced_after_a_handover(settings, pipeline, run_cli, cli_env, monkeypatch):
    produce(run_cli, 400, malformed_fraction=0.05, duplicate_fraction=0.05)
    # pinned statically (a group member would also learn from the group that it lost the partition: this test is
    # about the head alone, whatever a writer believes)
    zombie = _start_ingest({**cli_env, "LAMBDALAKE_ARCHIVE_ROLL_SECONDS": "0.5"}, "--partitions", "0,1,2,3",
                           roll_rows=20)
    try:
        _wait_archived(settings, pipeline)
        layout = Layout(settings.home)
        src = pipeline.sources[0]
        assert stored_head(layout, src.name, 0)[0].epoch == 1
        zombie.send_signal(signal.SIGSTOP)  # paused: a GC pause, a stopped VM, a partition from the network

        produce(run_cli, 300, seed=8, malformed_fraction=0.0, duplicate_fraction=0.0)
        # the handover: a new owner of partition 0 only, whatever lock the paused one still holds
        monkeypatch.setattr(PartitionLocks, "acquire", lambda self, keys: None)
        ingest(settings, pipeline, until_caught_up=True, share=Share(explicit=frozenset({0})),
               policy=RollPolicy(max_rows=20))
        head = stored_head(layout, src.name, 0)[0]
        assert head.epoch == 2
        listed_at_handover = {f.name for f in head.files}

        zombie.send_signal(signal.SIGCONT)  # it wakes with partition 0's new messages buffered, and rolls them
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            others = {s.name: {p: e for p, e in ends.items() if p != 0}
                      for s, ends in zip(pipeline.sources, _log_ends(settings, pipeline).values(), strict=True)}
            if all({p: e for p, e in archived_positions(layout, s.name).items() if p != 0} == others[s.name]
                   for s in pipeline.sources):
                break
            time.sleep(0.3)
        stays_fenced(layout, src, listed_at_handover)
    finally:
        stop_zombie(zombie, src)
    zombie_files = [f for f in layout.master_files_on_disk(src.name) if f.partition == 0 and "-e1-" in f.path.name]
    assert any(f.path.name not in listed_at_handover for f in zombie_files), "the zombie's refused roll was written"
    check_exact(settings, pipeline)
