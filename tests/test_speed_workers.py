"""Partition-parallel speed layer against the real broker: several workers, each owning a share of the partitions,
publish their own snapshots; serving reads their union; a partition that changes owner continues exactly.

Expected answers come from the independent oracle (``tests/oracle.py``) over the log read back from Kafka.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from lambdalake.clients import end_offsets
from lambdalake.layout import Layout
from lambdalake.speedset import read_speed_set
from tests.conftest import LAMBDALAKE
from tests.oracle import assert_rows_equal, oracle_views, read_log
from tests.test_end_to_end import served_snapshot
from tests.test_speed import produce, topics

pytestmark = pytest.mark.integration


def served_equals_oracle(settings, pipeline) -> dict:
    """A fresh serving connection answers every view exactly as the oracle over offsets < max(W, S) per
    partition; returns the speed positions S it served."""
    got = served_snapshot(settings, pipeline)
    want = oracle_views(pipeline, read_log(settings.bootstrap, topics(pipeline)), below=got["covered"])
    for v in pipeline.views:
        assert_rows_equal(got["rows"][v.name], want[v.name], v.name)
    return got["S"]


def holders(home) -> dict[tuple[str, int], str]:
    """Which worker's snapshot serving takes each partition from."""
    found = read_speed_set(Layout(home))
    assert found is not None
    return {key: part.worker for part in found.parts for key in part.partitions}


def test_workers_split_partitions_and_a_resplit_continues_exactly(settings, pipeline, run_cli, cli_env):
    produce(settings, pipeline, 2000, seed=11)
    run_cli("replay")  # a real batch version (Kappa replay, no Spark) at the block-aligned end of the log
    produce(settings, pipeline, 600, seed=14)
    ends = end_offsets(settings, topics(pipeline))

    # Two workers started together: partitions p%2==0 and p%2==1, one snapshot series each.
    res = run_cli("speed", "--until-caught-up", "--workers", "2", "--checkpoint-interval", "0.05",
                  env={"PYTHONPROFILEIMPORTTIME": "1"})  # every process's imports, on stderr
    assert "speed worker 0/2" in res.stdout and "speed worker 1/2" in res.stdout
    imported = {ln.rsplit("|", 1)[1].strip() for ln in res.stderr.splitlines() if ln.startswith("import time:")}
    assert "kafka" in imported and "pyarrow" in imported, "the import profile is read"
    # (a refused `import pandas` is listed too, as plain "pandas" in a few µs: pyarrow's one probe per process)
    assert not [m for m in imported if m.startswith("pandas.")], "no `lambdalake speed` process loads pandas"
    s = served_equals_oracle(settings, pipeline)
    assert s == {k: e for k, e in end_offsets(settings, topics(pipeline)).items()}
    assert holders(settings.home) == {k: f"{k[1] % 2}-of-2" for k in ends}

    # More data, then a re-split into three workers, one at a time: after each, partitions are held by old and
    # new owners at once, and the union is still exact (each new owner continues from the batch watermark).
    produce(settings, pipeline, 900, seed=12, start="2026-01-05T20:00:00Z")
    for i in range(3):
        run_cli("speed", "--until-caught-up", "--share", f"{i}/3", "--checkpoint-interval", "0.05")
        served_equals_oracle(settings, pipeline)
        moved = {k for k, w in holders(settings.home).items() if w.endswith("-of-3")}
        assert moved == {k for k in ends if k[1] % 3 <= i}
    # Back to one process for everything: it takes every partition over (its own old checkpoint, if any, is stale).
    produce(settings, pipeline, 300, seed=13)
    run_cli("speed", "--until-caught-up", "--checkpoint-interval", "0.05")
    s = served_equals_oracle(settings, pipeline)
    assert set(holders(settings.home).values()) == {""}
    assert s == end_offsets(settings, topics(pipeline))


def test_overlapping_worker_is_refused_naming_the_partition(settings, pipeline, cli_env, run_cli, tmp_path):
    produce(settings, pipeline, 200, seed=3)
    log = open(tmp_path / "daemon.out", "wb")
    daemon = subprocess.Popen([LAMBDALAKE, "speed", "--share", "0/2"], env=cli_env, stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    try:
        deadline = time.monotonic() + 60
        while not list((settings.home / "checkpoints" / "speed" / "partitions").glob("*.lock")):
            assert time.monotonic() < deadline and daemon.poll() is None, (tmp_path / "daemon.out").read_text()
            time.sleep(0.2)
        time.sleep(1.0)
        res = run_cli("speed", "--until-caught-up", "--partitions", "1,2", check=False)
        assert res.returncode != 0 and "owns partition 2 of" in res.stderr and "Traceback" not in res.stderr
        bad = run_cli("speed", "--workers", "2", "--share", "0/2", check=False)
        assert bad.returncode != 0 and "do not combine" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        daemon.terminate()
        assert daemon.wait(60) == 0
