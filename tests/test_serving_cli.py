"""``lambdalake sql`` (formats, errors, empty lake) and the catalog file opened by a separate DuckDB connection.

The lake is synthetic (see test_serving.py); the CLI runs as a real subprocess without any Kafka.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import duckdb
import pytest

from lambdalake.config import load_settings
from lambdalake.layout import Layout
from serving.catalog import write_catalog
from tests.conftest import LAMBDALAKE
from tests.test_serving import ends, expected_view, make_events, publish_batch, publish_speed, query_view, split_lake


@pytest.fixture
def sql_cli(home):
    """Run ``lambdalake <args>`` against ``home`` (no Kafka involved: the bootstrap is a dead placeholder)."""

    def run(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "LAMBDALAKE_HOME": str(home), "LAMBDALAKE_BOOTSTRAP": "127.0.0.1:1",
               "LAMBDALAKE_PIPELINE": "lambdalake.pipelines.clickstream", "COLUMNS": "200"}
        return subprocess.run([LAMBDALAKE, *args], capture_output=True, text=True, timeout=120, env=env,
                              stdin=subprocess.DEVNULL)

    return run


@pytest.fixture
def events(home, clickstream):
    evs = make_events(clickstream, 600)
    split_lake(home, clickstream, evs, {0: 3, 1: 4, 2: 1}, pruned_blocks={1: 2})
    return evs


def test_sql_json_equals_direct_aggregation(sql_cli, events, clickstream):
    res = sql_cli("sql", "SELECT product_id, currency, window_start, orders, revenue_cents, min_amount_cents, "
                         "max_amount_cents FROM revenue_daily", "--format", "json")
    assert res.returncode == 0, res.stderr
    got = {(r["product_id"], r["currency"], datetime.fromisoformat(r["window_start"]), r["orders"],
            r["revenue_cents"], r["min_amount_cents"], r["max_amount_cents"]) for r in json.loads(res.stdout)}
    assert got == expected_view(clickstream, clickstream.view("revenue_daily"), events)
    assert "hint" not in res.stderr


def test_sql_csv_and_table(sql_cli, events, clickstream):
    want = sum(1 for e in events if e.topic == clickstream.source("pageviews").topic)
    res = sql_cli("sql", "SELECT sum(views) AS total, count(*) AS n FROM pageviews_hourly", "--format", "csv")
    assert res.returncode == 0, res.stderr
    rows = list(csv.reader(io.StringIO(res.stdout)))
    assert rows[0] == ["total", "n"] and int(rows[1][0]) == want
    res = sql_cli("sql", "SELECT sum(views) AS total FROM pageviews_hourly")
    assert res.returncode == 0 and "total" in res.stdout and str(want) in res.stdout and "1 row" in res.stdout


def test_sql_metadata_and_master(sql_cli, events):
    res = sql_cli("sql", "SELECT batch_version, speed_snapshot FROM lambdalake.status", "-f", "json")
    assert json.loads(res.stdout) == [{"batch_version": "v000001", "speed_snapshot": "000000000001"}]
    res = sql_cli("sql", "SELECT count(*) AS n FROM master.pageviews", "-f", "json")
    assert json.loads(res.stdout) == [{"n": 0}]


@pytest.mark.parametrize("query, message", [
    ("SELEC 1", "Parser Error: syntax error"),
    ("SELECT * FROM no_such_view", "Catalog Error: Table with name no_such_view does not exist"),
    ("SELECT nope FROM pageviews_hourly", "Binder Error"),
    ("COPY (SELECT 1) TO '/tmp/lambdalake-serving-test.csv'", "disabled by configuration"),
    ("ATTACH '/tmp/lambdalake-serving-test.duckdb' AS x", "disabled by configuration"),
    ("INSTALL httpfs", "disabled by configuration"),
])
def test_sql_errors_are_one_line(sql_cli, events, query, message):
    res = sql_cli("sql", query)
    assert res.returncode != 0
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert not Path("/tmp/lambdalake-serving-test.csv").exists()


def test_sql_on_empty_lake_answers_with_a_hint(sql_cli):
    res = sql_cli("sql", "SELECT count(*) AS n FROM pageviews_hourly", "-f", "json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == [{"n": 0}]
    assert "nothing published yet" in res.stderr


def test_sql_hint_when_only_speed(sql_cli, home, clickstream):
    evs = make_events(clickstream, 100)
    publish_speed(home, clickstream, "000000000001", evs, {t: dict(ps) for t, ps in ends(evs).items()})
    res = sql_cli("sql", "SELECT 1 AS one", "-f", "csv")
    assert res.returncode == 0 and "no batch version published yet" in res.stderr


def test_sql_invariant_violation_is_an_error_line(sql_cli, home, clickstream):
    evs = make_events(clickstream, 200)
    end = ends(evs)
    publish_batch(home, clickstream, "v000001", evs, {t: {p: 15 for p in ps} for t, ps in end.items()})
    publish_speed(home, clickstream, "000000000001", evs, {t: dict(ps) for t, ps in end.items()})
    res = sql_cli("sql", "SELECT 1")
    assert res.returncode == 4 and "not multiples" in res.stderr and "Traceback" not in res.stderr


# --- catalog file -------------------------------------------------------------------------------------------------
def catalog_view(pipeline, view, events) -> set[tuple]:
    """What the catalog file answers without lambdalake's sketch functions: approx_distinct estimates are NULL."""
    gone = {i for i, a in enumerate(view.aggregates, start=len(view.keys) + 1)
            if getattr(a, "kind", "") == "approx_distinct"}
    return {tuple(None if i in gone else x for i, x in enumerate(r)) for r in expected_view(pipeline, view, events)}


def test_catalog_file_answers_like_the_connection(home, events, clickstream):
    settings = load_settings(home=home, pipeline="lambdalake.pipelines.clickstream")
    path, pair = write_catalog(settings, clickstream)
    assert path == home / "lake.duckdb" and (pair.batch_version, pair.speed_snapshot) == ("v000001", "000000000001")
    assert not [p for p in home.iterdir() if p.name.endswith((".tmp", ".wal"))]
    con = duckdb.connect(str(path), read_only=True)  # as the stock DuckDB CLI would open it
    for view in clickstream.views:
        assert query_view(con, view) == catalog_view(clickstream, view, events)
    assert con.execute("SELECT batch_version, speed_snapshot FROM lambdalake.status").fetchall() == [
        ("v000001", "000000000001")]

    # New pair published, old speed snapshot pruned: the open session still answers its own pair ...
    more = make_events(clickstream, 900, seed=8)
    split_lake(home, clickstream, more, {0: 6, 1: 6, 2: 6}, pruned_blocks={0: 6, 1: 6, 2: 6},
               version="v000002", snapshot="000000000002")
    shutil.rmtree(Layout(home).speed_snapshot("000000000001"))
    for view in clickstream.views:
        assert query_view(con, view) == catalog_view(clickstream, view, events)
    # ... and re-writing the catalog moves new sessions to the new pair, atomically.
    # (A new session must be another process: DuckDB caches an open database file per path within a process.)
    write_catalog(settings, clickstream)
    script = ("import sys, duckdb; con = duckdb.connect(sys.argv[1], read_only=True); "
              "print(con.execute('SELECT count(*), sum(views), sum(total_duration_ms), max(max_duration_ms) "
              "FROM pageviews_hourly').fetchall()[0])")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60)
    want = expected_view(clickstream, clickstream.view("pageviews_hourly"), more)
    assert out.stdout.strip() == str((len(want), sum(r[2] for r in want), sum(r[3] for r in want),
                                      max(r[4] for r in want))), out.stderr
    assert query_view(con, clickstream.views[0]) == catalog_view(clickstream, clickstream.views[0], events)


def test_catalog_command(sql_cli, home, events, clickstream):
    res = sql_cli("catalog")
    assert res.returncode == 0, res.stderr
    assert "lake.duckdb" in res.stdout
    con = duckdb.connect(str(home / "lake.duckdb"), read_only=True)
    view = clickstream.view("user_activity_daily")
    assert query_view(con, view) == expected_view(clickstream, view, events)


def test_catalog_of_empty_lake(sql_cli, home):
    res = sql_cli("catalog")
    assert res.returncode == 0 and "nothing published yet" in res.stderr
    con = duckdb.connect(str(home / "lake.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM pageviews_hourly").fetchall() == [(0,)]
    assert con.execute("SELECT count(*) FROM master.purchases").fetchone() == (0,)


# --- a view whose definition changed (issue 11) ---------------------------------------------------------------------
HALF_HOUR = """import dataclasses
from datetime import timedelta

from lambdalake.pipeline import load_pipeline

_base = load_pipeline("lambdalake.pipelines.clickstream")
pipeline = dataclasses.replace(_base, views=[
    dataclasses.replace(v, bucket=timedelta(minutes=30)) if v.name == "pageviews_hourly" else v for v in _base.views])
"""


@pytest.fixture
def half_hour(tmp_path) -> str:
    f = tmp_path / "half_hour.py"
    f.write_text(HALF_HOUR)
    return str(f)


def test_sql_refuses_a_rebuilding_view_with_one_line(sql_cli, events, clickstream, half_hour):
    res = sql_cli("sql", "SELECT count(*) FROM pageviews_hourly", "--pipeline", half_hour)
    assert res.returncode != 0 and res.stdout == ""
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert err == ["error: view pageviews_hourly is being rebuilt for its new definition: batch pending, "
                   "speed pending"], res.stderr
    # another view of the same lake still answers, silently
    res = sql_cli("sql", "SELECT sum(orders) AS n FROM revenue_daily", "-f", "json", "--pipeline", half_hour)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    want = sum(r[3] for r in expected_view(clickstream, clickstream.view("revenue_daily"), events))
    assert json.loads(res.stdout) == [{"n": want}]
    res = sql_cli("sql", "SELECT name, state FROM lambdalake.views", "-f", "json", "--pipeline", half_hour)
    assert {r["name"]: r["state"] for r in json.loads(res.stdout)} == {
        "pageviews_hourly": "rebuilding", "revenue_daily": "current", "user_activity_daily": "current"}


def test_sql_allow_stale_answers_and_warns_on_one_line(sql_cli, events, clickstream, half_hour):
    res = sql_cli("sql", "SELECT url, window_start, views FROM pageviews_hourly", "-f", "json", "--allow-stale",
                  "--pipeline", half_hour)
    assert res.returncode == 0, res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("warning: stale") and "pageviews_hourly" in err[0], res.stderr
    got = {(r["url"], datetime.fromisoformat(r["window_start"]), r["views"]) for r in json.loads(res.stdout)}
    old = expected_view(clickstream, clickstream.view("pageviews_hourly"), events)  # the previous definition's
    assert got == {r[:3] for r in old}
    res = sql_cli("sql", "SELECT name, state FROM lambdalake.views WHERE state <> 'current'", "-f", "json",
                  "--allow-stale", "--pipeline", half_hour)
    assert json.loads(res.stdout) == [{"name": "pageviews_hourly", "state": "stale"}] and res.stderr == ""


def test_catalog_refuses_a_rebuilding_view(sql_cli, home, events, clickstream, half_hour):
    res = sql_cli("catalog", "--pipeline", half_hour)
    assert res.returncode == 0, res.stderr
    assert "note: refused in the file (being rebuilt): pageviews_hourly;" in res.stderr
    con = duckdb.connect(str(home / "lake.duckdb"), read_only=True)
    with pytest.raises(duckdb.Error, match="view pageviews_hourly is being rebuilt for its new definition"):
        con.execute("SELECT count(*) FROM pageviews_hourly").fetchall()
    view = clickstream.view("user_activity_daily")
    assert query_view(con, view) == expected_view(clickstream, view, events)
    con.close()
    res = sql_cli("catalog", "--allow-stale", "--pipeline", half_hour)
    assert res.returncode == 0, res.stderr
    assert "note: served stale (previous definition): pageviews_hourly;" in res.stderr
    con = duckdb.connect(str(home / "lake.duckdb"), read_only=True)
    assert con.execute("SELECT state FROM lambdalake.views WHERE name = 'pageviews_hourly'").fetchone() == ("stale",)
    old = expected_view(clickstream, clickstream.view("pageviews_hourly"), events)
    assert con.execute("SELECT sum(views) FROM pageviews_hourly").fetchone()[0] == sum(r[2] for r in old)


def test_sql_timeout_is_one_line_and_exit_124(sql_cli, events):
    res = sql_cli("sql", "--timeout", "0.5",
                  "SELECT count(*) FROM range(1000000) a, range(1000000) b WHERE a.range + b.range = 7")
    assert res.returncode == 124, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "statement timeout after 0.5 s" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_sql_refuses_changes_with_one_line(sql_cli, events):
    res = sql_cli("sql", "DROP VIEW pageviews_hourly")
    assert res.returncode == 1
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "read-only mode! (the lake's views and tables are read-only" in errors[0], res.stderr


@pytest.mark.parametrize("query, message", [
    ("UPDATE _lake.watermarks SET batch_watermark = 0", "read-only mode! (the lake's"),
    ("DROP VIEW _lake.speed_pageviews_hourly", "read-only mode! (the lake's"),
    ("CREATE OR REPLACE VIEW pageviews_hourly AS SELECT 1", "read-only mode! (the lake's"),
    ("SET threads = 1000", "configuration has been locked"),
    ("SET memory_limit = '10TB'", "configuration has been locked"),
])
def test_sql_query_errors_are_one_line_lambdalake_errors(home, events, clickstream, query, message):
    """What `lambdalake sql` prints (run_query's QueryError, one line), without a subprocess per statement."""
    from serving.cli import run_query
    from serving.connection import connect
    from serving.exceptions import QueryError

    con = connect(load_settings(home=home, pipeline="lambdalake.pipelines.clickstream"), clickstream)
    with pytest.raises(QueryError) as err:
        run_query(con, query)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_installable_stable_duckdb_cli_opens_the_catalog(home, events, clickstream):
    """Issue 16: the DuckDB CLI a user gets from `pip install duckdb-cli` (pinned in the test extra; 1.5.6 reads
    storage versions 64-68 only) opens the catalog read-only and answers like the connection, every view."""
    cli = Path(sys.executable).with_name("duckdb")
    assert cli.is_file(), "the DuckDB CLI is missing: pip install -e '.[test]' (duckdb-cli)"
    version = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=30).stdout
    assert version.startswith("v1."), version  # the stable CLI, not the 2.0 Python package writing the file
    path, _ = write_catalog(load_settings(home=home, pipeline="lambdalake.pipelines.clickstream"), clickstream)
    for view in clickstream.views:
        cols = ", ".join(f'"{c}"' for c in view.output_columns)
        out = subprocess.run([str(cli), "-readonly", "-json", str(path), "-c",
                              f"SET TimeZone = 'UTC'; SELECT {cols} FROM {view.name}"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout or "[]")
        got = {tuple(round(v, 9) if isinstance(v, float) else v for v in r.values()) for r in rows}
        want = {tuple(round(v, 9) if isinstance(v, float) else
                      (v.strftime("%Y-%m-%d %H:%M:%S+00") if isinstance(v, datetime) else v) for v in r)
                for r in catalog_view(clickstream, view, events)}  # no approx_distinct estimates in a stock CLI
        assert got == want and want, view.name
