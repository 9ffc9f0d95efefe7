"""Airflow orchestration: the environment and launcher of ``lambdalake airflow`` and the thin wiring the DAGs in
``dags/`` share. The work the DAGs schedule belongs to the layers (``batch.plan``, ``batch/job.py``,
``batch.verify``, ``batch.compact``, ``lambdalake.versions``), which the DAG files call directly.

- :mod:`wiring.orchestration.tasks` — run-time lake configuration (Airflow Variables over the environment),
  the announcement records behind the Asset event, and the speed handoff step; testable without Airflow.
- :mod:`wiring.orchestration.airflow_env` — the environment Airflow runs with: project-local ``AIRFLOW_HOME``,
  the repo's ``dags/`` folder, the ``spark_default`` connection built from ``LAMBDALAKE_SPARK_MASTER``.
- :mod:`wiring.orchestration.standalone` — runs ``airflow standalone`` in its own process group and stops all
  of it on Ctrl-C.
- :mod:`wiring.orchestration.cli` — the ``lambdalake airflow`` command.

Nothing here imports Airflow at module import time, so the ``lambdalake`` CLI stays fast.
"""
