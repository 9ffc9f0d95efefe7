"""Airflow orchestration of the batch side: the importable task logic the DAGs in ``dags/`` schedule, and the
``lambdalake airflow`` launcher.

- :mod:`lambdalake.orchestration.tasks` — archive, plan, validate, publish (Asset event), speed handoff,
  compaction and version pruning; plain functions of :class:`lambdalake.config.Settings`, testable without Airflow.
- :mod:`lambdalake.orchestration.airflow_env` — the environment Airflow runs with: project-local ``AIRFLOW_HOME``,
  the repo's ``dags/`` folder, the ``spark_default`` connection built from ``LAMBDALAKE_SPARK_MASTER``.
- :mod:`lambdalake.orchestration.standalone` — runs ``airflow standalone`` in its own process group and stops all
  of it on Ctrl-C.
- :mod:`lambdalake.orchestration.cli` — the ``lambdalake airflow`` command.

Nothing here imports Airflow at module import time, so the ``lambdalake`` CLI stays fast.
"""
