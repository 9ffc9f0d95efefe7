"""Fast Airflow checks: every DAG file imports (DagBag) with the expected task graph, schedule and retry policy;
the Spark connection the project defines resolves to the right master; the run-time configuration precedence.

DagBag runs in a subprocess with its own AIRFLOW_HOME, so Airflow's global configuration never leaks into (or
from) the pytest process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lambdalake.config import load_settings
from wiring.orchestration.airflow_env import airflow_environment, dags_folder, spark_connection
from wiring.orchestration.tasks import batch_keep, lake_config, settings_from

REPO = Path(__file__).resolve().parent.parent

DESCRIBE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

def asset_names(cond):
    if cond is None:
        return []
    if hasattr(cond, "objects"):  # AssetAll / AssetAny
        return sorted(n for o in cond.objects for n in asset_names(o))
    return [cond.name]

def assets(timetable):
    return asset_names(getattr(timetable, "asset_condition", None))

bag = DagBag(dag_folder=sys.argv[1])
out = {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag in bag.dags.values():
    out["dags"][dag.dag_id] = {
        "fileloc": dag.fileloc,
        "timetable": type(dag.timetable).__name__,
        "schedule": getattr(dag.timetable, "expression", None) or getattr(dag.timetable, "_expression", None),
        "assets": assets(dag.timetable),
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
        "edges": sorted([t.task_id, d] for t in dag.tasks for d in t.downstream_task_ids),
        "tasks": {t.task_id: {
            "operator": type(t).__name__,
            "trigger_rule": str(t.trigger_rule.value if hasattr(t.trigger_rule, "value") else t.trigger_rule),
            "retries": t.retries,
            "backoff": t.retry_exponential_backoff,
            "outlets": sorted(getattr(o, "name", str(o)) for o in t.outlets),
            "application": getattr(t, "application", None),
            "conn_id": getattr(t, "_conn_id", None),
        } for t in dag.tasks},
    }
out["spark_master"] = SparkSubmitHook(conn_id="spark_default")._connection["master"]
print("JSON:" + json.dumps(out))
"""


def describe_dags(tmp_path: Path, **extra_env: str) -> dict:
    """Load ``dags/`` in a fresh Airflow process and describe what it found."""
    settings = load_settings(home=tmp_path / "lake", bootstrap="127.0.0.1:1")
    env = airflow_environment(tmp_path / "airflow-home", settings, port=18999)
    env.update(extra_env)
    res = subprocess.run([sys.executable, "-c", DESCRIBE, str(dags_folder())], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, f"DagBag probe failed:\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("JSON:"))
    return json.loads(line[len("JSON:"):])


@pytest.fixture(scope="module")
def dags(tmp_path_factory) -> dict:
    return describe_dags(tmp_path_factory.mktemp("dagbag"))


def test_every_dag_file_imports_without_errors(dags):
    assert dags["import_errors"] == {}
    files = {Path(d["fileloc"]).name for d in dags["dags"].values()}
    on_disk = {p.name for p in dags_folder().glob("*.py") if not p.name.startswith("_")}
    assert files == on_disk, "every DAG file defines a DAG"
    assert set(dags["dags"]) == {"lambdalake_batch", "lambdalake_maintenance", "lambdalake_views_consumer"}
    assert dags_folder() == REPO / "dags"


def test_batch_dag_graph_and_policy(dags):
    dag = dags["dags"]["lambdalake_batch"]
    assert sorted(map(tuple, dag["edges"])) == sorted([
        ("archive", "plan"), ("plan", "spark_batch"), ("plan", "verify"), ("spark_batch", "verify"),
        ("verify", "announce"), ("announce", "speed_handoff"),
    ])
    assert dag["schedule"] == "0 * * * *"  # hourly by default
    assert dag["catchup"] is False and dag["max_active_runs"] == 1
    for task_id, t in dag["tasks"].items():
        assert t["retries"] >= 1 and t["backoff"] >= 2, f"{task_id} retries with exponential backoff"
    spark = dag["tasks"]["spark_batch"]
    assert spark["operator"] == "SparkSubmitOperator"
    assert spark["application"] == str(REPO / "batch" / "job.py")
    assert spark["conn_id"] == "spark_default"
    assert dag["tasks"]["plan"]["operator"].startswith("_Branch")
    assert dag["tasks"]["verify"]["trigger_rule"] == "none_failed_min_one_success"
    assert dag["tasks"]["speed_handoff"]["trigger_rule"] == "none_failed"
    assert dag["tasks"]["announce"]["outlets"] == ["lambdalake_batch_views"]


def test_downstream_dag_is_triggered_by_the_published_views_asset(dags):
    consumer = dags["dags"]["lambdalake_views_consumer"]
    assert consumer["timetable"] == "AssetTriggeredTimetable"
    assert consumer["assets"] == ["lambdalake_batch_views"]


def test_maintenance_dag_graph(dags):
    dag = dags["dags"]["lambdalake_maintenance"]
    assert dag["edges"] == [["compact", "retire_versions"], ["retire_versions", "audit"]]
    assert dag["schedule"] == "0 0 * * *" and dag["catchup"] is False and dag["max_active_runs"] == 1


def test_spark_default_connection_points_at_local_master(dags):
    assert dags["spark_master"] == "local[*]"


def test_schedule_and_spark_master_are_configurable(tmp_path):
    out = describe_dags(tmp_path, LAMBDALAKE_BATCH_SCHEDULE="*/15 * * * *", LAMBDALAKE_MAINTENANCE_SCHEDULE="none",
                        AIRFLOW_CONN_SPARK_DEFAULT=spark_connection("spark://spark-master.example:7077"))
    assert out["import_errors"] == {}
    assert out["dags"]["lambdalake_batch"]["schedule"] == "*/15 * * * *"
    assert out["dags"]["lambdalake_maintenance"]["timetable"] == "NullTimetable"
    assert out["spark_master"] == "spark://spark-master.example:7077"


def test_airflow_environment_is_project_local(tmp_path):
    settings = load_settings(home=tmp_path / "lake", bootstrap="broker.example:9092",
                             spark_master="spark://m.example:7077")
    env = airflow_environment(tmp_path / "af", settings, port=8123, base={"PATH": "/usr/bin"})
    assert env["AIRFLOW_HOME"] == str((tmp_path / "af").resolve())
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(REPO / "dags")
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert env["AIRFLOW__API__BASE_URL"] == "http://localhost:8123"
    assert json.loads(env["AIRFLOW_CONN_SPARK_DEFAULT"])["host"] == "spark://m.example:7077"
    assert env["LAMBDALAKE_HOME"] == str((tmp_path / "lake").resolve())
    assert env["LAMBDALAKE_BOOTSTRAP"] == "broker.example:9092"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent), "spark-submit of this venv first"
    # a connection the user already defined wins
    mine = spark_connection("yarn")
    assert airflow_environment(tmp_path / "af", settings, base={"AIRFLOW_CONN_SPARK_DEFAULT": mine}
                               )["AIRFLOW_CONN_SPARK_DEFAULT"] == mine


def test_variables_override_environment(tmp_path, monkeypatch):
    env = {"LAMBDALAKE_HOME": str(tmp_path / "from-env"), "LAMBDALAKE_HANDOFF_BLOCK": "100",
           "LAMBDALAKE_BOOTSTRAP": "env.example:9092"}
    variables = {"lambdalake_home": str(tmp_path / "from-variable"), "lambdalake_batch_keep": "3"}
    cfg = lake_config(variables.get, env)
    assert cfg["LAMBDALAKE_HOME"] == str(tmp_path / "from-variable")
    assert cfg["LAMBDALAKE_BOOTSTRAP"] == "env.example:9092"
    settings = settings_from(cfg)
    assert settings.handoff_block == 100 and settings.bootstrap == "env.example:9092"
    assert batch_keep(cfg) == 3
    monkeypatch.chdir(tmp_path)
    assert lake_config(None, {})["LAMBDALAKE_HOME"] == str(tmp_path / "data"), "relative homes are made absolute"


def test_bad_configuration_is_reported(tmp_path):
    from lambdalake.exceptions import ConfigError

    with pytest.raises(ConfigError, match="LAMBDALAKE_HANDOFF_BLOCK='ten'"):
        settings_from(lake_config(None, {"LAMBDALAKE_HOME": str(tmp_path), "LAMBDALAKE_HANDOFF_BLOCK": "ten"}))
    with pytest.raises(ConfigError, match="must be >= 2"):
        batch_keep({"LAMBDALAKE_BATCH_KEEP": "1"})


def test_print_env_gives_a_shell_the_same_airflow(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LAMBDALAKE_HOME": str(tmp_path / "lake"),
           "LAMBDALAKE_SPARK_MASTER": "spark://m.example:7077"}
    res = subprocess.run([str(Path(sys.executable).parent / "lambdalake"), "airflow", "--print-env", "--port", "8091",
                          "--airflow-home", str(tmp_path / "af")], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    script = res.stdout + 'echo "$AIRFLOW_HOME|$AIRFLOW__CORE__DAGS_FOLDER|$AIRFLOW__API__PORT|$LAMBDALAKE_HOME"\n'
    shown = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30).stdout.strip()
    assert shown == f"{tmp_path / 'af'}|{REPO / 'dags'}|8091|{tmp_path / 'lake'}"
    assert "spark://m.example:7077" in res.stdout
