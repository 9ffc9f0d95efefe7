"""Serving never mixes definitions (issue 11): a view whose declared definition is not what both sides hold is
refused with one line, or — asked for — served stale from a kept pair of ONE earlier definition.

Lakes are built as in test_serving.py: parquet files plus BatchManifest / SpeedSnapshotMeta contracts whose per-view
fingerprints are those of the declaration that made the rows (``Pipeline.fingerprint``). Expected answers come from
the events in pure Python with the definition that should be served.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from lambdalake import contracts
from lambdalake.aggregates import min_
from lambdalake.config import load_settings
from lambdalake.contracts import SpeedView
from lambdalake.layout import Layout, current_batch_manifest
from lambdalake.pipeline import Pipeline
from serving.connection import connect, plans_of, refresh
from tests.test_serving import BLOCK, ends, expected_view, make_events, publish_batch, publish_speed, query_view

REBUILT = "is being rebuilt for its new definition"


@pytest.fixture
def serving_settings(home):
    return load_settings(home=home, pipeline="lambdalake.pipelines.clickstream")


def changed(base: Pipeline, view: str, **changes) -> Pipeline:
    """``base`` with one view's declaration replaced (the product's own declaration objects)."""
    return dataclasses.replace(base, views=[dataclasses.replace(v, **changes) if v.name == view else v
                                            for v in base.views])


def half_hour(base: Pipeline) -> Pipeline:
    return changed(base, "pageviews_hourly", bucket=timedelta(minutes=30))


def with_min(base: Pipeline) -> Pipeline:
    rev = base.view("revenue_daily")
    return changed(base, "revenue_daily", aggregates=[*rev.aggregates, min_("min_orders_cents", "amount_cents")])


def blocks(events, n_blocks: int) -> dict[str, dict[int, int]]:
    """A watermark of ``n_blocks`` whole blocks per partition (capped at the partition's whole blocks)."""
    return {t: {p: min(n_blocks * BLOCK, e - e % BLOCK) for p, e in ps.items()} for t, ps in ends(events).items()}


def upto(events, positions: dict[str, dict[int, int]]):
    return [e for e in events if e.offset < positions.get(e.topic, {}).get(e.partition, 0)]


def states(con) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in con.execute(
        "SELECT name, state, served_fingerprint, declared_fingerprint FROM lambdalake.views").fetchall()}


@pytest.fixture
def old_lake(home, clickstream):
    """A complete lake of the shipped declaration: version v000001 at 3 blocks, snapshot 1 over everything."""
    events = make_events(clickstream, 900)
    publish_batch(home, clickstream, "v000001", events, blocks(events, 3))
    publish_speed(home, clickstream, "000000000001", events, {t: dict(ps) for t, ps in ends(events).items()})
    return events


@pytest.mark.parametrize("change", [half_hour, with_min], ids=["bucket", "aggregate"])
def test_changed_view_is_refused_with_one_line_others_answer(home, serving_settings, clickstream, old_lake, change):
    new = change(clickstream)
    name = "pageviews_hourly" if change is half_hour else "revenue_daily"
    con = connect(serving_settings, new)
    with pytest.raises(duckdb.Error) as err:
        con.execute(f"SELECT count(*) FROM {name}").fetchall()
    msg = str(err.value)
    assert f"view {name} {REBUILT}: batch pending, speed pending" in msg and "\n" not in msg.strip()
    with pytest.raises(duckdb.Error, match=REBUILT):  # whatever the query does with it
        con.execute(f"SELECT * FROM (SELECT * FROM {name}) AS x WHERE window_start IS NULL").fetchall()
    # the declared columns are still there (DESCRIBE binds without scanning)
    assert tuple(r[0] for r in con.execute(f"DESCRIBE {name}").fetchall()) == new.view(name).output_columns
    for view in new.views:
        if view.name != name:
            assert query_view(con, view) == expected_view(new, view, old_lake), view.name
    got = states(con)
    assert got[name] == ("rebuilding", None, new.fingerprint(name))
    assert new.fingerprint(name) != clickstream.fingerprint(name)
    assert {n: s[0] for n, s in got.items() if n != name} == {v.name: "current" for v in new.views if v.name != name}
    assert con.execute("SELECT views_rebuilding, views_stale FROM lambdalake.status").fetchone() == (1, 0)


def test_speed_rebuild_progress_in_the_message(home, serving_settings, clickstream):
    """The speed layer rebuilding the view (its old rows, target = declared, progress) → "speed 63%"."""
    new = half_hour(clickstream)
    events = make_events(clickstream, 600)
    publish_batch(home, clickstream, "v000001", events, blocks(events, 2))
    views = {v.name: SpeedView(clickstream.fingerprint(v)) for v in clickstream.views}
    views["pageviews_hourly"] = SpeedView(clickstream.fingerprint("pageviews_hourly"),
                                          target=new.fingerprint("pageviews_hourly"), progress=0.634)
    publish_speed(home, clickstream, "000000000001", events, {t: dict(ps) for t, ps in ends(events).items()},
                  views=views)
    con = connect(serving_settings, new)
    with pytest.raises(duckdb.Error, match=f"view pageviews_hourly {REBUILT}: batch pending, speed 63%$"):
        con.execute("SELECT * FROM pageviews_hourly").fetchall()
    # the batch part rebuilt, the speed part still replaying: only the speed side is pending
    publish_batch(home, new, "v000002", events, blocks(events, 2))
    con = connect(serving_settings, new)
    with pytest.raises(duckdb.Error, match=f"view pageviews_hourly {REBUILT}: speed 63%$"):
        con.execute("SELECT * FROM pageviews_hourly").fetchall()


def test_allow_stale_serves_the_old_complete_pair_and_says_so(home, serving_settings, clickstream, old_lake):
    new = half_hour(clickstream)
    con = connect(serving_settings, new, allow_stale=True)
    view = new.view("pageviews_hourly")
    old_view = clickstream.view("pageviews_hourly")
    # rows of the OLD definition (1-hour buckets), complete: both sides of the old pair, merged at its watermark
    assert query_view(con, view) == expected_view(clickstream, old_view, old_lake)
    assert query_view(con, view) != expected_view(new, view, old_lake)
    got = states(con)
    assert got["pageviews_hourly"] == ("stale", clickstream.fingerprint(old_view), new.fingerprint(view))
    assert got["revenue_daily"][0] == "current"
    note = con.execute("SELECT note FROM lambdalake.views WHERE name = 'pageviews_hourly'").fetchone()[0]
    assert "stale" in note and "batch pending, speed pending" in note
    assert plans_of(con)["pageviews_hourly"].served_pieces == ("v000001", "000000000001")


def test_allow_stale_pairs_older_pieces_of_one_definition(home, serving_settings, clickstream):
    """Batch already rebuilt (v2 of the new definition), speed still replaying with its old rows pruned to W2:
    the stale pair is the older version v1 with the older snapshot 1 (pruned_to <= W1), never v2 + snapshot 2."""
    new = half_hour(clickstream)
    events = make_events(clickstream, 1200)
    first = events[:700]
    w1 = blocks(first, 2)
    publish_batch(home, clickstream, "v000001", first, w1)
    publish_speed(home, clickstream, "000000000001", first, {t: dict(ps) for t, ps in ends(first).items()})
    w2 = blocks(events, 5)
    publish_batch(home, new, "v000002", events, w2)
    old_rows = {v.name: SpeedView(clickstream.fingerprint(v)) for v in clickstream.views}
    old_rows["pageviews_hourly"] = SpeedView(clickstream.fingerprint("pageviews_hourly"),
                                             target=new.fingerprint("pageviews_hourly"), progress=0.5)
    publish_speed(home, clickstream, "000000000002", events, {t: dict(ps) for t, ps in ends(events).items()},
                  pruned_to=w2, views=old_rows)
    view = new.view("pageviews_hourly")

    refused = connect(serving_settings, new)
    with pytest.raises(duckdb.Error, match=f"{REBUILT}: speed 50%$"):
        refused.execute("SELECT count(*) FROM pageviews_hourly").fetchall()

    con = connect(serving_settings, new, allow_stale=True)
    assert plans_of(con)["pageviews_hourly"].served_pieces == ("v000001", "000000000001")
    assert query_view(con, view) == expected_view(clickstream, clickstream.view(view.name), first)
    # the other views are current: the newest pair, complete
    rev = new.view("revenue_daily")
    assert query_view(con, rev) == expected_view(new, rev, events)

    # once the older snapshot is gone no pair of one definition is left: refused, and it says why
    import shutil

    shutil.rmtree(Layout(home).speed_snapshot("000000000001"))
    con = connect(serving_settings, new, allow_stale=True)
    with pytest.raises(duckdb.Error, match=r"speed 50% \(no complete pair of the previous definition is kept\)$"):
        con.execute("SELECT count(*) FROM pageviews_hourly").fetchall()
    assert states(con)["pageviews_hourly"][0] == "rebuilding"


def test_after_both_sides_rebuilt_the_view_is_current_and_exact(home, serving_settings, clickstream, old_lake):
    new = half_hour(clickstream)
    positions = {t: dict(ps) for t, ps in ends(old_lake).items()}
    publish_batch(home, new, "v000002", old_lake, blocks(old_lake, 4))
    con = connect(serving_settings, new)
    with pytest.raises(duckdb.Error, match=f"{REBUILT}: speed pending$"):
        con.execute("SELECT count(*) FROM pageviews_hourly").fetchall()
    publish_speed(home, new, "000000000002", old_lake, positions, pruned_to=blocks(old_lake, 4))
    con = connect(serving_settings, new, allow_stale=True)  # nothing stale left to serve: current everywhere
    for view in new.views:
        assert query_view(con, view) == expected_view(new, view, old_lake), view.name
    assert {s[0] for s in states(con).values()} == {"current"}
    assert all(s[1] == s[2] for s in states(con).values())  # served = declared
    # going back to the old declaration is a change too: refused until rebuilt, never the 30-minute rows
    back = connect(serving_settings, clickstream)
    with pytest.raises(duckdb.Error, match=REBUILT):
        back.execute("SELECT count(*) FROM pageviews_hourly").fetchall()


def test_added_view_is_batch_pending_and_has_no_stale_pair(home, serving_settings, clickstream, old_lake):
    from lambdalake.aggregates import count
    from lambdalake.pipeline import View

    new = dataclasses.replace(clickstream, views=[*clickstream.views, View(
        "referrers_daily", source="pageviews", keys=["referrer"], bucket=timedelta(days=1),
        aggregates=[count("views")])])
    con = connect(serving_settings, new, allow_stale=True)
    with pytest.raises(duckdb.Error, match=f"view referrers_daily {REBUILT}: batch pending, speed pending "
                                           r"\(no complete pair of the previous definition is kept\)$"):
        con.execute("SELECT * FROM referrers_daily").fetchall()
    view = new.view("pageviews_hourly")
    assert query_view(con, view) == expected_view(new, view, old_lake)


def test_first_release_lake_still_serves(home, serving_settings, clickstream):
    """A format-1 manifest (no format, legacy fingerprints, no published_at) matches the unchanged declaration; with
    no speed snapshot (or one of this release) the views are current and exact."""
    events = make_events(clickstream, 600)
    wm = blocks(events, 3)
    legacy = {v.name: clickstream.legacy_fingerprint(v) for v in clickstream.views}
    manifest = publish_batch(home, clickstream, "v000001", events, wm, fingerprints=legacy, manifest_format=1)
    # as the first release wrote it: no "format", no "published_at" keys at all
    path = Layout(home).batch_version("v000001") / "manifest.json"
    doc = contracts.to_builtins(manifest)
    del doc["format"], doc["published_at"]
    path.write_text(json.dumps(doc))
    assert current_batch_manifest(Layout(home)).format == 1
    con = connect(serving_settings, clickstream)
    for view in clickstream.views:
        assert query_view(con, view) == expected_view(clickstream, view, upto(events, wm)), view.name
    assert {s[0] for s in states(con).values()} == {"current"}
    assert con.execute("SELECT batch_created_at FROM lambdalake.status").fetchone()[0] == manifest.published_time
    assert manifest.published_time is not None and manifest.published_time <= datetime.now(UTC)

    # a snapshot of this release over it: merged, current, exact
    publish_speed(home, clickstream, "000000000001", events, {t: dict(ps) for t, ps in ends(events).items()})
    con = connect(serving_settings, clickstream)
    for view in clickstream.views:
        assert query_view(con, view) == expected_view(clickstream, view, events), view.name

    # a legacy fingerprint never matches a CHANGED declaration
    new = half_hour(clickstream)
    con = connect(serving_settings, new)
    with pytest.raises(duckdb.Error, match=f"{REBUILT}: batch pending, speed pending$"):
        con.execute("SELECT count(*) FROM pageviews_hourly").fetchall()


def test_first_release_snapshot_is_speed_pending(home, serving_settings, clickstream):
    """A format-1 snapshot records no definition: treated as being rebuilt (the safe choice; the speed layer takes
    it over by itself), never paired for a stale answer."""
    events = make_events(clickstream, 600)
    legacy = {v.name: clickstream.legacy_fingerprint(v) for v in clickstream.views}
    publish_batch(home, clickstream, "v000001", events, blocks(events, 3), fingerprints=legacy, manifest_format=1)
    publish_speed(home, clickstream, "000000000001", events, {t: dict(ps) for t, ps in ends(events).items()},
                  snapshot_format=1)
    for allow_stale in (False, True):
        con = connect(serving_settings, clickstream, allow_stale=allow_stale)
        with pytest.raises(duckdb.Error, match=f"view pageviews_hourly {REBUILT}: speed pending"):
            con.execute("SELECT count(*) FROM pageviews_hourly").fetchall()


def test_refresh_reads_the_edited_pipeline_file(home, serving_settings, clickstream, old_lake, tmp_path):
    """A long-lived connection over a pipeline file: after the user edits the file, refresh() serves the new
    declaration — the changed view refused, a removed view gone, an added one present (and refused)."""
    f = tmp_path / "declared.py"
    f.write_text("from lambdalake.pipeline import load_pipeline\n"
                 "pipeline = load_pipeline('lambdalake.pipelines.clickstream')\n")
    con = connect(serving_settings, str(f))
    view = clickstream.view("pageviews_hourly")
    assert query_view(con, view) == expected_view(clickstream, view, old_lake)
    f.write_text("import dataclasses\nfrom datetime import timedelta\n"
                 "from lambdalake.aggregates import count\n"
                 "from lambdalake.pipeline import View, load_pipeline\n"
                 "_base = load_pipeline('lambdalake.pipelines.clickstream')\n"
                 "views = [dataclasses.replace(v, bucket=timedelta(minutes=30))\n"
                 "         if v.name == 'pageviews_hourly' else v\n"
                 "         for v in _base.views if v.name != 'user_activity_daily']\n"
                 "views.append(View('referrers_daily', source='pageviews', keys=['referrer'],\n"
                 "                  bucket=timedelta(days=1), aggregates=[count('views')]))\n"
                 "pipeline = dataclasses.replace(_base, views=views)\n")
    refresh(con)
    with pytest.raises(duckdb.Error, match=f"view pageviews_hourly {REBUILT}"):
        con.execute("SELECT count(*) FROM pageviews_hourly").fetchall()
    with pytest.raises(duckdb.Error, match="user_activity_daily does not exist"):
        con.execute("SELECT count(*) FROM user_activity_daily").fetchall()
    with pytest.raises(duckdb.Error, match=f"view referrers_daily {REBUILT}"):
        con.execute("SELECT count(*) FROM referrers_daily").fetchall()
    assert sorted(states(con)) == ["pageviews_hourly", "referrers_daily", "revenue_daily"]
    rev = clickstream.view("revenue_daily")
    assert query_view(con, rev) == expected_view(clickstream, rev, old_lake)


@pytest.mark.parametrize("materialize", [True, False])
def test_allow_stale_with_an_added_aggregate_shows_it_null(home, serving_settings, clickstream, old_lake, materialize):
    """The previous definition did not store the new aggregate: the stale answer has the declared columns, the
    old definition's values, and NULL for what it never computed (said in lambdalake.views)."""
    new = with_min(clickstream)
    con = connect(serving_settings, new, allow_stale=True, materialize=materialize)
    rows = con.execute("SELECT product_id, currency, window_start, orders, revenue_cents, min_amount_cents, "
                       "max_amount_cents, min_orders_cents FROM revenue_daily").fetchall()
    assert {r[:7] for r in rows} == expected_view(clickstream, clickstream.view("revenue_daily"), old_lake)
    assert {r[7] for r in rows} == {None}
    state, note = con.execute("SELECT state, note FROM lambdalake.views WHERE name = 'revenue_daily'").fetchall()[0]
    assert state == "stale" and "NULL: min_orders_cents" in note
    view = new.view("pageviews_hourly")
    assert query_view(con, view) == expected_view(new, view, old_lake)
