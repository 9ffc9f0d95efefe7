"""Spark on the lake's object storage (issue 28 item 3): the s3a connector that ``make install`` fetches
(infra/hadoop-aws/pom.xml) set up by :mod:`batch.spark_session` from the same S3 settings as the storage seam.

Fast tests: the mapping of the settings to s3a options, and the one-line errors of a wrong endpoint or missing jars.
Slow test, real parts: a driver process with an empty working directory runs Spark on ``local-cluster[2,1,1024]``
(two executor JVMs whose working directories and temporary directories hold no lake) against the embedded S3
server; it writes Parquet to ``s3a://`` and reads it back, and reads master files the product put through the seam.

Run as a script (``python tests/test_spark_s3a.py drive <json>``) this module is that driver.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batch.spark_session import S3A_JARS, s3a_conf, s3a_jars, s3a_options, spark_session
from lambdalake.exceptions import ConfigError
from lambdalake.storage.base import StorageError
from lambdalake.storage.s3 import S3Settings

REPO = Path(__file__).resolve().parent.parent
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "LAMBDALAKE_S3A_JARS")
T0 = 1_767_571_200_000_000  # 2026-01-05 00:00 UTC in µs


@pytest.fixture
def aws_env(monkeypatch):
    """A clean slate of the standard AWS variables; returns a setter."""
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_(**values: str) -> None:
        for k, v in values.items():
            monkeypatch.setenv(k, v)

    return set_


# the settings mapping (no JVM) ----------------------------------------------------------------------------------
def test_an_s3_compatible_server_maps_to_endpoint_path_style_plain_http_and_these_credentials(aws_env):
    aws_env(AWS_ENDPOINT_URL="http://127.0.0.1:8333/", AWS_REGION="eu-west-3", AWS_ACCESS_KEY_ID="AK",
            AWS_SECRET_ACCESS_KEY="SK")
    assert s3a_options() == {
        "fs.s3a.endpoint": "http://127.0.0.1:8333",  # s3a reads no AWS_ENDPOINT_URL itself
        "fs.s3a.endpoint.region": "eu-west-3",
        "fs.s3a.path.style.access": "true",
        "fs.s3a.connection.ssl.enabled": "false",
        "fs.s3a.access.key": "AK",
        "fs.s3a.secret.key": "SK",
        "fs.s3a.aws.credentials.provider": "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
        "fs.s3a.retry.limit": "4", "fs.s3a.attempts.maximum": "3",  # a store that is down fails a run in minutes
        "fs.s3a.connection.establish.timeout": "15s",
    }


def test_the_same_settings_as_the_storage_seam_https_and_a_session_token(aws_env):
    aws_env(AWS_ENDPOINT_URL="http://ignored:1", AWS_ENDPOINT_URL_S3="https://s3.example.test:9000",
            AWS_DEFAULT_REGION="ap-south-1", AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK",
            AWS_SESSION_TOKEN="TOK")
    opts = s3a_options()
    seam = S3Settings.resolve()  # what S3Store uses
    assert opts["fs.s3a.endpoint"] == seam.endpoint == "https://s3.example.test:9000"
    assert opts["fs.s3a.endpoint.region"] == seam.region == "ap-south-1"
    assert opts["fs.s3a.connection.ssl.enabled"] == "true"
    assert opts["fs.s3a.session.token"] == "TOK"
    assert opts["fs.s3a.aws.credentials.provider"] == "org.apache.hadoop.fs.s3a.TemporaryAWSCredentialsProvider"
    given = S3Settings.resolve(endpoint="http://10.0.0.1:9000", region="us-west-2", access_key="A", secret_key="S")
    assert s3a_options(given)["fs.s3a.endpoint"] == "http://10.0.0.1:9000"
    assert "fs.s3a.session.token" not in s3a_options(given)  # explicit keys: not the environment's token


def test_aws_itself_gets_region_and_ssl_and_no_endpoint_nor_path_style(aws_env):
    assert s3a_options() == {"fs.s3a.endpoint.region": "us-east-1", "fs.s3a.retry.limit": "4",  # s3a's own chain
                             "fs.s3a.attempts.maximum": "3", "fs.s3a.connection.establish.timeout": "15s"}
    aws_env(AWS_REGION="eu-central-1", AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK")
    opts = s3a_options()
    assert "fs.s3a.endpoint" not in opts and "fs.s3a.path.style.access" not in opts
    assert opts["fs.s3a.endpoint.region"] == "eu-central-1" and opts["fs.s3a.access.key"] == "AK"


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8333", "s3://127.0.0.1:8333", "http://", "http://:8333",
                                      "https://host:port", "http://host:99999", "ftp://host"])
def test_an_invalid_endpoint_is_one_line_naming_the_variable(aws_env, endpoint):
    aws_env(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK")
    with pytest.raises(ConfigError) as err:
        s3a_options()
    msg = str(err.value)
    assert "\n" not in msg and "AWS_ENDPOINT_URL" in msg and repr(endpoint.rstrip("/")) in msg
    with pytest.raises(ConfigError):
        s3a_conf()  # the settings are checked before the jars


def test_an_endpoint_without_credentials_or_half_a_key_pair_is_one_line(aws_env):
    aws_env(AWS_ENDPOINT_URL="http://127.0.0.1:8333")
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") as err:
        s3a_options()
    assert "\n" not in str(err.value)
    aws_env(AWS_ACCESS_KEY_ID="AK")
    with pytest.raises(ConfigError, match="both an access key and a secret key"):
        s3a_options()


def test_missing_jars_name_make_install(aws_env, tmp_path):
    with pytest.raises(ConfigError, match="run `make install`") as err:
        s3a_jars(tmp_path / "nothing-here")
    assert "\n" not in str(err.value) and "nothing-here" in str(err.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "s3-2.35.4.jar").write_bytes(b"")
    with pytest.raises(ConfigError, match="run `make install`"):
        s3a_jars(tmp_path / "empty")  # no hadoop-aws among them
    aws_env(LAMBDALAKE_S3A_JARS=str(tmp_path / "nothing-here"))
    with pytest.raises(ConfigError, match="nothing-here"):
        s3a_jars()


def test_a_hadoop_aws_for_another_hadoop_is_refused(tmp_path):
    (tmp_path / "hadoop-aws-3.4.1.jar").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"Hadoop 3\.4\.1 but pyspark runs Hadoop 3\.5\.0") as err:
        s3a_jars(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not (S3A_JARS / ".complete").exists(), reason="make install has not fetched the s3a jars")
def test_make_install_fetched_hadoop_aws_for_pyspark_s_hadoop_and_no_sdk_bundle(aws_env):
    jars = s3a_jars()
    names = {Path(j).name for j in jars}
    assert "hadoop-aws-3.5.0.jar" in names and "s3-2.35.4.jar" in names and "netty-nio-client-2.35.4.jar" in names
    assert not [n for n in names if n.startswith(("bundle-", "netty-", "slf4j-", "httpclient-"))
                and n != "netty-nio-client-2.35.4.jar"], "pyspark ships those"
    assert sum(Path(j).stat().st_size for j in jars) < 20_000_000
    aws_env(AWS_ENDPOINT_URL="http://127.0.0.1:8333", AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK")
    conf = s3a_conf()
    assert conf["spark.jars"].split(",") == jars
    assert conf["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:8333"


# real Spark, real S3 server ---------------------------------------------------------------------------------------
def _master_objects(store, pipeline) -> dict:
    """Two master files of purchases put through the seam, like the archiver's; returns what Spark must read."""
    from batch.master import master_table, parquet_bytes
    from lambdalake.heads import file_key

    src = pipeline.source("purchases")
    keys, rows = [], []
    for partition, n in ((0, 40), (1, 25)):
        offsets = list(range(100, 100 + n))
        cols = {"event_id": [f"e{partition}-{o}" for o in offsets], "event_time": [T0 + o for o in offsets],
                "user_id": [f"u{o % 7}" for o in offsets], "product_id": [f"p{o % 3}" for o in offsets],
                "amount_cents": [o * 10 + partition for o in offsets], "currency": ["EUR"] * n}
        key = file_key("master", src.name, partition, f"{offsets[0]:020d}-{offsets[-1] + 1:020d}.parquet")
        store.put(key, parquet_bytes(master_table(src, cols, partition, offsets, [T0] * n)))
        keys.append(key)
        rows += [[e, a, partition, o] for e, a, o in zip(cols["event_id"], cols["amount_cents"], offsets, strict=True)]
    return {"keys": keys, "rows": sorted(rows)}


def _local_spark_home(tmp_path: Path) -> Path:
    """A SPARK_HOME that is pyspark's install (its bin/ and jars/) but whose work/ — the executors' working
    directories under local-cluster — is in the test's own directory, not in the virtualenv."""
    import pyspark

    home = tmp_path / "spark-home"
    home.mkdir()
    for part in ("bin", "jars"):
        (home / part).symlink_to(Path(pyspark.__file__).parent / part)
    return home


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not (S3A_JARS / ".complete").exists(), reason="make install has not fetched the s3a jars")
def test_spark_on_a_local_cluster_writes_and_reads_s3a_and_reads_what_the_seam_wrote(s3_server, s3_store,
                                                                                      clickstream, tmp_path):
    master = _master_objects(s3_store, clickstream)
    driver, driver_tmp, exec_tmp = (tmp_path / d for d in ("driver", "driver-tmp", "executor-tmp"))
    for d in (driver, driver_tmp, exec_tmp):
        d.mkdir()
    spark_home = _local_spark_home(tmp_path)
    lake = f"s3a://{s3_store.bucket}/{s3_store.prefix}"
    job = {"lake": lake, "master": master["keys"], "executor_tmp": str(exec_tmp), "rows": 5000}
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARS and not k.startswith("PYSPARK")}
    env.update(s3_server.env())  # the standard AWS variables, nothing else: what a user sets
    env.update(SPARK_HOME=str(spark_home), TMPDIR=str(driver_tmp), PYTHONPATH=str(REPO),
               PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_DIRS=str(exec_tmp))  # the workers' scratch space
    t = time.monotonic()
    res = subprocess.run([sys.executable, __file__, "drive", json.dumps(job)], cwd=driver, env=env,
                         capture_output=True, text=True, timeout=540, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - t
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])

    assert out["executors"] == 2, out  # two executor JVMs besides the driver
    assert out["written"] == {"count": 5000, "sum": sum(range(5000)) * 3, "distinct_parts": 4}
    assert out["read_back"] == out["written"]
    assert out["master_rows"] == master["rows"]  # every row, every value of the seam's objects
    assert out["event_time_type"] == "timestamp"

    # the product reads what Spark wrote, through the seam
    parts = [k for k in s3_store.list("spark/out") if k.endswith(".parquet")]
    assert len(parts) == 4 and s3_store.exists("spark/out/_SUCCESS")
    tables = [pq.read_table(io.BytesIO(s3_store.get(k))) for k in parts]
    assert sum(t.num_rows for t in tables) == 5000
    assert sum(sum(t.column("v").to_pylist()) for t in tables) == sum(range(5000)) * 3

    # the executors ran in their own working directories, and nothing of the lake landed on a local disk
    work = sorted(p for p in (spark_home / "work").glob("app-*/*") if p.is_dir())
    assert len(work) == 2, work
    local = [p for d in (driver, driver_tmp, exec_tmp, spark_home / "work") for p in d.rglob("*")
             if p.suffix == ".parquet" or p.name in ("_SUCCESS", "_temporary") or "part-" in p.name]
    assert local == [], local
    assert seconds < 300, f"{seconds:.0f} s"


def _drive(job: dict) -> dict:
    """The driver process: Spark on local-cluster[2,1,1024] with s3a from the AWS variables alone."""
    from pyspark.sql import functions as F

    exec_tmp, driver_tmp = job["executor_tmp"], os.environ["TMPDIR"]
    spark = spark_session("local-cluster[2,1,1024]", "lambdalake-s3a-test", s3=True, conf={
        "spark.ui.enabled": "false", "spark.driver.memory": "1g", "spark.sql.shuffle.partitions": "4",
        "spark.executorEnv.TMPDIR": exec_tmp,
        "spark.executor.extraJavaOptions": f"-Djava.io.tmpdir={exec_tmp}",
        "spark.driver.extraJavaOptions": f"-Djava.io.tmpdir={driver_tmp}"})
    try:
        sc = spark.sparkContext
        deadline = time.monotonic() + 120
        while sc._jsc.sc().getExecutorIds().size() < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        lake = job["lake"]
        df = spark.range(job["rows"]).select(F.col("id"), (F.col("id") * 3).alias("v")).repartition(4)
        df.write.mode("overwrite").parquet(f"{lake}/spark/out")

        def summary(frame) -> dict:
            row = frame.withColumn("pid", F.spark_partition_id()).agg(
                F.count("*").alias("n"), F.sum("v").alias("s"), F.countDistinct("pid").alias("p")).first()
            return {"count": row["n"], "sum": row["s"], "distinct_parts": row["p"]}

        written = summary(df)
        back = spark.read.parquet(f"{lake}/spark/out")
        read_back = {**summary(back), "distinct_parts": len(back.inputFiles())}
        master = spark.read.parquet(*[f"{lake}/{k}" for k in job["master"]])
        rows = sorted([r["event_id"], r["amount_cents"], r["_partition"], r["_offset"]]
                      for r in master.select("event_id", "amount_cents", "_partition", "_offset").collect())
        return {"executors": sc._jsc.sc().getExecutorIds().size(), "written": written, "read_back": read_back,
                "master_rows": rows, "event_time_type": master.schema["event_time"].dataType.typeName()}
    finally:
        spark.stop()


if __name__ == "__main__" and sys.argv[1:2] == ["drive"]:
    print(json.dumps(_drive(json.loads(sys.argv[2]))))
