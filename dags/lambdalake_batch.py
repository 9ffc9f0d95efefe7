"""lambdalake_batch: archive -> plan -> Spark batch -> verify -> announce (Asset) -> speed handoff.

Thin wiring of the layers' own functions (the table in :mod:`wiring.orchestration.tasks` names each one): the
batch layer's :mod:`batch.plan` (archive, plan), its Spark job ``batch/job.py`` — submitted with the Spark
provider's SparkSubmitOperator through the Airflow connection ``spark_default`` (``lambdalake airflow`` defines it
from ``LAMBDALAKE_SPARK_MASTER``) — and :mod:`batch.verify`.

Why the Spark task also publishes: the batch job stages the views, validates them and switches the ``CURRENT``
pointer by one compare-and-swap, in one process (``batch/job.py``, run protocol steps 4-5) — a
half-published state never exists between tasks. ``verify`` then re-checks the *published* version independently
(manifest, declared definitions, null keys, totals against the master dataset), and ``announce`` tells downstream
DAGs through the ``lambdalake_batch_views`` Asset only if it passed.

Incremental hourly, full daily: the job builds each version from the published one plus the events archived since
whenever that is exact (``batch.incremental.incremental_base``), and recomputes everything from master when it is
not, when the last full recompute is older than ``LAMBDALAKE_BATCH_FULL_EVERY`` hours (default 24: the slower
schedule), or when the run's ``full`` param is set (a manual full run: trigger with ``{"full": true}``).

Layer modules are imported inside the tasks, so parsing this file stays cheap.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import pendulum
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from wiring.orchestration import dagkit
from wiring.orchestration import tasks as wiring

log = logging.getLogger(__name__)
BATCH_JOB = importlib.util.find_spec("batch.job").origin  # the batch layer's spark-submit application
FULL_ENV, FULL_EVERY_ENV = "LAMBDALAKE_BATCH_FULL", "LAMBDALAKE_BATCH_FULL_EVERY"  # read by batch/job.py's main


@dag(
    dag_id="lambdalake_batch",
    description="Archive the log, recompute the batch views with Spark, verify, announce, hand off to speed",
    schedule=dagkit.schedule("LAMBDALAKE_BATCH_SCHEDULE", "@hourly"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=dagkit.default_args(),
    render_template_as_native_obj=True,  # spark_env below is a dict pulled from XCom
    params={"force": Param(False, type="boolean", description="Recompute even if nothing new was archived"),
            "full": Param(False, type="boolean", description="Recompute every view from all master data "
                          "(not incrementally); implies force")},
    tags=["lambdalake"],
    doc_md=__doc__,
)
def lambdalake_batch() -> None:
    @task
    def archive() -> dict:
        """Run the archiver until it has caught up with the log (or wait for a running archiver daemon)."""
        from batch.catch_up import archive

        settings, pipeline = wiring.load(dagkit.run_config())
        return archive(settings, pipeline).to_dict()

    @task.branch
    def plan() -> str | None:
        """Decide: a new version (spark_batch), only verify the published one, or nothing."""
        from batch.plan import plan_batch

        ctx = get_current_context()
        cfg = dagkit.run_config()
        settings, pipeline = wiring.load(cfg)
        full = bool(ctx["params"].get("full"))
        decision = plan_batch(settings, pipeline, force=full or bool(ctx["params"].get("force")))
        action, reason = wiring.next_action(settings, decision.action, decision.reason, decision.published_version)
        ti = ctx["ti"]
        ti.xcom_push(key="plan", value={**decision.to_dict(), "action": action, "reason": reason, "full": full})
        env = wiring.spark_env(cfg, settings)
        if full:
            env[FULL_ENV] = "1"
        if os.environ.get(FULL_EVERY_ENV):  # the age that forces a full recompute (hours), if set for Airflow
            env[FULL_EVERY_ENV] = os.environ[FULL_EVERY_ENV]
        ti.xcom_push(key="spark_env", value=env)
        # a lake on object storage: Spark's s3a connector, given to spark-submit (its driver starts before Python)
        if settings.lake:
            from batch.spark_session import s3a_jars

            ti.xcom_push(key="spark_jars", value=",".join(s3a_jars()))
        else:
            ti.xcom_push(key="spark_jars", value="")
        log.info("plan: %s: %s", action, reason)
        return {"batch": "spark_batch", "verify": "verify", "none": None}[action]

    spark_batch = SparkSubmitOperator(
        task_id="spark_batch",
        application=BATCH_JOB,
        conn_id=dagkit.spark_conn_id(),
        name="lambdalake-batch",
        env_vars="{{ ti.xcom_pull(task_ids='plan', key='spark_env') }}",
        jars="{{ ti.xcom_pull(task_ids='plan', key='spark_jars') or '' }}",
        conf={"spark.ui.showConsoleProgress": "false"},
    )

    @task(trigger_rule="none_failed_min_one_success")
    def verify() -> dict:
        """Re-check the published version against its manifest, the declaration and the master dataset."""
        from batch.verify import verify_published

        settings, pipeline = wiring.load(dagkit.run_config())
        report = verify_published(settings, pipeline)
        if report is None:
            raise AirflowSkipException("nothing is published yet")
        return wiring.asset_event_extra(settings, report)

    @task(outlets=[dagkit.BATCH_VIEWS])
    def announce(extra: dict) -> dict:
        """Announce the verified version: the Asset event downstream DAGs are scheduled on."""
        settings, _ = wiring.load(dagkit.run_config())
        get_current_context()["outlet_events"][dagkit.BATCH_VIEWS].extra = extra
        wiring.announce(settings, extra)
        return extra

    @task(trigger_rule="none_failed")
    def speed_handoff() -> dict:
        """Make sure the speed layer dropped what the published version covers."""
        from speed.hand_off import hand_off_now

        settings, pipeline = wiring.load(dagkit.run_config())
        return hand_off_now(settings, pipeline).to_dict()

    decided = plan()
    verified = verify()
    archive() >> decided >> spark_batch >> verified
    decided >> verified
    announce(verified) >> speed_handoff()


lambdalake_batch()
