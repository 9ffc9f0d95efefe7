"""``lambdalake forget`` on a lake on object storage (issue 28): the erasure rewrite gives each new file version a name
of its own and puts it in place of the old one by the partition's head swap (nothing renamed or deleted; the old
version goes with garbage collection after the grace period). Served rows of the subject vanish at once; the next
batch version and the speed layer's rebuild make every view equal the oracle over the log without the subject, and
the audit — run from another machine — accounts the erased offsets. Real Kafka, Spark and the embedded S3 server."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from lambdalake import erasure
from lambdalake.contracts import REWRITE_DONE, ErasureRecord
from lambdalake.heads import GC_GRACE_ENV, file_key
from lambdalake.layout import Layout, rewrite_records
from serving.connection import connect
from tests.conftest import as_machine, machine_cli
from tests.oracle import assert_served_equals_oracle, parse_event, read_log
from tests.test_archiver_s3 import _master_in_bucket
from tests.test_speed import produce, topics

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_forget_on_a_bucket_rewrites_through_the_heads_and_the_views_follow(settings, pipeline, s3_lake, tmp_path,
                                                                            monkeypatch):
    url, store, env, work = s3_lake
    produce(settings, pipeline, 1200, seed=51)
    machine_cli(env, work, "ingest", "--until-caught-up", "--roll-rows", "100")
    spark = {**env, "LAMBDALAKE_WORK_DIR": str(tmp_path / "spark-machine"), "PYSPARK_PYTHON": sys.executable}
    machine_cli(spark, work, "batch", "--spark-master", "local[2]")
    machine_cli(env, work, "speed", "--until-caught-up")
    pv = pipeline.source("pageviews")
    log = read_log(settings.bootstrap, topics(pipeline))
    users = Counter(e["user_id"] for m in log if m.topic == pv.topic and (e := parse_event(pv, m.value)))
    user = users.most_common(1)[0][0]
    before = _master_in_bucket(store, pipeline)

    # machine C forgets the user's page views
    other = {**env, "LAMBDALAKE_WORK_DIR": str(tmp_path / "forget-machine")}
    res = machine_cli(other, work, "forget", "--source", pv.name, user)
    assert f"forgot user_id={user!r} of source {pv.name!r}" in res.stdout and "master rewritten" in res.stdout
    layout = Layout(Path("/nonexistent"), store=store)
    records = [r for _, r in rewrite_records(layout, ErasureRecord)]
    assert records and all(r.status == REWRITE_DONE and r.new_name() != r.name for r in records)
    erased = {(r.partition, o) for r in records if r.dataset == "master" for o in r.offsets}
    after = _master_in_bucket(store, pipeline)
    assert after["purchases"] == before["purchases"]
    assert after[pv.name] == [row for row in before[pv.name] if (row[0], row[1]) not in erased]
    assert len(erased) >= users[user]  # every archived page view of the user (duplicates included)
    old = {file_key(r.dataset, r.source, r.partition, r.name) for r in records}
    assert all(store.exists(k) for k in old)  # the old versions stay for the grace period ...
    res = machine_cli({**other, GC_GRACE_ENV: "0"}, work, "compact", "--gc-only")
    assert not any(store.exists(k) for k in old), res.stdout  # ... then go with garbage collection

    # at once: no served row keyed by the user (machine D)
    as_machine(monkeypatch, {**env, "LAMBDALAKE_WORK_DIR": str(tmp_path / "serving-machine")})
    con = connect(pipeline=settings.pipeline, home=url)
    try:
        assert not con.execute("SELECT count(*) FROM user_activity_daily WHERE user_id = ?", [user]).fetchall()[0][0]
    finally:
        con.close()

    # the next batch version (a full recompute: a subject was forgotten) and the speed layer's rebuild
    res = machine_cli(spark, work, "batch", "--spark-master", "local[2]")
    assert "full" in res.stdout, res.stdout
    machine_cli(env, work, "speed", "--until-caught-up")
    kept = [m for m in log if not (m.topic == pv.topic and (e := parse_event(pv, m.value)) and e["user_id"] == user)]
    con = connect(pipeline=settings.pipeline, home=url)
    try:
        assert_served_equals_oracle(con, pipeline, kept)
    finally:
        con.close()
    res = machine_cli({**env, "LAMBDALAKE_WORK_DIR": str(tmp_path / "serving-machine")}, work, "audit", "--format",
                      "json", check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert user not in res.stdout and json.loads(res.stdout)["ok"]
    res = machine_cli(other, work, "status", "--format", "json")
    stages = {(e["source"], e["subject"]): e["stage"] for e in json.loads(res.stdout)["erasures"]}
    assert stages == {(pv.name, user): "complete"}, stages


def test_a_forget_killed_before_its_swap_erases_nothing_and_a_rerun_completes(settings, pipeline, s3_lake, tmp_path):
    url, store, env, work = s3_lake
    produce(settings, pipeline, 600, seed=52)
    machine_cli(env, work, "ingest", "--until-caught-up", "--roll-rows", "100")
    pv = pipeline.source("pageviews")
    log = read_log(settings.bootstrap, topics(pipeline))
    users = Counter(e["user_id"] for m in log if m.topic == pv.topic and (e := parse_event(pv, m.value)))
    user = users.most_common(1)[0][0]
    before = _master_in_bucket(store, pipeline)
    res = machine_cli({**env, "LAMBDALAKE_ERASE_FAULT": "rewrite"}, work, "forget", "--source", pv.name, user,
                      check=False)
    assert res.returncode == -9, res.stderr[-2000:]
    layout = Layout(Path("/nonexistent"), store=store)
    (killed,) = [r for _, r in rewrite_records(layout, ErasureRecord)]
    assert killed.status == "started" and store.exists(file_key(killed.dataset, pv.name, killed.partition,
                                                                killed.new_name()))
    assert _master_in_bucket(store, pipeline) == before  # its new version was never swapped in: nothing erased
    assert not erasure.erased_offsets(layout, pv.name)
    assert erasure.stored_request(layout, pv.name, user) is not None  # recorded before any rewrite

    res = machine_cli(env, work, "forget", "--source", pv.name, user)  # run again: it resumes and completes
    assert "master rewritten" in res.stdout
    after = _master_in_bucket(store, pipeline)
    erased = {(p, o) for p, offs in erasure.erased_offsets(layout, pv.name).items() for o in offs}
    assert after[pv.name] == [row for row in before[pv.name] if (row[0], row[1]) not in erased]
    assert len(erased) >= users[user] and after["purchases"] == before["purchases"]
    # the killed attempt's record is settled (aborted) once older than the grace period, and its file collected
    machine_cli({**env, GC_GRACE_ENV: "0"}, work, "compact")
    (settled,) = [r for _, r in rewrite_records(layout, ErasureRecord) if r.new_name() == killed.new_name()]
    assert settled.status == "aborted"
    assert not store.exists(file_key(killed.dataset, pv.name, killed.partition, killed.new_name()))
    assert _master_in_bucket(store, pipeline) == after
