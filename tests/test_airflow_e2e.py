"""End to end: ``airflow dags test lambdalake_batch`` against the real Kafka broker and real Spark (spark-submit of
``batch/job.py`` through the SparkSubmitOperator and the ``spark_default`` connection to ``local[*]``).

One test, one lake, a sequence of DAG runs:

1. a normal run archives the log, computes and publishes v1, verifies and announces it, and runs the (stopped)
   speed layer once so it hands off; the serving layer then returns exactly the independent oracle;
2. the same run again is a no-op: no new version, the same content served; the version, left unannounced, is
   verified and announced without Spark;
3. a forced run recomputes with Spark: a new version with the same watermark and the same content;
5. new events make a new version; 6. ``lambdalake_maintenance`` compacts the master files and prunes old versions,
   and serving still equals the oracle.

Then the verifier must reject tampered copies of the published version.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import serving
from batch.verify import VerificationFailed, verify_published
from lambdalake.config import load_settings
from lambdalake.embedded import free_port
from lambdalake.heads import master_files
from lambdalake.layout import Layout, current_batch_manifest
from lambdalake.speedset import current_speed_snapshot
from tests.oracle import assert_rows_equal, oracle_views, read_log
from wiring.orchestration.airflow_env import airflow_environment
from wiring.orchestration.standalone import airflow_bin
from wiring.orchestration.tasks import announced

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1800)]


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory) -> Path:
    """A temporary AIRFLOW_HOME with a migrated SQLite metadata database."""
    home = tmp_path_factory.mktemp("airflow-home")
    env = airflow_environment(home, load_settings(home=home / "unused-lake", bootstrap="x:1"),
                              port=free_port())
    res = subprocess.run([airflow_bin(), "db", "migrate"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"airflow db migrate failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return home


def airflow(env: dict, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    res = subprocess.run([airflow_bin(), *args], env=env, capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise AssertionError(f"airflow {' '.join(args)} exited {res.returncode}\nstdout (tail):\n"
                             f"{res.stdout[-6000:]}\nstderr (tail):\n{res.stderr[-6000:]}")
    return res


def run_states(airflow_home: Path, expected_runs: int) -> dict[str, str]:
    """Task states of the last run of ``lambdalake_batch``, after checking there are ``expected_runs`` runs and all
    succeeded. Read from Airflow's metadata database (``dag_run``, ``task_instance``): what ``airflow dags
    list-runs`` / ``tasks states-for-dag-run`` print, without ~6 s of Airflow start-up per call."""
    with closing(sqlite3.connect(f"file:{airflow_home / 'airflow.db'}?mode=ro", uri=True)) as db:
        runs = db.execute("SELECT run_id, state FROM dag_run WHERE dag_id = 'lambdalake_batch' "
                          "ORDER BY start_date").fetchall()
        assert [state for _, state in runs] == ["success"] * expected_runs, runs
        return dict(db.execute("SELECT task_id, state FROM task_instance WHERE dag_id = 'lambdalake_batch' "
                               "AND run_id = ?", (runs[-1][0],)).fetchall())


def served(settings, pipeline) -> dict[str, list[tuple]]:
    """Every view as the serving layer returns it (``serving.connect``)."""
    con = serving.connect(settings, pipeline)
    try:
        return {v.name: con.execute(f'SELECT {", ".join(chr(34) + c + chr(34) for c in v.output_columns)} '
                                    f'FROM "{v.name}"').fetchall() for v in pipeline.views}
    finally:
        con.close()


def test_dags_test_publishes_what_serving_returns_and_is_idempotent(settings, pipeline, run_cli, airflow_home,
                                                                     tmp_path):
    run_cli("produce", "--events", "1500", "--seed", "11", "--span-hours", "30")
    run_cli("speed", "--until-caught-up")  # a speed layer that ran before and is stopped now
    layout = Layout(settings.home)
    env = airflow_environment(airflow_home, settings, port=free_port())
    env["LAMBDALAKE_SPARK_SHUFFLE_PARTITIONS"] = "4"

    # 1. the first run publishes v000001
    airflow(env, "dags", "test", "lambdalake_batch")
    first = current_batch_manifest(layout)
    assert first is not None and first.version == "v000001"
    assert first.spark_master.startswith("local"), "computed by spark-submit on the spark_default master"
    assert announced(settings, "v000001"), "verified and announced through the Asset"
    watermark = first.watermark
    assert watermark.total() > 0
    snap = current_speed_snapshot(layout)
    assert all(snap.pruned_to.at(*tp) >= w for tp, w in watermark.items()), "the speed layer handed off to v000001"

    messages = read_log(settings.bootstrap, [s.topic for s in pipeline.sources])
    expected_all = oracle_views(pipeline, messages)
    views_v1 = served(settings, pipeline)
    # the speed side holds nothing below W any more, so this is also exact for the batch version below W
    for view in pipeline.views:
        assert_rows_equal(views_v1[view.name], expected_all[view.name], view.name)

    states = run_states(airflow_home, 1)
    assert states == dict.fromkeys(["archive", "plan", "spark_batch", "verify", "announce", "speed_handoff"],
                                   "success")

    # 2. the same run again: nothing new archived -> no new version, same content. The version is also left
    #    unannounced first (published by hand, or a run that failed after publishing): the run verifies and
    #    announces it without Spark.
    (layout.checkpoints("airflow") / "announced" / "v000001.json").unlink()
    airflow(env, "dags", "test", "lambdalake_batch")
    assert current_batch_manifest(layout).version == "v000001" and announced(settings, "v000001")
    assert layout.batch_versions() == ["v000001"]
    assert [p for p in layout.batch_views.iterdir() if p.is_dir()] == [layout.batch_version("v000001")]
    second = served(settings, pipeline)
    for view in pipeline.views:
        assert_rows_equal(second[view.name], views_v1[view.name], view.name)
    states = run_states(airflow_home, 2)
    assert states["spark_batch"] == "skipped", states
    assert states["verify"] == states["announce"] == states["speed_handoff"] == "success", states

    # 3. forced: Spark recomputes the same snapshot -> new version, same watermark, same content
    airflow(env, "dags", "test", "lambdalake_batch", "-c", json.dumps({"force": True}))
    third = current_batch_manifest(layout)
    assert third.version == "v000002" and third.watermark == watermark
    assert third.row_counts == first.row_counts and third.events == first.events
    assert announced(settings, "v000002")
    forced = served(settings, pipeline)
    for view in pipeline.views:
        assert_rows_equal(forced[view.name], views_v1[view.name], view.name)

    # 5. new events -> a new version; 6. maintenance compacts the master files and prunes old versions
    run_cli("produce", "--events", "700", "--seed", "12", "--span-hours", "30")
    airflow(env, "dags", "test", "lambdalake_batch")
    assert current_batch_manifest(layout).version == "v000003"
    files_before = sum(len(master_files(layout, s.name)) for s in pipeline.sources)
    airflow({**env, "LAMBDALAKE_BATCH_KEEP": "2"}, "dags", "test", "lambdalake_maintenance")
    assert layout.batch_versions() == ["v000002", "v000003"]  # v1 retired: its prefix deleted
    assert ({p for p in layout.batch_views.iterdir() if p.is_dir()}
            == {layout.batch_version("v000002"), layout.batch_version("v000003")})
    assert sum(len(master_files(layout, s.name)) for s in pipeline.sources) < files_before, "small files compacted"
    assert any((layout.master_log()).glob("*-compact-*.json")), "compaction is recorded"
    messages = read_log(settings.bootstrap, [s.topic for s in pipeline.sources])
    expected_all = oracle_views(pipeline, messages)
    after = served(settings, pipeline)
    for view in pipeline.views:
        assert_rows_equal(after[view.name], expected_all[view.name], view.name)

    # the verifier is not a rubber stamp: it rejects a published version that lost a row or changed a total
    assert verify_published(settings, pipeline).version == "v000003"
    view = next(v for v in pipeline.views if any(a.kind == "count" for a in v.stored_aggregates))
    count_col = next(a.name for a in view.stored_aggregates if a.kind == "count")
    for case in ("lost a row", "changed a count"):
        copy = tmp_path / case.replace(" ", "_")
        shutil.copytree(settings.home, copy, ignore=shutil.ignore_patterns("kafka"))
        victim = max((Layout(copy).batch_version("v000003") / view.name).glob("*.parquet"),
                     key=lambda f: f.stat().st_size)
        table = pq.read_table(victim)
        if case == "lost a row":
            table, match = table.slice(1), "rows in"
        else:
            counts = table.column(count_col).to_pylist()
            counts[0] += 1
            table, match = table.set_column(table.schema.get_field_index(count_col), count_col,
                                            pa.array(counts, pa.int64())), "deduplicated master events"
        pq.write_table(table, victim)
        with pytest.raises(VerificationFailed, match=match):
            verify_published(settings.with_(home=copy), pipeline)


def test_the_batch_dag_runs_on_a_lake_in_a_bucket(settings, pipeline, s3_lake, airflow_home, tmp_path, monkeypatch):
    """``lambdalake_batch`` with ``LAMBDALAKE_HOME=s3://...``: archive into the bucket, spark-submit with the s3a
    jars, verify from the bucket, announce there, hand off; another machine serves exactly the oracle."""
    from lambdalake.heads import archived_positions
    from tests.conftest import as_machine, machine_cli
    from tests.oracle import assert_served_equals_oracle
    from tests.test_speed import produce
    from wiring.orchestration.tasks import settings_from

    url, store, env_a, work = s3_lake
    produce(settings, pipeline, 1200, seed=17)
    machine_cli(env_a, work, "speed", "--until-caught-up")  # a speed layer that ran on another machine
    as_machine(monkeypatch, {**env_a, "LAMBDALAKE_WORK_DIR": str(tmp_path / "airflow-machine")})
    lake = settings_from({"LAMBDALAKE_HOME": url, "LAMBDALAKE_BOOTSTRAP": settings.bootstrap,
                          "LAMBDALAKE_PIPELINE": settings.pipeline, "LAMBDALAKE_PARTITIONS": "4",
                          "LAMBDALAKE_HANDOFF_BLOCK": str(settings.handoff_block)})
    env = airflow_environment(airflow_home, lake, port=free_port())
    env["LAMBDALAKE_SPARK_SHUFFLE_PARTITIONS"] = "4"
    assert env["LAMBDALAKE_HOME"] == url

    airflow(env, "dags", "test", "lambdalake_batch")
    with closing(sqlite3.connect(f"file:{airflow_home / 'airflow.db'}?mode=ro", uri=True)) as db:
        (run_id,) = db.execute("SELECT run_id FROM dag_run WHERE dag_id = 'lambdalake_batch' "
                               "ORDER BY start_date DESC LIMIT 1").fetchone()
        states = dict(db.execute("SELECT task_id, state FROM task_instance WHERE dag_id = 'lambdalake_batch' "
                                 "AND run_id = ?", (run_id,)).fetchall())
    assert states == dict.fromkeys(["archive", "plan", "spark_batch", "verify", "announce", "speed_handoff"],
                                   "success"), states
    layout = Layout(tmp_path / "nowhere", store=store)
    manifest = current_batch_manifest(layout)
    assert manifest is not None and manifest.version == "v000001" and manifest.spark_master.startswith("local")
    assert all(archived_positions(layout, s.name) for s in pipeline.sources)  # archived into the bucket
    assert store.exists("checkpoints/airflow/announced/v000001.json")
    snap = current_speed_snapshot(layout)
    assert all(snap.pruned_to.at(*tp) >= w for tp, w in manifest.watermark.items()), "handed off"
    assert not list((tmp_path / "airflow-machine").rglob("*.parquet")), "lake files on the Airflow machine"

    as_machine(monkeypatch, {**env_a, "LAMBDALAKE_WORK_DIR": str(tmp_path / "serving-machine")})
    con = serving.connect(home=url, pipeline=settings.pipeline)
    try:
        assert_served_equals_oracle(con, pipeline, read_log(settings.bootstrap, [s.topic for s in pipeline.sources]))
    finally:
        con.close()
