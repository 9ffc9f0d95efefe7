"""lambdalake_maintenance: compact small master files, retire old batch versions (retention), then audit the lake;
beside them, check that every partition has a moving owner.

Thin wiring over :func:`batch.compact.compact` (the batch layer's atomic, recorded compaction; safe while the batch
DAG runs: it waits for the master readers lock), :func:`lambdalake.versions.retire_versions` (keeps the newest
``LAMBDALAKE_BATCH_KEEP`` versions, never the current one nor the one before it) and :func:`audit.check.audit`
(``lambdalake audit``: log vs master, master vs batch, log vs speed, served vs recomputed). The first two are
idempotent: a second run finds nothing to do. The audit fails the task, without retries, on any difference. The
``owners`` task (:func:`lambdalake.status.collect`, ``lambdalake status --check``) fails on a stalled partition: a
layer behind the log on it that has not moved for ``LAMBDALAKE_STALL_SECONDS`` (its owner died and none took over).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

from wiring.orchestration import dagkit
from wiring.orchestration import tasks as wiring


@dag(
    dag_id="lambdalake_maintenance",
    description="Compact small master files, retire old batch versions, audit the lake end to end",
    schedule=dagkit.schedule("LAMBDALAKE_MAINTENANCE_SCHEDULE", "@daily"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=dagkit.default_args(),
    tags=["lambdalake"],
    doc_md=__doc__,
)
def lambdalake_maintenance() -> None:
    @task
    def compact() -> dict:
        """Rewrite runs of small adjacent master files into one file each."""
        from dataclasses import asdict

        from batch.compact import compact

        settings, pipeline = wiring.load(dagkit.run_config())
        return asdict(compact(settings.home, pipeline, lake=settings.lake))

    @task
    def retire_versions() -> list[str]:
        """Delete batch versions beyond the retention."""
        from lambdalake.versions import default_keep, retire_versions

        cfg = dagkit.run_config()
        settings, _ = wiring.load(cfg)
        keep = wiring.batch_keep(cfg)
        from lambdalake.layout import Layout

        return retire_versions(settings.home, keep=default_keep() if keep is None else keep,
                               layout=Layout.of(settings.home, settings.lake))

    @task
    def audit() -> dict:
        """``lambdalake audit`` at the served pair; any difference fails the run loudly (no retry)."""
        from airflow.sdk.exceptions import AirflowFailException

        from audit.check import audit as audit_lake

        settings, pipeline = wiring.load(dagkit.run_config())
        report = audit_lake(settings, pipeline)
        if not report.ok:
            listed = "; ".join(str(d) for d in report.differences)
            raise AirflowFailException(f"lambdalake audit found {report.total_differences} differences in "
                                       f"{settings.home} (batch version {report.batch_version}, speed snapshot "
                                       f"{report.speed_snapshot}): {listed}")
        return report.to_dict()

    @task
    def owners() -> dict:
        """Every partition owned and moving (``lambdalake status --check``); fails on a stalled one."""
        from airflow.sdk.exceptions import AirflowFailException

        from lambdalake.status import collect

        settings, pipeline = wiring.load(dagkit.run_config())
        st = collect(settings, pipeline)
        if st.stalled:
            raise AirflowFailException(f"stalled partitions in {settings.home} (nothing moved for "
                                       f"{st.stall_seconds:.0f}s): " + "; ".join(st.stalled))
        return {"partitions": len(st.partitions), "stall_seconds": st.stall_seconds}

    compact() >> retire_versions() >> audit()
    owners()


lambdalake_maintenance()
