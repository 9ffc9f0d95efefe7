"""What the DAG files in ``dags/`` share: the published-views Asset, retry policy, schedules. Imports Airflow.

Parse-time settings come from the environment only (reading Airflow Variables while parsing costs a metadata
database round-trip per parse); the lake configuration is read at run time (:func:`run_config`).

==================================  ===========================================  ===================
environment variable                meaning                                      default
==================================  ===========================================  ===================
LAMBDALAKE_BATCH_SCHEDULE           schedule of ``lambdalake_batch`` (cron or    ``@hourly``
                                    preset; ``none`` = only manual/API runs)
LAMBDALAKE_MAINTENANCE_SCHEDULE     schedule of ``lambdalake_maintenance``       ``@daily``
LAMBDALAKE_SPARK_CONN_ID            Airflow connection of the Spark master       ``spark_default``
LAMBDALAKE_AIRFLOW_RETRIES          retries per task (exponential backoff)       2
==================================  ===========================================  ===================
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from airflow.sdk import Asset

from lambdalake.config import env_int
from wiring.orchestration.tasks import ASSET_NAME

#: The published batch version of the lake. Downstream DAGs use ``schedule=[BATCH_VIEWS]``; each event's extra
#: holds ``home``, ``version``, ``watermark``, ``row_counts`` and ``events``.
BATCH_VIEWS = Asset(name=ASSET_NAME, uri="lambdalake://batch-views", group="lambdalake")


def schedule(env_name: str, default: str) -> str | None:
    """A schedule from the environment; ``none`` (any case) or empty means no schedule (manual runs only)."""
    value = os.environ.get(env_name, default).strip()
    return None if value.lower() in ("", "none", "null") else value


def default_args() -> dict[str, Any]:
    """Retries with exponential backoff (30 s, 1 min, 2 min, ... at most 10 min)."""
    retries = env_int("LAMBDALAKE_AIRFLOW_RETRIES", 2, minimum=0)
    return {
        "owner": "lambdalake",
        "retries": retries,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=10),
    }


def spark_conn_id() -> str:
    return os.environ.get("LAMBDALAKE_SPARK_CONN_ID", "spark_default")


def run_config() -> dict[str, str]:
    """The lake configuration at run time: Airflow Variables ``lambdalake_*`` over ``LAMBDALAKE_*``."""
    from wiring.orchestration.tasks import lake_config

    return lake_config()
