"""The independent oracle: what every view must equal, computed WITHOUT engine code.

It reads the messages back from Kafka, applies the documented validation rules (re-implemented here with the
standard library — not ``lambdalake.validation``), the dedup rule (first valid occurrence of an event_id per
topic-partition, by offset) and computes each view in plain DuckDB SQL. The only thing it takes from the engine is
the pipeline *declaration* (field specs, keys, bucket, aggregate kinds): the data a user wrote, not code under test.

Use::

    msgs = read_log(bootstrap, [s.topic for s in pipeline.sources])
    expected = oracle_views(pipeline, msgs)                 # everything
    expected_below = oracle_views(pipeline, msgs, below={("topic", 0): 100, ...})   # offsets < W only
    assert_rows_equal(actual_rows, expected["pageviews_hourly"])
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction

import duckdb
import pyarrow as pa

ONE_MIB = 1024 * 1024
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
TS = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)\Z")
# The documented supported range of an instant, in UTC (docs/pipelines.md, "Validation rules"): both ends inclusive.
FIRST_UTC = datetime(2, 1, 1, tzinfo=timezone.utc)
LAST_UTC = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)


@dataclass(frozen=True)
class LogMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def read_log(bootstrap: str, topics: list[str], timeout: float = 60.0) -> list[LogMessage]:
    """Every message of ``topics`` from offset 0 to the end offsets seen at the start of the call."""
    from kafka import KafkaConsumer, TopicPartition

    # committed records only (the archiver writes dead letters in transactions: batch.dead_letters); a partition is
    # read once the position passes its end, which may be a transaction marker rather than a record
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                      isolation_level="read_committed")
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(c.partitions_for_topic(t) or ())]
        ends = c.end_offsets(tps)
        todo = {tp: end for tp, end in ends.items() if end > 0}
        out: list[LogMessage] = []
        if todo:
            c.assign(list(todo))
            c.seek_to_beginning(*todo)
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"oracle could not read the log to its end: {todo}")
            for tp, recs in c.poll(timeout_ms=500, max_records=20_000).items():
                for r in recs:
                    if r.offset < ends[tp]:
                        out.append(LogMessage(tp.topic, tp.partition, r.offset, r.key, r.value))
            for tp in list(todo):
                if c.position(tp) >= ends[tp]:
                    todo.pop(tp, None)
        return out
    finally:
        c.close()


# --- the documented validation rules, re-implemented -------------------------------------------------------------
class _Literal(float):
    """A JSON number that is not a 64-bit integer, remembering how it was written (decimal fields read that)."""

    text: str


def _finite_float(text: str) -> float:
    """Rule 2: every number must fit a double (``1e400`` is not a number of this contract)."""
    v = float(text)
    if v in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} overflows a double")
    lit = _Literal(v)
    lit.text = text
    return lit


def decimal_units(v, scale: int) -> int | None:
    """Rule 7 (decimals): the JSON number ``v`` times 10^scale if that is an integer of at most 18 digits."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    exact = Fraction(v) if isinstance(v, int) else Fraction(Decimal(v.text))
    units = exact * 10 ** scale
    if units.denominator != 1 or abs(units.numerator) >= 10 ** 18:
        return None
    return units.numerator


def _json_int(text: str) -> int | float:
    """Rule 2: an integer literal is an integer within the 64-bit range (signed or unsigned), else a double."""
    v = int(text)
    return v if -2**63 <= v < 2**64 else _finite_float(text)


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def _ts_us(text: str) -> int | None:
    m = TS.match(text)
    if not m:
        return None
    y, mo, d, h, mi, s, frac, tz = m.groups()
    if tz in ("Z", "z"):
        off = timedelta(0)
    else:
        hh, mm = int(tz[1:3]), int(tz[4:6])
        if hh > 23 or mm > 59:
            return None
        off = timedelta(hours=hh, minutes=mm) * (1 if tz[0] == "+" else -1)
    micro = int((frac[1:] + "000000")[:6]) if frac else 0
    try:
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), micro, tzinfo=timezone(off))
    except ValueError:
        return None
    if not FIRST_UTC <= dt <= LAST_UTC:  # aware datetimes compare as instants
        return None
    delta = dt - EPOCH
    return delta.days * 86_400_000_000 + delta.seconds * 1_000_000 + delta.microseconds


def parse_event(source, value: bytes | None) -> dict | None:
    """The event's fields if the message is valid for ``source`` per the documented rules, else None."""
    if value is None or len(value) > ONE_MIB:
        return None
    try:
        doc = json.loads(value.decode("utf-8"), parse_constant=_no_constants, parse_float=_finite_float,
                         parse_int=_json_int)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    out = {}
    for f in source.fields:
        if f.name not in doc:
            if f.required:
                return None
            out[f.name] = None
            continue
        if doc[f.name] is None:
            if f.required and not f.nullable:
                return None
            out[f.name] = None
            continue
        v = doc[f.name]
        if f.type == "integer":
            if isinstance(v, bool) or not isinstance(v, int):
                return None
            if (f.minimum is not None and v < f.minimum) or (f.maximum is not None and v > f.maximum):
                return None
        elif f.type == "string":
            if not isinstance(v, str):
                return None
            if (f.min_length is not None and len(v) < f.min_length) or (
                    f.max_length is not None and len(v) > f.max_length):
                return None
            if f.pattern and not re.fullmatch(f.pattern, v):
                return None
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return None
        elif f.type == "timestamp":
            if not isinstance(v, str):
                return None
            v = _ts_us(v)
            if v is None:
                return None
        elif f.type == "boolean":
            if not isinstance(v, bool):
                return None
        elif f.type == "number":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return None
            v = float(v)
        elif f.type == "decimal":
            v = decimal_units(v, f.scale)
            if v is None:
                return None
        else:
            raise AssertionError(f"oracle: unknown field type {f.type}")
        out[f.name] = v
    return out


# --- views in plain SQL --------------------------------------------------------------------------------------------
def _events_table(con, source, messages: list[LogMessage], below: dict | None) -> str:
    table = f"ev_{source.name}"
    cols = ["_partition", "_offset"] + [f.name for f in source.fields]
    rows = []
    for m in messages:
        if m.topic != source.topic:
            continue
        ev = parse_event(source, m.value)
        if ev is None:
            continue
        rows.append([m.partition, m.offset] + [
            Decimal(ev[f.name]).scaleb(-f.scale) if f.type == "decimal" and ev[f.name] is not None else ev[f.name]
            for f in source.fields])
    types = {"integer": pa.int64(), "string": pa.string(), "timestamp": pa.int64(), "boolean": pa.bool_(),
             "number": pa.float64()}
    schema = pa.schema([("_partition", pa.int32()), ("_offset", pa.int64())]
                       + [(f.name, pa.decimal128(38, f.scale) if f.type == "decimal" else types[f.type])
                          for f in source.fields])
    arrow = pa.Table.from_arrays([pa.array([r[i] for r in rows], schema.field(i).type) for i in range(len(cols))],
                                 schema=schema)
    con.register(f"arrow_{source.name}", arrow)
    con.execute(f"CREATE OR REPLACE TABLE raw_{source.name} AS SELECT * FROM arrow_{source.name}")
    con.unregister(f"arrow_{source.name}")
    # dedup: first valid occurrence per (partition, event_id), by offset; then the position filter
    limit = ""
    if below is not None:
        conds = [f"(_partition = {p} AND _offset < {w})" for (t, p), w in below.items() if t == source.topic]
        limit = "WHERE " + (" OR ".join(conds) if conds else "FALSE")
    con.execute(f"""
        CREATE OR REPLACE TABLE {table} AS
        SELECT * FROM (
            SELECT *, row_number() OVER (PARTITION BY _partition, "{source.event_id}" ORDER BY _offset) AS _rn
            FROM raw_{source.name}) WHERE _rn = 1 {('AND (' + limit[6:] + ')') if limit else ''}""")
    return table


def oracle_views(pipeline, messages: list[LogMessage], below: dict[tuple[str, int], int] | None = None,
                 sketches: bool = False) -> dict[str, list[tuple]]:
    """Rows of every view (columns ``view.output_columns``, sorted), over valid deduplicated events.

    ``below``: only events at offsets < W[(topic, partition)] (partitions not listed contribute nothing).
    ``window_start`` is returned as microseconds since the epoch (UTC); means as floats; decimals as ``Decimal``.
    A view's filter is read from its declaration and written as SQL here (:func:`_where_sql`).
    An ``approx_distinct`` is its estimate (:func:`distinct_estimate`); with ``sketches``, the sketch's bytes
    (:func:`distinct_sketch`), to merge with stored rows of an engine (:func:`parts_estimate`).
    """
    con = duckdb.connect()
    tables = {s.name: _events_table(con, s, messages, below) for s in pipeline.sources}
    out = {}
    for v in pipeline.views:
        src = pipeline.source_map[v.source]
        b = v.bucket // timedelta(microseconds=1)
        ws = f'("{src.event_time}" - ((("{src.event_time}" % {b}) + {b}) % {b}))'
        sel = [f'"{k}"' for k in v.keys] + [f"{ws} AS window_start"]
        for a in v.aggregates:
            kind = getattr(a, "kind", "mean")
            col = f'"{a.column}"' if a.column else None
            ftype = src.field_map[a.column].type if a.column else None
            total = {"integer": f"sum({col})::BIGINT", "number": f"sum({col})::DOUBLE"}.get(ftype, f"sum({col})")
            expr = {"count": "count(*)", "sum": total, "min": f"min({col})", "max": f"max({col})",
                    "mean": f"avg({col})::DOUBLE", "approx_distinct": f"list({col})"}[kind]
            sel.append(f'{expr} AS "{a.name}"')
        keys = ", ".join([f'"{k}"' for k in v.keys] + ["window_start"])
        where = "" if v.where is None else f"WHERE {_where_sql(v.where, src)}"
        sql = f"SELECT {', '.join(sel)} FROM {tables[src.name]} {where} GROUP BY {keys} ORDER BY {keys}"
        rows = [list(r) for r in con.execute(sql).fetchall()]
        for i, a in enumerate(v.aggregates, start=len(v.keys) + 1):
            if getattr(a, "kind", "") == "approx_distinct":
                scale = src.field_map[a.column].scale or 0
                fn = distinct_sketch if sketches else distinct_estimate
                for r in rows:
                    r[i] = fn([x if not isinstance(x, Decimal) else int(x.scaleb(scale)) for x in r[i]], a.lg_k)
        out[v.name] = [tuple(r) for r in rows]
    con.close()
    return out


def _sketch(values: list, lg_k: int):
    import datasketches

    sketch = datasketches.hll_sketch(lg_k, datasketches.tgt_hll_type.HLL_8)
    for x in values:
        if x is not None:
            sketch.update(x)
    return sketch


def distinct_sketch(values: list, lg_k: int) -> bytes:
    """An Apache DataSketches HLL sketch (HLL_8, ``lg_k``) of the non-null values — strings as UTF-8, integers and
    decimals' scaled integers as 64-bit integers — as compact bytes."""
    return _sketch(values, lg_k).serialize_compact()


def parts_estimate(parts: list) -> int:
    """The documented meaning of an ``approx_distinct`` value (docs/pipelines.md, "Approximate distinct counts"): the
    union of the
    parts' sketches, fed twice to a fresh union (so that it is estimated from its registers alone — the composite
    estimate — never with the order-dependent HIP one), rounded."""
    import datasketches

    sketches = [datasketches.hll_sketch.deserialize(bytes(p)) for p in parts if p is not None]
    lg_k = min((s.lg_config_k for s in sketches), default=12)
    union = datasketches.hll_union(lg_k)
    for s in sketches:
        union.update(s)
    merged = union.get_result(datasketches.tgt_hll_type.HLL_8)
    canon = datasketches.hll_union(lg_k)
    canon.update(merged)
    canon.update(merged)
    return round(canon.get_estimate())


def distinct_estimate(values: list, lg_k: int) -> int:
    """An ``approx_distinct`` value computed from the values themselves (not from an engine's sketches)."""
    return parts_estimate([distinct_sketch(values, lg_k)])


def _constant_sql(field, value) -> str:
    """A filter constant of the declaration as SQL over the oracle's events table."""
    if field.type == "timestamp":
        text = value.isoformat() if isinstance(value, datetime) else value
        us = _ts_us(text)
        assert us is not None, f"oracle: bad timestamp constant {value!r}"
        return str(us)
    if field.type == "decimal":
        return f"CAST('{Decimal(value)}' AS DECIMAL(38, {field.scale}))"
    if field.type == "string":
        return "'" + value.replace("'", "''") + "'"
    if field.type == "boolean":
        return "TRUE" if value else "FALSE"
    if field.type == "number":
        return f"CAST('{float(value)!r}' AS DOUBLE)"
    return str(int(value))


def _where_sql(pred, source) -> str:
    """The documented filter semantics: a comparison or ``in`` on a null field is false; and/or are two-valued."""
    if pred.op in ("and", "or"):
        return "(" + f" {pred.op.upper()} ".join(_where_sql(a, source) for a in pred.args) + ")"
    f = source.field_map[pred.field]
    col = f'"{f.name}"'
    if pred.op == "is_null":
        return f"({col} IS NULL)"
    if pred.op == "not_null":
        return f"({col} IS NOT NULL)"
    vals = [_constant_sql(f, x) for x in pred.values]
    if pred.op == "in":
        return f"({col} IS NOT NULL AND {col} IN ({', '.join(vals)}))"
    op = {"eq": "=", "ne": "<>", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}[pred.op]
    return f"({col} IS NOT NULL AND {col} {op} {vals[0]})"


def oracle_counts(pipeline, messages: list[LogMessage]) -> dict[str, dict[str, int]]:
    """Per source topic: messages, valid (first occurrences), duplicates, invalid."""
    out = {}
    for s in pipeline.sources:
        seen: set[tuple[int, str]] = set()
        c = {"messages": 0, "valid": 0, "duplicates": 0, "invalid": 0}
        for m in sorted((m for m in messages if m.topic == s.topic), key=lambda m: (m.partition, m.offset)):
            c["messages"] += 1
            ev = parse_event(s, m.value)
            if ev is None:
                c["invalid"] += 1
            elif (m.partition, ev[s.event_id]) in seen:
                c["duplicates"] += 1
            else:
                seen.add((m.partition, ev[s.event_id]))
                c["valid"] += 1
        out[s.topic] = c
    return out


# --- comparing -------------------------------------------------------------------------------------------------
def _norm(v):
    if isinstance(v, datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=timezone.utc)
        d = v - EPOCH
        return d.days * 86_400_000_000 + d.seconds * 1_000_000 + d.microseconds
    if hasattr(v, "to_pydatetime"):  # pandas Timestamp
        return _norm(v.to_pydatetime())
    if isinstance(v, float):
        return float(f"{v:.10g}") if math.isfinite(v) else v
    if hasattr(v, "item"):  # numpy scalar
        return _norm(v.item())
    return v


def normalize_rows(rows) -> list[tuple]:
    """Rows as sorted tuples with timestamps as epoch µs and floats rounded to 10 significant digits."""
    return sorted((tuple(_norm(x) for x in r) for r in rows), key=lambda r: tuple((x is None, x) for x in r))


def _close(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float):
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)
    return x == y


def assert_rows_equal(actual, expected, view: str = "") -> None:
    """Equal rows; floats (float sums, means) equal within a relative 1e-9: engines sum in different orders."""
    a, e = normalize_rows(actual), normalize_rows(expected)
    if a == e:
        return
    if len(a) == len(e) and all(len(x) == len(y) and all(map(_close, x, y)) for x, y in zip(a, e, strict=True)):
        return
    sa, se = set(a), set(e)
    missing, extra = sorted(se - sa, key=str)[:5], sorted(sa - se, key=str)[:5]
    raise AssertionError(f"view {view}: {len(a)} rows vs oracle {len(e)}; missing {missing}; unexpected {extra}")


def assert_served_equals_oracle(con, pipeline, messages: list[LogMessage]):
    """Every view a serving connection answers equals the oracle at the positions its pair covers (batch watermark,
    speed positions beyond it). Returns the pair."""
    from serving.connection import pair_of

    pair = pair_of(con)
    assert pair is not None and pair.batch_version is not None
    w, s = dict(pair.watermark), dict(pair.positions)
    want = oracle_views(pipeline, messages, below={k: max(w.get(k, 0), s.get(k, 0)) for k in set(w) | set(s)})
    for v in pipeline.views:
        assert_rows_equal(con.execute(f"SELECT * FROM {v.name}").fetchall(), want[v.name], v.name)
    return pair
