"""Serving from a batch version's serving copy (issue 31): DuckDB-native scans and stored estimates, still exact,
still locked down; versions without a copy (earlier releases) keep serving the same answers.

The lakes are the ones of tests/test_serving.py (its helpers publish batch versions and speed snapshots by hand);
the copy is written by the same function :func:`lambdalake.versions.publish` calls.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import duckdb
import pytest

from lambdalake.config import load_settings
from lambdalake.exceptions import InvariantViolation
from lambdalake.layout import Layout, read_batch_manifest
from lambdalake.servingcopy import ENV, copy_path, write_serving_copy
from lambdalake.versions import new_staging_dir, publish
from serving.connection import connect, refresh
from tests.test_serving import (
    BLOCK,
    ends,
    expected_view,
    make_events,
    publish_batch,
    publish_speed,
    query_view,
    split_lake,
)


@pytest.fixture
def serving_settings(home):
    return load_settings(home=home, pipeline="lambdalake.pipelines.clickstream")


def add_copy(home: Path, version: str = "v000001") -> Path:
    vdir = Layout(home).batch_version(version)
    path = write_serving_copy(vdir, read_batch_manifest(Layout(home), version).row_counts)
    assert path is not None and path == copy_path(vdir)
    return path


def copy_attached(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The batch copies a connection has attached (``lake_g<N>_batch``)."""
    return [r[0] for r in con.execute("SELECT database_name FROM duckdb_databases() "
                                      "WHERE database_name LIKE 'lake_g%_batch'").fetchall()]


def split_views(con: duckdb.DuckDBPyConnection) -> set[str]:
    """The views a connection serves split from the batch copy (they have ``_lake.speed_groups_<view>``)."""
    return {r[0].removeprefix("speed_groups_") for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = '_lake' AND table_name LIKE 'speed_groups_%' "
        "AND database_name = current_database()").fetchall()}


def assert_exact(con, clickstream, events) -> None:
    for view in clickstream.views:
        assert query_view(con, view) == expected_view(clickstream, view, events), view.name
        cols = [d[0] for d in con.execute(f'SELECT * FROM "{view.name}" LIMIT 0').description]
        assert tuple(cols) == view.output_columns


@pytest.mark.parametrize("layout", ["mixed", "speed_everywhere", "no_visible_speed"])
def test_served_from_the_copy_equals_the_oracle(home, serving_settings, clickstream, layout):
    """Rows only in batch, only in speed and in both (unpruned speed blocks below W excluded), answered from the
    serving copy with the stored estimates: equal to the independent aggregation, approx_distinct exactly."""
    events = make_events(clickstream, 900)
    w = {"mixed": {0: 3, 1: 5, 2: 0}, "speed_everywhere": {0: 1, 1: 1, 2: 1},
         "no_visible_speed": {0: 99, 1: 99, 2: 99}}[layout]
    split_lake(home, clickstream, events, w, pruned_blocks={1: 2})
    add_copy(home)
    con = connect(serving_settings, clickstream)
    assert copy_attached(con)
    assert split_views(con) == {v.name for v in clickstream.views}  # really served from the copy
    assert_exact(con, clickstream, events)
    parquet = connect(serving_settings, clickstream, materialize=True)  # the copy is never used materialized
    assert not copy_attached(parquet)
    for view in clickstream.views:
        assert query_view(con, view) == query_view(parquet, view)
    keep = "SELECT url, sum(views), max(unique_users) FROM pageviews_hourly WHERE url LIKE '%a%' GROUP BY url"
    assert sorted(con.execute(keep).fetchall()) == sorted(parquet.execute(keep).fetchall())


def test_tail_groups_of_one_many_or_no_sketch_parts_and_null_keys_stay_exact(home, clickstream):
    """The tail stores a group's only sketch part as it is and a list only for two or more parts: groups keyed on
    a nullable field (NULL keys), sketches of a nullable field and either count of parts estimate the same union as
    the parquet path and the oracle."""
    from datetime import timedelta

    from lambdalake.aggregates import approx_distinct, count
    from lambdalake.pipeline import View

    pipe = dataclasses.replace(clickstream, views=[View(
        "by_referrer", source="pageviews", keys=["referrer"], bucket=timedelta(hours=1),
        aggregates=[count("views"), approx_distinct("users", "user_id"), approx_distinct("refs", "referrer")])])
    events = make_events(pipe, 1200, seed=11)
    split_lake(home, pipe, events, {0: 2, 1: 4, 2: 0}, pruned_blocks={1: 1})
    add_copy(home)
    settings = load_settings(home=home)
    con = connect(settings, pipe)
    assert split_views(con) == {"by_referrer"}
    view = pipe.view("by_referrer")
    assert query_view(con, view) == expected_view(pipe, view, events)
    kinds = con.execute(
        "SELECT count(*) FILTER (WHERE __one_users IS NOT NULL), count(*) FILTER (WHERE users IS NOT NULL), "
        "count(*) FILTER (WHERE referrer IS NULL) "
        "FROM _lake.speed_groups_by_referrer").fetchall()[0]
    assert all(kinds), kinds  # one part, several parts, a NULL key: each in the tail
    parquet = connect(settings, pipe, materialize=True)
    assert query_view(con, view) == query_view(parquet, view)


def _publish_through_versions(home: Path, clickstream, events, watermark: dict) -> str:
    """A batch version staged the way the batch job stages one and published by lambdalake.versions.publish."""
    layout = Layout(home)
    manifest = publish_batch(home, clickstream, "staged-by-test", events, watermark, point=False)
    staging = new_staging_dir(layout)
    staging.rmdir()
    os.rename(layout.batch_version("staged-by-test"), staging)
    return publish(layout, staging, manifest).version


@pytest.mark.parametrize("with_copy", [True, False])
def test_a_version_published_with_or_without_a_copy_serves_the_same(home, serving_settings, clickstream,
                                                                    monkeypatch, with_copy):
    """publish() writes the copy; a version without it (what earlier releases published, here
    LAMBDALAKE_SERVING_COPY=0) is served from its parquet files with the same, exact answers."""
    if not with_copy:
        monkeypatch.setenv(ENV, "0")
    events = make_events(clickstream, 900)
    end = {t: dict(ps) for t, ps in ends(events).items()}
    watermark = {t: {p: min(2 * BLOCK, n - n % BLOCK) for p, n in ps.items()} for t, ps in end.items()}
    version = _publish_through_versions(home, clickstream, events, watermark)
    publish_speed(home, clickstream, "000000000001", events, end)
    con = connect(serving_settings, clickstream)
    assert len(copy_attached(con)) == (1 if with_copy else 0), version
    assert_exact(con, clickstream, events)


def test_refresh_to_a_version_without_its_copy_attached_stays_exact(home, serving_settings, clickstream):
    """A refresh attaches the new version's copy (into the scratch directory, as at connect) and detaches the
    old one."""
    events = make_events(clickstream, 900)
    split_lake(home, clickstream, events, {0: 2, 1: 2, 2: 2})
    add_copy(home)
    con = connect(serving_settings, clickstream)
    [before] = copy_attached(con)
    split_lake(home, clickstream, events, {0: 4, 1: 3, 2: 5}, version="v000002", snapshot="000000000002")
    add_copy(home, "v000002")
    refresh(con)
    [after] = copy_attached(con)
    assert after != before
    assert_exact(con, clickstream, events)


def test_a_copy_that_disagrees_with_the_manifest_is_not_used(home, serving_settings, clickstream):
    events = make_events(clickstream, 400)
    split_lake(home, clickstream, events, {0: 2, 1: 2, 2: 2})
    vdir = Layout(home).batch_version("v000001")
    counts = dict(read_batch_manifest(Layout(home), "v000001").row_counts)
    assert write_serving_copy(vdir, counts) is not None
    with duckdb.connect(str(copy_path(vdir))) as db:  # damage one table
        db.execute("DELETE FROM batch_pageviews_hourly WHERE rowid = 0")
    con = connect(serving_settings, clickstream)
    assert_exact(con, clickstream, events)
    assert copy_attached(con)  # attached, but its damaged table is not read
    assert split_views(con) == {v.name for v in clickstream.views} - {"pageviews_hourly"}


def test_a_copy_resolving_outside_the_lake_is_refused(home, serving_settings, clickstream, tmp_path):
    events = make_events(clickstream, 200)
    split_lake(home, clickstream, events, {0: 1, 1: 1, 2: 1})
    path = add_copy(home)
    moved = tmp_path / path.name
    path.rename(moved)
    path.symlink_to(moved)
    with pytest.raises(InvariantViolation, match=f"{path}.*outside the lake"):
        connect(serving_settings, clickstream)


# --- the lock-down holds with the copy attached ---------------------------------------------------------------------
@pytest.fixture
def copy_con(home, serving_settings, clickstream):
    events = make_events(clickstream, 300)
    split_lake(home, clickstream, events, {0: 2, 1: 2, 2: 2})
    add_copy(home)
    con = connect(serving_settings, clickstream)
    [alias] = copy_attached(con)
    private = Path(con.execute("SELECT path FROM duckdb_databases() WHERE database_name = ?", [alias]).fetchone()[0])
    lake_copy = copy_path(Layout(home).batch_version("v000001"))
    assert not private.exists() and home not in private.parents and private != lake_copy  # private, unlinked
    return con


def _files(root: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("statement, refusal", [
    ("COPY pageviews_hourly TO '{copy}' (FORMAT parquet, USE_TMP_FILE false)", "disabled by configuration"),
    ("COPY pageviews_hourly TO '{version}/x.csv'", "disabled by configuration"),
    ("COPY pageviews_hourly TO '{lake}/x.parquet' (FORMAT parquet)", "disabled by configuration"),
    ("COPY pageviews_hourly TO '{next_to}/x.csv'", "disabled by configuration"),
    ("COPY pageviews_hourly TO '{copy}.wal'", "disabled by configuration"),
    ("ATTACH '{copy}' AS again", "disabled by configuration"),
    ("ATTACH '{copy}' AS again (READ_ONLY)", "disabled by configuration"),
    ("ATTACH '{version}/y.duckdb' AS created", "disabled by configuration"),
    ("ATTACH '{lake}/y.duckdb' AS created", "disabled by configuration"),
    ("ATTACH '{next_to}/y.duckdb' AS created", "disabled by configuration"),
    ("SELECT * FROM read_parquet('{version}/pageviews_hourly/part-00000.parquet')", "disabled by configuration"),
    ("CREATE TABLE {alias}.main.mine AS SELECT 1 AS x", "read-only"),
    ("DELETE FROM {alias}.main.batch_pageviews_hourly", "read-only"),
    ("UPDATE {alias}.main.batch_pageviews_hourly SET views = 0", "read-only"),
    ("DROP TABLE {alias}.main.batch_pageviews_hourly", "read-only"),
])
def test_nothing_can_write_into_or_next_to_the_lake(copy_con, home, statement, refusal):
    """Issue 31 item 1: the batch copy is attached READ_ONLY from a private copy in the scratch directory; COPY TO
    and ATTACH into the lake (the copy itself and its WAL name, its version directory, the lake root) and next to
    it are refused, the attached copy cannot be written, and nothing in or next to the lake changes."""
    next_to = home.parent
    [alias] = copy_attached(copy_con)
    sql = statement.format(copy=copy_path(Layout(home).batch_version("v000001")), lake=home,
                           version=Layout(home).batch_version("v000001"), next_to=next_to, alias=alias)
    lake_before, beside_before = _files(home), sorted(p.name for p in next_to.iterdir())
    answer = copy_con.execute("SELECT sum(views), sum(unique_users) FROM pageviews_hourly").fetchall()
    with pytest.raises(duckdb.Error, match=refusal):
        copy_con.execute(sql)
    assert _files(home) == lake_before
    assert sorted(p.name for p in next_to.iterdir()) == beside_before
    assert copy_con.execute("SELECT sum(views), sum(unique_users) FROM pageviews_hourly").fetchall() == answer


def test_a_detached_or_replaced_copy_fails_the_query_instead_of_answering(copy_con):
    """A user who detaches the copy and attaches a database of their own under its name (only the scratch
    directory is attachable) gets an error from the views, never an answer from their tables."""
    [alias] = copy_attached(copy_con)
    scratch = Path(copy_con.execute("SELECT path FROM duckdb_databases() WHERE database_name = ?", [alias])
                   .fetchone()[0]).parent
    copy_con.execute(f"CREATE TEMP TABLE mine AS SELECT * FROM {alias}.main.batch_pageviews_hourly")
    copy_con.execute(f"DETACH {alias}")
    with pytest.raises(duckdb.Error):
        copy_con.execute("SELECT sum(views) FROM pageviews_hourly").fetchall()
    copy_con.execute(f"ATTACH '{scratch}/fake.duckdb' AS {alias}")
    copy_con.execute(f"CREATE TABLE {alias}.main.batch_pageviews_hourly AS "
                     "SELECT * REPLACE (views * 1000 AS views) FROM temp.mine")
    with pytest.raises(duckdb.Error, match="detached or replaced"):
        copy_con.execute("SELECT sum(views) FROM pageviews_hourly").fetchall()


def test_connections_of_a_process_share_one_private_copy_no_user_can_write(copy_con, home, serving_settings,
                                                                         clickstream):
    """The file is copied once per process: a second connection attaches a hard link of the same private copy
    (no second copy). A user overwriting or re-attaching their connection's (unlinked) name of it writes a new
    file of their own: the other connection's answers and the lake do not change."""
    [alias] = copy_attached(copy_con)
    mine = Path(copy_con.execute("SELECT path FROM duckdb_databases() WHERE database_name = ?", [alias])
                .fetchone()[0])
    other = connect(serving_settings, clickstream)
    [other_alias] = copy_attached(other)
    theirs = Path(other.execute("SELECT path FROM duckdb_databases() WHERE database_name = ?", [other_alias])
                  .fetchone()[0])
    cached = [p for p in theirs.parents[1].glob("lambdalake-copies-*/*.duckdb")]
    if not cached:
        pytest.skip("no hard links between the scratch directories and their root here")
    assert os.stat(cached[0]).st_nlink == 1 and not theirs.exists()  # every connection's link already unlinked
    answer = other.execute("SELECT sum(views), sum(unique_users) FROM pageviews_hourly").fetchall()
    lake_before = _files(home)
    copy_con.execute(f"COPY (SELECT 1 AS x) TO '{mine}' (FORMAT csv, USE_TMP_FILE false)")
    copy_con.execute(f"ATTACH '{mine}.x.duckdb' AS scribble")
    copy_con.execute("CREATE TABLE scribble.t AS SELECT 1 AS x")
    assert other.execute("SELECT sum(views), sum(unique_users) FROM pageviews_hourly").fetchall() == answer
    assert connect(serving_settings, clickstream).execute(
        "SELECT sum(views), sum(unique_users) FROM pageviews_hourly").fetchall() == answer
    assert _files(home) == lake_before


def test_a_killed_process_private_copies_are_removed_by_the_next(tmp_path):
    """A process killed before its exit handlers leaves its private directory of copies behind: the next process
    making its own removes it (a live process's, another user's or a foreign name stay)."""
    import subprocess
    import sys

    from serving import copies

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    left = tmp_path / f"{copies.CACHE_PREFIX}{dead}-x1"
    live = tmp_path / f"{copies.CACHE_PREFIX}{os.getppid()}-x2"
    foreign = tmp_path / f"{copies.CACHE_PREFIX}abc"
    for d in (left, live, foreign):
        d.mkdir()
        (d / "1-2.duckdb").write_bytes(b"x" * 10)
    copies._sweep(tmp_path)
    assert not left.exists() and live.exists() and foreign.exists()
