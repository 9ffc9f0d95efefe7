"""Changing a view (issue 11), end to end on the real broker, the real Spark job and the CLI.

A user edits their pipeline file. From then on, until both layers have rebuilt a changed view for its new
definition, no query may return rows made by the old definition under the view's name: it is refused with one
line, or — asked for explicitly — served stale from a complete pair of the old definition. After ``speed`` and
``batch`` ran with the new declaration, every view equals the independent oracle for the new definition (views
changed, added and removed, and a tightened validation rule that takes events out of every view of their source);
going back to the old declaration restores the old results exactly.

Each declared pipeline is its own file built from the previous one with ``dataclasses.replace`` (the product's own
declaration objects, never hand-written dicts).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lambdalake.clients import ensure_topics
from lambdalake.pipeline import Pipeline, load_pipeline
from serving import connect
from tests.oracle import assert_rows_equal, oracle_views, read_log
from wiring.demo_stream import demo_messages
from wiring.produce import send

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# The declarations the user switches between; each is written as a pipeline file importing the base copy.
CHANGES = {
    "A": "",
    # bucket of one view, an aggregate added to another, a view removed, a view added, and a tightened
    # validation rule: long page views become invalid for every view of the source
    "B": """
src = _base.source("pageviews")
fields = [dataclasses.replace(f, maximum=60_000) if f.name == "duration_ms" else f for f in src.fields]
sources = [dataclasses.replace(s, fields=fields) if s.name == "pageviews" else s for s in _base.sources]
views = []
for v in _base.views:
    if v.name == "pageviews_hourly":
        v = dataclasses.replace(v, bucket=timedelta(minutes=30))
    elif v.name == "revenue_daily":
        v = dataclasses.replace(v, aggregates=(*v.aggregates, min_("min_orders_cents", "amount_cents")))
    elif v.name == "user_activity_daily":
        continue
    views.append(v)
views.append(View("referrers_daily", source="pageviews", keys=["referrer"], bucket=timedelta(days=1),
                  aggregates=[count("views")]))
pipeline = dataclasses.replace(_base, sources=sources, views=views)
""",
}


def _declare(tmp_path: Path, base: Path, name: str) -> tuple[Path, Pipeline]:
    f = tmp_path / f"declared_{name}.py"
    f.write_text("import dataclasses\nfrom datetime import timedelta\n"
                 "from lambdalake.aggregates import count, min_\n"
                 "from lambdalake.pipeline import View, load_pipeline\n"
                 f"_base = load_pipeline({str(base)!r})\npipeline = _base\n" + CHANGES[name])
    return f, load_pipeline(str(f))


def _rows(settings, pipeline: Pipeline, **kw) -> dict[str, list]:
    con = connect(settings=settings, pipeline=pipeline, **kw)
    try:
        return {v.name: con.execute(f"SELECT * FROM {v.name}").fetchall() for v in pipeline.views}
    finally:
        con.close()


def _assert_equal_to_oracle(settings, pipeline: Pipeline, log) -> None:
    expected = oracle_views(pipeline, log)
    got = _rows(settings, pipeline)
    for v in pipeline.views:
        assert_rows_equal(got[v.name], expected[v.name], v.name)


def test_changed_views_rebuild_on_both_sides_never_mix_and_revert_exactly(settings, pipeline, run_cli, tmp_path):
    base = Path(settings.pipeline)
    files = {n: _declare(tmp_path, base, n) for n in CHANGES}
    env = {n: {"LAMBDALAKE_PIPELINE": str(f), "LAMBDALAKE_SPARK_MASTER": "local[2]"} for n, (f, _) in files.items()}
    a, b = (files[n][1] for n in "AB")
    topics = [s.topic for s in pipeline.sources]

    # A lake with both sides: a batch version over the first events, the speed layer over all of them.
    ensure_topics(settings, pipeline)
    messages = list(demo_messages(pipeline, 4000, late_fraction=0.1, duplicate_fraction=0.05,
                                  malformed_fraction=0.02, seed=11))
    send(settings, iter(messages[:2500]), progress=False)
    run_cli("ingest", "--until-caught-up", env=env["A"])
    run_cli("batch", env=env["A"])
    send(settings, iter(messages[2500:]), progress=False)
    run_cli("ingest", "--until-caught-up", env=env["A"])
    run_cli("speed", "--until-caught-up", env=env["A"])
    log = read_log(settings.bootstrap, topics)
    _assert_equal_to_oracle(settings, a, log)

    # B declared, nothing rebuilt yet: a changed view is refused with one line, an unchanged one answers.
    res = run_cli("sql", "SELECT count(*) FROM pageviews_hourly", check=False, env=env["B"])
    assert res.returncode != 0
    err = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and "pageviews_hourly" in err[0] and "rebuil" in err[0], res.stderr
    assert "Traceback" not in res.stderr
    for changed in ("revenue_daily", "referrers_daily"):
        res = run_cli("sql", f"SELECT count(*) FROM {changed}", check=False, env=env["B"])
        assert res.returncode != 0 and "rebuil" in res.stderr, (changed, res.stderr)
    res = run_cli("sql", "SELECT url, window_start, views FROM pageviews_hourly ORDER BY 1, 2", "--format", "json",
                  "--allow-stale", check=False, env=env["B"])
    assert res.returncode == 0, res.stderr
    assert "stale" in res.stderr.lower()
    stale = [(r["url"], r["views"]) for r in json.loads(res.stdout)]
    old = oracle_views(a, log)["pageviews_hourly"]
    assert sorted(stale) == sorted((r[0], r[2]) for r in old), "stale rows are the old definition's, complete"
    views_table = run_cli("sql", "SELECT name, state FROM lambdalake.views ORDER BY name", "--format", "json",
                          env=env["B"])
    states = {r["name"]: r["state"] for r in json.loads(views_table.stdout)}
    assert states == {"pageviews_hourly": "rebuilding", "revenue_daily": "rebuilding",
                      "referrers_daily": "rebuilding"}, states

    # The speed layer rebuilds by itself; the batch side is still pending, so the view stays refused.
    run_cli("speed", "--until-caught-up", env=env["B"])
    res = run_cli("sql", "SELECT count(*) FROM pageviews_hourly", check=False, env=env["B"])
    assert res.returncode != 0 and "batch" in res.stderr, res.stderr
    # ... until the batch layer recomputed it: then every view is exact for the new definition.
    run_cli("batch", env=env["B"])
    _assert_equal_to_oracle(settings, b, log)
    # the tightened rule bit: events valid under A are gone from every view of the source, on both sides
    counted = {n: sum(r[2] for r in oracle_views(p, log)["pageviews_hourly"]) for n, p in (("A", a), ("B", b))}
    assert counted["B"] < counted["A"], counted
    status = run_cli("status", "--format", "json", env=env["B"])
    assert "rebuilding" not in status.stdout

    # Reverting restores the original results exactly (no leftover rows of the 30-minute buckets).
    run_cli("speed", "--until-caught-up", env=env["A"])
    run_cli("batch", env=env["A"])
    _assert_equal_to_oracle(settings, a, log)
