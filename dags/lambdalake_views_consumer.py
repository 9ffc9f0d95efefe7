"""lambdalake_views_consumer: an example downstream DAG, triggered by data — each new published batch version.

Scheduled on the ``lambdalake_batch_views`` Asset that ``lambdalake_batch`` emits after validating a version; the
event's extra says which version and where. The task opens the serving layer (:func:`serving.connect`) and
reports what every view holds — replace it with your own export, report or model refresh.
"""

from __future__ import annotations

import logging

import pendulum
from airflow.sdk import dag, get_current_context, task

from wiring.orchestration import dagkit

log = logging.getLogger(__name__)


@dag(
    dag_id="lambdalake_views_consumer",
    description="Example: runs when lambdalake_batch publishes a new batch version",
    schedule=[dagkit.BATCH_VIEWS],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["lambdalake", "example"],
    doc_md=__doc__,
)
def lambdalake_views_consumer() -> None:
    @task
    def summarize() -> dict:
        """Row counts of every merged view, read through the serving layer."""
        import serving
        from wiring.orchestration.tasks import load

        events = get_current_context()["triggering_asset_events"][dagkit.BATCH_VIEWS]
        extra = events[-1].extra if events else {}
        cfg = dagkit.run_config()
        if extra.get("home"):
            cfg["LAMBDALAKE_HOME"] = extra["home"]
        settings, pipeline = load(cfg)
        con = serving.connect(settings, pipeline)
        try:
            counts = {v.name: con.execute(f'SELECT count(*) FROM "{v.name}"').fetchone()[0] for v in pipeline.views}
        finally:
            con.close()
        log.info("batch version %s: %s", extra.get("version"), counts)
        return {"version": extra.get("version"), "rows": counts}

    summarize()


lambdalake_views_consumer()
