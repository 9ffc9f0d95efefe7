"""``lambdalake forget`` (issue 13 §2) on a lake built by the product itself: real broker, archiver, Spark batch job
and speed layer — the lake of tests/test_audit.py, whose last test runs :func:`forget_scenario` (building a lake
of its own would cost the suite a minute).

A user with events below and above the batch watermark W, in every view (page views and purchases), with duplicates,
and the subject of malformed messages (``user-bad``: in the DLQ and the rejected files) are forgotten. At once: no
served row keyed by the user, no master row, no rejected message. A forget killed between its intent record and the
rename (``LAMBDALAKE_ERASE_FAULT=rewrite``) resumes when run again. After the next batch version and the speed
layer's rebuild: every served view equals the independent oracle over the log without the subjects, no speed row
and no audit output derives from them, and ``lambdalake audit`` passes (erased offsets accounted).
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter

import orjson
import pyarrow.parquet as pq
import pytest

from audit.check import audit
from audit.events import erased
from batch.archiver import ingest
from batch.erase import forget
from batch.job import run_batch
from batch.partition_buffer import RollPolicy
from lambdalake import erasure
from lambdalake.config import load_settings
from lambdalake.heads import master_files, rejected_files
from lambdalake.layout import Layout, current_batch_manifest
from lambdalake.schema import VALUE_COL
from lambdalake.status import erasure_status
from serving.connection import connect
from serving.datasets import speed_table
from serving.published import resolve_pair
from speed.consumer import SpeedLayer, SpeedOptions
from tests.conftest import LAMBDALAKE
from tests.oracle import assert_rows_equal, oracle_views, parse_event, read_log
from wiring.cli import main
from wiring.demo_stream import demo_messages

BAD = "user-bad"  # the user_id of the demo's malformed messages that carry one
def _env(settings, **extra) -> dict:
    return {**os.environ, "LAMBDALAKE_HOME": str(settings.home), "LAMBDALAKE_BOOTSTRAP": settings.bootstrap,
            "LAMBDALAKE_PIPELINE": settings.pipeline, "LAMBDALAKE_HANDOFF_BLOCK": str(settings.handoff_block),
            "LAMBDALAKE_PARTITIONS": str(settings.partitions), **extra}


def _pick_subject(pipeline, messages, watermark) -> str:
    """From the log (the oracle's reading): a user with page views below and above W, purchases, and a duplicate."""
    pv, pu = pipeline.source("pageviews"), pipeline.source("purchases")
    below, above, bought, ids = Counter(), Counter(), Counter(), Counter()
    for m in messages:
        src = pv if m.topic == pv.topic else pu
        e = parse_event(src, m.value)
        if e is None:
            continue
        u = e["user_id"]
        ids[(u, e["event_id"])] += 1
        if src is pu:
            bought[u] += 1
        elif m.offset < watermark.at(pv.topic, m.partition):
            below[u] += 1
        else:
            above[u] += 1
    dup = {u for (u, _), n in ids.items() if n > 1}
    ok = [u for u in below if above[u] and bought[u] and u in dup]
    assert ok, "the demo stream has no user with all the traits this test needs"
    return max(ok, key=lambda u: (below[u] + above[u], u))


def _master_subjects(layout: Layout, source) -> Counter:
    return Counter(v for f in master_files(layout, source.name)
                   for v in pq.read_table(f.path, columns=[source.key]).column(0).to_pylist())


def _rejected_subjects(layout: Layout, source) -> Counter:
    return Counter(erasure.subject_of(v, source.key) for f in rejected_files(layout, source.name)
                   for v in pq.read_table(f.path, columns=[VALUE_COL]).column(0).to_pylist())


def _served(settings, pipeline, view: str) -> list[tuple]:
    con = connect(settings=settings, pipeline=pipeline)
    try:
        return con.sql(f'SELECT * FROM "{view}"').fetchall()
    finally:
        con.close()


def _status(layout: Layout) -> dict[tuple[str, str], str]:
    return {(e.source, e.subject): e.stage for e in erasure_status(layout, current_batch_manifest(layout))}


def forget_scenario(settings, pipeline, spark, monkeypatch, capfd) -> None:
    """The whole story on the lake of tests/test_audit.py (built once there; run last, it changes the lake): 600
    events archived and batched, 300 more in the log and the speed layer only."""
    layout = Layout(settings.home)
    pv, pu = pipeline.source("pageviews"), pipeline.source("purchases")
    ingest(settings, pipeline, until_caught_up=True, policy=RollPolicy(max_rows=73))  # master above W too
    w = current_batch_manifest(layout).watermark
    user = _pick_subject(pipeline, read_log(settings.bootstrap, [pv.topic]) + read_log(settings.bootstrap,
                                                                                        [pu.topic]), w)
    gone = {user, BAD}
    sides = {o >= w.at(pv.topic, f.partition) for f in master_files(layout, pv.name)
             for u, o in zip(*pq.read_table(f.path, columns=["user_id", "_offset"]).to_pydict().values(), strict=True)
             if u == user}
    assert sides == {False, True}, "the user has master rows below and above W"
    assert _master_subjects(layout, pu)[user] and _rejected_subjects(layout, pv)[BAD]
    assert any(r[0] == user for r in _served(settings, pipeline, "user_activity_daily"))

    # 1. pageviews, in-process: rows keyed by the user are gone from serving at once
    report = forget(settings, pipeline, "pageviews", [user, BAD])
    assert report.master_rows >= 2 and report.rejected_messages >= 1
    assert {r.subject: r.stage for r in report.requests} == {user: "master rewritten", BAD: "master rewritten"}
    assert not _master_subjects(layout, pv).keys() & gone
    assert not _rejected_subjects(layout, pv).keys() & gone
    served = _served(settings, pipeline, "user_activity_daily")
    assert served and not [r for r in served if r[0] in gone]
    assert sum(len(o) for o in erased(layout, pv).offsets.values()) == report.erased

    # 2. purchases through the CLI, kill -9 between the intent record and the rename, then run again
    res = subprocess.run([LAMBDALAKE, "forget", "--source", "purchases", user, BAD], capture_output=True, text=True,
                         env=_env(settings, LAMBDALAKE_ERASE_FAULT="rewrite"), timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == -9, res.stderr
    assert {r.subject for r in erasure.read_requests(layout, pu.name)} == gone  # recorded before any rewrite
    assert any(rec.status == "started" for _, rec in erasure.erase_records(layout))
    assert not erased(layout, pu).offsets  # a rewrite not renamed erases nothing
    assert _master_subjects(layout, pu)[user]
    for k, v in _env(settings).items():
        if k.startswith("LAMBDALAKE_"):
            monkeypatch.setenv(k, v)
    capfd.readouterr()
    assert main(["forget", "--source", "purchases", user, BAD]) == 0
    out = capfd.readouterr().out
    assert "recovered an interrupted rewrite" in out and "aborted" in out, out
    assert "no retention limit" in out  # the embedded broker keeps the log forever, and forget says so
    assert not any(rec.status == "started" for _, rec in erasure.erase_records(layout))
    assert not _master_subjects(layout, pu).keys() & gone and not _rejected_subjects(layout, pu).keys() & gone
    stages = _status(layout)  # the published batch version still counts the user's page views below W
    assert stages[(pv.name, user)] == "master rewritten", stages
    assert set(stages.values()) <= {"master rewritten", "batch corrected"}, stages  # no purchase of it read: done

    # forgetting a subject that does not exist: nothing rewritten
    nobody = forget(settings, pipeline, "purchases", ["user-nobody"], publish=False)
    assert nobody.erased == 0 and not nobody.files_rewritten

    # 3. the next batch version and the speed layer's rebuild correct the aggregates
    run_batch(settings, pipeline, spark=spark)
    SpeedLayer(settings, pipeline, SpeedOptions()).run(until_caught_up=True)
    assert set(_status(layout).values()) == {"complete"}, _status(layout)
    rows = speed_table(pipeline, pipeline.view("user_activity_daily"), resolve_pair(settings.home))
    assert rows.num_rows and not set(rows.column("user_id").to_pylist()) & gone
    messages = [m for m in read_log(settings.bootstrap, [pv.topic, pu.topic])
                if not ((e := parse_event(pipeline.source_for_topic(m.topic), m.value)) and e["user_id"] in gone)]
    expected = oracle_views(pipeline, messages)
    for v in pipeline.views:
        assert_rows_equal(_served(settings, pipeline, v.name), expected[v.name], v.name)
    result = audit(settings, pipeline)
    assert result.ok, [str(d) for d in result.differences]
    text = orjson.dumps(result.to_dict()).decode()
    assert user not in text and BAD not in text


@pytest.mark.parametrize("args, expected", [
    (["forget", "u1"], "--source is required"),
    (["forget", "--source", "pageviews"], "no subject given"),
    (["forget", "--source", "pageviews", " u1"], "surrounding spaces"),
])
def test_forget_bad_arguments(args, expected, tmp_path, monkeypatch, capfd):
    """In-process (cheap): the one line, its exit status, nothing recorded."""
    for k in [k for k in os.environ if k.startswith("LAMBDALAKE_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("LAMBDALAKE_HOME", str(tmp_path))
    monkeypatch.setenv("LAMBDALAKE_BOOTSTRAP", "127.0.0.1:1")
    assert main(args) == 2
    err = capfd.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "checkpoints").exists()  # nothing recorded


def test_forget_unknown_source_cli(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDALAKE_")}
    res = subprocess.run([LAMBDALAKE, "forget", "--source", "nope", "u1"], capture_output=True, text=True,
                         timeout=60, env={**env, "LAMBDALAKE_HOME": str(tmp_path),
                                          "LAMBDALAKE_BOOTSTRAP": "127.0.0.1:1"})
    assert res.returncode != 0 and "unknown source 'nope'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr + res.stdout and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "checkpoints").exists()


def _small_lake(tmp_path, clickstream):
    """One master file and one rejected file of pageviews, written by the archiver's own writers from the demo
    stream (no broker): (layout, source, log messages, verdicts)."""
    from batch.master import master_table, rejected_table, write_parquet_atomic
    from lambdalake.validation import Validator

    src = clickstream.source("pageviews")
    msgs = [m for m in demo_messages(clickstream, 80, malformed_fraction=0.2, duplicate_fraction=0.1, seed=5)
            if m.topic == src.topic]
    validate = Validator(src)
    verdicts = [validate(m.value) for m in msgs]
    ok = [o for o, v in enumerate(verdicts) if v.ok]
    bad = [o for o, v in enumerate(verdicts) if not v.ok]
    layout = Layout(tmp_path)
    cols = {f.name: [verdicts[o].record[f.name] for o in ok] for f in src.fields}
    write_parquet_atomic(master_table(src, cols, 0, ok, [0] * len(ok)), layout.master_file(src.name, 0, 0, len(msgs)))
    write_parquet_atomic(rejected_table(src, 0, bad, [msgs[o].value for o in bad], [verdicts[o].reason for o in bad],
                                        0), layout.rejected_file(src.name, 0, 0, len(msgs)))
    return layout, src, msgs, verdicts


class Crash(BaseException):
    """What a SIGKILL leaves on disk, without killing the test process: nothing after the fault point runs."""


def test_forget_resumes_after_a_crash_and_accounts_erased_offsets(tmp_path, clickstream, monkeypatch):
    """The resumable steps without a broker: a crash after recording the request, then one between the intent
    record and the rename; each rerun completes; the audit's offset accounting counts the removed offsets as
    erased (a DLQ record of one may remain; a rejected file or master row still holding one is a difference)."""
    import batch.erase
    from audit.log_master import check_log_master, read_rejected
    from audit.logread import DeadLetters, PartitionLog
    from audit.report import AuditReport, CheckResult

    layout, src, msgs, verdicts = _small_lake(tmp_path, clickstream)
    settings = load_settings(home=tmp_path, pipeline="lambdalake.pipelines.clickstream")
    user = Counter(v.record["user_id"] for v in verdicts if v.ok).most_common(1)[0][0]
    gone_offsets = {o for o, v in enumerate(verdicts) if v.ok and v.record["user_id"] == user}
    gone_offsets |= {o for o, v in enumerate(verdicts) if not v.ok and erasure.subject_of(msgs[o].value, "user_id")
                     == BAD}
    assert len(gone_offsets) > 2

    def crash_at(step):
        def fault(at):
            if at == step:
                raise Crash(at)
        monkeypatch.setattr(batch.erase, "fault", fault)

    crash_at("recorded")
    with pytest.raises(Crash):
        forget(settings, clickstream, "pageviews", [user, BAD], publish=False)
    assert erasure.erased_subjects(layout, src.name) == {user, BAD}  # skipped by every reader from now on
    assert not erased(layout, src).offsets and _master_subjects(layout, src)[user]  # nothing rewritten yet
    crash_at("rewrite")
    with pytest.raises(Crash):
        forget(settings, clickstream, "pageviews", [user], publish=False)
    assert [rec.status for _, rec in erasure.erase_records(layout)] == ["started"]
    assert not erased(layout, src).offsets and _master_subjects(layout, src)[user]
    crash_at(None)
    report = forget(settings, clickstream, "pageviews", [user], publish=False)
    assert report.recovered and "aborted" in report.recovered[0]
    assert not _master_subjects(layout, src).keys() & {user, BAD}
    assert not _rejected_subjects(layout, src).keys() & {user, BAD}  # the pending BAD request was resumed too
    got = erased(layout, src).offsets
    assert set(got[0]) == gone_offsets
    assert all(r.stage == "master rewritten" for r in erasure.read_requests(layout, src.name))
    again = forget(settings, clickstream, "pageviews", [user], publish=False)
    assert again.erased == 0 and not again.files_rewritten  # idempotent

    log = PartitionLog(first=0, end=len(msgs), stop=len(msgs), offsets=list(range(len(msgs))),
                       values=[m.value for m in msgs])
    bad = [o for o, v in enumerate(verdicts) if not v.ok]

    def run(kept) -> AuditReport:
        report = AuditReport(str(tmp_path), clickstream.name)
        report.checks["log-master"] = CheckResult("log-master")
        check_log_master(report, src, master_files(layout, src.name), {0: log}, DeadLetters({0: bad}), erased(layout,
                         src), 1.0, kept)
        return report

    rejected, _ = read_rejected(rejected_files(layout, src.name))
    assert run(rejected).ok, run(rejected).differences  # DLQ records of erased messages remain: accounted
    dlq_erased = sorted(gone_offsets & set(bad))[0]
    stale = run({0: {**rejected[0], dlq_erased: msgs[dlq_erased].value}})
    assert [d.subject for d in stale.differences] == [f"pageviews[0]@{dlq_erased}"]
