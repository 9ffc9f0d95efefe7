"""``lambdalake audit`` (issue 13 §1) on a lake built by the product itself: real broker, archiver, Spark batch job
and speed layer, built once for the module.

The lake has late, duplicated and malformed messages, a batch version whose watermark W trails the archive, and
speed rows beyond W. Untouched, the audit passes (exit 0). Then one value is rewritten with pyarrow in a master
file, a batch view file and a speed snapshot file, each in turn (and put back): the audit names the difference each
time (exit 1). A broker it cannot reach is exit 2 with one line.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from audit.check import audit
from audit.report import LOG_MASTER, LOG_SPEED, MASTER_BATCH, MERGED
from batch.archiver import ingest
from batch.job import run_batch
from batch.partition_buffer import RollPolicy
from lambdalake.clients import ensure_topics
from lambdalake.config import load_settings
from lambdalake.embedded import free_port
from lambdalake.heads import master_files, rejected_files
from lambdalake.layout import Layout
from lambdalake.pipeline import load_pipeline
from lambdalake.servingcopy import copy_path, table_name
from lambdalake.speedset import current_speed_snapshot
from serving.published import resolve_pair
from speed.consumer import SpeedLayer, SpeedOptions
from tests.conftest import LAMBDALAKE, write_pipeline_copy
from wiring.demo_stream import demo_messages
from wiring.produce import send

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def lake(kafka_broker, spark, tmp_path_factory):
    """Archive 600 events, batch (W trails the archive), 300 more events, speed layer caught up."""
    tmp = tmp_path_factory.mktemp("audit")
    pipe_file = write_pipeline_copy(tmp, "lambdalake.pipelines.clickstream", uuid.uuid4().hex[:10])
    (tmp / "lake").mkdir()
    settings = load_settings(home=tmp / "lake", bootstrap=kafka_broker, pipeline=str(pipe_file),
                             partitions=4).with_(handoff_block=50)
    pipeline = load_pipeline(settings.pipeline)
    ensure_topics(settings, pipeline)
    mixed = dict(late_fraction=0.1, duplicate_fraction=0.05, malformed_fraction=0.03)
    send(settings, demo_messages(pipeline, 600, seed=1, **mixed), progress=False)
    ingest(settings, pipeline, until_caught_up=True, policy=RollPolicy(max_rows=73))
    manifest = run_batch(settings, pipeline, spark=spark)
    assert manifest.watermark.total() > 0
    send(settings, demo_messages(pipeline, 300, seed=2, **mixed), progress=False)
    SpeedLayer(settings, pipeline, SpeedOptions()).run(until_caught_up=True)
    pair = resolve_pair(settings.home)
    assert any(pair.positions.at(t, p) > w for (t, p), w in pair.watermark.items()), "speed rows beyond W"
    return settings, pipeline


def _env(settings, **extra) -> dict:
    import os

    return {**os.environ, "LAMBDALAKE_HOME": str(settings.home), "LAMBDALAKE_BOOTSTRAP": settings.bootstrap,
            "LAMBDALAKE_PIPELINE": settings.pipeline, **extra}


def _cli(settings, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([LAMBDALAKE, "audit", *args], capture_output=True, text=True, timeout=300,
                          env=_env(settings, **env), stdin=subprocess.DEVNULL)


@contextmanager
def tampered(path: Path, column: str, row: int | None = None) -> Iterator[tuple]:
    """Rewrite one value of ``column`` (an integer) in the parquet file ``path``: +1 at ``row`` (default: the
    first non-null). The original bytes are put back afterwards. Yields (row, old value)."""
    original = path.read_bytes()
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    i = row if row is not None else next(k for k, v in enumerate(values) if v is not None)
    old = values[i]
    values[i] = old + 1
    col = pa.array(values, table.schema.field(column).type)
    pq.write_table(table.set_column(table.schema.get_field_index(column), table.schema.field(column), col), path)
    try:
        yield i, old
    finally:
        path.write_bytes(original)


@contextmanager
def tampered_copy(version_dir: Path, view: str, column: str) -> Iterator[None]:
    """+1 on ``column`` of one row of ``view`` in the version's serving copy (lambdalake.servingcopy); the original
    bytes are put back afterwards."""
    path = copy_path(version_dir)
    original = path.read_bytes()
    con = duckdb.connect(str(path))
    try:
        table = table_name(view)
        con.execute(f'UPDATE "{table}" SET "{column}" = "{column}" + 1 '
                    f'WHERE rowid = (SELECT min(rowid) FROM "{table}")')
        con.execute("CHECKPOINT")
    finally:
        con.close()
    try:
        yield
    finally:
        path.write_bytes(original)
        for wal in path.parent.glob(path.name + ".wal"):
            wal.unlink()


def _named(report, check: str, *words: str) -> list:
    return [d for d in report.differences if d.check == check and all(w in str(d) for w in words)]


def test_untouched_lake_passes_and_reports_what_it_compared(lake):
    settings, pipeline = lake
    res = _cli(settings, "--format", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and report["differences"] == []
    checks = report["checks"]
    assert checks[LOG_MASTER]["compared"]["messages_revalidated"] == checks[LOG_MASTER]["compared"]["log_messages"]
    assert checks[LOG_MASTER]["compared"]["dlq_records"] > 0 and checks[LOG_MASTER]["compared"]["log_bytes"] > 0
    assert checks[LOG_MASTER]["compared"]["rejected_bytes"] > 0  # the lake's copies of the DLQ'd messages
    assert checks[MASTER_BATCH]["compared"]["batch_rows"] > 0 and checks[MASTER_BATCH]["compared"]["master_events"] > 0
    assert checks[MASTER_BATCH]["compared"]["inputs_checksummed"] > 0
    assert checks[LOG_SPEED]["compared"]["speed_rows"] > 0
    assert checks[MERGED]["compared"]["served_rows"] > 0
    assert all(c["positions"] for c in (checks[n]["compared"] for n in (LOG_MASTER, MASTER_BATCH, LOG_SPEED)))
    assert report["seconds"] > 0 and report["batch_version"] == "v000001" and report["speed_snapshot"]
    # --sample re-validates a share of the offsets; --view narrows the views
    part = audit(settings, pipeline, views=["revenue_daily"], sample=0.3)
    assert part.ok and part.views == ["revenue_daily"]
    assert 0 < part.checks[LOG_MASTER].compared["messages_revalidated"] < part.checks[LOG_MASTER].compared[
        "log_messages"]


def test_audit_catches_a_tampered_master_batch_and_speed_file(lake):
    settings, pipeline = lake
    layout = Layout(settings.home)
    pair = resolve_pair(settings.home)
    pv = pipeline.source("pageviews")

    # master: one page view's duration below W
    w = pair.watermark.of_topic(pv.topic)
    f = next(m for m in master_files(layout, pv.name) if m.start < w.get(m.partition, 0))
    offsets = pq.read_table(f.path, columns=["_offset"]).column("_offset").to_pylist()
    row = next(i for i, o in enumerate(offsets) if o < w[f.partition])
    with tampered(f.path, "duration_ms", row) as (_, old):
        report = audit(settings, pipeline)
    assert not report.ok
    where = f"pageviews[{f.partition}]@{offsets[row]}"
    assert _named(report, LOG_MASTER, where, f"duration_ms={old + 1}", f"(log: {old})"), report.differences
    assert _named(report, MASTER_BATCH, "pageviews_hourly"), report.differences
    assert _named(report, MASTER_BATCH, f.path.name, "changed since the batch version read it"), report.differences

    # batch: one row's count in a view file of the published version
    view = pipeline.view("pageviews_hourly")
    batch_file = pair.batch_files(view)[0]
    with tampered(batch_file, "views") as (_, old):
        res = _cli(settings)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "DIFFERENCE master-batch" in res.stdout and f"{pair.batch_version}/pageviews_hourly" in res.stdout
    assert f"views={old + 1} (recomputation from master: {old})" in res.stdout
    # serving reads the version's serving copy (written at publish), which tampering with a parquet file leaves as
    # it was: the served answers are still right, and the audit says only what differs
    assert "DIFFERENCE merged" not in res.stdout and "Traceback" not in res.stderr
    # the serving copy itself tampered with: the served answers change, and the merged check says so
    with tampered_copy(layout.batch_version(pair.batch_version), "pageviews_hourly", "views"):
        res = _cli(settings)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "DIFFERENCE merged: pageviews_hourly" in res.stdout and "Traceback" not in res.stderr

    # speed: one visible row's revenue in the snapshot
    revenue = pipeline.view("revenue_daily")
    snap = current_speed_snapshot(layout)
    purchases = pipeline.source("purchases")
    wp = pair.watermark.of_topic(purchases.topic)
    for name in snap.views["revenue_daily"].file_names("revenue_daily"):  # the first file with a visible row
        speed_file = layout.speed_file(snap.snapshot, name)
        table = pq.read_table(speed_file)
        visible = pc.greater_equal(table.column("_block_start"),
                                   pa.array([wp.get(p, 0) for p in table.column("_partition").to_pylist()],
                                            pa.int64()))
        if True in visible.to_pylist():
            break
    row = visible.to_pylist().index(True)
    agg = next(a.name for a in revenue.stored_aggregates if a.kind == "sum")
    with tampered(speed_file, agg, row):
        report = audit(settings, pipeline, views=["revenue_daily"])
    assert _named(report, LOG_SPEED, "revenue_daily", f"{agg}="), report.differences
    assert _named(report, MERGED, "revenue_daily"), report.differences
    assert not _named(report, MASTER_BATCH) and not _named(report, LOG_MASTER)

    assert audit(settings, pipeline).ok  # every file put back: the lake is whole again


def test_audit_that_cannot_reach_the_broker_exits_2_with_one_line(lake):
    settings, _ = lake
    res = _cli(settings, LAMBDALAKE_BOOTSTRAP=f"127.0.0.1:{free_port()}")
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: audit could not run") and "Kafka" in lines[0], res.stderr


def test_offset_accounting_without_a_broker(tmp_path, clickstream):
    """log <-> master on a lake the archiver's own writers build from the demo stream (no broker, no Spark): every
    archived offset in exactly one place, rejected files agree with the log; each break is a named difference."""
    from audit.events import Erased
    from audit.log_master import check_log_master, read_rejected
    from audit.logread import DeadLetters, PartitionLog
    from audit.report import AuditReport, CheckResult
    from batch.master import master_table, rejected_table, write_parquet_atomic
    from lambdalake.validation import Validator

    src = clickstream.source("pageviews")
    msgs = [m for m in demo_messages(clickstream, 60, malformed_fraction=0.2, duplicate_fraction=0.1, seed=5)
            if m.topic == src.topic]
    log = PartitionLog(first=0, end=len(msgs), stop=len(msgs), offsets=list(range(len(msgs))),
                       values=[m.value for m in msgs])
    validate = Validator(src)
    verdicts = [validate(m.value) for m in msgs]
    ok = [o for o, v in enumerate(verdicts) if v.ok]
    bad = [o for o, v in enumerate(verdicts) if not v.ok]
    assert ok and bad
    layout = Layout(tmp_path)
    cols = {f.name: [verdicts[o].record[f.name] for o in ok] for f in src.fields}
    write_parquet_atomic(master_table(src, cols, 0, ok, [0] * len(ok)), layout.master_file(src.name, 0, 0, len(msgs)))
    write_parquet_atomic(rejected_table(src, 0, bad, [msgs[o].value for o in bad], [verdicts[o].reason for o in bad],
                                        0), layout.rejected_file(src.name, 0, 0, len(msgs)))
    rejected, _ = read_rejected(rejected_files(layout, src.name))
    assert set(rejected[0]) == set(bad)

    def run(dlq_offsets: list[int], kept: dict) -> AuditReport:
        report = AuditReport(str(tmp_path), clickstream.name)
        report.checks["log-master"] = CheckResult("log-master")
        check_log_master(report, src, master_files(layout, src.name), {0: log}, DeadLetters({0: dlq_offsets}),
                         Erased(), 1.0, kept)
        return report

    assert run(bad, rejected).ok
    assert run(bad[1:], {}).differences[0].detail == "archived offset is in none of master, DLQ, erased"
    assert run(bad[1:], rejected).ok  # its DLQ record is gone but the lake keeps it: noted, accounted for
    twice = run([*bad, bad[0], ok[0]], rejected)
    assert {d.subject for d in twice.differences} == {f"pageviews[0]@{bad[0]}", f"pageviews[0]@{ok[0]}"}
    other = {0: {**rejected[0], bad[0]: b"{}"}}
    assert run(bad, other).differences[0].detail == "the rejected file holds other bytes than the log message"


def test_forget_then_audit_passes(lake, spark, monkeypatch, capfd):
    """LAST in this module (it changes the lake): ``lambdalake forget`` on this lake, then the next batch and speed
    rebuild, and the audit passes with the erased offsets accounted (tests/test_forget.py)."""
    from tests.test_forget import forget_scenario

    forget_scenario(*lake, spark, monkeypatch, capfd)
