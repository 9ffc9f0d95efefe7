"""Filters (``View(where=...)``) and the decimal / boolean / number field types through every engine, and typed
``lambdalake load`` (issue 15 items 2-4).

Cheap tests first (no broker, no Spark): the declaration and its fingerprint, validation parity (fast path,
reference path and oracle) on the new types, the speed state merged by the serving SQL against the oracle, decimal
sums against exact ``Decimal`` arithmetic, typed loading of CSV/Parquet files. Then ONE integration test on the
session broker and Spark: an order-lines source through archiver + Spark batch + speed layer + serving merge, equal
to the oracle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import zlib
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lambdalake.aggregates import count, max_, min_, sum_
from lambdalake.exceptions import ConfigError, PipelineError
from lambdalake.fields import Field
from lambdalake.pipeline import Pipeline, View, load_pipeline
from lambdalake.pipelines.orders import pipeline as ORDERS
from lambdalake.predicates import and_, between, eq, ge, in_, is_null, le, lt, ne, not_null, or_
from lambdalake.schema import arrow_schema, master_columns, speed_view_columns, view_columns
from lambdalake.validation import ReferenceValidator, Validator
from lambdalake.viewsql import merged_view_sql, typed_select, view_sql
from speed.state import SourceState
from tests.oracle import LogMessage, assert_rows_equal, oracle_views, parse_event
from wiring.load_file import check_file, file_messages

OL = ORDERS.source("order_lines")
V_OL, R_OL = Validator(OL), ReferenceValidator(OL)
ENCODE = msgspec.json.Encoder(decimal_format="number").encode


# --- order-line events ------------------------------------------------------------------------------------------
def order_docs(n: int, seed: int = 5) -> list[dict]:
    """Deterministic order lines around the Q1 2026 filter edges: decimals as ``Decimal`` (written as JSON numbers
    exactly), some discounts absent or null, some weights absent, both flags."""
    rng = random.Random(seed)
    start = datetime(2025, 12, 20, tzinfo=UTC)
    docs = []
    for i in range(n):
        t = start + timedelta(minutes=rng.randrange(0, 150 * 24 * 60))
        if i % 17 == 0:  # exactly on the range ends
            t = rng.choice([datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC),
                            datetime(2026, 3, 31, 23, 59, 59, 999999, tzinfo=UTC)])
        doc = {"line_id": f"l{i}", "ordered_at": t.isoformat().replace("+00:00", "Z"), "order_id": f"o{i // 3}",
               "sku": rng.choice(["A-1", "B-2", "C-3", "D-4"]), "currency": rng.choice(["EUR", "USD"]),
               "quantity": rng.randint(1, 5),
               "price": Decimal(rng.randint(0, 10**7)).scaleb(-2) if i % 23 else Decimal("99999999999.99"),
               "tax": Decimal(rng.randint(0, 10**6)).scaleb(-4), "returned": rng.random() < 0.3}
        r = rng.random()
        if r < 0.5:
            doc["discount"] = Decimal(rng.randint(0, 500)).scaleb(-2)
        elif r < 0.6:
            doc["discount"] = None
        if rng.random() < 0.8:
            doc["weight_kg"] = rng.choice([rng.random() * 10, rng.randint(0, 3), 0.1, 1e-7])
        docs.append(doc)
    return docs


def order_values(n: int, seed: int = 5) -> list[bytes]:
    """Valid order lines plus duplicates and invalid ones of each new type's rules."""
    docs = order_docs(n, seed)
    values = [ENCODE(d) for d in docs]
    bad = [dict(docs[0], line_id="bad1", price="19.99"), dict(docs[1], line_id="bad2", price=Decimal("19.999")),
           dict(docs[2], line_id="bad3", returned=1), dict(docs[3], line_id="bad4", weight_kg="1.5"),
           dict(docs[4], line_id="bad5", tax=Decimal("1e20")), dict(docs[5], line_id="bad6", returned="false")]
    out = []
    for i, v in enumerate(values):
        out.append(v)
        if i % 40 == 7:
            out.append(v)  # a duplicate
        if i % 50 == 9 and bad:
            out.append(ENCODE(bad.pop()))
    return out


def as_log(values: list[bytes], topic: str, partitions: int = 2) -> list[LogMessage]:
    offsets = [0] * partitions
    out = []
    for v in values:
        p = zlib.crc32(json.loads(v)["order_id"].encode()) % partitions
        out.append(LogMessage(topic, p, offsets[p], None, v))
        offsets[p] += 1
    return out


# --- declaration -------------------------------------------------------------------------------------------------
def test_fingerprints_of_views_without_the_new_features_are_what_they_were():
    """The fingerprint formula of the release before filters and the new types (asdict of every field): an
    unchanged view keeps its fingerprint, so an upgrade rebuilds nothing."""
    demo = load_pipeline("lambdalake.pipelines.clickstream")
    old_style = [v for v in demo.views if all(getattr(a, "kind", "") != "approx_distinct" for a in v.aggregates)]
    assert len(old_style) >= 2
    for v in old_style:
        src = demo.source_of(v)
        fields = []
        for f in src.fields:
            d = asdict(f)
            assert d.pop("scale") is None
            fields.append(d)
        doc = {"view": {"name": v.name, "source": v.source, "keys": list(v.keys), "bucket_us": v.bucket_us,
                        "aggregates": [[type(a).__name__, a.name, getattr(a, "kind", "mean"), a.column]
                                       for a in v.aggregates]},
               "source": {"name": src.name, "topic": src.topic, "event_id": src.event_id,
                          "event_time": src.event_time, "key": src.key, "fields": fields}}
        old = hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
        assert demo.fingerprint(v) == old


def _with_where(where) -> Pipeline:
    v = dataclasses.replace(ORDERS.view("sales_q1_daily"), where=where)
    return dataclasses.replace(ORDERS, views=[v])


def test_a_changed_filter_or_field_type_changes_the_fingerprint_and_equal_constants_do_not():
    fp = ORDERS.fingerprint("sales_q1_daily")
    assert _with_where(None).fingerprint("sales_q1_daily") != fp
    q1 = ORDERS.view("sales_q1_daily").where
    assert _with_where(and_(*q1.args[:2], eq("returned", True))).fingerprint("sales_q1_daily") != fp
    # the same instants written with another offset / as datetimes: the same definition
    same = and_(ge("ordered_at", "2026-01-01T01:00:00+01:00"), lt("ordered_at", datetime(2026, 4, 1, tzinfo=UTC)),
                eq("returned", False))
    assert _with_where(same).fingerprint("sales_q1_daily") == fp
    scaled = [dataclasses.replace(f, scale=3) if f.name == "price" else f for f in OL.fields]
    other = dataclasses.replace(ORDERS, sources=[dataclasses.replace(OL, fields=scaled)])
    assert other.fingerprint("sales_q1_daily") != fp


@pytest.mark.parametrize("where, words", [
    (eq("price", "19.999"), "at most 2 fractional digits"),
    (eq("price", 19.99), "at most 2 fractional digits"),  # a float is not an exact decimal constant
    (eq("returned", 1), "not a valid boolean"),
    (ge("returned", True), "has no order"),
    (eq("quantity", "3"), "not a valid integer"),
    (ge("ordered_at", "2026-01-01"), "RFC 3339"),
    (eq("nope", 1), "unknown field"),
    (in_("sku", []), "at least one value"),
    (or_(), "at least one predicate"),
])
def test_bad_filters_are_refused_when_declared(where, words):
    with pytest.raises(PipelineError, match=words):
        _with_where(where)


def test_field_type_rules_of_the_declaration():
    with pytest.raises(PipelineError, match="scale"):
        Field("x", "decimal")
    with pytest.raises(PipelineError, match="scale"):
        Field.decimal("x", scale=19)
    with pytest.raises(PipelineError, match="no range"):
        Field("x", "number", minimum=1)
    with pytest.raises(PipelineError, match="float number"):
        dataclasses.replace(ORDERS, views=[View("w", source="order_lines", keys=["weight_kg"],
                                                bucket=timedelta(hours=1), aggregates=[count("n")])])
    with pytest.raises(PipelineError, match="integer, decimal or number"):
        dataclasses.replace(ORDERS, views=[View("w", source="order_lines", keys=[], bucket=timedelta(hours=1),
                                                aggregates=[sum_("n", "returned")])])


# --- validation --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over, reason", [
    ({"price": "19.99"}, "field 'price': expected decimal number, got string"),
    ({"price": Decimal("19.999")}, "field 'price': 19.999 is not a decimal with at most 2 fractional digits"),
    ({"price": Decimal("10000000000000000")}, "18 digits in all"),
    ({"tax": True}, "expected decimal number, got boolean"),
    ({"returned": 1}, "field 'returned': expected boolean, got integer"),
    ({"returned": "true"}, "expected boolean, got string"),
    ({"weight_kg": "1.5"}, "field 'weight_kg': expected number, got string"),
    ({"price": None}, "field 'price': null is not allowed"),
])
def test_new_types_are_strict(over, reason):
    raw = ENCODE(dict(order_docs(1)[0], **over))
    for judge in (V_OL, R_OL):
        verdict = judge(raw)
        assert not verdict.ok and reason in verdict.reason, verdict
    assert parse_event(OL, raw) is None


def test_decimals_are_read_as_written():
    base = order_docs(1)[0]
    for text, units in [(b"12.5", 1250), (b"12.50", 1250), (b"1.25e1", 1250), (b"-0.00", 0), (b"7", 700),
                        (b"99999999999999.99", 9999999999999999)]:
        raw = ENCODE(dict(base, price=Decimal(0))).replace(b'"price":0', b'"price":' + text)
        for judge in (V_OL, R_OL):
            assert judge(raw).record["price"] == units, text
        assert parse_event(OL, raw)["price"] == units
    raw = ENCODE(dict(base, weight_kg=3))
    assert V_OL(raw).record["weight_kg"] == 3.0 and type(V_OL(raw).record["weight_kg"]) is float


def _agree(raw: bytes) -> None:
    got, want, oracle = V_OL(raw), R_OL(raw), parse_event(OL, raw)
    assert got.ok == want.ok == (oracle is not None), (raw[:300], got, want)
    if got.ok:
        assert got.record == want.record == oracle
        assert [type(x) for x in got.record.values()] == [type(x) for x in want.record.values()]
    else:
        assert got.reason == want.reason


decimal_text = st.one_of(
    st.integers(0, 5).flatmap(lambda p: st.decimals(-10**16, 10**16, allow_nan=False, allow_infinity=False,
                                                    places=p)).map(str),
    st.from_regex(r"\A-?(0|[1-9]\d{0,20})(\.\d{1,6})?([eE][+-]?\d{1,3})?\Z"),
    st.sampled_from(["1e400", "1e-400", "-0", "0.0", "1E2", "1.10", "999999999999999999", "1" + "0" * 30,
                     "0." + "0" * 40 + "1", "12.3400000000000000000000000000"]),
)
json_value = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False,
                       allow_infinity=False).map(repr), st.text(max_size=6).map(json.dumps))


@settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow], deadline=timedelta(seconds=2))
@given(st.data())
def test_fast_path_reference_and_oracle_agree_on_the_new_types(data):
    doc = order_docs(1, seed=data.draw(st.integers(0, 50)))[0]
    doc.pop("discount", None)
    doc.pop("weight_kg", None)
    parts = {k: ENCODE(v).decode() for k, v in doc.items()}
    for name in ("price", "discount", "tax", "weight_kg", "returned"):
        choice = data.draw(st.sampled_from(["keep", "decimal", "any", "absent"]))
        if choice == "decimal":
            parts[name] = data.draw(decimal_text)
        elif choice == "any":
            parts[name] = str(data.draw(json_value)).replace("None", "null").replace("True", "true").replace(
                "False", "false")
        elif choice == "absent":
            parts.pop(name, None)
    raw = ("{" + ",".join(f'"{k}":{v}' for k, v in parts.items()) + "}").encode()
    _agree(raw)


# --- speed state + serving merge vs the oracle (no broker, no Spark) ------------------------------------------------
def _speed_tables(pipeline: Pipeline, log: list[LogMessage], block: int) -> dict[str, pa.Table]:
    """The speed layer's state over ``log`` (validation, dedup by (partition, event id), the compiled updater)."""
    src = pipeline.sources[0]
    state = SourceState(src, pipeline.views_of(src), block)
    validate = Validator(src)
    seen: set[tuple[int, str]] = set()
    for m in sorted(log, key=lambda m: (m.partition, m.offset)):
        v = validate(m.value)
        if not v.ok or (m.partition, v.record[src.event_id]) in seen:
            continue
        seen.add((m.partition, v.record[src.event_id]))
        state.update(v.record, state.rows_for(m.partition, m.offset))
    return state.view_tables()


def _master_table(pipeline: Pipeline, log: list[LogMessage]) -> pa.Table:
    src = pipeline.sources[0]
    validate = Validator(src)
    rows = {f.name: [] for f in src.fields}
    parts, offsets = [], []
    for m in log:
        v = validate(m.value)
        if v.ok:
            for k in rows:
                rows[k].append(v.record[k])
            parts.append(m.partition)
            offsets.append(m.offset)
    schema = arrow_schema(master_columns(src), nullability=False)
    arrays = [pa.array(rows[f.name], pa.int64()).cast(schema.field(f.name).type) if f.type == "timestamp"
              else pa.array(rows[f.name], schema.field(f.name).type) for f in src.fields]
    return pa.Table.from_arrays(arrays + [pa.array(parts, pa.int32()), pa.array(offsets, pa.int64())],
                                names=[f.name for f in src.fields] + ["_partition", "_offset"])


def merged_rows(pipeline: Pipeline, log: list[LogMessage], batch_below: dict[int, int], block: int) -> dict:
    """Batch rows (the audit's DuckDB interpretation over deduplicated master rows below ``batch_below``, a
    multiple of ``block`` as a published watermark is) merged with the speed rows by the serving SQL, per view."""
    assert all(w % block == 0 for w in batch_below.values())
    src = pipeline.sources[0]
    con = duckdb.connect()
    con.register("master_arrow", _master_table(pipeline, log))
    below = " OR ".join(f"(_partition = {p} AND _offset < {w})" for p, w in batch_below.items()) or "FALSE"
    con.execute(f"""CREATE TABLE events AS SELECT * FROM master_arrow WHERE {below}
                    QUALIFY row_number() OVER (PARTITION BY _partition, "{src.event_id}" ORDER BY _offset) = 1""")
    speed = _speed_tables(pipeline, log, block)
    out = {}
    for v in pipeline.views:
        batch = typed_select(view_columns(src, v), "(" + view_sql(src, v, "SELECT * FROM events") + ")")
        con.execute(f"CREATE TABLE b_{v.name} AS {batch}")
        con.register(f"s_arrow_{v.name}", speed[v.name])
        con.execute(f"CREATE TABLE s_{v.name} AS {typed_select(speed_view_columns(src, v), f's_arrow_{v.name}')}")
        out[v.name] = con.execute(merged_view_sql(v, f"b_{v.name}", f"s_{v.name}", batch_below, src)).fetchall()
    con.close()
    return out


def test_speed_state_merged_with_batch_rows_equals_the_oracle():
    log = as_log(order_values(900), OL.topic)
    expected = oracle_views(ORDERS, log)
    assert len(expected["sales_q1_daily"]) > 50 and len(expected["lines_by_flag_hourly"]) > 50
    for below in ({0: 0, 1: 0}, {0: 300, 1: 200}, {0: 10_000, 1: 10_000}):  # speed only, a split, batch only
        got = merged_rows(ORDERS, log, below, block=100)
        for v in ORDERS.views:
            assert_rows_equal(got[v.name], expected[v.name], v.name)
    # the filter bites: the view counts fewer lines than are valid
    valid = sum(parse_event(OL, m.value) is not None for m in log)
    assert 0 < sum(r[2] for r in expected["sales_q1_daily"]) < valid


def test_decimal_sums_are_exact_decimal_arithmetic():
    docs = order_docs(1200, seed=9)
    log = as_log([ENCODE(d) for d in docs], OL.topic)
    got = merged_rows(ORDERS, log, {0: 192, 1: 320}, block=64)["sales_q1_daily"]
    lo, hi = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
    want: dict[tuple, list[Decimal]] = {}
    for d in docs:
        t = datetime.fromisoformat(d["ordered_at"])
        if lo <= t < hi and not d["returned"]:
            acc = want.setdefault((d["currency"], t.date()), [Decimal(0), Decimal(0), Decimal(0)])
            acc[0] += d["price"]
            acc[1] += d.get("discount") or 0
            acc[2] += d["tax"]
    names = list(ORDERS.view("sales_q1_daily").output_columns)
    rows = {(r[0], r[1].date()): r for r in got}
    assert rows.keys() == want.keys()
    for k, (price, _, tax) in want.items():
        r = rows[k]
        assert r[names.index("revenue")] == price and isinstance(r[names.index("revenue")], Decimal)
        assert r[names.index("tax")] == tax
    assert sum(r[names.index("revenue")] for r in got) == sum(p for p, _, _ in want.values())


def test_every_predicate_through_speed_and_merge_equals_the_oracle():
    log = as_log(order_values(600, seed=3), OL.topic)
    preds = [eq("sku", "A-1"), ne("currency", "EUR"), in_("sku", ["B-2", "C-3"]), between("price", "10", "50000.5"),
             lt("tax", "50"), ge("quantity", 3), eq("returned", True), is_null("discount"), not_null("weight_kg"),
             ge("weight_kg", 0.5), in_("returned", [False]), eq("price", "99999999999.990"), le("discount", "0.5"),
             or_(and_(eq("sku", "D-4"), not_null("discount")), lt("ordered_at", "2026-01-10T00:00:00+02:00"))]
    base = View("p", source="order_lines", keys=["sku", "returned"], bucket=timedelta(days=7),
                aggregates=[count("n"), sum_("s", "discount"), min_("w", "weight_kg"), max_("t", "tax"),
                            sum_("kg", "weight_kg")])
    views = [dataclasses.replace(base, name=f"p{i}", where=p) for i, p in enumerate(preds)]
    pipe = dataclasses.replace(ORDERS, views=views)
    expected = oracle_views(pipe, log)
    got = merged_rows(pipe, log, {0: 160, 1: 96}, block=32)
    for v in views:
        assert expected[v.name], f"{v.name}: the oracle keeps no row; the predicate tests nothing"
        assert_rows_equal(got[v.name], expected[v.name], v.name)


# --- typed loading -------------------------------------------------------------------------------------------------
HEADER = "line_id,ordered_at,order_id,sku,currency,quantity,price,discount,tax,returned,weight_kg\n"


def test_load_converts_csv_columns_to_the_declared_types(tmp_path):
    # order ids that look numeric (leading zeros) are declared strings; prices look like floats but are decimals
    csv = tmp_path / "lines.csv"
    csv.write_text(HEADER + "".join(f"l{i},2026-02-0{1 + i}T10:00:00Z,{i:05d},A-1,EUR,{1 + i},19.9{i},,1.5,"
                                    f"{'true' if i % 2 else 'FALSE'},{i}.25\n" for i in range(5)))
    assert check_file(ORDERS, csv, "order_lines").bad_rows == 0
    msgs = list(file_messages(ORDERS, csv, "order_lines"))
    docs = [json.loads(m.value) for m in msgs]
    assert [d["order_id"] for d in docs] == ["00000", "00001", "00002", "00003", "00004"]
    assert [m.key for m in msgs] == [d["order_id"].encode() for d in docs]
    assert [d["returned"] for d in docs] == [False, True, False, True, False]
    assert all("discount" not in d for d in docs)  # an empty cell is absent
    values = [V_OL(m.value) for m in msgs]
    assert all(v.ok for v in values), values
    assert [v.record["price"] for v in values] == [1990, 1991, 1992, 1993, 1994]
    assert b'"price":19.90' in msgs[0].value  # written as the exact decimal, not a float


def test_load_refuses_a_file_with_unconvertible_rows_naming_their_lines_and_sends_nothing(tmp_path):
    good = "l{i},2026-02-01T10:00:00Z,o{i},A-1,EUR,1,1.50,,0.1,false,\n"
    rows = [good.format(i=i) for i in range(6)]
    rows[1] = "l1,2026-02-01T10:00:00Z,o1,A-1,EUR,1,1.505,,0.1,false,\n"  # line 3: three fraction digits
    rows[3] = "l3,2026-02-01T10:00:00Z,o3,A-1,EUR,1,1.50,,0.1,yes,\n"  # line 5: not a boolean
    rows[4] = "l4,2026-02-01 10:00,o4,A-1,EUR,two,1.50,,0.1,false,\n"  # line 6: two problems, the first named
    csv = tmp_path / "bad.csv"
    csv.write_text(HEADER + "".join(rows))
    check = check_file(ORDERS, csv, "order_lines")
    assert check.rows == 6 and check.bad_rows == 3
    assert [w for w, _ in check.problems] == ["line 3", "line 5", "line 6"]
    assert "1.505" in check.problems[0][1] and "'yes' is not true or false" in check.problems[1][1]
    with pytest.raises(ConfigError, match=r"bad.csv: 3 of 6 rows cannot be sent \(line 3: .*nothing was sent"):
        file_messages(ORDERS, csv, "order_lines")
    # a row valid in type but not under the rules (currency pattern) is refused too
    csv.write_text(HEADER + good.format(i=0) + good.format(i=1).replace("EUR", "euro"))
    assert check_file(ORDERS, csv, "order_lines").problems[0][0] == "line 3"


def test_load_converts_parquet_columns_to_the_declared_types(tmp_path):
    table = pa.table({
        "line_id": ["p1", "p2"], "ordered_at": pa.array([datetime(2026, 2, 1, tzinfo=UTC)] * 2, pa.timestamp("us",
                                                                                                          tz="UTC")),
        "order_id": [1, 2],  # integers in the file, declared strings
        "sku": ["A-1", "B-2"], "currency": ["EUR", "USD"], "quantity": [1.0, 2.0],
        "price": pa.array([Decimal("10.10"), Decimal("3")], pa.decimal128(10, 2)), "tax": [0.1, 2.5],
        "returned": [True, False], "weight_kg": [1, None]})
    pq.write_table(table, tmp_path / "lines.parquet")
    msgs = list(file_messages(ORDERS, tmp_path / "lines.parquet", "order_lines"))
    recs = [V_OL(m.value).record for m in msgs]
    assert [(r["order_id"], r["price"], r["tax"], r["quantity"], r["weight_kg"]) for r in recs] == [
        ("1", 1010, 1000, 1, 1.0), ("2", 300, 25000, 2, None)]
    pq.write_table(table.set_column(7, "tax", pa.array([0.12345, 1.0])), tmp_path / "bad.parquet")
    check = check_file(ORDERS, tmp_path / "bad.parquet", "order_lines")
    assert check.problems == [("row 1", "column 'tax': 0.12345 is not a decimal with at most 4 fractional digits "
                                        "and 18 digits in all")]


# --- one integration test: real broker, archiver, Spark batch job, speed layer, serving --------------------------
@pytest.mark.integration
def test_order_lines_through_every_engine_equal_the_oracle(kafka_broker, lake, tmp_path, unique_suffix, spark):
    from audit.check import audit
    from batch.archiver import ingest
    from batch.job import run_batch
    from lambdalake.clients import ensure_topics
    from lambdalake.config import load_settings
    from serving import connect
    from speed.consumer import SpeedLayer, SpeedOptions
    from tests.conftest import write_pipeline_copy
    from tests.oracle import read_log
    from wiring.produce import Message, send

    pipe_file = write_pipeline_copy(tmp_path, "lambdalake.pipelines.orders", unique_suffix)
    cfg = load_settings(home=lake, bootstrap=kafka_broker, pipeline=str(pipe_file), partitions=2).with_(
        handoff_block=50)
    pipe = load_pipeline(str(pipe_file))
    topic = pipe.sources[0].topic
    ensure_topics(cfg, pipe)
    values = order_values(900, seed=21)
    msgs = [Message(topic, json.loads(v)["order_id"].encode(), v, "row") for v in values]
    send(cfg, iter(msgs[:600]), progress=False)
    ingest(cfg, pipe, until_caught_up=True)
    manifest = run_batch(cfg, pipe, spark=spark)
    assert sum(manifest.watermark.values()) > 0 and all(manifest.row_counts.values())
    send(cfg, iter(msgs[600:]), progress=False)
    SpeedLayer(cfg, pipe, SpeedOptions()).run(until_caught_up=True)

    log = read_log(kafka_broker, [topic])
    assert sum(manifest.watermark.values()) < len(log)  # the speed layer holds the rest
    expected = oracle_views(pipe, log)
    con = connect(settings=cfg, pipeline=pipe)
    try:
        for v in pipe.views:
            got = con.execute(f"SELECT * FROM {v.name}").fetchall()
            assert expected[v.name] and len(got) == len(expected[v.name])
            assert_rows_equal(got, expected[v.name], v.name)
        types = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns "
                                 "WHERE table_name = 'sales_q1_daily'").fetchall())
        assert types["revenue"] == "DECIMAL(38,2)" and types["max_price"] == "DECIMAL(18,2)"
        assert types["weight_kg"] == "DOUBLE"
    finally:
        con.close()
    # the audit's independent DuckDB recomputation agrees too (filters, decimals as served, float sums)
    report = audit(cfg, pipe)
    assert report.ok, report.to_dict()["differences"]


def test_load_check_is_a_dry_run_listing_refused_lines(tmp_path):
    from typer.testing import CliRunner

    from wiring.cli import app

    csv = tmp_path / "chk.csv"
    csv.write_text(HEADER + "l0,2026-02-01T10:00:00Z,o0,A-1,EUR,1,1.505,,0.1,false,\n"
                   "l1,2026-02-01T10:00:00Z,o1,A-1,EUR,1,1.5,,0.1,false,\n")
    # no broker is reachable at this address: a dry run never connects
    args = ["load", str(csv), "--source", "order_lines", "--check", "--pipeline", "lambdalake.pipelines.orders",
            "--home", str(tmp_path / "lake"), "--bootstrap", "127.0.0.1:1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert "chk.csv line 2: column 'price': 1.505 is not a decimal" in res.output
    assert "checked 2 rows of chk.csv: 1 ok, 1 refused; nothing was sent" in res.output
    csv.write_text(HEADER + "l1,2026-02-01T10:00:00Z,o1,A-1,EUR,1,1.5,,0.1,false,\n")
    assert CliRunner().invoke(app, args).exit_code == 0
