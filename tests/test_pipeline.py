"""The pipeline declaration API: consistency checks, mean resolution, loading user pipelines."""

from __future__ import annotations

from datetime import timedelta

import pytest

from lambdalake.aggregates import count, max_, mean, sum_
from lambdalake.exceptions import PipelineError
from lambdalake.fields import Field, Source
from lambdalake.pipeline import Pipeline, View, load_pipeline

EVENTS = Source(name="events", topic="t.events", key="user", event_id="id", event_time="ts",
                fields=[Field.string("id"), Field.timestamp("ts"), Field.string("user"),
                        Field.string("kind"), Field.integer("value", minimum=0)])


def test_demo_pipeline_matches_the_contract():
    p = load_pipeline("lambdalake.pipelines.clickstream")
    assert [s.topic for s in p.sources] == ["clickstream.pageviews", "clickstream.purchases"]
    assert p.view("pageviews_hourly").output_columns == (
        "url", "window_start", "views", "total_duration_ms", "max_duration_ms", "mean_duration_ms", "unique_users")
    assert p.view("revenue_daily").output_columns == (
        "product_id", "currency", "window_start", "orders", "revenue_cents", "min_amount_cents", "max_amount_cents")
    assert p.view("user_activity_daily").output_columns == (
        "user_id", "window_start", "pageviews", "total_duration_ms")
    assert p.view("pageviews_hourly").bucket_us == 3600 * 10**6
    # the mean reuses the declared sum and count, so nothing hidden is stored
    m = p.view("pageviews_hourly").means[0]
    assert (m.sum_name, m.count_name) == ("total_duration_ms", "views")


def test_mean_without_declared_sum_and_count_adds_hidden_stored_columns():
    v = View("v", source="events", keys=["kind"], bucket=timedelta(minutes=5),
             aggregates=[max_("top", "value"), mean("avg_value", "value")])
    Pipeline("p", sources=[EVENTS], views=[v])
    assert [a.name for a in v.stored_aggregates] == ["top", "__sum_value", "__count"]
    assert v.output_columns == ("kind", "window_start", "top", "avg_value")


@pytest.mark.parametrize("view, message", [
    (View("v", source="nope", keys=["kind"], bucket=timedelta(hours=1), aggregates=[count("n")]), "unknown source"),
    (View("v", source="events", keys=["color"], bucket=timedelta(hours=1), aggregates=[count("n")]),
     "not a field"),
    (View("v", source="events", keys=["kind"], bucket=timedelta(hours=1), aggregates=[sum_("s", "kind")]),
     "needs an integer, decimal or number field"),
    (View("v", source="events", keys=["ts"], bucket=timedelta(hours=1), aggregates=[count("n")]), "timestamp"),
    (View("events", source="events", keys=["kind"], bucket=timedelta(hours=1), aggregates=[count("n")]),
     "duplicate"),
])
def test_inconsistent_declarations_are_refused(view, message):
    with pytest.raises(PipelineError, match=message):
        Pipeline("p", sources=[EVENTS], views=[view])


def test_mean_over_an_optional_field_is_refused():
    src = Source(name="ev", topic="t.ev", key="u", event_id="id", event_time="ts",
                 fields=[Field.string("id"), Field.timestamp("ts"), Field.string("u"),
                         Field.integer("v", required=False)])
    with pytest.raises(PipelineError, match="mean 'm' over optional field 'v'"):
        Pipeline("p", sources=[src], views=[View("w", source="ev", keys=[], bucket=timedelta(hours=1),
                                                 aggregates=[mean("m", "v")])])
    # sum/max over the optional field stay allowed (nulls are skipped, SQL semantics)
    Pipeline("p", sources=[src], views=[View("w", source="ev", keys=[], bucket=timedelta(hours=1),
                                             aggregates=[sum_("s", "v"), max_("x", "v")])])


def test_bad_names_and_buckets_are_refused():
    with pytest.raises(PipelineError, match="whole number of seconds"):
        View("v", source="events", keys=[], bucket=timedelta(milliseconds=1500), aggregates=[count("n")])
    with pytest.raises(PipelineError, match="collide"):
        View("v", source="events", keys=["n"], bucket=timedelta(hours=1), aggregates=[count("n")])
    with pytest.raises(PipelineError, match="event_id field"):
        Source(name="s", topic="t", key="u", event_id="missing", event_time="ts",
               fields=[Field.timestamp("ts"), Field.string("u")])
    with pytest.raises(PipelineError, match="topic"):
        Source(name="s", topic="t.dlq", key="u", event_id="u", event_time="ts",
               fields=[Field.timestamp("ts"), Field.string("u")])


def test_user_pipeline_file_loads_without_engine_changes(tmp_path):
    f = tmp_path / "shop.py"
    f.write_text(
        "from datetime import timedelta\n"
        "from lambdalake import Field, Pipeline, Source, View, count, sum_\n"
        "signups = Source(name='signups', topic='shop.signups', key='user_id', event_id='event_id',\n"
        "    event_time='event_time', fields=[Field.string('event_id'), Field.timestamp('event_time'),\n"
        "    Field.string('user_id'), Field.string('country', pattern=r'^[A-Z]{2}$')])\n"
        "pipeline = Pipeline('shop', sources=[signups], views=[View('signups_daily', source='signups',\n"
        "    keys=['country'], bucket=timedelta(days=1), aggregates=[count('signups')])])\n")
    p = load_pipeline(str(f))
    assert p.name == "shop" and p.view("signups_daily").keys == ("country",)


def test_loading_errors_are_actionable(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_pipeline(str(tmp_path / "missing.py"))
    with pytest.raises(PipelineError, match="not found"):
        load_pipeline("no_such_module_xyz.pipeline")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(PipelineError, match="failed to import: RuntimeError: boom"):
        load_pipeline(str(broken))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(PipelineError, match="defines no module-level"):
        load_pipeline(str(empty))
