"""Serving a lake on object storage from a machine whose disk holds no lake (issue 28): ``connect()``, ``lambdalake
sql`` and ``lambdalake catalog`` read a local mirror of what the bucket publishes (:mod:`lambdalake.mirror`) under
the same lock-down, and ``master.<source>`` from the bucket itself through pyarrow. Real Kafka, the real embedded S3
server, the archiver and the speed layer writing into the bucket from another machine's directory."""

from __future__ import annotations

import json

import duckdb
import pytest

from lambdalake.clients import end_offsets
from lambdalake.config import load_settings
from lambdalake.exceptions import ConfigError
from lambdalake.mirror import sync
from serving.connection import connect
from tests.conftest import as_machine, machine_cli
from tests.oracle import assert_served_equals_oracle, read_log
from tests.test_archiver import expected_master
from tests.test_speed import produce, topics

pytestmark = [pytest.mark.slow, pytest.mark.integration]



def test_views_and_master_are_served_from_a_bucket_on_a_machine_without_the_lake(settings, pipeline, s3_lake,
                                                                                tmp_path, monkeypatch):
    url, store, env, work = s3_lake
    produce(settings, pipeline, 1200, seed=21)
    machine_cli(env, work, "ingest", "--until-caught-up")
    machine_cli(env, work, "replay")  # a batch version (Kappa replay) published into the bucket
    produce(settings, pipeline, 400, seed=23, start="2026-01-05T18:00:00Z")
    machine_cli(env, work, "ingest", "--until-caught-up")
    machine_cli(env, work, "speed", "--until-caught-up", "--checkpoint-interval", "0.05")
    assert not list(work.rglob("*.parquet")), "lake data on machine A's local disk"

    # machine B: its own work directory and TMPDIR, nothing of machine A's; the bucket and the settings alone
    other = tmp_path / "machine-b"
    other.mkdir()
    env_b = {**env, "LAMBDALAKE_WORK_DIR": str(other / "work"), "TMPDIR": str(other)}
    as_machine(monkeypatch, env_b)
    msgs = read_log(settings.bootstrap, topics(pipeline))
    con = connect(pipeline=settings.pipeline, home=url)
    try:
        pair = assert_served_equals_oracle(con, pipeline, msgs)
        assert pair.speed_snapshot is not None and any(pair.watermark.values())
        master = expected_master(pipeline, msgs)
        for src in pipeline.sources:  # master.<source>: the heads mirrored, the files read in the bucket
            got = con.execute(f"SELECT _partition, _offset, event_id FROM master.{src.name}").fetchall()
            assert sorted(got) == master[src.name], src.name
        with pytest.raises(duckdb.Error, match="(?i)permission|not allowed|disabled"):  # the lock-down holds
            con.execute(f"SELECT * FROM read_text('{settings.pipeline}')").fetchall()
    finally:
        con.close()
    mirror = other / "work" / "mirror"
    assert mirror.is_dir() and not list(mirror.glob("master/**/*.parquet")), "master files copied to machine B"

    # the CLI on machine B, and a catalog a stock DuckDB can open: views yes, master says where it is
    res = machine_cli(env_b, other, "sql", "SELECT sum(views) FROM pageviews_hourly")
    assert res.returncode == 0 and "Traceback" not in res.stderr
    res = machine_cli(env_b, other, "catalog")
    path = mirror / "lake.duckdb"
    assert str(path) in res.stdout
    cat = duckdb.connect(str(path), read_only=True)
    try:
        assert cat.execute("SELECT count(*) FROM pageviews_hourly").fetchone()[0] > 0
        with pytest.raises(duckdb.Error, match="is in the bucket"):
            cat.execute(f"SELECT * FROM master.{pipeline.sources[0].name}").fetchall()
    finally:
        cat.close()

    # status on machine B: every partition archived and consumed up to the log's end, heads and owners shown
    res = machine_cli(env_b, other, "status", "--format", "json")
    st = json.loads(res.stdout)
    ends = end_offsets(settings, topics(pipeline))
    assert {(r["topic"], r["partition"]): (r["archived"], r["speed_position"]) for r in st["partitions"]
            if (r["topic"], r["partition"]) in ends} == {k: (e, e) for k, e in ends.items()}
    assert all(r["archiver_owner"] and r["archiver_epoch"] is not None for r in st["partitions"] if r["archived"])
    assert st["heads"] and not st["errors"], st["errors"]

    # a second sync fetches only what changed (immutable objects once)
    produce(settings, pipeline, 300, seed=22, start="2026-01-06T02:00:00Z")
    machine_cli(env, work, "speed", "--until-caught-up", "--checkpoint-interval", "0.05")
    before = {p for p in mirror.rglob("*.parquet")}
    sync(store, mirror)
    assert {p for p in mirror.rglob("*.parquet")} > before


def test_commands_that_do_not_run_on_object_storage_say_so(s3_lake):
    url, store, env, work = s3_lake
    res = machine_cli(env, work, "kafka", "up", check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert "object storage" in res.stderr and url in res.stderr, res.stderr
    with pytest.raises(ConfigError, match="object storage"):
        load_settings(home=url)
