"""The Spark batch job against the real broker and real Spark: published views == the independent oracle.

The oracle (``tests/oracle.py``) reads the log back from Kafka and applies the documented validation and dedup
rules in plain Python + DuckDB SQL; nothing here uses the engine's validation, dedup or aggregation code.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batch.archiver import ingest
from batch.exceptions import MasterBehindPublished, NothingToCompute
from batch.job import run_batch
from batch.master import sha256_file
from batch.partition_buffer import RollPolicy
from lambdalake.aggregates import Mean
from lambdalake.contracts import MANIFEST_FORMAT, BatchManifest, Positions, SpeedPointer, SpeedSnapshotMeta
from lambdalake.exceptions import PublishError
from lambdalake.layout import (
    Layout,
    batch_pointer,
    current_batch_manifest,
    speed_pointer,
    write_contract,
    write_pointer,
)
from lambdalake.pipeline import load_pipeline
from lambdalake.procs import kill_group
from lambdalake.versions import retire_versions, rollback
from tests.conftest import LAMBDALAKE
from tests.oracle import assert_rows_equal, oracle_views, parts_estimate, read_log

pytestmark = pytest.mark.integration


# --- helpers -------------------------------------------------------------------------------------------------------
def produce(run_cli, events: int, seed: int = 11, **kw) -> None:
    args = ["produce", "--events", str(events), "--seed", str(seed)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    run_cli(*args)


def version_rows(home: Path, version: str, view, raw: bool = False) -> list[tuple]:
    """Rows of a published view; output columns (declared aggregates, means derived) unless ``raw``."""
    table = pq.read_table(Layout(home).batch_version(version) / view.name)
    cols = {c: table.column(c).to_pylist() for c in table.column_names}
    n = table.num_rows
    if raw:
        return [tuple(cols[c][i] for c in table.column_names) for i in range(n)]
    means = {m.name: m for m in view.means}
    out = []
    for i in range(n):
        row = [cols[k][i] for k in view.keys] + [cols["window_start"][i]]
        for a in view.aggregates:
            if isinstance(a, Mean):
                m = means[a.name]
                s, c = cols[m.sum_name][i], cols[m.count_name][i]
                row.append(None if s is None or not c else s / c)
            elif a.kind == "approx_distinct":  # Spark's sketch, estimated as the oracle defines it
                row.append(parts_estimate([cols[a.name][i]]))
            else:
                row.append(cols[a.name][i])
        out.append(tuple(row))
    return out


def below(manifest: BatchManifest) -> dict[tuple[str, int], int]:
    return dict(manifest.watermark)


def assert_version_equals_oracle(settings, pipeline, manifest: BatchManifest, log=None) -> None:
    log = log if log is not None else read_log(settings.bootstrap, [s.topic for s in pipeline.sources])
    expected = oracle_views(pipeline, log, below=below(manifest))
    assert sorted(manifest.views) == sorted(v.name for v in pipeline.views) == sorted(manifest.row_counts)
    for view in pipeline.views:
        rows = version_rows(settings.home, manifest.version, view)
        assert_rows_equal(rows, expected[view.name], view.name)
        assert manifest.row_counts[view.name] == len(expected[view.name])
        assert manifest.views[view.name].fingerprint == pipeline.fingerprint(view)


@pytest.fixture
def archived(settings, pipeline, run_cli):
    """A lake with ~2000 events (late, duplicated, malformed) archived in small files."""
    produce(run_cli, 2000, late_fraction=0.1, duplicate_fraction=0.05, malformed_fraction=0.03)
    ingest(settings, pipeline, until_caught_up=True, policy=RollPolicy(max_rows=73))
    return settings


# --- tests ---------------------------------------------------------------------------------------------------------
def test_batch_views_equal_oracle_below_aligned_watermark(archived, pipeline, spark, monkeypatch):
    settings = archived
    # the dedup's fallback (the rows shuffled by id: more repeated ids than are broadcast); the broadcast join of
    # the repeated ids' first offsets is what every other full run here takes, each checked against the oracle too
    monkeypatch.setenv("LAMBDALAKE_BATCH_BROADCAST_DUPLICATES", "0")
    manifest = run_batch(settings, pipeline, spark=spark)
    layout = Layout(settings.home)
    assert batch_pointer(layout) == "v000001"
    assert current_batch_manifest(layout) == manifest
    # watermark: whole blocks only, trailing the archived ends by less than a block, and really trailing somewhere
    block = settings.handoff_block
    assert manifest.block == block
    trailing = 0
    for (t, p), end in manifest.archived.items():
        w = manifest.watermark.at(t, p)
        assert w % block == 0 and 0 <= end - w < block
        trailing += end > w
    assert trailing > 0, "the test data should leave partial blocks so W trails the archived data"
    assert_version_equals_oracle(settings, pipeline, manifest)
    # lineage: inputs are real files with the recorded size, checksum and rows; they cover [0, W) exactly
    for inp in manifest.inputs:
        path = settings.home / inp.path
        assert path.stat().st_size == inp.bytes and sha256_file(path) == inp.sha256
        assert pq.ParquetFile(path).metadata.num_rows == inp.rows
    for s in pipeline.sources:
        for p, w in manifest.watermark.of_topic(s.topic).items():
            ranges = sorted((i.start, i.end) for i in manifest.inputs if i.source == s.name and i.partition == p)
            if w:
                assert ranges[0][0] == 0 and ranges[-1][1] >= w > ranges[-1][0]
                assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    for key in ("engine", "spark_master", "code_version", "started_at", "finished_at", "published_at", "duration_s",
                "pipeline", "version"):
        assert getattr(manifest, key) not in (None, "")
    assert manifest.engine.startswith("spark 4.") and manifest.format == MANIFEST_FORMAT


def test_batch_below_w_plus_rest_above_w_equals_everything(archived, pipeline, spark, run_cli):
    """W trails the archive: batch (< W) merged with the same views computed over >= W equals the whole log.

    The part >= W comes from the real speed layer's published snapshot (rows carry their block) when available.
    """
    settings = archived
    manifest = run_batch(settings, pipeline, spark=spark)
    log = read_log(settings.bootstrap, [s.topic for s in pipeline.sources])
    w = below(manifest)
    res = run_cli("speed", "--until-caught-up", check=False, timeout=300)
    assert res.returncode == 0, res.stderr
    layout = Layout(settings.home)
    ptr = speed_pointer(layout)
    assert ptr is not None
    sdir = layout.speed_snapshot(ptr)
    everything = oracle_views(pipeline, log)
    for view in pipeline.views:
        batch_raw = version_rows(settings.home, manifest.version, view, raw=True)
        speed = pq.read_table(sdir / f"{view.name}.parquet")
        topic = pipeline.source_of(view).topic
        keep = [w.get((topic, p), 0) <= b for p, b in zip(speed.column("_partition").to_pylist(),
                                                          speed.column("_block_start").to_pylist(), strict=True)]
        speed = speed.filter(keep).drop(["_partition", "_block_start"])
        speed_raw = [tuple(r.values()) for r in speed.to_pylist()]
        merged = merge_stored(view, batch_raw + speed_raw)
        assert_rows_equal(merged, everything[view.name], view.name)


def merge_stored(view, rows: list[tuple]) -> list[tuple]:
    """Combine stored rows with equal (keys, window_start) per the declared merge rules; derive means."""
    nk = len(view.keys) + 1
    stored = view.stored_aggregates
    acc: dict[tuple, list] = {}
    for r in rows:
        key, vals = r[:nk], list(r[nk:])
        if key not in acc:
            acc[key] = [[v] if a.merge == "union" else v for a, v in zip(stored, vals, strict=True)]
            continue
        cur = acc[key]
        for i, a in enumerate(stored):
            x, y = cur[i], vals[i]
            if a.merge == "union":  # sketch parts, estimated below
                cur[i] = [*x, y]
            elif x is None or y is None:
                cur[i] = y if x is None else x
            elif a.merge == "sum":
                cur[i] = x + y
            else:
                cur[i] = min(x, y) if a.merge == "min" else max(x, y)
    idx = {a.name: i for i, a in enumerate(stored)}
    means = {m.name: m for m in view.means}
    out = []
    for key, vals in acc.items():
        row = list(key)
        for a in view.aggregates:
            if isinstance(a, Mean):
                m = means[a.name]
                row.append(vals[idx[m.sum_name]] / vals[idx[m.count_name]])
            elif a.kind == "approx_distinct":
                row.append(parts_estimate(vals[idx[a.name]]))
            else:
                row.append(vals[idx[a.name]])
        out.append(tuple(row))
    return out


def test_rerun_same_snapshot_same_content_and_rollback_and_prune(archived, pipeline, spark, run_cli):
    settings = archived
    layout = Layout(settings.home)
    m1 = run_batch(settings, pipeline, spark=spark)
    m2 = run_batch(settings, pipeline, spark=spark)
    assert (m1.version, m2.version) == ("v000001", "v000002")
    assert m1.watermark == m2.watermark and m1.inputs == m2.inputs
    for view in pipeline.views:
        assert sorted(version_rows(settings.home, "v000001", view, raw=True), key=repr) == \
            sorted(version_rows(settings.home, "v000002", view, raw=True), key=repr)
    # more data -> v3 at a higher watermark
    produce(run_cli, 500, seed=12)
    ingest(settings, pipeline, until_caught_up=True)
    m3 = run_batch(settings, pipeline, spark=spark)
    assert any(below(m3)[k] > w for k, w in below(m2).items())
    assert_version_equals_oracle(settings, pipeline, m3)
    # rollback through the real CLI: CURRENT -> v2, the older snapshot, which still equals its oracle
    res = run_cli("batch", "--rollback")
    assert "v000003 -> v000002" in res.stdout
    assert batch_pointer(layout) == "v000002"
    assert_version_equals_oracle(settings, pipeline, current_batch_manifest(layout))
    # rollback again -> v1; a new run numbers after the highest existing version and becomes current
    assert rollback(settings.home) == ("v000002", "v000001")
    m4 = run_batch(settings, pipeline, spark=spark, keep=2)
    assert m4.version == "v000004" and batch_pointer(layout) == "v000004"
    # keep=2 pruned everything but the newest two (the current one and the one before it)
    assert layout.batch_versions() == ["v000003", "v000004"]
    assert retire_versions(settings.home, keep=2) == []
    # the rollback refuses when the speed layer says it pruned beyond the previous watermark
    big = Positions({tp: w + 10 * settings.handoff_block for tp, w in m4.watermark.items()})
    write_contract(layout.speed_snapshot("s-test") / "snapshot.json",
                   SpeedSnapshotMeta(snapshot="s-test", positions=big, pruned_to=big, block=settings.handoff_block))
    write_pointer(layout.speed_pointer, SpeedPointer("s-test"))
    with pytest.raises(PublishError, match="pruned"):
        rollback(settings.home)
    assert batch_pointer(layout) == "v000004"


def test_failed_run_changes_nothing_served(archived, pipeline, spark):
    settings = archived
    layout = Layout(settings.home)
    m1 = run_batch(settings, pipeline, spark=spark)
    # corrupt one input file in place (same name, garbage content): the Spark read fails
    victim = settings.home / m1.inputs[0].path
    good = victim.read_bytes()
    victim.write_bytes(b"PAR1 this is not parquet PAR1")
    try:
        with pytest.raises(Exception):  # noqa: B017 - any Spark error; what matters is what is served after
            run_batch(settings, pipeline, spark=spark)
    finally:
        victim.write_bytes(good)
    assert batch_pointer(layout) == "v000001"
    assert layout.batch_versions() == ["v000001"]
    # the failed run's prefix is gone: the only one left is where v1 was staged and lives
    staged = [d for d in layout.batch_views.iterdir() if d.name.startswith("run-")]
    assert staged == [layout.batch_version("v000001")]
    assert_version_equals_oracle(settings, pipeline, current_batch_manifest(layout))


def test_nothing_to_compute_is_a_clear_error(settings, pipeline, spark, run_cli):
    with pytest.raises(NothingToCompute):
        run_batch(settings, pipeline, spark=spark)
    res = run_cli("batch", check=False)
    assert res.returncode != 0 and "no complete block" in res.stderr and "Traceback" not in res.stderr


def test_a_kappa_replay_ahead_of_master_refuses_the_next_batch_run_until_the_archiver_caught_up(
        settings, pipeline, spark, run_cli):
    """A Kappa replay publishes from the log itself, ahead of an archiver that has not run: a batch run then would
    move the watermark backwards. It is refused before any work, with what to do; once master caught up, it runs."""
    produce(run_cli, 2000, malformed_fraction=0.03)
    run_cli("replay")
    with pytest.raises(MasterBehindPublished, match="let the archiver catch up"):
        run_batch(settings, pipeline, spark=spark)
    res = run_cli("batch", check=False)
    assert res.returncode != 0 and "kappa-replay" in res.stderr and "ingest --until-caught-up" in res.stderr
    assert "Traceback" not in res.stderr
    ingest(settings, pipeline, until_caught_up=True)
    manifest = run_batch(settings, pipeline, spark=spark)
    assert_version_equals_oracle(settings, pipeline, manifest)


def test_view_option_recomputes_one_view_at_published_watermark(archived, pipeline, spark, run_cli):
    settings = archived
    m1 = run_batch(settings, pipeline, spark=spark)
    produce(run_cli, 300, seed=13)
    ingest(settings, pipeline, until_caught_up=True)
    m2 = run_batch(settings, pipeline, spark=spark, views=["revenue_daily"])
    assert m2.watermark == m1.watermark  # one watermark per version: the published one
    assert_version_equals_oracle(settings, pipeline, m2)
    # unchanged views are carried over as the very same files (hard links), the named one recomputed
    v1, v2 = Layout(settings.home).batch_version("v000001"), Layout(settings.home).batch_version("v000002")
    for view in pipeline.views:
        same = all(os.path.samefile(f, v1 / view.name / f.name) for f in (v2 / view.name).glob("*.parquet")
                   if (v1 / view.name / f.name).exists())
        recomputed = m2.views[view.name].computed_in == "v000002"
        assert recomputed == (view.name == "revenue_daily")
        if not recomputed:
            assert same and m2.views[view.name].computed_in == "v000001"


SENSORS = '''
from datetime import timedelta
from lambdalake.aggregates import count, max_, mean, min_, sum_
from lambdalake.fields import Field, Source
from lambdalake.pipeline import Pipeline, View

readings = Source(
    name="readings", topic="lab.readings.{suffix}", key="device", event_id="rid", event_time="at",
    fields=[Field.string("rid"), Field.timestamp("at"), Field.string("device"),
            Field.string("site", required=False, nullable=True), Field.integer("temp_c", minimum=-80, maximum=80),
            Field.integer("battery", required=False)],
)
pipeline = Pipeline("lab", sources=[readings], views=[
    View("site_15min", source="readings", keys=["site"], bucket=timedelta(minutes=15),
         aggregates=[mean("avg_temp", "temp_c"), min_("min_temp", "temp_c"), max_("max_device", "device"),
                     min_("min_battery", "battery")]),
    View("device_daily", source="readings", keys=["device", "site"], bucket=timedelta(days=1),
         aggregates=[count("n"), sum_("sum_temp", "temp_c"), max_("max_temp", "temp_c")]),
])
'''


def test_second_pipeline_needs_no_engine_change(kafka_broker, tmp_path, unique_suffix, spark, cli_env):
    """A user's own pipeline file (nullable key, string max, optional int min, mean) through the real CLI."""
    import random

    from lambdalake.config import load_settings

    pfile = tmp_path / "lab.py"
    pfile.write_text(SENSORS.replace("{suffix}", unique_suffix))
    home = tmp_path / "lab-lake"
    settings = load_settings(home=home, bootstrap=kafka_broker, pipeline=str(pfile), partitions=3).with_(
        handoff_block=20)
    pipeline = load_pipeline(str(pfile))
    rng = random.Random(5)
    lines = []
    for i in range(700):
        doc = {"rid": f"r{i}", "at": f"2026-03-0{1 + i % 3}T{i % 24:02d}:{(i * 7) % 60:02d}:00+02:00",
               "device": f"dev-{rng.randrange(12)}", "temp_c": rng.randrange(-20, 40)}
        if rng.random() < 0.7:
            doc["site"] = rng.choice(["north", "south", None])
        if rng.random() < 0.5:
            doc["battery"] = rng.randrange(0, 100)
        lines.append(json.dumps(doc))
        if rng.random() < 0.05:
            lines.append(json.dumps(doc))  # duplicate
        if rng.random() < 0.03:
            lines.append(json.dumps({**doc, "rid": f"bad{i}", "temp_c": 500}))  # out of range
        if rng.random() < 0.02:
            lines.append('{"rid": "broken"')
    f = tmp_path / "readings.jsonl"
    f.write_text("\n".join(lines) + "\n")
    env = {**cli_env, "LAMBDALAKE_HOME": str(home), "LAMBDALAKE_PIPELINE": str(pfile),
           "LAMBDALAKE_PARTITIONS": "3", "LAMBDALAKE_HANDOFF_BLOCK": "20"}
    for args in (["topics", "--no-count"], ["load", str(f), "--source", "readings"], ["ingest", "--until-caught-up"]):
        res = subprocess.run([LAMBDALAKE, *args], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
    manifest = run_batch(settings, pipeline, spark=spark)
    log = read_log(kafka_broker, [readings_topic(pipeline)])
    expected = oracle_views(pipeline, log, below=below(manifest))
    assert any(r[0] is None for r in expected["site_15min"]), "the data should produce a null-site group"
    for view in pipeline.views:
        assert_rows_equal(version_rows(home, manifest.version, view), expected[view.name], view.name)


def readings_topic(pipeline) -> str:
    return pipeline.sources[0].topic


@pytest.mark.slow
def test_killed_cli_run_changes_nothing_served(archived, pipeline, spark, cli_env):
    """kill -9 of a real `lambdalake batch` at its worst instant — every view written and validated in its staging
    directory, nothing published (``LAMBDALAKE_BATCH_FAULT=staged``; polling for the staging directory from
    outside missed that window on a fast machine): CURRENT and the served version are untouched; the next run cleans
    up the dead run's staging directory and publishes normally."""
    settings = archived
    layout = Layout(settings.home)
    m1 = run_batch(settings, pipeline, spark=spark)
    proc = subprocess.Popen([LAMBDALAKE, "batch"], env={**cli_env, "LAMBDALAKE_BATCH_FAULT": "staged"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        rc = proc.wait(300)
    finally:
        kill_group(proc)  # its Spark JVM too, if it outlived the driver
        _, err = proc.communicate(timeout=60)
    assert rc == -9, err.decode(errors="replace")[-3000:]
    staged = [d for d in layout.batch_views.iterdir()  # v1 lives in its run's prefix too
              if d.name.startswith("run-") and d != layout.batch_version("v000001")]
    assert staged and all((d / v.name).is_dir() and any((d / v.name).iterdir()) for d in staged
                          for v in pipeline.views), "the killed run had not written its views"
    assert batch_pointer(layout) == "v000001"
    assert layout.batch_versions() == ["v000001"]
    m2 = run_batch(settings, pipeline, spark=spark)
    assert m2.version == "v000002" and m2.watermark == m1.watermark
    assert not any(d.exists() for d in staged)  # the dead run's prefix; m2 lives in its own run's prefix


@pytest.mark.slow
def test_spark_submit_on_a_local_cluster(archived, pipeline, cli_env):
    """`spark-submit batch/job.py` as a user (or the Airflow DAG) runs it, on a multi-executor Spark cluster
    (2 workers, separate executor JVMs: everything the job ships to executors must pickle and import there)."""
    settings = archived
    spark_submit = str(Path(LAMBDALAKE).parent / "spark-submit")
    job = str(Path(__file__).resolve().parent.parent / "batch" / "job.py")
    env = {**cli_env, "PYSPARK_PYTHON": str(Path(LAMBDALAKE).parent / "python")}
    res = subprocess.run([spark_submit, "--master", "local-cluster[2,1,1024]", job, "--home", str(settings.home),
                          "--pipeline", settings.pipeline], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["version"] == "v000001"
    manifest = current_batch_manifest(Layout(settings.home))
    assert manifest.spark_master == "local-cluster[2,1,1024]"
    assert_version_equals_oracle(settings, pipeline, manifest)


def test_input_checksums_reused_only_for_files_unchanged_since_the_published_run(tmp_path):
    """Step 1 takes an input's sha256 from the published manifest only when path, range and size match and the file
    is older than that run's start; anything else is hashed again (no Spark, no broker)."""
    from datetime import UTC, datetime, timedelta

    from batch.inputs import KnownChecksums, select_inputs
    from batch.master import master_table, write_parquet_atomic
    from lambdalake.contracts import InputFile

    pipeline = load_pipeline("lambdalake.pipelines.clickstream")
    src = pipeline.source("purchases")
    layout = Layout(tmp_path / "lake")
    t0 = 1_767_571_200_000_000
    cols = {"event_id": ["e1", "e2"], "event_time": [t0, t0 + 1], "user_id": ["u", "u"], "product_id": ["p", "p"],
            "amount_cents": [5, 6], "currency": ["EUR", "EUR"]}
    path = layout.master_file(src.name, 0, 0, 2)
    write_parquet_atomic(master_table(src, cols, 0, [0, 1], [t0, t0]), path)
    first = select_inputs(layout, pipeline, 1).files_of(src)
    assert [i.sha256 for i in first] == [sha256_file(path)]

    def known(started: datetime, **change) -> KnownChecksums:
        rec = InputFile(**{**{f: getattr(first[0], f) for f in first[0].__struct_fields__}, "sha256": "0" * 64,
                           **change})
        m = BatchManifest(pipeline=pipeline.name, watermark=Positions({}), block=1, archived=Positions({}),
                          inputs=[rec], started_at=started.isoformat().replace("+00:00", "Z"))
        k = KnownChecksums.of(m)
        assert k is not None
        return k

    later = datetime.now(UTC) + timedelta(minutes=5)
    def sha(k: KnownChecksums) -> str:
        return select_inputs(layout, pipeline, 1, known=k).files_of(src)[0].sha256

    assert sha(known(later)) == "0" * 64  # unchanged since that run: the recorded checksum is reused
    assert sha(known(datetime.now(UTC) - timedelta(minutes=5))) == sha256_file(path)  # modified after: hashed
    assert sha(known(later, bytes=first[0].bytes + 1)) == sha256_file(path)  # other size: hashed
    assert sha(known(later, end=3)) == sha256_file(path)  # other range: hashed
    assert KnownChecksums.of(None) is None
