"""approx_distinct (issue 15 item 1): one sketch format and one estimate on every engine.

- any split of the values into parts (batch files, speed blocks, workers) unions to the estimate of all values, in
  Python and through the DuckDB functions serving uses; the oracle's estimate is computed from the values alone;
- Spark's ``hll_sketch_agg`` sketches are the Python ones (same hashing, same registers), and Spark's
  ``hll_union_agg`` reads the speed layer's compact sketches (an incremental run over a Kappa-replayed version);
- estimates stay within the sketch's error bound of the exact distinct count, uniform and skewed;
- serving merges batch and speed sketches per row and rolls up across rows from ``sketches.<view>``.
The demo's ``pageviews_hourly.unique_users`` is compared with the oracle through the real broker, Spark and the speed
layer by every end-to-end test (test_end_to_end, test_airflow_e2e, test_audit).
"""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import timedelta

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdalake import sketches
from lambdalake.aggregates import approx_distinct, count
from lambdalake.exceptions import PipelineError
from lambdalake.fields import Field, Source
from lambdalake.pipeline import Pipeline, View, load_pipeline
from serving.connection import connect
from tests.oracle import distinct_estimate, parts_estimate
from tests.test_serving import bucket_start, make_events, split_lake

LG_K = 12
RSE = 1.04 / (2 ** LG_K) ** 0.5  # HLL's relative standard error at lg_k 12: ~1.6%

values_st = st.lists(st.one_of(st.text(max_size=6), st.integers(-(2 ** 63), 2 ** 63 - 1)), max_size=400)


@settings(max_examples=30, deadline=None)
@given(values=values_st, n_parts=st.integers(1, 5), seed=st.integers(0, 2 ** 32))
def test_any_split_unions_to_the_estimate_of_all_values(values, n_parts, seed):
    rng = random.Random(seed)
    parts = [sketches.new(LG_K) for _ in range(n_parts)]
    for v in values:
        parts[rng.randrange(n_parts)].update(v)
    blobs = [sketches.to_bytes(p) for p in parts]
    want = distinct_estimate(values, LG_K)
    assert sketches.estimate(blobs) == want
    assert sketches.estimate([sketches.union_bytes(blobs[:2]), *blobs[2:]]) == want  # unions of unions
    con = duckdb.connect()
    try:
        sketches.register(con)
        sketches.register(con)  # idempotent
        got = con.execute("SELECT hll_count(?::BLOB[]), hll_count([hll_union(?::BLOB[])])", [blobs, blobs]).fetchone()
        assert got == (want, want)
        built = con.execute("SELECT hll_count([hll_sketch_varchar(?::VARCHAR[], 12), "
                            "hll_sketch_bigint(?::BIGINT[], 12)])", [[v for v in values if isinstance(v, str)],
                                                                     [v for v in values if isinstance(v, int)]]
                            ).fetchone()[0]
        assert built == want
    finally:
        con.close()


@pytest.mark.parametrize("skew", [0.0, 1.2])
def test_estimates_stay_within_the_error_bound(skew):
    """200k events over ~40k users, uniform or Zipf-like skewed, split over 4 parts by event: within 3 RSE."""
    rng = random.Random(42)
    users = 40_000
    weights = [1 / (i + 1) ** skew for i in range(users)]
    stream = rng.choices(range(users), weights=weights, k=200_000)
    parts = [sketches.new(LG_K) for _ in range(4)]
    for i, u in enumerate(stream):
        parts[i % 4].update(f"user-{u}")
    exact = len(set(stream))
    est = sketches.estimate([sketches.to_bytes(p) for p in parts])
    assert abs(est - exact) <= 3 * RSE * exact, (est, exact)


def test_spark_sketches_are_the_python_sketches(spark):
    """Batch (Spark) sketches of some events + speed (Python) sketches of the rest == the estimate of all, per key;
    Spark's union reads the Python sketches too."""
    from pyspark.sql import functions as F

    rng = random.Random(3)
    rows = [(f"k{rng.randrange(3)}", f"u{rng.randrange(1500)}", rng.randrange(2500)) for _ in range(4000)]
    batch, speed = rows[:3000], rows[3000:]
    keys = sorted({r[0] for r in rows})
    df = spark.createDataFrame(batch, "k string, s string, i long")
    spark_rows = {r.k: (bytes(r.hs), bytes(r.hi)) for r in
                  df.groupBy("k").agg(F.hll_sketch_agg("s", LG_K).alias("hs"),
                                      F.hll_sketch_agg("i", LG_K).alias("hi")).collect()}
    py = {k: (sketches.to_bytes(sketches.of_values([r[1] for r in speed if r[0] == k], LG_K)),
              sketches.to_bytes(sketches.of_values([r[2] for r in speed if r[0] == k], LG_K))) for k in keys}
    # Spark unions the speed layer's compact sketches with its own (an incremental run over a replayed version)
    both = spark.createDataFrame([(k, spark_rows[k][0]) for k in keys] + [(k, py[k][0]) for k in keys],
                                 "k string, b binary")
    unions = {r.k: bytes(r.u) for r in both.groupBy("k").agg(F.hll_union_agg("b").alias("u")).collect()}
    for k in keys:
        want_s = distinct_estimate([r[1] for r in rows if r[0] == k], LG_K)
        assert sketches.estimate([spark_rows[k][0], py[k][0]]) == want_s
        assert sketches.estimate([spark_rows[k][1], py[k][1]]) == distinct_estimate([r[2] for r in rows if r[0] == k],
                                                                                    LG_K)
        assert parts_estimate([unions[k]]) == want_s


def test_serving_merges_batch_and_speed_sketches_and_rolls_up(tmp_path):
    """unique_users of a lake split between batch and speed == the oracle per row; ``sketches.pageviews_hourly``
    rolls hourly rows up to per-url uniques over all hours (a distinct count does not add up across rows)."""
    pipeline = load_pipeline("lambdalake.pipelines.clickstream")
    view = pipeline.view("pageviews_hourly")
    events = make_events(pipeline, 1500, seed=11)
    split_lake(tmp_path, pipeline, events, {0: 3, 1: 2, 2: 4})
    con = connect(home=tmp_path, pipeline=pipeline)
    try:
        served = dict(((u, ws.timestamp()), n) for u, ws, n in
                      con.execute("SELECT url, window_start, unique_users FROM pageviews_hourly").fetchall())
        rolled = dict(con.execute("SELECT url, hll_count(list(unique_users)) FROM sketches.pageviews_hourly "
                                  "GROUP BY url").fetchall())
    finally:
        con.close()
    src = pipeline.source_of(view)
    per_row, per_url = defaultdict(list), defaultdict(list)
    for e in events:
        if e.topic == src.topic:
            ws = bucket_start(e.fields["event_time"], view.bucket)
            per_row[(e.fields["url"], ws.timestamp())].append(e.fields["user_id"])
            per_url[e.fields["url"]].append(e.fields["user_id"])
    assert served == {k: distinct_estimate(v, LG_K) for k, v in per_row.items()}
    assert rolled == {k: distinct_estimate(v, LG_K) for k, v in per_url.items()}
    assert any(rolled[u] < sum(n for (uu, _), n in served.items() if uu == u) for u in rolled)  # not a sum


def _source(*fields: Field) -> Source:
    return Source(name="s", topic="t", key="k", event_id="id", event_time="ts",
                  fields=[Field.string("id"), Field.timestamp("ts"), Field.string("k"), *fields])


@pytest.mark.parametrize("field,lg_k,error", [
    (Field.number("x"), 12, "needs a string, integer or decimal field; 'x' is number"),
    (Field.boolean("x"), 12, "needs a string, integer or decimal field; 'x' is boolean"),
    (Field.integer("x"), 3, "lg_k must be an integer from 4 to 21, not 3"),
    (Field.integer("x"), 22, "lg_k must be an integer from 4 to 21, not 22"),
])
def test_declaration_errors_are_one_actionable_line(field, lg_k, error):
    with pytest.raises(PipelineError, match=error):
        Pipeline("p", sources=[_source(field)], views=[
            View("v", source="s", keys=["k"], bucket=timedelta(hours=1),
                 aggregates=[count("n"), approx_distinct("u", "x", lg_k=lg_k)])])


def test_lg_k_is_part_of_the_definition():
    def fp(lg_k: int) -> str:
        p = Pipeline("p", sources=[_source(Field.integer("x"))], views=[
            View("v", source="s", keys=["k"], bucket=timedelta(hours=1), aggregates=[approx_distinct("u", "x", lg_k)])])
        return p.fingerprint("v")

    assert fp(12) == fp(12) and fp(12) != fp(14)
