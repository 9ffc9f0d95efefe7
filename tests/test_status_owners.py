"""``lambdalake status`` shows who owns each partition (archiver head owner and epoch, the speed worker serving it)
and reports a partition as stalled when a layer behind the log on it has not moved for the threshold; ``--check``
exits 1 then (the maintenance DAG's ``owners`` task fails the same way)."""

from __future__ import annotations

import json
import time

import pytest

from tests.test_archiver import produce

pytestmark = pytest.mark.integration


def test_owners_are_shown_and_a_partition_nobody_moves_is_stalled(settings, pipeline, run_cli):
    produce(run_cli, 300, malformed_fraction=0.0, duplicate_fraction=0.0)
    run_cli("ingest", "--until-caught-up")
    run_cli("speed", "--until-caught-up", "--checkpoint-interval", "0.05")
    res = run_cli("status", "--check", "--stall-seconds", "1")  # nothing behind: nothing stalled
    assert "owners" in res.stdout and "stalled" not in res.stdout
    st = json.loads(run_cli("status", "--format", "json").stdout)
    rows = [p for p in st["partitions"] if p["end_offset"]]
    assert rows and all(p["archiver_owner"] and p["archiver_epoch"] == 1 for p in rows)
    assert all(p["speed_worker"] == "(all partitions)" and p["speed_epoch"] is not None for p in rows)
    assert st["stalled"] == []

    produce(run_cli, 100, seed=9, malformed_fraction=0.0, duplicate_fraction=0.0)  # nobody reads it
    time.sleep(1.5)
    res = run_cli("status", "--check", "--stall-seconds", "1", check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "has not archived for" in res.stdout and "has not published for" in res.stdout
    res = run_cli("status", "--check", check=False)  # the default threshold (300 s) is not reached
    assert res.returncode == 0, res.stdout + res.stderr
    st = json.loads(run_cli("status", "--format", "json", "--stall-seconds", "1").stdout)
    assert st["stalled"] and all("[" in line for line in st["stalled"])
