"""Issue 14 (odd but valid inputs never crash a command): the supported instant range end to end, the reasons of
``lambdalake topics``, and a lake directory that does not exist.

The lake of the rendering tests is built without Kafka or Spark, through the product's own code: messages are
validated by :class:`lambdalake.validation.Validator`, aggregated by the speed interpreter
(:func:`speed.state.apply_records`), the first half published as a batch version (:func:`speed.replay.batch_table`
+ :func:`lambdalake.versions.publish`, as ``lambdalake replay`` does), the second half as a speed snapshot
(:func:`speed.snapshot.write_snapshot`), and the valid events as a master file (:func:`batch.master.master_table`).
The expected rendering is computed here from the accepted microseconds with plain integer arithmetic.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import tempfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pyarrow.parquet as pq
import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from batch.master import master_table, write_parquet_atomic
from lambdalake.aggregates import count
from lambdalake.config import fix_handoff_block, load_settings
from lambdalake.contracts import BatchManifest, BatchView, Positions, SpeedSnapshotMeta, SpeedView
from lambdalake.dedup import DedupWindow
from lambdalake.exceptions import ConfigError, PipelineError
from lambdalake.heads import master_files
from lambdalake.instants import FIRST_INSTANT_US, LAST_INSTANT_US, MAX_BUCKET
from lambdalake.layout import Layout
from lambdalake.pipeline import View, load_pipeline
from lambdalake.validation import Validator
from lambdalake.versions import new_staging_dir, publish
from serving.catalog import write_catalog
from serving.cli import OutputFormat, run_query, write_result
from serving.cli import register as register_serving
from serving.connection import connect
from speed.replay import batch_table
from speed.snapshot import make_visible, write_snapshot
from speed.state import apply_records, build_states
from tests.conftest import LAMBDALAKE
from wiring.topic_counts import REASON_GROUPS_SHOWN, reason_group, reason_summary

PIPELINE_FILE = '''
from datetime import timedelta
from lambdalake.aggregates import count, max_, mean
from lambdalake.fields import Field, Source
from lambdalake.pipeline import Pipeline, View

ticks = Source(name="ticks", topic="edge.ticks", key="user", event_id="event_id", event_time="event_time",
               fields=[Field.string("event_id"), Field.timestamp("event_time"), Field.string("user"),
                       Field.integer("n", minimum=0), Field.timestamp("seen_at", required=False, nullable=True)])
pipeline = Pipeline("edges", sources=[ticks], views=[
    View("per_hour", source="ticks", keys=["user"], bucket=timedelta(hours=1), aggregates=[count("events"),
         max_("top", "n")]),
    View("per_week", source="ticks", keys=[], bucket=timedelta(days=7), aggregates=[count("events")]),
    View("per_year", source="ticks", keys=["user"], bucket=timedelta(days=365), aggregates=[count("events"),
         mean("mean_n", "n")]),
])
'''
BLOCK = 2
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def utc(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


@pytest.fixture(scope="module")
def pipe_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("edges") / "edges_pipeline.py"
    f.write_text(PIPELINE_FILE)
    return f


def message(i: int, event_time: str, seen_at: str | None) -> bytes:
    return json.dumps({"event_id": f"e{i}", "event_time": event_time, "user": f"u{i % 2}", "n": i,
                       "seen_at": seen_at}).encode()


def build_lake(home: Path, pipe_file: Path, messages: list[bytes]) -> list[dict]:
    """Publish the valid ``messages`` (offsets 0.. of partition 0) as described in the module docstring: batch
    below W (half the log, on a block boundary), speed from W. Returns the accepted records."""
    pipeline = load_pipeline(str(pipe_file))
    source = pipeline.sources[0]
    topic = source.topic
    validate = Validator(source)
    records = [SimpleNamespace(offset=o, value=v) for o, v in enumerate(messages)]
    end = len(records)
    w = (end // 2) - (end // 2) % BLOCK
    layout = Layout(home)
    fix_handoff_block(home, BLOCK)

    def aggregate(part: list) -> dict:
        state = build_states(pipeline, BLOCK)[topic]
        apply_records(part, partition=0, position=0, floor=0, state=state, validate=validate,
                      window=DedupWindow(span=1 << 40), pending=lambda _: None, event_id=source.event_id)
        return state.view_tables()

    # master: the valid events with their positions (what the archiver writes)
    valid = [(r.offset, v.record) for r in records if (v := validate(r.value)).ok]
    if valid:
        cols = {f.name: [rec[f.name] for _, rec in valid] for f in source.fields}
        table = master_table(source, cols, 0, [o for o, _ in valid], [0] * len(valid))
        write_parquet_atomic(table, layout.master_file(source.name, 0, 0, end))
    # batch version: offsets < W, merged into the batch layout like a Kappa replay
    tables = aggregate(records[:w])
    staging = new_staging_dir(layout)
    views, rows = {}, {}
    for view in pipeline.views:
        out = batch_table(pipeline, view, tables[view.name])
        (staging / view.name).mkdir()
        pq.write_table(out, staging / view.name / "part-00000.parquet")
        views[view.name] = BatchView(pipeline.fingerprint(view), files=["part-00000.parquet"])
        rows[view.name] = out.num_rows
    publish(layout, staging, BatchManifest(pipeline=pipeline.name, watermark=Positions({(topic, 0): w}),
                                           block=BLOCK, row_counts=rows, views=views, engine="test", format=2))
    # speed snapshot: offsets >= W, per (partition, block)
    tables = aggregate(records[w:])
    snap = "000000000001"
    write_snapshot(layout, snap, tables, SpeedSnapshotMeta(
        pipeline=pipeline.name, positions=Positions({(topic, 0): end}), pruned_to=Positions({(topic, 0): w}),
        block=BLOCK, created_at_unix=datetime.now(UTC).timestamp(),
        rows={n: t.num_rows for n, t in tables.items()},
        views={v.name: SpeedView(pipeline.fingerprint(v), rows=tables[v.name].num_rows) for v in pipeline.views},
        format=2))
    make_visible(layout, snap)
    return [rec for _, rec in valid]


# Every timestamp the lake holds, as one TIMESTAMPTZ column (what each output path must render).
QUERY = ("SELECT 'per_hour' AS what, window_start AS t FROM per_hour UNION ALL "
         "SELECT 'per_week', window_start FROM per_week UNION ALL SELECT 'per_year', window_start FROM per_year "
         "UNION ALL SELECT 'event_time', event_time FROM master.ticks UNION ALL "
         "SELECT 'seen_at', seen_at FROM master.ticks WHERE seen_at IS NOT NULL")
BUCKETS = {"per_hour": 3600, "per_week": 7 * 86400, "per_year": 365 * 86400}


def expected(records: list[dict]) -> Counter:
    """(what, instant) pairs the query must return, from the accepted microseconds (floor = Python's //)."""
    out: Counter = Counter()
    for name, secs in BUCKETS.items():
        b = secs * 1_000_000
        keyed = {(r["user"] if name != "per_week" else None, r["event_time"] // b * b) for r in records}
        out.update((name, utc(t)) for _, t in keyed)
    out.update(("event_time", utc(r["event_time"])) for r in records)
    out.update(("seen_at", utc(r["seen_at"])) for r in records if r["seen_at"] is not None)
    return out


def serving_cli() -> typer.Typer:
    app = typer.Typer()
    register_serving(app)
    return app


def sql_outputs(home: Path, pipe_file: Path, via_cli: bool) -> dict[str, str]:
    """``lambdalake sql QUERY -f <fmt>`` for each format: the command itself (``via_cli``), or its two steps on one
    connection (:func:`serving.cli.run_query`, :func:`serving.cli.write_result`; cheaper, for many examples)."""
    if via_cli:
        app, runner, out = serving_cli(), CliRunner(), {}
        for fmt in OutputFormat:
            res = runner.invoke(app, ["sql", QUERY, "-f", fmt.value, "--home", str(home), "--pipeline", str(pipe_file)])
            assert res.exit_code == 0 and res.exception is None, (fmt, res.output, res.exception)
            out[fmt.value] = res.stdout
        return out
    con = connect(load_settings(home=home, pipeline=str(pipe_file)), str(pipe_file), materialize=False)
    try:
        result = run_query(con, QUERY)
    finally:
        con.close()
    out = {}
    for fmt in OutputFormat:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            write_result(result, fmt)
        out[fmt.value] = buf.getvalue()
    return out


def check_renders(home: Path, pipe_file: Path, records: list[dict], via_cli: bool = True) -> None:
    """Every output path renders every instant of the lake exactly: sql table/csv/json, connect(), the catalog."""
    assert all(FIRST_INSTANT_US <= r["event_time"] <= LAST_INSTANT_US for r in records)
    want = expected(records)
    iso = Counter((what, t.isoformat()) for what, t in want.elements())
    out = sql_outputs(home, pipe_file, via_cli)
    assert Counter((r["what"], r["t"]) for r in json.loads(out["json"])) == iso
    lines = out["csv"].splitlines()
    assert lines[0] == "what,t" and Counter(tuple(ln.split(",")) for ln in lines[1:]) == iso
    assert all(t in out["table"] for _, t in iso) and f"{sum(iso.values())} row" in out["table"]
    settings_ = load_settings(home=home, pipeline=str(pipe_file))
    con = connect(settings_, str(pipe_file))
    try:
        got = con.sql(QUERY).fetchall()
    finally:
        con.close()
    assert all(isinstance(t, datetime) for _, t in got) and Counter(got) == want
    path, _ = write_catalog(settings_, load_pipeline(str(pipe_file)))
    cat = duckdb.connect(str(path), read_only=True)
    try:
        cat.execute("SET TimeZone = 'UTC'")
        got = cat.execute(QUERY).fetchall()
        text = cat.execute(f"SELECT what, t::VARCHAR FROM ({QUERY})").fetchall()
    finally:
        cat.close()
    assert all(isinstance(t, datetime) for _, t in got) and Counter(got) == want
    assert not [t for _, t in text if "BC" in t or t[4] != "-"], text  # years 1..9999, as DuckDB's CLI shows


# --- item 1: the supported range end to end --------------------------------------------------------------------------
EDGE_TIMES = [  # (event_time, seen_at): both ends of the range, reached through offsets
    ("0002-01-01T00:00:00Z", None), ("0002-01-01T14:00:00+14:00", "0002-01-01T00:00:00-00:00"),
    ("0001-12-31T12:00:00-12:00", "9999-12-31T23:59:59.999999Z"),
    ("9999-12-31T23:59:59.999999Z", "0002-01-01T00:00:00Z"), ("9999-12-31T11:59:59.9999999999-12:00", None),
    ("9999-12-31T23:59:59+00:00", None), ("2026-01-05T10:00:00Z", None),
    # outside (the issue's own): rejected with the field and the range named, so never stored
    ("0001-01-01T00:00:00+14:00", None), ("9999-12-31T23:59:59-12:00", None),
    ("2026-01-05T10:00:00Z", "0001-01-01T00:00:00Z"),
]


def test_extreme_valid_instants_render_everywhere_and_the_cli_never_crashes(tmp_path, pipe_file):
    home = tmp_path / "lake"
    home.mkdir()
    msgs = [message(i, t, s) for i, (t, s) in enumerate(EDGE_TIMES)]
    records = build_lake(home, pipe_file, msgs)
    assert len(records) == 7
    validate = Validator(load_pipeline(str(pipe_file)).sources[0])
    reasons = [validate(m).reason for m in msgs[7:]]
    assert [r.split(":")[0] for r in reasons] == ["field 'event_time'", "field 'event_time'", "field 'seen_at'"]
    assert all("is outside the supported range 0002-01-01T00:00:00Z..9999-12-31T23:59:59.999999Z" in r
               for r in reasons), reasons
    check_renders(home, pipe_file, records)
    # the real command, as the issue ran it: exit 0, the extreme rows in order, no traceback
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDALAKE_")}
    res = subprocess.run([LAMBDALAKE, "sql", "SELECT window_start FROM per_week ORDER BY window_start",
                          "--home", str(home), "--pipeline", str(pipe_file)], capture_output=True, text=True,
                         env={**env, "COLUMNS": "200"}, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "0001-12-27T00:00:00+00:00" in res.stdout and "9999-12-30T00:00:00+00:00" in res.stdout


def test_view_buckets_are_capped_so_window_start_stays_in_range():
    assert MAX_BUCKET == timedelta(days=365)
    View("ok", source="s", keys=[], bucket=MAX_BUCKET, aggregates=[count("n")])
    with pytest.raises(PipelineError, match="longer than the maximum 365 days"):
        View("too_long", source="s", keys=[], bucket=MAX_BUCKET + timedelta(seconds=1), aggregates=[count("n")])
    # the first supported instant floored to the longest bucket is still in year 1
    first_floor = FIRST_INSTANT_US - FIRST_INSTANT_US % (MAX_BUCKET // timedelta(microseconds=1))
    assert utc(first_floor).year == 1


def _rfc3339(naive: datetime, offset_minutes: int, digits: int) -> str:
    sign = "+" if offset_minutes >= 0 else "-"
    h, m = divmod(abs(offset_minutes), 60)
    frac = f".{naive.microsecond:06d}{'7' * max(0, digits - 6)}"[:digits + 1] if digits else ""
    return f"{naive.year:04d}-{naive:%m-%dT%H:%M:%S}{frac}{sign}{h:02d}:{m:02d}"


near_ends = st.one_of(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(1, 1, 9)),
                      st.datetimes(min_value=datetime(1, 12, 30), max_value=datetime(2, 1, 9)),
                      st.datetimes(min_value=datetime(9999, 12, 24), max_value=datetime(9999, 12, 31, 23, 59, 59,
                                                                                          999999)),
                      st.datetimes(min_value=datetime(2, 1, 1)))
instants = st.builds(_rfc3339, near_ends, st.integers(-(23 * 60 + 59), 23 * 60 + 59), st.integers(0, 14))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(instants, st.none() | instants), min_size=1, max_size=6))
def test_any_accepted_instant_renders_in_every_output(pipe_file, times):
    """The property of issue 14: whatever the validator accepts, every output path renders (exactly)."""
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        records = build_lake(home, pipe_file, [message(i, t, s) for i, (t, s) in enumerate(times)])
        check_renders(home, pipe_file, records, via_cli=False)


# --- item 6: `lambdalake topics` accounts for every invalid message ------------------------------------------------
def test_reason_groups_add_up_with_an_other_bucket():
    reasons = Counter({f"field 'f{i}'": 10 - i for i in range(8)})
    summary = reason_summary(reasons)
    assert len(summary) == REASON_GROUPS_SHOWN + 1 and summary[-1][0] == "other"
    assert sum(n for _, n in summary) == sum(reasons.values())
    assert summary[:2] == [("field 'f0'", 10), ("field 'f1'", 9)]
    one_more = Counter(dict(list(reasons.items())[:REASON_GROUPS_SHOWN + 1]))
    assert reason_summary(one_more) == sorted(one_more.items(), key=lambda kv: -kv[1])  # no "other" of one
    assert reason_group("message is 1048577 bytes, above the limit of 1048576") == \
        "message is N bytes, above the limit of N"
    assert reason_group("not UTF-8: byte 0xff at position 0 (invalid start byte)") == "not UTF-8"


def test_topics_counts_every_invalid_reason_and_names_random_bytes(settings, pipeline, capsys):
    from lambdalake.clients import ensure_topics
    from lambdalake.options import Context
    from wiring.cli import print_topic_counts
    from wiring.demo_stream import demo_messages
    from wiring.produce import Message, send
    from wiring.topic_counts import count_topics

    rng = random.Random(14)
    pv = pipeline.source("pageviews")
    garbage = [Message(pv.topic, None, bytes([0xFF, 0xC3]) + rng.randbytes(30), "malformed:random bytes")
               for _ in range(5)]
    msgs = [*demo_messages(pipeline, 150, malformed_fraction=0.6, duplicate_fraction=0.05, seed=3), *garbage]
    ensure_topics(settings, pipeline)
    send(settings, iter(msgs), progress=False)
    counts = {tc.topic: tc for tc in count_topics(settings, pipeline)}
    tc = counts[pv.topic]
    sent_invalid = sum(1 for m in msgs if m.topic == pv.topic and m.kind.startswith("malformed"))
    assert tc.invalid == sent_invalid == sum(tc.reasons.values())
    assert len(tc.reasons) > REASON_GROUPS_SHOWN + 1  # the table needs its "other" bucket
    assert tc.reasons["not UTF-8"] >= len(garbage) and not [r for r in tc.reasons if "surrogates" in r]
    summary = reason_summary(tc.reasons)  # what the table's "invalid by reason" column lists
    assert summary[-1][0] == "other" and sum(n for _, n in summary) == tc.invalid
    print_topic_counts(Context(settings, pipeline))
    out = capsys.readouterr().out
    assert "not UTF-8" in out and "other" in out and "surrogates" not in out, out


# --- item 7: a lake directory that does not exist --------------------------------------------------------------------
def missing_lake_error(path: Path) -> str:
    return (f"lake directory {path} does not exist; pass --home (or set LAMBDALAKE_HOME to) the directory the "
            "archiver, batch and speed layers write to")


def test_sql_refuses_a_lake_that_does_not_exist(tmp_path):
    """The issue's command: one line, exit 2, nothing created."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDALAKE_")}
    missing = tmp_path / "nope" / "lake"
    res = subprocess.run([LAMBDALAKE, "sql", "SELECT 1", "--home", str(missing)], capture_output=True, text=True,
                         env=env, timeout=120, stdin=subprocess.DEVNULL)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and res.stdout == "", res
    assert lines == [f"error: {missing_lake_error(missing)}"], res.stderr
    assert not missing.parent.exists()


def test_every_reading_command_refuses_a_missing_lake_and_creating_ones_do_not(tmp_path, monkeypatch):
    from wiring.cli import app as root

    missing = tmp_path / "nope"
    runner = CliRunner()
    for app, args in ((serving_cli(), ["catalog", "--home", str(missing)]),
                      (serving_cli(), ["sql", "SELECT 1"]),  # LAMBDALAKE_HOME, as every option
                      (root, ["status", "--home", str(missing)])):
        monkeypatch.setenv("LAMBDALAKE_HOME", str(missing))
        res = runner.invoke(app, args)
        assert isinstance(res.exception, ConfigError) and str(res.exception) == missing_lake_error(missing), args
    assert not missing.exists()
    # the Python API too
    from serving import connect

    with pytest.raises(ConfigError, match="does not exist"):
        connect(home=missing, pipeline="lambdalake.pipelines.clickstream")
    # a command that creates a lake still may: the embedded broker's status reads <home>/kafka without the rule
    res = runner.invoke(root, ["kafka", "status", "--home", str(missing)])
    assert res.exit_code == 1 and "not running" in res.stdout


def test_sql_output_never_crashes_on_instants_python_cannot_hold(tmp_path):
    """The lake holds none (rule 6), but user SQL can compute any instant: shown as Arrow's text, exit 0."""
    query = ("SELECT TIMESTAMPTZ '2026-01-01 10:00:00+00' - INTERVAL 2030 YEAR AS t, DATE '0000-06-01' AS d "
             "UNION ALL SELECT TIMESTAMPTZ '2026-01-01 10:00:00+00', DATE '2020-01-01'")
    runner = CliRunner()
    for fmt in ("json", "csv", "table"):
        res = runner.invoke(serving_cli(), ["sql", query, "-f", fmt, "--home", str(tmp_path),
                                            "--pipeline", "lambdalake.pipelines.clickstream"])
        assert res.exit_code == 0 and res.exception is None, (fmt, res.output)
        assert "-0004-01-01 10:00:00" in res.stdout and "0000-06-01" in res.stdout, res.stdout
        assert "2026-01-01T10:00:00+00:00" in res.stdout and "2020-01-01" in res.stdout


def test_an_older_lake_with_out_of_range_master_rows_verifies_and_renders(tmp_path, pipe_file):
    """Before the range rule an archiver stored UTC year 0 / 10000 instants. The batch side re-checks the rule (the
    Spark job's ``valid_rows`` and the independent ``batch.verify``, here), and ``sql`` over master renders them."""
    from batch.verify import verify_published

    home = tmp_path / "lake"
    home.mkdir()
    times = ["2026-01-05T10:00:00Z", "0001-01-01T00:00:00+14:00", "2026-01-05T11:00:00Z",
             "9999-12-31T23:59:59-12:00", "2026-01-05T12:00:00Z", "2026-01-05T13:00:00Z"]
    msgs = [message(i, t, None) for i, t in enumerate(times)]
    records = build_lake(home, pipe_file, msgs)
    assert len(records) == 4
    pipeline = load_pipeline(str(pipe_file))
    source = pipeline.sources[0]
    year1 = (datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)
    old = {1: year1 - 14 * 3600 * 10**6, 3: LAST_INSTANT_US - 999_999 + 12 * 3600 * 10**6}  # as stored then
    rows = sorted([(i, {**json.loads(msgs[i]), "event_time": us, "seen_at": None}) for i, us in old.items()]
                  + [(int(r["event_id"][1:]), r) for r in records])
    cols = {f.name: [r[f.name] for _, r in rows] for f in source.fields}
    write_parquet_atomic(master_table(source, cols, 0, [o for o, _ in rows], [0] * len(rows)),
                         Layout(home).master_file(source.name, 0, 0, len(msgs)), overwrite=True)
    assert verify_published(load_settings(home=home, pipeline=str(pipe_file)), pipeline).version == "v000001"
    res = CliRunner().invoke(serving_cli(), ["sql", "SELECT event_time FROM master.ticks ORDER BY _offset", "-f",
                                             "csv", "--home", str(home), "--pipeline", str(pipe_file)])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[2:5] == ["0000-12-31 10:00:00.000000Z", "2026-01-05T11:00:00+00:00",
                                            "10000-01-01 11:59:59.000000Z"], res.stdout


def test_layout_refuses_master_files_resolving_outside_the_lake(tmp_path):
    """The rule is the core's (Layout.master_files): the batch job, verify and audit refuse as serving does."""
    from lambdalake.exceptions import InvariantViolation
    from lambdalake.layout import Layout

    layout = Layout(tmp_path / "lake")
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(b"PAR1")
    link = layout.master_file("pageviews", 0, 0, 10)
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    with pytest.raises(InvariantViolation, match="outside the lake"):
        master_files(layout, "pageviews")
