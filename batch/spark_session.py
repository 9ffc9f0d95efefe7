"""The batch job's Spark session: the settings every run needs (UTC session time zone, microsecond timestamps) and
a session for a master URL that leaves spark-submit's ``--master`` alone."""

from __future__ import annotations

import os
from pathlib import Path

SESSION_CONF = {
    "spark.sql.session.timeZone": "UTC",  # window_start is a UTC instant; never the JVM's zone
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",  # not INT96: readable as timestamp[us, UTC]
}


def spark_session(master: str | None = None, app_name: str = "lambdalake-batch"):
    """A SparkSession for ``master`` (``local[*]``, ``local-cluster[2,1,1024]``, ``spark://...``, ``yarn`` ...).

    Returns an existing active session if there is one. Under ``spark-submit`` (which starts this Python process
    from its JVM and says so in ``PYSPARK_GATEWAY_PORT``) the master is spark-submit's ``--master``: setting one
    here would silently override it (a job submitted to a cluster would run in the driver).
    """
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        master = None
    if master:
        builder = builder.master(master)
    for k, v in SESSION_CONF.items():
        builder = builder.config(k, v)
    builder = builder.config("spark.ui.showConsoleProgress", "false")  # the CLI shows its own status
    builder = builder.config("spark.sql.shuffle.partitions",
                             os.environ.get("LAMBDALAKE_SPARK_SHUFFLE_PARTITIONS", "16"))
    # the heap of a local run (executors live in the driver JVM): Spark's 1g default spills the dedup shuffle of
    # a few million events to disk. Only applies when this call starts the JVM (spark-submit sets its own).
    builder = builder.config("spark.driver.memory", os.environ.get("LAMBDALAKE_SPARK_DRIVER_MEMORY", "4g"))
    if master and master.startswith("local-cluster"):
        # executors are separate JVMs started from pyspark's own jars
        import pyspark

        builder = builder.config("spark.home", os.environ.get("SPARK_HOME", str(Path(pyspark.__file__).parent)))
    return builder.getOrCreate()
