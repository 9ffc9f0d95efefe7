"""The Spark batch job on a lake on object storage (issue 28): master read through ``s3a://`` from the files the
heads list, the version staged by the executors into the bucket under the run's own prefix, checked, published by
one swap of the pointer; incremental runs and ``--view`` carry-overs without hard links (server-side copies).

Every "machine" is its own process with its own working directory, work directory and TMPDIR; Spark runs on
``local-cluster[2,1,1024]`` — two executor JVMs whose working directories hold no lake — and the machines share only
the Kafka bootstrap address and the S3 endpoint. Real Kafka, real Spark, the real embedded S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch.spark_session import S3A_JARS
from lambdalake import contracts
from lambdalake.contracts import BatchManifest, BatchPointer
from lambdalake.layout import BATCH_POINTER_KEY
from serving.connection import connect
from tests.conftest import LAMBDALAKE, as_machine, failed_in_one_line, machine_cli
from tests.oracle import assert_served_equals_oracle, read_log
from tests.test_spark_s3a import _local_spark_home
from tests.test_speed import produce, topics

pytestmark = [pytest.mark.slow, pytest.mark.integration,
              pytest.mark.skipif(not (S3A_JARS / ".complete").exists(),
                                 reason="make install has not fetched the s3a jars")]

CLUSTER = "local-cluster[2,1,1024]"


def _machine(env: dict, tmp_path: Path, name: str, **extra: str) -> tuple[dict, Path]:
    """A machine's environment and working directory: nothing in common with the others but the settings."""
    root = tmp_path / name
    (root / "tmp").mkdir(parents=True)
    return {**env, "LAMBDALAKE_WORK_DIR": str(root / "work"), "TMPDIR": str(root / "tmp"), **extra}, root


def _spark_machine(env: dict, tmp_path: Path) -> tuple[dict, Path]:
    """The batch machine: a SPARK_HOME whose work/ (the executors' working directories) is its own, small JVMs."""
    env_b, root = _machine(env, tmp_path, "machine-spark")
    spark_home = _local_spark_home(root)
    env_b.update(SPARK_HOME=str(spark_home), SPARK_LOCAL_DIRS=str(root / "tmp"),
                 LAMBDALAKE_SPARK_DRIVER_MEMORY="1g", LAMBDALAKE_SPARK_SHUFFLE_PARTITIONS="4")
    env_b = {k: v for k, v in env_b.items() if not k.startswith("PYSPARK")}
    env_b["PYSPARK_PYTHON"] = sys.executable  # the executors' Python workers: this virtualenv's
    return env_b, root


def _manifest(store) -> tuple[BatchPointer, BatchManifest]:
    ptr = contracts.decode(store.get(BATCH_POINTER_KEY), BatchPointer, BATCH_POINTER_KEY)
    return ptr, contracts.decode(store.get(f"{ptr.prefix}/manifest.json"), BatchManifest, "manifest")


def _batch_prefixes(store) -> set[str]:
    """The names directly under ``views/batch/`` holding any object (directory markers included)."""
    return {k.split("/")[2] for k in store.list("views/batch/") if k.count("/") >= 2}


def _lake_files_on_disk(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.suffix == ".parquet" or p.name in ("_SUCCESS", "_temporary")
            or p.name.startswith("part-")]


def _assert_served_exactly(settings, pipeline, url: str, env: dict, monkeypatch) -> None:
    """Machine C serves the bucket's batch version (and speed snapshots, if any); the merged views equal the oracle
    at the positions they cover."""
    as_machine(monkeypatch, env)
    con = connect(pipeline=settings.pipeline, home=url)
    try:
        assert_served_equals_oracle(con, pipeline, read_log(settings.bootstrap, topics(pipeline)))
    finally:
        con.close()


@pytest.fixture
def archived(settings, pipeline, s3_lake, tmp_path):
    """A bucket lake holding archived events (late, duplicated, malformed) and a Spark machine:
    (url, store, machine A's env and directory, the Spark machine's env and directory)."""
    url, store, env, work = s3_lake
    produce(settings, pipeline, 1500, seed=31)
    machine_cli(env, work, "ingest", "--until-caught-up")
    return (url, store, env, work, *_spark_machine(env, tmp_path))


def test_spark_on_a_local_cluster_computes_and_publishes_views_into_the_bucket(settings, pipeline, archived,
                                                                              tmp_path, monkeypatch):
    url, store, env, work, env_b, spark_root = archived
    res = machine_cli(env_b, spark_root, "batch", "--spark-master", CLUSTER)
    assert "published batch version v000001" in res.stdout, res.stdout
    ptr, m1 = _manifest(store)
    assert m1.mode == "full" and m1.spark_master == CLUSTER and any(m1.watermark.values())
    assert ptr.prefix.startswith("views/batch/run-")
    for name, meta in m1.views.items():  # every listed file is in the version's prefix, nothing else is
        listed = {f"{ptr.prefix}/{name}/{f}" for f in meta.files}
        assert listed == {k for k in store.list(f"{ptr.prefix}/{name}/") if k.endswith(".parquet")}, name
    assert not [k for k in store.list(ptr.prefix + "/") if k.endswith(("_SUCCESS", ".crc"))]
    assert all(store.size(i.path) == i.bytes for i in m1.inputs)  # lineage from the bucket's objects
    assert m1.row_counts and all(n > 0 for n in m1.row_counts.values())
    env_c, _ = _machine(env, tmp_path, "machine-serve")
    _assert_served_exactly(settings, pipeline, url, env_c, monkeypatch)

    # more events (late, duplicated, malformed): the next run extends the published version incrementally
    produce(settings, pipeline, 600, seed=32, start="2026-01-05T20:00:00Z")
    machine_cli(env, work, "ingest", "--until-caught-up")
    res = machine_cli(env_b, spark_root, "batch", "--spark-master", CLUSTER)
    ptr2, m2 = _manifest(store)
    assert m2.version == "v000002" and m2.mode == "incremental" and m2.based_on == "v000001", m2.mode_reason
    assert all(m2.watermark.at(*k) >= w for k, w in m1.watermark.items())
    _assert_served_exactly(settings, pipeline, url, env_c, monkeypatch)

    # the speed layer (machine A) adds what the version does not cover; machine C's audit holds end to end: log vs
    # master in the bucket, master vs the Spark-built version, log vs speed, serving vs recomputation
    produce(settings, pipeline, 300, seed=34, start="2026-01-06T02:00:00Z")
    machine_cli(env, work, "speed", "--until-caught-up", "--checkpoint-interval", "0.05")
    _assert_served_exactly(settings, pipeline, url, env_c, monkeypatch)
    res = machine_cli(env_c, tmp_path / "machine-serve", "audit", "--format", "json", check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["batch_version"] == "v000002" and report["speed_snapshot"], report
    assert report["checks"]["master-batch"]["compared"]["inputs_checksummed"] == len(m2.inputs)
    assert report["checks"]["log-master"]["compared"]["master_rows"] > 0

    # one view recomputed at the published watermark, the others carried over (copied inside the bucket)
    view = pipeline.views[0].name
    machine_cli(env_b, spark_root, "batch", "--view", view, "--spark-master", "local[2]")
    ptr3, m3 = _manifest(store)
    assert m3.version == "v000003" and m3.watermark == m2.watermark
    assert m3.views[view].computed_in == "v000003"
    carried = [v.name for v in pipeline.views if v.name != view]
    assert carried and all(m3.views[n].computed_in == m2.views[n].computed_in for n in carried)
    for n in carried:
        assert [store.size(f"{ptr3.prefix}/{n}/{f}") for f in m3.views[n].files] == \
            [store.size(f"{ptr2.prefix}/{n}/{f}") for f in m2.views[n].files]
    _assert_served_exactly(settings, pipeline, url, env_c, monkeypatch)

    # rollback works on the bucket's pointer
    res = machine_cli(env_b, spark_root, "batch", "--rollback", "--force")
    assert "v000003 -> v000002" in res.stdout
    assert _manifest(store)[1].version == "v000002"

    # nothing of the lake ever landed on the batch machine's disk, nor in the executors' working directories
    assert _lake_files_on_disk(spark_root) == [], _lake_files_on_disk(spark_root)
    work_dirs = sorted(p for p in (spark_root / "spark-home" / "work").glob("app-*/*") if p.is_dir())
    assert len(work_dirs) >= 2, work_dirs  # the two executor JVMs of each local-cluster run


def test_a_batch_run_killed_before_its_swap_publishes_nothing_and_a_rerun_is_exact(settings, pipeline, archived,
                                                                                  tmp_path, monkeypatch):
    url, store, env, work, env_b, spark_root = archived
    for fault in ("staged", "swap"):
        res = machine_cli({**env_b, "LAMBDALAKE_BATCH_FAULT": fault}, spark_root, "batch", "--spark-master",
                          "local[2]", check=False)
        assert res.returncode == -9, (fault, res.returncode, res.stderr[-2000:])
        assert not store.exists(BATCH_POINTER_KEY), fault  # nothing published
    left = _batch_prefixes(store)
    assert len(left) == 2, left  # the two killed runs' prefixes: garbage once older than the grace period
    res = machine_cli({**env_b, "LAMBDALAKE_MASTER_GC_GRACE": "0"}, spark_root, "batch", "--spark-master",
                      "local[2]")
    ptr, m = _manifest(store)
    assert m.version == "v000001" and _batch_prefixes(store) == {
        "CURRENT", ptr.prefix.split("/")[2]}  # the killed runs' prefixes collected
    env_c, _ = _machine(env, tmp_path, "machine-serve")
    _assert_served_exactly(settings, pipeline, url, env_c, monkeypatch)
    assert _lake_files_on_disk(spark_root) == []
    assert os.environ.get("LAMBDALAKE_BATCH_FAULT") is None


def test_the_s3_server_killed_while_a_run_stages_fails_in_one_line_and_a_rerun_is_exact(settings, pipeline,
                                                                                        own_s3_lake, tmp_path,
                                                                                        monkeypatch):
    """A server of its own (the session's one must survive), killed with -9 once the run's first staged object is
    in the bucket: the run gives up with one line and publishes nothing; with the server started again on the same
    port and data, a rerun publishes a version that serves exactly."""
    lake = own_s3_lake
    produce(settings, pipeline, 1500, seed=36)
    machine_cli(lake.env, lake.work, "ingest", "--until-caught-up")
    env_b, spark_root = _spark_machine(lake.env, tmp_path)
    run = subprocess.Popen([LAMBDALAKE, "batch", "--spark-master", "local[2]"], env=env_b, cwd=spark_root,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not any(k.startswith("views/batch/run-") for k in lake.store.list("views/batch/")):
            assert run.poll() is None and time.monotonic() < deadline, "the run staged nothing"
            time.sleep(0.1)
        lake.server.down(timeout=0)  # SIGKILL of the server mid-run
    finally:
        line = failed_in_one_line(run, timeout=240)
    assert "s3" in line.lower(), line  # says the object storage failed (e.g. "is the S3 endpoint up ...")
    assert lake.server.up(timeout=90)["port"] == lake.port
    assert not lake.store.exists(BATCH_POINTER_KEY)  # nothing published
    machine_cli(env_b, spark_root, "batch", "--spark-master", "local[2]")
    assert _manifest(lake.store)[1].version == "v000001"
    env_c, _ = _machine(lake.env, tmp_path, "machine-serve")
    _assert_served_exactly(settings, pipeline, lake.url, env_c, monkeypatch)
