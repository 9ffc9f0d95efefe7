"""Compaction on a lake on object storage (issue 28): no lake-wide lock, no rename, no delete — the intent record,
the merged file under a name no other writer uses, the head swap as the commit point; the replaced files stay until
garbage collection, a grace period after the rewrite (a batch run that listed them may still read them). Two
compactions at once: each group is rewritten once. A compaction killed before its swap changes nothing served and
is settled by the recovery once older than the grace period. Real Kafka, the real embedded S3 server, real Spark."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from batch.compact import compact, plan_groups
from lambdalake.contracts import REWRITE_DONE, REWRITE_STARTED, CompactionRecord
from lambdalake.heads import GC_GRACE_ENV, collect_master_garbage, file_key, master_files, stored_head
from lambdalake.layout import Layout, rewrite_records
from serving.connection import connect
from tests.conftest import as_machine, machine_cli
from tests.oracle import assert_served_equals_oracle, read_log
from tests.test_archiver import expected_master
from tests.test_archiver_s3 import _check_exact, _master_in_bucket
from tests.test_speed import produce

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture
def small_rolls(settings, pipeline, s3_lake):
    """A bucket lake archived in rolls of at most 40 rows (many small master files): (url, store, env, work)."""
    url, store, env, work = s3_lake
    produce(settings, pipeline, 1200, seed=41)
    machine_cli(env, work, "ingest", "--until-caught-up", "--roll-rows", "40")
    return url, store, env, work


def _listed(layout: Layout, pipeline) -> set[str]:
    keys = set()
    for s in pipeline.sources:
        for p in range(8):
            head, _ = stored_head(layout, s.name, p)
            for f in head.files if head else []:
                keys.add(file_key("master", s.name, p, f.name))
    return keys


def _master_objects(store) -> set[str]:
    return {k for k in store.list("master/") if k.endswith(".parquet")}


def test_compaction_in_a_bucket_keeps_replaced_files_for_the_grace_period_and_batch_reads_it(
        settings, pipeline, small_rolls, tmp_path, monkeypatch):
    url, store, env, work = small_rolls
    layout = Layout(Path("/nonexistent"), store=store)
    before = _master_objects(store)
    assert len(before) > 8  # several small files per partition

    # machine B compacts: its own work directory, nothing but the bucket
    env_b = {**env, "LAMBDALAKE_WORK_DIR": str(tmp_path / "machine-b" / "work")}
    res = machine_cli(env_b, work, "compact", "--target-rows", "400")
    assert "compacted" in res.stdout and "removed 0 garbage files" in res.stdout, res.stdout
    records = [rec for _, rec in rewrite_records(layout, CompactionRecord)]
    assert records and all(r.status == REWRITE_DONE and r.finished_at for r in records)
    replaced = {file_key("master", r.source, r.partition, n) for r in records for n in r.replaced_names()}
    merged = {file_key("master", r.source, r.partition, r.new_name()) for r in records}
    listed = _listed(layout, pipeline)
    assert merged <= listed and not replaced & listed  # the heads list the merged files instead
    assert _master_objects(store) == before | merged  # nothing deleted yet: a reader may still read them
    _check_exact(settings, pipeline, store)  # every archived message once, through the heads

    # garbage collection: the replaced files are protected for the grace period after the rewrite, then deleted
    res = machine_cli(env_b, work, "compact", "--gc-only")
    assert "removed 0 garbage files" in res.stdout, res.stdout
    res = machine_cli({**env_b, GC_GRACE_ENV: "0"}, work, "compact", "--gc-only")
    assert f"removed {len(replaced)} garbage files" in res.stdout, res.stdout
    assert _master_objects(store) == listed
    _check_exact(settings, pipeline, store)

    # the Spark batch job reads the compacted master from the bucket: every view exact
    machine_cli({**env_b, "PYSPARK_PYTHON": sys.executable}, work, "batch", "--spark-master", "local[2]")
    as_machine(monkeypatch, env_b)
    con = connect(pipeline=settings.pipeline, home=url)
    try:
        assert_served_equals_oracle(con, pipeline, read_log(settings.bootstrap, [s.topic for s in pipeline.sources]))
    finally:
        con.close()


def test_two_compactions_at_once_rewrite_each_group_once(settings, pipeline, small_rolls, tmp_path, monkeypatch):
    url, store, env, work = small_rolls
    as_machine(monkeypatch, env)
    layout = Layout(Path("/nonexistent"), store=store)
    src = pipeline.sources[0].name
    groups = sum(len(plan_groups([f for f in master_files(layout, src) if f.partition == p], 400, 1 << 30, layout))
                 for p in range(settings.partitions))
    assert groups > 0
    reports, errors = [], []

    def run(i: int) -> None:
        try:
            reports.append(compact(tmp_path / f"machine-{i}", pipeline, source=src, target_rows=400, lake=url))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    # each group rewritten by exactly one of them; the other skipped it (its file is garbage, listed by no head)
    assert sum(r.groups for r in reports) == groups, [(r.groups, r.skipped) for r in reports]
    done = [r for _, r in rewrite_records(layout, CompactionRecord) if r.status == REWRITE_DONE]
    assert len(done) == groups
    _check_exact(settings, pipeline, store)
    log = read_log(settings.bootstrap, [s.topic for s in pipeline.sources])
    assert _master_in_bucket(store, pipeline) == expected_master(pipeline, log)


def test_a_compaction_killed_before_its_swap_changes_nothing_and_is_settled_after_the_grace_period(
        settings, pipeline, small_rolls, tmp_path):
    url, store, env, work = small_rolls
    layout = Layout(Path("/nonexistent"), store=store)
    exact = _master_in_bucket(store, pipeline)
    res = machine_cli({**env, "LAMBDALAKE_COMPACT_FAULT": "swap"}, work, "compact", "--target-rows", "400",
                      check=False)
    assert res.returncode == -9, res.stderr[-2000:]
    (killed,) = [r for _, r in rewrite_records(layout, CompactionRecord)]
    killed_key = file_key("master", killed.source, killed.partition, killed.new_name())
    assert killed.status == REWRITE_STARTED and store.exists(killed_key)  # written, never swapped in
    assert _master_in_bucket(store, pipeline) == exact  # nothing served changed
    src = killed.source
    replaced = {file_key("master", src, killed.partition, n) for n in killed.replaced_names()}
    assert collect_master_garbage(layout, src, 0) == []  # a started record protects its files, whatever their age

    # the next compaction leaves the young record alone (it may be in flight on another machine) and does the work
    res = machine_cli(env, work, "compact", "--target-rows", "400")
    assert "recovered" not in res.stdout and _master_in_bucket(store, pipeline) == exact
    assert [r.status for _, r in rewrite_records(layout, CompactionRecord) if r.new_name() == killed.new_name()] == [
        REWRITE_STARTED]
    # once older than the grace period it is settled: its group was compacted since, so it is aborted, and garbage
    # collection takes its file and the files the compactions replaced
    res = machine_cli({**env, GC_GRACE_ENV: "0"}, work, "compact", "--target-rows", "400")
    statuses = {r.new_name(): r.status for _, r in rewrite_records(layout, CompactionRecord)}
    assert statuses[killed.new_name()] == "aborted" and set(statuses.values()) == {REWRITE_DONE, "aborted"}
    assert not store.exists(killed_key) and not any(store.exists(k) for k in replaced), res.stdout
    assert _master_objects(store) == _listed(layout, pipeline)
    _check_exact(settings, pipeline, store)
