"""Upgrading a lake whose speed layer wrote hard-linked snapshots (format 3) and pointers without a writer, tested on
a lake made by the previous release's own CLI (``PREVIOUS``, extracted from git): this code's speed layer resumes
from that checkpoint without a command in between, claims the pointers, writes format-4 snapshots (part files
referenced, never linked) and retention retires the old ones; serving stays exact throughout."""

from __future__ import annotations

import pytest

from lambdalake import contracts
from lambdalake.contracts import SpeedPointer
from lambdalake.layout import Layout, read_speed_snapshot_meta, speed_pointer
from speed.checkpoint import CheckpointPointer
from tests.releases import extract
from tests.releases import run_cli as run_release
from tests.test_speed import produce
from tests.test_speed_workers import served_equals_oracle

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PREVIOUS = "db9e971423b5d872e09d8a923c1a8ac74e71c84b"  # the last stop before speed snapshots went through the seam


@pytest.fixture(scope="module")
def previous(tmp_path_factory):
    return extract(PREVIOUS, tmp_path_factory.mktemp("previous"))


def test_a_speed_layer_of_the_previous_release_goes_on_through_the_storage_seam(settings, pipeline, cli_env, run_cli,
                                                                                previous):
    layout = Layout(settings.home)
    produce(settings, pipeline, 1500, seed=81)
    run_release(previous, "wiring.cli", cli_env, "speed", "--until-caught-up", "--checkpoint-interval", "0.02")
    old = read_speed_snapshot_meta(layout, speed_pointer(layout))
    assert old.format == 3 and not any("/" in f for v in old.views.values() for f in v.files)
    served_equals_oracle(settings, pipeline)

    produce(settings, pipeline, 1500, seed=82, start="2026-01-05T20:00:00Z")
    run_cli("speed", "--until-caught-up", "--checkpoint-interval", "0.02", "--keep-snapshots", "1",
            "--keep-snapshot-seconds", "0")
    new = read_speed_snapshot_meta(layout, speed_pointer(layout))
    assert new.format == 4 and new.snapshot != old.snapshot
    assert any("/" in f for v in new.views.values() for f in v.files)  # part files referenced
    ptr = contracts.read(layout.checkpoints("speed") / "CURRENT", CheckpointPointer)
    assert ptr.checkpoint == new.snapshot and ptr.writer and ptr.seq > 0
    assert contracts.read(layout.speed_pointer, SpeedPointer).writer == ptr.writer
    assert old.snapshot not in layout.speed_snapshots(), "retention kept the old release's snapshot"
    served_equals_oracle(settings, pipeline)
