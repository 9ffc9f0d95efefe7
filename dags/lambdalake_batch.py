"""lambdalake_batch: archive -> plan -> Spark batch -> validate -> publish (Asset) -> speed handoff.

Thin wiring; the work is :mod:`lambdalake.orchestration.tasks` (see its docstring for what each step guarantees)
and the batch layer's Spark job ``batch/job.py``, submitted with the Spark provider's SparkSubmitOperator through
the Airflow connection ``spark_default`` (``lambdalake airflow`` defines it from ``LAMBDALAKE_SPARK_MASTER``).

Why the Spark task also publishes: the batch job stages the views, validates them and switches the ``CURRENT``
pointer under the batch layer's publish lock, in one process (``batch/job.py``, run protocol steps 4-5) — a
half-published state never exists between tasks. ``validate`` then checks the *published* version independently
(manifest, null keys, totals against the master dataset), and ``publish`` announces it to downstream DAGs through
the ``lambdalake_batch_views`` Asset only if it passed.
"""

from __future__ import annotations

import importlib.util
import logging

import pendulum
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from lambdalake.orchestration import dagkit
from lambdalake.orchestration import tasks as lake

log = logging.getLogger(__name__)
BATCH_JOB = importlib.util.find_spec("batch.job").origin  # the batch layer's spark-submit application


@dag(
    dag_id="lambdalake_batch",
    description="Archive the log, recompute the batch views with Spark, validate, publish, hand off to speed",
    schedule=dagkit.schedule("LAMBDALAKE_BATCH_SCHEDULE", "@hourly"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=dagkit.default_args(),
    render_template_as_native_obj=True,  # spark_env below is a dict pulled from XCom
    params={"force": Param(False, type="boolean", description="Recompute even if nothing new was archived")},
    tags=["lambdalake"],
    doc_md=__doc__,
)
def lambdalake_batch() -> None:
    @task
    def archive() -> dict:
        """Run the archiver until it has caught up with the log (or wait for a running archiver daemon)."""
        settings, pipeline = lake.load(dagkit.run_config())
        return lake.archive(settings, pipeline).to_dict()

    @task.branch
    def plan() -> str | None:
        """Decide: a new version (spark_batch), only validate the published one, or nothing."""
        ctx = get_current_context()
        cfg = dagkit.run_config()
        settings, pipeline = lake.load(cfg)
        decision = lake.plan_batch(settings, pipeline, force=bool(ctx["params"].get("force")))
        ti = ctx["ti"]
        ti.xcom_push(key="plan", value=decision.to_dict())
        ti.xcom_push(key="spark_env", value=lake.spark_env(cfg, settings))
        log.info("plan: %s: %s", decision.action, decision.reason)
        return {"batch": "spark_batch", "validate": "validate", "none": None}[decision.action]

    spark_batch = SparkSubmitOperator(
        task_id="spark_batch",
        application=BATCH_JOB,
        conn_id=dagkit.spark_conn_id(),
        name="lambdalake-batch",
        env_vars="{{ ti.xcom_pull(task_ids='plan', key='spark_env') }}",
        conf={"spark.ui.showConsoleProgress": "false"},
    )

    @task(trigger_rule="none_failed_min_one_success")
    def validate() -> dict:
        """Check the published version against its manifest and the master dataset."""
        settings, pipeline = lake.load(dagkit.run_config())
        report = lake.validate_published(settings, pipeline)
        if report is None:
            raise AirflowSkipException("nothing is published yet")
        return lake.asset_event_extra(settings, report)

    @task(outlets=[dagkit.BATCH_VIEWS])
    def publish(extra: dict) -> dict:
        """Announce the validated version: the Asset event downstream DAGs are scheduled on."""
        settings, _ = lake.load(dagkit.run_config())
        get_current_context()["outlet_events"][dagkit.BATCH_VIEWS].extra = extra
        lake.mark_announced(settings, extra)
        return extra

    @task(trigger_rule="none_failed")
    def speed_handoff() -> dict:
        """Make sure the speed layer dropped what the published version covers."""
        settings, pipeline = lake.load(dagkit.run_config())
        return lake.speed_handoff(settings, pipeline).to_dict()

    decided = plan()
    validated = validate()
    archive() >> decided >> spark_batch >> validated
    decided >> validated
    publish(validated) >> speed_handoff()


lambdalake_batch()
