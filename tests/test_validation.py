"""Validation: the documented rules, checked on hand-picked cases and by property-based tests.

The property tests cross-check three implementations: the engine's compiled fast path (`Validator`, msgspec), its
reference path (`ReferenceValidator`, the rules one check at a time) and the oracle's (`tests/oracle.py`, stdlib
json); they must reach the same verdict and the same parsed values on any document and any bytes.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lambdalake.instants import parse_rfc3339_us
from lambdalake.pipeline import load_pipeline
from lambdalake.validation import MAX_MESSAGE_BYTES, Invalid, ReferenceValidator, Valid, Validator
from tests.oracle import parse_event
from wiring.demo_stream import demo_messages

PIPE = load_pipeline("lambdalake.pipelines.clickstream")
PV = PIPE.source("pageviews")
PU = PIPE.source("purchases")
V_PV, V_PU = Validator(PV), Validator(PU)
R_PV, R_PU = ReferenceValidator(PV), ReferenceValidator(PU)


def pv(**over) -> bytes:
    doc = {"event_id": "e1", "event_time": "2026-01-05T10:00:00Z", "user_id": "u1", "url": "https://x/",
           "referrer": None, "duration_ms": 10}
    doc.update(over)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def test_valid_pageview_is_normalised_to_utc_microseconds():
    v = V_PV(pv(event_time="2026-01-05T12:30:00.123456+02:00"))
    assert isinstance(v, Valid)
    assert v.record["event_time"] == parse_rfc3339_us("2026-01-05T10:30:00.123456Z")
    assert v.record["referrer"] is None and v.record["duration_ms"] == 10


def test_absent_referrer_means_null_and_extra_fields_are_ignored():
    v = V_PV(pv(referrer=..., extra={"nested": [1, 2]}))
    assert isinstance(v, Valid) and v.record["referrer"] is None and "extra" not in v.record


@pytest.mark.parametrize("value, reason", [
    (pv(duration_ms="10"), "expected integer, got string"),
    (pv(duration_ms=True), "expected integer, got boolean"),
    (pv(duration_ms=10.0), "expected integer"),
    (pv(duration_ms=86_400_001), "above the maximum"),
    (pv(duration_ms=-1), "below the minimum"),
    (pv(url=""), "length 0 is below the minimum 1"),
    (pv(url="u" * 2049), "above the maximum 2048"),
    (pv(event_id="e" * 129), "above the maximum 128"),
    (pv(user_id=None), "null is not allowed"),
    (pv(url=...), "missing required field 'url'"),
    (pv(event_time="2026-01-05T10:00:00"), "not an RFC 3339"),
    (pv(event_time="2026-02-30T10:00:00Z"), "not an RFC 3339"),
    (pv(event_time="2026-01-05T23:59:60Z"), "not an RFC 3339"),
    (pv(event_time="2026-01-05 10:00:00Z"), "not an RFC 3339"),
    (pv(event_time="2026-01-05T10:00:00+0100"), "not an RFC 3339"),  # msgspec reads it; the rules want +01:00
    (pv(event_time=1767607200), "expected an RFC 3339 timestamp string"),
    # outside the supported range once in UTC (issue 14): year 1 (and so year 0), year 10000
    (pv(event_time="0001-01-01T00:00:00+14:00"), "'event_time': '0001-01-01T00:00:00+14:00' is outside the "
     "supported range 0002-01-01T00:00:00Z..9999-12-31T23:59:59.999999Z"),
    (pv(event_time="0001-12-31T23:59:59.999999Z"), "'event_time': '0001-12-31T23:59:59.999999Z' is outside"),
    (pv(event_time="0002-01-01T00:00:00+00:01"), "is outside the supported range"),
    (pv(event_time="9999-12-31T23:59:59-12:00"), "'event_time': '9999-12-31T23:59:59-12:00' is outside"),
    (b'{"event_id": ', "not JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8: byte 0xff at position 0"),
    (b'{"url": "\xed\xa0\x80"}', "not UTF-8: byte 0xed at position 9"),  # an encoded surrogate
    (b'{"url": "\\ud800"}', "not JSON"),  # a lone surrogate escape
    (b"[1, 2]", "expected a JSON object"),
    (b'{"duration_ms": NaN}', "not JSON"),
    (b"", "not JSON"),
    (None, "tombstone"),
])
def test_rejections_say_why(value, reason):
    v = V_PV(value)
    assert isinstance(v, Invalid), v
    assert reason in v.reason


def test_purchase_currency_and_amount_rules():
    base = {"event_id": "p1", "event_time": "2026-01-05T10:00:00Z", "user_id": "u", "product_id": "sku",
            "amount_cents": 1, "currency": "EUR"}
    assert V_PU(json.dumps(base).encode()).ok
    for bad in ({"currency": "eur"}, {"currency": "EURO"}, {"amount_cents": 0}, {"amount_cents": 1_000_000_001},
                {"product_id": ""}):
        assert not V_PU(json.dumps({**base, **bad}).encode()).ok, bad


def test_size_limit_is_one_mib():
    pad = MAX_MESSAGE_BYTES - len(pv(pad=""))
    exactly = pv(pad="x" * pad)
    assert len(exactly) == MAX_MESSAGE_BYTES and V_PV(exactly).ok
    assert "above the limit" in V_PV(pv(pad="x" * (pad + 1))).reason


@pytest.mark.parametrize("ts, utc", [
    ("0002-01-01T00:00:00Z", "0002-01-01T00:00:00Z"),  # FIRST_INSTANT
    ("0001-12-31T23:59:59-00:01", "0002-01-01T00:00:59Z"),
    ("0002-01-01T13:59:59+14:00", "0001-12-31T23:59:59Z"),
    ("9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999999Z"),  # LAST_INSTANT
    ("9999-12-31T23:59:59.9999999999999Z", "9999-12-31T23:59:59.999999Z"),
    ("10000-01-01T00:00:00Z", None),
])
def test_supported_range_is_decided_in_utc_by_every_implementation(ts, utc):
    """Issue 14 item 1: inside the range (after conversion to UTC) is valid for the fast path, the reference path
    and the oracle alike; outside is rejected by all three with the same reason."""
    raw = pv(event_time=ts)
    got, ref, oracle = V_PV(raw), R_PV(raw), parse_event(PV, raw)
    first, last = parse_rfc3339_us("0002-01-01T00:00:00Z"), parse_rfc3339_us("9999-12-31T23:59:59.999999Z")
    us = None if utc is None else parse_rfc3339_us(utc)
    inside = us is not None and first <= us <= last
    assert got.ok == ref.ok == (oracle is not None) == inside, (got, ref, oracle)
    if inside:
        assert got.record["event_time"] == ref.record["event_time"] == oracle["event_time"] == us
    else:
        assert got.reason == ref.reason and got.reason.startswith("field 'event_time': ")


def test_fractional_seconds_of_any_length_are_truncated():
    """Issue 14 item 5: RFC 3339 allows any number of fraction digits; beyond microseconds they are truncated."""
    assert parse_rfc3339_us("1970-01-01T00:00:00.123456789Z") == 123456
    assert parse_rfc3339_us("1970-01-01T00:00:00.1234569999999999999999Z") == 123456
    for ts in ("2026-01-05T10:00:00.1234567891Z", "2026-01-05T12:00:00.99999999999999999999+02:00"):
        raw = pv(event_time=ts)
        want = parse_rfc3339_us(ts[:26] + ts[ts.index("Z") if ts.endswith("Z") else -6:])
        assert V_PV(raw).record["event_time"] == R_PV(raw).record["event_time"] == parse_event(PV, raw)[
            "event_time"] == want
    assert parse_rfc3339_us("1969-12-31T23:59:59.5Z") == -500_000
    assert parse_rfc3339_us("2026-01-01T00:00:00+24:00") is None


def test_every_generated_malformed_kind_is_rejected_and_every_valid_one_accepted():
    kinds_seen = set()
    for m in demo_messages(PIPE, 3000, malformed_fraction=0.2, duplicate_fraction=0.05, seed=7):
        src = PV if m.topic == PV.topic else PU
        verdict = Validator(src)(m.value)
        if m.kind.startswith("malformed"):
            kinds_seen.add(m.kind)
            assert not verdict.ok, m.kind
        else:
            assert verdict.ok, (m.kind, verdict)
    assert len(kinds_seen) >= 15


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data):
    for v in (V_PV, V_PU):
        verdict = v(data)
        assert isinstance(verdict, Valid | Invalid)
        assert not (isinstance(verdict, Invalid) and verdict.reason.startswith("validator error")), verdict


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False,
                        allow_infinity=False), st.text(max_size=20))
timestamps = st.one_of(
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.datetimes().map(lambda d: d.isoformat()),
    st.from_regex(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,20})?(Z|[+-]\d\d:\d\d)\Z"),
    st.from_regex(r"\A(000[12]-0[12]|9999-12)-[0-3]\dT[0-2]\d:[0-5]\d:[0-5]\d(\.\d{1,12})?(Z|[+-][01]\d:[0-5]\d)\Z"),
    st.text(max_size=30),
)
pageview_docs = st.fixed_dictionaries(
    {},
    optional={
        "event_id": st.one_of(st.text(min_size=0, max_size=130), json_scalar),
        "event_time": st.one_of(timestamps, json_scalar),
        "user_id": st.one_of(st.text(max_size=5), json_scalar),
        "url": st.one_of(st.text(max_size=5), json_scalar),
        "referrer": json_scalar,
        "duration_ms": st.one_of(st.integers(-5, 86_400_005), json_scalar),
        "other": json_scalar,
    },
)


# The layouts producers write: compact (orjson, JavaScript), Python's default `": "`, indented, escaped non-ASCII.
LAYOUTS = [dict(separators=(",", ":"), ensure_ascii=False), {}, dict(indent=1), dict(separators=(" ,", " : "))]


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=timedelta(seconds=2))
@given(pageview_docs, st.sampled_from(LAYOUTS))
def test_engine_and_oracle_agree_on_any_document(doc, layout):
    _agree(PV, json.dumps(doc, **layout).encode())


def _agree(source, raw: bytes) -> None:
    """Fast path, reference path and oracle: same verdict, same values, same reason."""
    fast, ref = (V_PV, R_PV) if source is PV else (V_PU, R_PU)
    got, want, oracle = fast(raw), ref(raw), parse_event(source, raw)
    assert got.ok == want.ok == (oracle is not None), (raw[:200], got, want)
    if got.ok:
        assert got.record == want.record == oracle
        assert list(got.record) == [f.name for f in source.fields]
    else:
        assert got.reason == want.reason


# Documents built to hit the fast path's edges: unknown fields holding what msgspec skips but orjson checks (huge
# numbers, deep nesting), timestamps msgspec reads differently (space separator, 7+ fraction digits, offsets),
# integers at the 64-bit limits, patterns that match only as a search, non-ASCII strings.
edge_numbers = st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, -2**63, -2**63 - 1, 0, -0.0, 1e308, 10**30])
edge_times = st.one_of(
    st.from_regex(r"\A\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d{1,12})?([Zz]|[+-]\d\d:?\d\d)?\Z"),
    st.sampled_from(["2026-02-29T00:00:00Z", "2024-02-29T23:59:59.9999999Z", "2026-01-01T23:59:60Z",
                     "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+01:00", "2026-01-01T00:00:00+24:00",
                     "0002-01-01T00:00:00Z", "0002-01-01T00:00:00+00:01", "0001-12-31T23:59:59-00:01",
                     "9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.9999999999Z", "9999-12-31T23:59:59.5-00:01",
                     "9999-12-31T23:00:00-00:59"]),
)
purchase_docs = st.fixed_dictionaries(
    {"event_id": st.one_of(st.just("e1"), st.text(max_size=3)), "event_time": edge_times,
     "user_id": st.just("u"), "product_id": st.one_of(st.just("p"), st.text(max_size=3)),
     "amount_cents": st.one_of(st.integers(-1, 3), edge_numbers, st.integers(999_999_999, 1_000_000_001)),
     "currency": st.one_of(st.sampled_from(["EUR", "eur", "EURO", "XEURX", "€UR", "EU"]), st.text(max_size=4))},
    optional={"extra": st.one_of(edge_numbers, st.recursive(st.integers(), lambda c: st.lists(c, max_size=2),
                                                            max_leaves=3), st.text(max_size=5))},
)


@settings(max_examples=800, suppress_health_check=[HealthCheck.too_slow], deadline=timedelta(seconds=2))
@given(purchase_docs, st.sampled_from(LAYOUTS))
def test_fast_path_reference_and_oracle_agree_at_the_edges(doc, layout):
    _agree(PU, json.dumps(doc, **layout).encode())


RAW_EDGES = [
    b'{"x":1e400,' + pv()[1:],  # a number beyond a double in an unknown field
    b'{"x":"\xff",' + pv()[1:],  # invalid UTF-8 in an unknown field
    b'{"x":' + b"[" * 1030 + b"]" * 1030 + b"," + pv()[1:],  # nesting past orjson's limit
    b'{"x":' + b"[" * 900 + b"]" * 900 + b"," + pv()[1:],  # deep but allowed
    b'{"x":' + b"9" * 400 + b"," + pv()[1:],
    pv(event_time="2026-01-05 10:00:00Z"), pv(event_time="2026-01-05T10:00:00.9999999Z"),
    pv(event_time="2026-01-05t10:00:00.5z"), pv(duration_ms=2**64), pv(event_id="e" * 128),
    pv()[:-1] + b',"event_id":"again"}',  # duplicate key: the last one wins everywhere
    b"\xef\xbb\xbf" + pv(), b" " + pv() + b"\n",
    pv(event_time="2026-01-05T10:00:00+0100"), pv(event_time="2026-01-05T10:00:00.5-0130"),
    # a timestamp key given twice: the last one counts, whatever the layout or escaping of either
    pv(event_time="2026-01-05 10:00:00Z")[:-1] + b',"event_time":"2026-01-05T10:00:00Z"}',
    pv(event_time="2026-01-05T10:00:00Z")[:-1] + b',"event_time":"2026-01-05 10:00:00Z"}',
    pv(event_time="2026-01-05T10:00:00Z")[:-1] + b',"event_time" : "2026-01-05T10:00:00.1234567Z"}',
    pv(event_time="2026-01-05T10:00:00Z")[:-1] + b',"event_time":\n"2026-01-05T10:00:00+0100"}',
    pv(event_time="2026-01-05T10:00:00Z")[:-1] + b',"\\u0065vent_time":"2026-01-05 10:00:00Z"}',
    pv(event_time="2026-01-05T10:00:00Z")[:-1] + b',"\\u0065vent_time":"2026-01-05T11:00:00Z"}',
    pv(event_time="2026-01-05T10:00:00Z", url="event_time"),
    pv(event_time="2026-01-05T10:00:00Z", url='"event_time":"'),
    pv(event_time="2026-01-05T10:00:00Z").replace(b"T10", b"\\u002010"),  # an escaped space inside the timestamp
    pv(event_time="2026-01-05T10:00:00Z").replace(b"T10", b"\\u005410"),  # an escaped T
    pv(event_time="2026-01-05T10:00:00.123Z", url="https://x/\u00e9"),  # escapes elsewhere: timestamps as strings
    pv(event_time="2026-01-05T10:00:00.1234565Z", url="https://x/\u00e9"),
    json.dumps(json.loads(pv(event_time="2026-01-05T10:00:00.5+01:00")), separators=(",", " : ")).encode(),
    json.dumps(json.loads(pv(event_time="2026-01-05T10:00:00+0100")), separators=(" ,", "  :  ")).encode(),
]


@pytest.mark.parametrize("raw", RAW_EDGES)
def test_fast_path_reference_and_oracle_agree_on_raw_edges(raw):
    _agree(PV, raw)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=timedelta(seconds=2))
@given(st.data())
def test_fast_path_reference_and_oracle_agree_on_mutated_bytes(data):
    raw = bytearray(pv(referrer="r", other=[1, {"a": "b"}]))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    _agree(PV, bytes(raw))


def _counting_reference(v: Validator) -> list[bytes | None]:
    calls: list[bytes | None] = []
    reference = v.reference

    def counted(value):
        calls.append(value)
        return reference(value)

    v.reference = counted  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("layout", LAYOUTS)
def test_valid_demo_messages_never_need_the_reference_path(layout):
    """The fast path decides every valid message of the demo stream on its own, in every producer layout (a
    regression here costs throughput only, which no other test would notice)."""
    fast = {PV.topic: Validator(PV), PU.topic: Validator(PU)}
    calls = {t: _counting_reference(v) for t, v in fast.items()}
    n = 0
    for m in demo_messages(PIPE, 1500, malformed_fraction=0.0, duplicate_fraction=0.0, seed=5):
        raw = json.dumps(json.loads(m.value), **layout).encode()
        assert fast[m.topic](raw).ok
        n += 1
    assert n == 1500 and calls[PV.topic] == calls[PU.topic] == []


near_rfc3339 = st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt _][0-9]{2}:[0-9]{2}(:[0-9]{2})?([.,][0-9]{0,9})?"
                             r"([Zz]|[+-][0-9]{2}(:?[0-9]{2})?)?\Z")


@settings(max_examples=250, deadline=timedelta(seconds=2))
@given(st.one_of(near_rfc3339, timestamps))
def test_msgspec_reads_the_rfc3339_shape_as_the_rules(ts):
    """Where a timestamp text has the shape the fast path checks, msgspec's reading (if it accepts the text at all)
    is the rules' instant; outside that shape the fast path never trusts msgspec."""
    import msgspec

    from lambdalake.instants import epoch_us
    from lambdalake.validation import _TZ_DATETIME, rfc3339_shape

    raw = ts.encode("utf-8", "surrogatepass")
    if not rfc3339_shape(raw):
        return
    try:
        us = epoch_us(msgspec.convert(ts, _TZ_DATETIME))
    except msgspec.ValidationError:
        return
    assert us == parse_rfc3339_us(ts), ts


@settings(max_examples=200, deadline=timedelta(seconds=2))
@given(st.from_regex(r"\A-?(0|[1-9][0-9]{0,22})(\.[0-9]{1,25})?([eE][+-]?[0-9]{1,3})?\Z"), st.integers(0, 9))
def test_plain_decimal_reading_equals_the_decimal_rule(text, scale):
    from lambdalake.fields import decimal_units
    from lambdalake.validation import plain_decimal_units

    assert plain_decimal_units(text.encode(), scale) == decimal_units(text, scale), (text, scale)
