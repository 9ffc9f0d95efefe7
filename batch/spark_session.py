"""The batch job's Spark session: the settings every run needs (UTC session time zone, microsecond timestamps) and
a session for a master URL that leaves spark-submit's ``--master`` alone; asked for (``s3=``), Spark's s3a connector
set up from the same S3 settings as the storage seam (:func:`s3a_options`, :func:`s3a_jars`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from lambdalake.exceptions import ConfigError
from lambdalake.storage.s3 import S3Settings

SESSION_CONF = {
    "spark.sql.session.timeZone": "UTC",  # window_start is a UTC instant; never the JVM's zone
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",  # not INT96: readable as timestamp[us, UTC]
}


# where `make install` puts hadoop-aws and the AWS SDK (infra/hadoop-aws/pom.xml); elsewhere: LAMBDALAKE_S3A_JARS
S3A_JARS = Path(__file__).resolve().parent.parent / ".cache" / "hadoop-aws" / "libs"
SIMPLE_CREDENTIALS = "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider"
TEMPORARY_CREDENTIALS = "org.apache.hadoop.fs.s3a.TemporaryAWSCredentialsProvider"


def s3a_options(s3: S3Settings | None = None) -> dict[str, str]:
    """The Hadoop s3a options (``fs.s3a.*``) for the S3 settings the storage seam uses (``s3``, else
    :meth:`S3Settings.resolve`: ``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID`` ...): s3a does not read
    ``AWS_ENDPOINT_URL`` itself, and needs path-style requests for servers other than AWS. A malformed endpoint is a
    one-line ConfigError, an endpoint without credentials a one-line StorageError."""
    s = s3 or S3Settings.resolve()
    opts = {"fs.s3a.endpoint.region": s.region}  # v4 signing needs one, whatever the server
    # a store that is down fails a run in minutes, not after s3a's 7 retries x the SDK's 5 attempts of every request
    # (each cleanup request too); throttling (503) keeps its own 20 retries (fs.s3a.retry.throttle.limit)
    opts.update({"fs.s3a.retry.limit": "4", "fs.s3a.attempts.maximum": "3",
                 "fs.s3a.connection.establish.timeout": "15s"})
    if s.endpoint:
        opts["fs.s3a.endpoint"] = s.endpoint
        opts["fs.s3a.path.style.access"] = "true"  # bucket in the path: no DNS name per bucket
        opts["fs.s3a.connection.ssl.enabled"] = str(urlsplit(s.endpoint).scheme == "https").lower()
    if s.access_key:
        opts["fs.s3a.access.key"] = s.access_key
        opts["fs.s3a.secret.key"] = s.secret_key or ""
        if s.session_token:
            opts["fs.s3a.session.token"] = s.session_token
        # these credentials and nothing else (not an instance profile's, not a profile file's)
        opts["fs.s3a.aws.credentials.provider"] = TEMPORARY_CREDENTIALS if s.session_token else SIMPLE_CREDENTIALS
    return opts


def s3a_jars(libs: str | Path | None = None) -> list[str]:
    """The jars of Spark's s3a connector: ``libs`` > ``LAMBDALAKE_S3A_JARS`` > what ``make install`` fetched. A
    missing directory, or a hadoop-aws that is not the Hadoop inside pyspark, is a one-line ConfigError."""
    given = libs or os.environ.get("LAMBDALAKE_S3A_JARS")
    where = Path(given or S3A_JARS)
    jars = sorted(str(p) for p in where.glob("*.jar")) if where.is_dir() else []
    aws = [j for j in jars if re.fullmatch(r"hadoop-aws-[\d.]+\.jar", Path(j).name)]
    if not aws or (not given and not (where / ".complete").exists()):
        raise ConfigError(f"Spark's s3a connector (hadoop-aws and the AWS SDK) is not in {where}: run `make install` "
                          "(it fetches them with Maven), or set LAMBDALAKE_S3A_JARS to a directory holding them")
    theirs, ours = _hadoop_version(), Path(aws[0]).name[len("hadoop-aws-"):-len(".jar")]
    if theirs and theirs != ours:
        raise ConfigError(f"{aws[0]} is for Hadoop {ours} but pyspark runs Hadoop {theirs}: run `make install` "
                          "after moving hadoop.version in infra/hadoop-aws/pom.xml to it")
    return jars


def _hadoop_version() -> str | None:
    """The Hadoop version inside pyspark (its hadoop-client-api jar), or None if it cannot be told."""
    import pyspark

    found = sorted(Path(pyspark.__file__).parent.glob("jars/hadoop-client-api-*.jar"))
    return found[0].name[len("hadoop-client-api-"):-len(".jar")] if found else None


def s3a_conf(s3: S3Settings | None = None, libs: str | Path | None = None) -> dict[str, str]:
    """Spark settings for a session that reads and writes ``s3a://``: ``spark.jars`` and ``spark.hadoop.fs.s3a.*``
    (under spark-submit, give the jars as ``--jars``: spark-submit starts the driver before this runs)."""
    options = s3a_options(s3)  # the settings first: a wrong endpoint says so even where the jars are missing
    return {"spark.jars": ",".join(s3a_jars(libs)), **{f"spark.hadoop.{k}": v for k, v in options.items()}}


def spark_session(master: str | None = None, app_name: str = "lambdalake-batch", *,
                  s3: S3Settings | bool = False, conf: dict[str, str] | None = None):
    """A SparkSession for ``master`` (``local[*]``, ``local-cluster[2,1,1024]``, ``spark://...``, ``yarn`` ...).

    Returns an existing active session if there is one. Under ``spark-submit`` (which starts this Python process
    from its JVM and says so in ``PYSPARK_GATEWAY_PORT``) the master is spark-submit's ``--master``: setting one
    here would silently override it (a job submitted to a cluster would run in the driver).

    ``s3``: also read and write ``s3a://`` paths, with these S3 settings (``True``: :meth:`S3Settings.resolve`)
    — :func:`s3a_conf`. Without it the session is exactly what it was before s3a existed. ``conf``: more Spark
    settings, applied last.
    """
    from pyspark.sql import SparkSession

    s3a = s3a_conf(None if s3 is True else s3) if s3 else {}
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
    for k, v in {**s3a, **(conf or {})}.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    if s3a:
        _check_s3a_loads(spark)
    return spark


def _check_s3a_loads(spark) -> None:
    """ConfigError if the driver cannot load the s3a file system: a session started earlier in this process without
    the jars, or spark-submit without ``--jars`` (``spark.jars`` set here comes too late for its driver)."""
    jvm = spark.sparkContext._jvm
    try:
        jvm.org.apache.hadoop.fs.FileSystem.getFileSystemClass("s3a", spark.sparkContext._jsc.hadoopConfiguration())
    except Exception:  # noqa: BLE001 - py4j's error of a missing class
        where = os.environ.get("LAMBDALAKE_S3A_JARS") or S3A_JARS
        raise ConfigError("this Spark driver cannot load the s3a file system (hadoop-aws): the Spark session was "
                          f"started without its jars — under spark-submit pass --jars with the jars of {where}; "
                          "in Python, start no other Spark session first") from None
