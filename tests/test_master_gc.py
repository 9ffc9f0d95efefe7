"""Garbage collection of master files no head lists (lambdalake.heads.collect_master_garbage, `lambdalake compact`) on
both stores: an unlisted file is deleted only once older than the grace period; listed files, files a started
rewrite names and partitions without a head (the first release's) are never touched. And `lambdalake status` shows
each partition's head."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from batch.archiver import ingest
from batch.partition_buffer import RollPolicy
from lambdalake.exceptions import ConfigError
from lambdalake.heads import (
    GC_GRACE_ENV,
    HeadFile,
    PartitionHead,
    collect_master_garbage,
    file_key,
    gc_grace,
    stored_head,
)
from lambdalake.layout import Layout
from tests.conftest import LAMBDALAKE
from tests.test_archiver import check_exact, produce

SRC = "pageviews"  # a source of the default pipeline (the CLI tests below run it)
HOUR = 3600.0


@pytest.fixture(params=["local", "s3"])
def layout(request, tmp_path) -> Layout:
    if request.param == "local":
        return Layout(tmp_path / "lake")
    return Layout(tmp_path / "unused", store=request.getfixturevalue("s3_store"))


def _roll(held: PartitionHead, start: int, end: int, dataset: str = "master") -> HeadFile:
    name = held.new_name(start, end)
    held.layout.store.put(file_key(dataset, SRC, held.head.partition, name), b"rows")
    return HeadFile(name=name, start=start, end=end)


def _keys(layout: Layout, p: int = 0) -> set[str]:
    return set(layout.store.list(f"master/{SRC}/p={p}/")) | set(layout.store.list(f"rejected/{SRC}/p={p}/"))


def _zombie_lake(layout: Layout) -> tuple[set[str], set[str]]:
    """Writer a archives [0, 10), b claims the partition, then a (paused through the claim) puts a roll of both
    datasets that no head will ever list: the claim could not see it. Returns (listed keys, garbage keys)."""
    a = PartitionHead.claim(layout, SRC, 0, "writer-a")
    a.commit(0, 10, _roll(a, 0, 10), _roll(a, 0, 10, "rejected"))
    b = PartitionHead.claim(layout, SRC, 0, "writer-b")
    b.commit(10, 20, _roll(b, 10, 20))
    late = [_roll(a, 20, 30), _roll(a, 20, 30, "rejected")]  # the zombie's roll after b's claim
    garbage = {file_key("master", SRC, 0, late[0].name), file_key("rejected", SRC, 0, late[1].name)}
    return _keys(layout) - garbage, garbage


def test_unlisted_files_go_only_after_the_grace_period_listed_ones_never(layout):
    listed, garbage = _zombie_lake(layout)
    assert collect_master_garbage(layout, SRC, HOUR) == []  # young: it may be a live writer's roll before its swap
    assert _keys(layout) == listed | garbage
    assert sorted(collect_master_garbage(layout, SRC, 0)) == sorted(garbage)
    assert _keys(layout) == listed  # HEAD and every listed file of both datasets kept
    head, _ = stored_head(layout, SRC, 0)
    assert [(f.start, f.end) for f in head.files] == [(0, 10), (10, 20)] and len(head.rejected) == 1
    assert collect_master_garbage(layout, SRC, 0) == []


def test_partitions_without_a_head_are_never_touched(layout):
    """A partition of the first release (no HEAD yet): its files on disk are its record, until a claim."""
    first = [f"{0:020d}-{10:020d}.parquet", f"{10:020d}-{20:020d}.parquet", f"{10:020d}-{40:020d}.parquet"]
    for name in first:
        layout.store.put(file_key("master", SRC, 3, name), b"rows")
    layout.store.put(file_key("rejected", SRC, 3, first[0]), b"bad")
    before = _keys(layout, 3)
    assert collect_master_garbage(layout, SRC, 0) == [] and _keys(layout, 3) == before
    assert stored_head(layout, SRC, 3) == (None, None)


def test_the_grace_period_is_the_files_age_and_comes_from_the_environment(tmp_path, monkeypatch):
    layout = Layout(tmp_path / "lake")
    listed, garbage = _zombie_lake(layout)
    old, young = sorted(garbage)
    day_ago = time.time() - 24 * HOUR
    os.utime(layout.store.path(old), (day_ago, day_ago))
    for key in listed:  # old listed files stay: age alone never makes garbage
        os.utime(layout.store.path(key), (day_ago, day_ago))
    assert collect_master_garbage(layout, SRC) == [old]  # default grace: 6 hours
    monkeypatch.setenv(GC_GRACE_ENV, "0.5")
    time.sleep(0.6)
    assert collect_master_garbage(layout, SRC) == [young] and _keys(layout) == listed


def test_files_a_started_rewrite_names_are_kept(tmp_path):
    """A compaction's merged file is unlisted between its rename and its head swap; its record says so."""
    layout = Layout(tmp_path / "lake")
    a = PartitionHead.claim(layout, SRC, 0, "writer-a")
    first, second = _roll(a, 0, 10), _roll(a, 10, 20)
    a.commit(0, 10, first)
    a.commit(10, 20, second)
    merged = f"{0:020d}-{20:020d}.parquet"
    layout.store.put(file_key("master", SRC, 0, merged), b"rows")
    record = {"kind": "compact", "status": "started", "source": SRC, "partition": 0,
              "replaced": [{"name": first.name}, {"name": second.name}], "merged": {"name": merged}}
    layout.master_log().mkdir(parents=True)
    log = layout.master_log() / "20260101T000000000000Z-compact-pageviews-p0-0-20.json"
    log.write_text(json.dumps(record))
    assert collect_master_garbage(layout, SRC, 0) == []
    log.write_text(json.dumps({**record, "status": "aborted"}))  # recovery gave it up: garbage now
    assert collect_master_garbage(layout, SRC, 0) == [file_key("master", SRC, 0, merged)]


def test_grace_values():
    assert gc_grace("90", "--gc-grace") == 90.0 and gc_grace(0) == 0.0
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(ConfigError, match="--gc-grace"):
            gc_grace(bad, "--gc-grace")


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LAMBDALAKE, *args], env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_compact_gc_only_on_a_local_and_an_s3_lake_and_bad_grace_is_one_line(layout, tmp_path):
    listed, garbage = _zombie_lake(layout)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDALAKE_")}
    if hasattr(layout.store, "root"):
        env["LAMBDALAKE_HOME"] = str(layout.store.root)
    else:
        s = layout.store.settings
        env.update(LAMBDALAKE_HOME=layout.store.url, LAMBDALAKE_WORK_DIR=str(tmp_path / "work"),
                   AWS_ENDPOINT_URL=s.endpoint, AWS_ACCESS_KEY_ID=s.access_key, AWS_SECRET_ACCESS_KEY=s.secret_key,
                   AWS_REGION=s.region)
    res = _cli(env, "compact", "--gc-only", "--gc-grace", "soon")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: --gc-grace='soon' is not a number"], res.stderr
    res = _cli(env, "compact", "--gc-only")
    assert res.returncode == 0 and "removed 0 garbage files" in res.stdout, res.stdout + res.stderr
    res = _cli(env, "compact", "--gc-only", "--gc-grace", "0")
    assert res.returncode == 0 and "removed 2 garbage files" in res.stdout, res.stdout + res.stderr
    assert all(f"deleted {k}" in res.stdout for k in garbage) and _keys(layout) == listed


# on a lake made by the real archiver ---------------------------------------------------------------------------
def _archived(settings, pipeline, run_cli) -> Layout:
    produce(run_cli, 300)
    ingest(settings, pipeline, until_caught_up=True, policy=RollPolicy(max_rows=40))
    return Layout(settings.home)


@pytest.mark.integration
def test_compact_deletes_a_fenced_writers_late_roll_and_keeps_every_event(settings, pipeline, run_cli):
    layout = _archived(settings, pipeline, run_cli)
    src = pipeline.sources[0].name
    p = next(p for p in range(settings.partitions) if stored_head(layout, src, p)[0] is not None)
    head, _ = stored_head(layout, src, p)
    late = file_key("master", src, p, f"{head.end:020d}-{head.end + 5:020d}-e{head.epoch - 1}-0123abcd.parquet")
    layout.store.put(late, b"a zombie's roll, put after the claim that fenced it")
    res = run_cli("compact", "--target-rows", "100")
    assert "removed 0 garbage files" in res.stdout and layout.store.exists(late)  # younger than 6 h
    res = run_cli("compact", "--target-rows", "100", env={GC_GRACE_ENV: "0"})
    assert "removed 1 garbage files" in res.stdout and f"deleted {late}" in res.stdout, res.stdout
    assert not layout.store.exists(late)
    check_exact(settings, pipeline)  # no listed file was touched


@pytest.mark.integration
def test_status_shows_each_partitions_master_head(settings, pipeline, run_cli):
    layout = _archived(settings, pipeline, run_cli)
    first_release = layout.master_partition(pipeline.sources[1].name, 7)  # a 0.2.0 partition: no HEAD
    first_release.mkdir(parents=True)
    (first_release / f"{0:020d}-{0:020d}.parquet").write_bytes(b"")
    st = json.loads(run_cli("status", "--format", "json").stdout)
    heads = {(h["source"], h["partition"]): h for h in st["heads"]}
    for s in pipeline.sources:
        for p in range(settings.partitions):
            head, _ = stored_head(layout, s.name, p)
            if head is None:
                continue
            h = heads[s.name, p]
            assert (h["owner"], h["epoch"], h["end"], h["files"], h["rejected"], h["generation"]) == (
                head.owner, head.epoch, head.end, len(head.files), len(head.rejected), head.generation)
            assert h["epoch"] >= 1 and h["files"] >= 1
    assert heads[pipeline.sources[1].name, 7]["owner"] is None
    table = run_cli("status").stdout
    assert "master heads" in table and "no head (release 0.2 files)" in table and "speed position" in table
    some = next(h for h in st["heads"] if h["owner"])
    assert some["owner"][:12] in table
