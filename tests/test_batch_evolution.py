"""Issue 11, the batch side: a changed view definition is recomputed, exactly, and only what changed.

Against the real broker and real Spark. Every changed pipeline is built from the loaded demo pipeline with
``dataclasses.replace`` on its own ``View``/``Source``/``Pipeline`` objects; every result is compared with the
independent oracle (``tests/oracle.py``) computed with the *new* definition. Covered here: bucket, keys, an added
aggregate, a removed view, tightened field rules (lower ``maximum``, a new ``pattern``, an optional field becoming
required) — including an invalid first occurrence that must not shadow a later valid duplicate —, a loosened rule
(a higher ``maximum``: a rejected message, kept in the lake's rejected files, counts and wins over its duplicate),
the plan the Airflow DAG follows, ``--view`` carry-over, the independent verification, and reverting to the
original results.
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import timedelta

import pyarrow.parquet as pq
import pytest

from batch.archiver import ingest
from batch.incremental import IDS_DIR
from batch.job import run_batch
from batch.partition_buffer import RollPolicy
from batch.plan import plan_batch
from batch.spark_rules import java_pattern
from batch.verify import VerificationFailed, verify_published
from lambdalake.aggregates import min_
from lambdalake.clients import ensure_topics
from lambdalake.fields import Field
from lambdalake.layout import Layout
from lambdalake.pipeline import Pipeline
from tests.oracle import assert_rows_equal, oracle_views, read_log
from tests.test_batch_job import produce, version_rows
from wiring.produce import Message, send

# --- the Java regex the Spark job evaluates == re.fullmatch (no broker needed) --------------------------------------
PATTERNS = [r"^[A-Z]{3}$", r"[a-z]+(-[a-z]+)*", r"\d{2,4}", r".+", r"(?i)usd|eur", r"\w+@\w+\.com", r"a|ab",
            r"[^\s]+", r"\bab\b", r"[A-Z]{2}-\d+"]
STRINGS = ["USD", "usd", "US", "USDX", "USD\n", "\nUSD", "ÜSD", "١٢٣", "12", "1234", "12345", "a-b", "a--b",
           "x\u2028y", "x\ry", "x\u0085y", "ab", "a", "", "é_1@x.com", "EUR", "Eur", " tab\t", "x\u00a0", "Straße",
           "DE-42", "de-42", "DE-42\n"]


def test_spark_pattern_full_matches_like_python(spark):
    from pyspark.sql import functions as F

    demo = [f.pattern for s in _demo().sources for f in s.fields if f.pattern]
    assert demo, "the demo pipeline declares a pattern"
    df = spark.createDataFrame([(s,) for s in STRINGS], "v string")
    for pattern in [*demo, *PATTERNS]:
        java = java_pattern(Field.string("x", pattern=pattern))
        got = {r["v"]: r["m"] for r in df.select("v", F.col("v").rlike(java).alias("m")).collect()}
        want = {s: re.fullmatch(pattern, s) is not None for s in STRINGS}
        assert got == want, (pattern, {s for s in STRINGS if got[s] != want[s]})
        assert any(want.values()) and not all(want.values()), f"{pattern!r} should separate the strings"


@pytest.mark.parametrize("pattern", [r"(?P<cc>[A-Z]{2})", r"[A-Z]+\Z", r"(a)?(?(1)b|c)"])
def test_python_only_regex_is_refused_up_front(pattern):
    from lambdalake.exceptions import PipelineError

    with pytest.raises(PipelineError, match="Python-only"):
        java_pattern(Field.string("x", pattern=pattern))


def _demo() -> Pipeline:
    from lambdalake.pipeline import load_pipeline

    return load_pipeline("lambdalake.pipelines.clickstream")


# --- changes of the declaration --------------------------------------------------------------------------------------
def replace_view(pipeline: Pipeline, name: str, **changes) -> Pipeline:
    return dataclasses.replace(pipeline, views=[dataclasses.replace(v, **changes) if v.name == name else v
                                                for v in pipeline.views])


def replace_fields(pipeline: Pipeline, source: str, **per_field: dict) -> Pipeline:
    src = pipeline.source(source)
    fields = [dataclasses.replace(f, **per_field[f.name]) if f.name in per_field else f for f in src.fields]
    return dataclasses.replace(pipeline, sources=[dataclasses.replace(s, fields=fields) if s.name == source else s
                                                  for s in pipeline.sources])


def tightened(pipeline: Pipeline) -> Pipeline:
    """Lower maximum (duration), a new pattern (currency), an optional nullable field becoming required."""
    p = replace_fields(pipeline, "pageviews", duration_ms={"maximum": 60_000},
                       referrer={"required": True, "nullable": False})
    return replace_fields(p, "purchases", currency={"pattern": r"EUR|USD"})


def loosened(pipeline: Pipeline) -> Pipeline:
    """A higher maximum (duration): messages rejected under the original rules become valid."""
    return replace_fields(pipeline, "pageviews", duration_ms={"maximum": 200_000_000})


SHADOW_ID = "shadow-event-1"
LOOSE_ID = "loose-event-1"


def shadow_messages(pipeline: Pipeline) -> list[Message]:
    """The same event id twice on one partition (same key): first with a duration above 60 000 (invalid once the
    maximum is lowered), then a valid one. Under the original rules the first wins; tightened, the second must."""
    topic = pipeline.source("pageviews").topic
    doc = {"event_id": SHADOW_ID, "event_time": "2026-01-05T10:15:00Z", "user_id": "user-shadow",
           "url": "https://shop.example/shadow", "referrer": "https://www.example.org/", "duration_ms": 70_000}
    loose = {**doc, "event_id": LOOSE_ID, "url": "https://shop.example/loose", "duration_ms": 100_000_000}
    return [Message(topic, b"user-shadow", json.dumps(doc).encode(), "valid"),
            Message(topic, b"user-shadow", json.dumps({**doc, "duration_ms": 500}).encode(), "duplicate"),
            # rejected (above the original maximum), then a valid duplicate: loosened, the first must win
            Message(topic, b"user-shadow", json.dumps(loose).encode(), "invalid"),
            Message(topic, b"user-shadow", json.dumps({**loose, "duration_ms": 600}).encode(), "valid")]


@pytest.fixture
def evolving_lake(settings, pipeline, run_cli):
    """~2000 events (late, duplicated, malformed) behind the shadow pair, archived in small files."""
    ensure_topics(settings, pipeline)
    send(settings, iter(shadow_messages(pipeline)), progress=False)
    produce(run_cli, 2000, late_fraction=0.1, duplicate_fraction=0.05, malformed_fraction=0.03)
    ingest(settings, pipeline, until_caught_up=True, policy=RollPolicy(max_rows=97))
    return settings


def assert_equals_oracle(settings, declared: Pipeline, manifest, log) -> None:
    expected = oracle_views(declared, log, below=dict(manifest.watermark))
    assert sorted(manifest.views) == sorted(v.name for v in declared.views)
    assert sorted(p.name for p in Layout(settings.home).batch_version(manifest.version).iterdir()
                  if p.is_dir() and p.name != IDS_DIR) \
        == sorted(v.name for v in declared.views), "a version holds exactly the declared views (+ its id index)"
    for view in declared.views:
        assert manifest.views[view.name].fingerprint == declared.fingerprint(view)
        assert_rows_equal(version_rows(settings.home, manifest.version, view), expected[view.name], view.name)
        assert manifest.row_counts[view.name] == len(expected[view.name])


def raw_rows(settings, manifest, pipeline: Pipeline) -> dict[str, list]:
    return {v.name: sorted(version_rows(settings.home, manifest.version, v, raw=True), key=repr)
            for v in pipeline.views}


@pytest.mark.integration
def test_changed_definitions_are_recomputed_exactly_and_revert_restores(evolving_lake, pipeline, spark):
    settings = evolving_lake
    log = read_log(settings.bootstrap, [s.topic for s in pipeline.sources])
    original = run_batch(settings, pipeline, spark=spark)
    assert_equals_oracle(settings, pipeline, original, log)
    original_rows = raw_rows(settings, original, pipeline)  # the version itself is pruned by the runs below
    assert plan_batch(settings, pipeline).action == "none"
    # the shadow pair is below W, and under the original rules its first (long) occurrence wins
    shadow = [m for m in log if m.key == b"user-shadow"]
    assert len(shadow) == 4 and all(m.offset < original.watermark.at(m.topic, m.partition) for m in shadow)
    pv = next(v for v in pipeline.views if v.name == "pageviews_hourly")
    shadow_rows = [r for r in version_rows(settings.home, original.version, pv) if r[0].endswith("/shadow")]
    assert [r[3] for r in shadow_rows] == [70_000]

    changes = {
        "bucket": (replace_view(pipeline, "pageviews_hourly", bucket=timedelta(minutes=30)), ["pageviews_hourly"]),
        # each change is made to the original declaration: the previous change is reverted at the same time
        "keys": (replace_view(pipeline, "revenue_daily", keys=("currency",)), ["pageviews_hourly", "revenue_daily"]),
        "aggregate": (replace_view(pipeline, "revenue_daily", aggregates=(
            *pipeline.view("revenue_daily").aggregates, min_("min_orders_cents", "amount_cents"))),
            ["revenue_daily"]),
        "tightened": (tightened(pipeline), ["pageviews_hourly", "revenue_daily", "user_activity_daily"]),
        "loosened": (loosened(pipeline), [v.name for v in pipeline.views
                                          if v.source == "pageviews" or v.name == "revenue_daily"]),
    }
    for kind, (declared, changed) in changes.items():
        plan = plan_batch(settings, declared)
        assert plan.action == "batch" and plan.changed_views == changed, (kind, plan)
        assert all(name in plan.reason for name in changed), (kind, plan.reason)
        manifest = run_batch(settings, declared, spark=spark)
        assert manifest.watermark == original.watermark
        assert_equals_oracle(settings, declared, manifest, log)
        assert plan_batch(settings, declared).action == "none", kind
        assert verify_published(settings, declared).version == manifest.version
        with pytest.raises(VerificationFailed, match="definition"):  # the old declaration does not match it
            verify_published(settings, pipeline)
        if kind == "tightened":
            # rows invalid under the new rules are gone, and the shadowed valid duplicate counts instead
            rows = [r for r in version_rows(settings.home, manifest.version, declared.view("pageviews_hourly"))
                    if r[0].endswith("/shadow")]
            assert [r[3] for r in rows] == [500]
            assert manifest.events["pageviews"] < original.events["pageviews"]
            assert manifest.events["purchases"] < original.events["purchases"]
        if kind == "loosened":
            # the rejected message is valid now, read from the rejected files, and wins over its later duplicate
            rows = [r for r in version_rows(settings.home, manifest.version, declared.view("pageviews_hourly"))
                    if r[0].endswith("/loose")]
            assert [r[3] for r in rows] == [100_000_000]
            assert manifest.revalidated["pageviews"] >= 1 and manifest.rejected_inputs
            assert manifest.events["pageviews"] >= original.events["pageviews"]  # the exact count: the oracle above

    # reverting the declaration restores the original results exactly
    plan = plan_batch(settings, pipeline)
    last = list(changes.values())[-1][0]  # what the published version was computed for
    assert plan.action == "batch" and plan.changed_views == [
        v.name for v in pipeline.views if last.fingerprints.get(v.name) != pipeline.fingerprint(v)]
    reverted = run_batch(settings, pipeline, spark=spark)
    assert raw_rows(settings, reverted, pipeline) == original_rows
    assert reverted.row_counts == original.row_counts and reverted.events == original.events
    assert plan_batch(settings, pipeline).action == "none"


@pytest.mark.integration
def test_view_option_carries_over_only_matching_definitions_and_removed_views_vanish(evolving_lake, pipeline, spark):
    settings = evolving_lake
    log = read_log(settings.bootstrap, [s.topic for s in pipeline.sources])
    v1 = run_batch(settings, pipeline, spark=spark)
    # revenue_daily changes; only user_activity_daily is named: the changed view is recomputed too, the unchanged
    # pageviews_hourly is carried over (the very same files)
    declared = replace_view(pipeline, "revenue_daily", keys=("currency",))
    v2 = run_batch(settings, declared, spark=spark, views=["user_activity_daily"])
    assert v2.watermark == v1.watermark
    assert {n: m.computed_in for n, m in v2.views.items()} == {
        "pageviews_hourly": v1.version, "revenue_daily": v2.version, "user_activity_daily": v2.version}
    assert_equals_oracle(settings, declared, v2, log)
    layout = Layout(settings.home)
    for f in (layout.batch_version(v2.version) / "pageviews_hourly").glob("*.parquet"):
        assert f.samefile(layout.batch_version(v1.version) / "pageviews_hourly" / f.name)
    # a removed view is not in the next version; a named view that is unchanged is recomputed all the same
    removed = dataclasses.replace(declared, views=[v for v in declared.views if v.name != "user_activity_daily"])
    assert plan_batch(settings, removed).action == "none", "a removed view alone needs no recompute"
    v3 = run_batch(settings, removed, spark=spark, views=["revenue_daily"])
    assert sorted(v3.views) == ["pageviews_hourly", "revenue_daily"] and "user_activity_daily" not in v3.row_counts
    assert not (layout.batch_version(v3.version) / "user_activity_daily").exists()
    assert_equals_oracle(settings, removed, v3, log)
    for f in (layout.batch_version(v3.version) / "revenue_daily").glob("*.parquet"):
        assert pq.ParquetFile(f).schema_arrow.names[0] == "currency"
    # a field declared after the files were archived is not in master: refused with the way out, nothing published
    from lambdalake.exceptions import PipelineError
    from lambdalake.layout import batch_pointer

    src = removed.source("purchases")
    with_field = dataclasses.replace(removed, sources=[
        dataclasses.replace(s, fields=(*s.fields, Field.string("coupon", required=False, nullable=True)))
        if s.name == src.name else s for s in removed.sources])
    with pytest.raises(PipelineError, match=r"'coupon' are not in master file .*lambdalake replay"):
        run_batch(settings, with_field, spark=spark)
    assert batch_pointer(layout) == v3.version
