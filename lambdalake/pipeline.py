"""The pipeline declaration: one definition that every engine interprets.

A :class:`Pipeline` has *sources* (a Kafka topic with a JSON schema, an event-id field, an event-time field and a
subject/key field) and *views* (group-by keys, an event-time bucket, and aggregates from a closed set of mergeable
ones). The batch job (Spark), the speed layer (Python), the serving merge (DuckDB SQL) and the audit all read this
object; none of them hard-codes a view.

Mergeable aggregates (the closed set)::

    count()            number of events                      merge: add
    sum_(column)       sum of an integer/decimal/number      merge: add (decimals as scaled integers: exact)
    min_(column)       minimum                               merge: min
    max_(column)       maximum                               merge: max
    mean(column)       derived: sum / count, never stored    recomputed after merging
    approx_distinct(column, lg_k=12)
                       HLL sketch of the distinct values     merge: union; served as the estimate
                       (lambdalake.sketches: the same DataSketches format and estimate on every engine)

A view may keep only some events with a declarative filter (``where=``, see :class:`Predicate`). Field types:
string, integer, timestamp, decimal (exact, stored as a scaled integer), boolean, number (float64).

A view's *stored* columns are its mergeable aggregates plus hidden ones a mean needs (``__sum_<col>``,
``__count``) when the view does not declare them itself. Its *output* columns are the keys, ``window_start``
(UTC timestamp, start of the event-time bucket) and the declared aggregates in declaration order.

Example (a user's own pipeline file, loaded with ``--pipeline path/to/file.py``)::

    from datetime import timedelta
    from lambdalake import Field, Pipeline, Source, View, count, sum_, mean

    signups = Source(
        name="signups", topic="shop.signups", key="user_id", event_id="event_id", event_time="event_time",
        fields=[Field.string("event_id", max_length=128), Field.timestamp("event_time"),
                Field.string("user_id"), Field.string("country", pattern=r"^[A-Z]{2}$")],
    )
    pipeline = Pipeline("shop", sources=[signups],
                        views=[View("signups_daily", source="signups", keys=["country"],
                                    bucket=timedelta(days=1), aggregates=[count("signups")])])
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Literal

from lambdalake.exceptions import PipelineError
from lambdalake.instants import FIRST_INSTANT_US, LAST_INSTANT_US, MAX_BUCKET, parse_rfc3339_us

FieldType = Literal["string", "integer", "timestamp", "decimal", "boolean", "number"]
AggKind = Literal["count", "sum", "min", "max", "approx_distinct"]
MergeKind = Literal["sum", "min", "max", "union"]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
WINDOW_START = "window_start"
US_PER_SECOND = 1_000_000


@dataclass(frozen=True)
class Field:
    """One JSON field of a source's messages.

    ``required=False`` means the field may be absent; absent and ``null`` are then the same (None).
    ``nullable`` allows an explicit JSON null.
    """

    name: str
    type: FieldType
    required: bool = True
    nullable: bool = False
    min_length: int | None = None
    max_length: int | None = None
    minimum: int | None = None
    maximum: int | None = None
    pattern: str | None = None
    # Fractional digits of a decimal field (None for every other type). Not in repr: the legacy fingerprint of a
    # lambdalake 0.1 manifest is a repr of the fields and must not change.
    scale: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.type not in FIELD_TYPES:
            raise PipelineError(f"field {self.name!r}: unknown type {self.type!r}; one of {', '.join(FIELD_TYPES)}")
        if (self.scale is not None) != (self.type == "decimal"):
            raise PipelineError(f"field {self.name!r}: scale is for decimal fields only, and a decimal needs one")
        if self.scale is not None and not (isinstance(self.scale, int) and 0 <= self.scale <= MAX_SCALE):
            raise PipelineError(f"field {self.name!r}: scale {self.scale!r} must be an integer in 0..{MAX_SCALE}")
        if self.type in ("decimal", "boolean", "number") and (
                self.minimum is not None or self.maximum is not None or self.pattern is not None
                or self.min_length is not None or self.max_length is not None):
            raise PipelineError(f"field {self.name!r}: a {self.type} field takes no range, length or pattern rule")

    @classmethod
    def string(cls, name: str, *, min_length: int = 1, max_length: int | None = None, pattern: str | None = None,
               required: bool = True, nullable: bool = False) -> Field:
        return cls(name, "string", required=required, nullable=nullable, min_length=min_length,
                   max_length=max_length, pattern=pattern)

    @classmethod
    def integer(cls, name: str, *, minimum: int | None = None, maximum: int | None = None,
                required: bool = True, nullable: bool = False) -> Field:
        return cls(name, "integer", required=required, nullable=nullable, minimum=minimum, maximum=maximum)

    @classmethod
    def timestamp(cls, name: str, *, required: bool = True, nullable: bool = False) -> Field:
        """An RFC 3339 string with a timezone; stored as a UTC timestamp with microsecond precision."""
        return cls(name, "timestamp", required=required, nullable=nullable)

    @classmethod
    def decimal(cls, name: str, *, scale: int, required: bool = True, nullable: bool = False) -> Field:
        """A JSON number whose value has at most ``scale`` fractional digits (``12.5`` and ``12.50`` at scale 2; not
        ``12.505``) and at most 18 digits in all; stored exactly as the integer value x 10^scale (``12.5`` -> 1250),
        so sums are exact. Served as ``DECIMAL(18, scale)`` (sums ``DECIMAL(38, scale)``)."""
        return cls(name, "decimal", required=required, nullable=nullable, scale=scale)

    @classmethod
    def boolean(cls, name: str, *, required: bool = True, nullable: bool = False) -> Field:
        """JSON ``true`` / ``false`` only (not ``1``, not ``"true"``)."""
        return cls(name, "boolean", required=required, nullable=nullable)

    @classmethod
    def number(cls, name: str, *, required: bool = True, nullable: bool = False) -> Field:
        """Any JSON number, stored as a float64 (an integer literal beyond 2^53 is rounded to the nearest double)."""
        return cls(name, "number", required=required, nullable=nullable)


FIELD_TYPES = ("string", "integer", "timestamp", "decimal", "boolean", "number")
NUMERIC_TYPES = ("integer", "decimal", "number")  # sum_ and mean read these
SKETCH_TYPES = ("string", "integer", "decimal")  # approx_distinct hashes these (a decimal as its scaled integer)
MAX_SCALE = 18
DECIMAL_DIGITS = 18  # a decimal's stored integer has at most this many digits (it fits int64 and DECIMAL(18, s))


def field_doc(f: Field) -> dict:
    """A field's declaration as a JSON-able dict for fingerprints: ``scale`` only where it is set, so the
    fingerprint of a view whose source declares no decimal is the same as before decimals existed."""
    doc = asdict(f)
    if doc["scale"] is None:
        del doc["scale"]
    return doc


@dataclass(frozen=True)
class Aggregate:
    """A mergeable aggregate. ``column`` is None for count."""

    name: str
    kind: AggKind
    column: str | None = None
    # approx_distinct only: log2 of the sketch's registers. Not in repr: the 0.1 fingerprint hashed the repr.
    lg_k: int | None = field(default=None, repr=False)

    @property
    def merge(self) -> MergeKind:
        """How two partial results combine: counts and sums add, min/max fold, sketches union."""
        if self.kind == "approx_distinct":
            return "union"
        return "sum" if self.kind in ("count", "sum") else self.kind


@dataclass(frozen=True)
class Mean:
    """Derived aggregate ``sum(column) / count``; never stored, recomputed after every merge."""

    name: str
    column: str
    sum_name: str = ""  # resolved by View
    count_name: str = ""


def count(name: str) -> Aggregate:
    return Aggregate(name, "count")


def sum_(name: str, column: str) -> Aggregate:
    return Aggregate(name, "sum", column)


def min_(name: str, column: str) -> Aggregate:
    return Aggregate(name, "min", column)


def max_(name: str, column: str) -> Aggregate:
    return Aggregate(name, "max", column)


def mean(name: str, column: str) -> Mean:
    return Mean(name, column)


def approx_distinct(name: str, column: str, lg_k: int = 12) -> Aggregate:
    """Approximate number of distinct non-null values of a string, integer or decimal ``column`` per row: an HLL
    sketch with 2^lg_k registers (relative standard error ~1.04/sqrt(2^lg_k): 1.6% at 12), merged by union across
    batch and speed and across rows (:mod:`lambdalake.sketches`)."""
    return Aggregate(name, "approx_distinct", column, lg_k)


# --- filters -------------------------------------------------------------------------------------------------------
COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")
PREDICATE_OPS = (*COMPARISONS, "in", "is_null", "not_null", "and", "or")
_RANGE_TYPES = ("string", "integer", "timestamp", "decimal", "number")


@dataclass(frozen=True)
class Predicate:
    """One node of a view filter (``View(where=...)``): a comparison of a field with constants, a null check, or
    ``and``/``or`` of predicates. Build it with :func:`eq`, :func:`ne`, :func:`lt`, :func:`le`, :func:`gt`,
    :func:`ge`, :func:`between`, :func:`in_`, :func:`is_null`, :func:`not_null`, :func:`and_`, :func:`or_` (or
    ``p & q``, ``p | q``).

    Semantics, the same in every engine: a comparison or ``in`` is *false* when the field is null (never unknown),
    so ``and``/``or`` are plain two-valued logic; ``is_null`` is true for a null (or absent optional) field.
    Constants are given as the field's JSON type would read: a timestamp as an RFC 3339 string with offset (or an
    aware ``datetime``), a decimal as a ``str``/``Decimal``/``int`` with at most ``scale`` fractional digits.
    """

    op: str
    field: str | None = None
    values: tuple = ()
    args: tuple[Predicate, ...] = ()

    def __and__(self, other: Predicate) -> Predicate:
        return and_(self, other)

    def __or__(self, other: Predicate) -> Predicate:
        return or_(self, other)

    @property
    def fields(self) -> tuple[str, ...]:
        """Every field the predicate reads, in first-use order."""
        if self.field is not None:
            return (self.field,)
        return tuple(dict.fromkeys(f for a in self.args for f in a.fields))

    def doc(self) -> list:
        """JSON-able form (fingerprints)."""
        if self.op in ("and", "or"):
            return [self.op, [a.doc() for a in self.args]]
        return [self.op, self.field, list(self.values)]


def eq(field: str, value: object) -> Predicate:
    return Predicate("eq", field, (value,))


def ne(field: str, value: object) -> Predicate:
    return Predicate("ne", field, (value,))


def lt(field: str, value: object) -> Predicate:
    return Predicate("lt", field, (value,))


def le(field: str, value: object) -> Predicate:
    return Predicate("le", field, (value,))


def gt(field: str, value: object) -> Predicate:
    return Predicate("gt", field, (value,))


def ge(field: str, value: object) -> Predicate:
    return Predicate("ge", field, (value,))


def between(field: str, low: object, high: object) -> Predicate:
    """``low <= field <= high`` (both ends inclusive, as SQL BETWEEN)."""
    return and_(ge(field, low), le(field, high))


def in_(field: str, values: Iterable[object]) -> Predicate:
    return Predicate("in", field, tuple(values))


def is_null(field: str) -> Predicate:
    return Predicate("is_null", field)


def not_null(field: str) -> Predicate:
    return Predicate("not_null", field)


def and_(*preds: Predicate) -> Predicate:
    return Predicate("and", args=tuple(preds))


def or_(*preds: Predicate) -> Predicate:
    return Predicate("or", args=tuple(preds))


def decimal_units(value: object, scale: int) -> int | None:
    """The stored integer of a decimal constant (``value`` x 10^scale) or None if it has more than ``scale``
    fractional digits or more than 18 digits in all."""
    if isinstance(value, bool) or not isinstance(value, (int, str, Decimal)):
        return None
    try:
        d = Decimal(value) if not isinstance(value, Decimal) else value
    except ArithmeticError:
        return None
    if not d.is_finite():
        return None
    sign, digits, exp = d.as_tuple()
    assert isinstance(exp, int)
    cut = len(digits)
    while cut and digits[cut - 1] == 0:  # trailing zeros do not count (1.50 is 1.5)
        cut -= 1
    if cut > DECIMAL_DIGITS + 1:
        return None
    exp += len(digits) - cut
    n = int("".join(map(str, digits[:cut])) or "0")
    shift = exp + scale
    if shift < 0:
        if shift < -400 or n % 10 ** -shift:
            return None
        n //= 10 ** -shift
    elif n:
        if shift > DECIMAL_DIGITS:
            return None
        n *= 10 ** shift
    if n >= 10 ** DECIMAL_DIGITS:
        return None
    return -n if sign else n


def _resolve_value(f: Field, value: object, where: str) -> object:
    """A filter constant as the engines store the field (timestamps: UTC µs; decimals: scaled integer)."""
    bad = PipelineError(f"{where}: {value!r} is not a valid {f.type} constant for field {f.name!r}")
    if f.type == "string":
        if not isinstance(value, str):
            raise bad
        return value
    if f.type == "integer":
        if isinstance(value, bool) or not isinstance(value, int) or not -2**63 <= value < 2**63:
            raise bad
        return value
    if f.type == "boolean":
        if not isinstance(value, bool):
            raise bad
        return value
    if f.type == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or \
                value in (float("inf"), float("-inf")):
            raise bad
        return float(value)
    if f.type == "decimal":
        assert f.scale is not None
        units = decimal_units(value, f.scale)
        if units is None:
            raise PipelineError(f"{where}: {value!r} is not a decimal with at most {f.scale} fractional digits (and "
                                f"{DECIMAL_DIGITS} digits in all) for field {f.name!r}; give a str or Decimal")
        return units
    # timestamp

    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise PipelineError(f"{where}: datetime {value!r} for field {f.name!r} has no timezone")
        us = parse_rfc3339_us(value.isoformat())
    elif isinstance(value, str):
        us = parse_rfc3339_us(value)
    else:
        raise bad
    if us is None or not FIRST_INSTANT_US <= us <= LAST_INSTANT_US:
        raise PipelineError(f"{where}: {value!r} is not an RFC 3339 timestamp with timezone in the supported range "
                            f"for field {f.name!r}")
    return us


def resolve_predicate(pred: Predicate, source: Source, where: str) -> Predicate:
    """``pred`` checked against ``source``'s fields, its constants converted to stored values (see
    :func:`_resolve_value`). Raises :class:`PipelineError` for an unknown field, operator or a bad constant."""
    if not isinstance(pred, Predicate):
        raise PipelineError(f"{where}: {pred!r} is not a predicate; build one with eq, in_, between, and_, ...")
    if pred.op in ("and", "or"):
        if not pred.args:
            raise PipelineError(f"{where}: {pred.op}_ needs at least one predicate")
        return Predicate(pred.op, args=tuple(resolve_predicate(a, source, where) for a in pred.args))
    if pred.op not in PREDICATE_OPS:
        raise PipelineError(f"{where}: unknown operator {pred.op!r}; one of {', '.join(PREDICATE_OPS)}")
    f = source.field_map.get(pred.field or "")
    if f is None:
        raise PipelineError(f"{where}: filter reads unknown field {pred.field!r} of source {source.name!r}")
    if pred.op in ("is_null", "not_null"):
        if pred.values:
            raise PipelineError(f"{where}: {pred.op} takes no value")
        return pred
    if pred.op in ("lt", "le", "gt", "ge") and f.type not in _RANGE_TYPES:
        raise PipelineError(f"{where}: {f.type} field {f.name!r} has no order; use eq, ne or in_")
    if pred.op == "in" and not pred.values:
        raise PipelineError(f"{where}: in_ needs at least one value")
    if pred.op != "in" and len(pred.values) != 1:
        raise PipelineError(f"{where}: {pred.op} takes exactly one value")
    return Predicate(pred.op, pred.field, tuple(_resolve_value(f, v, where) for v in pred.values))


@dataclass(frozen=True)
class Source:
    """A Kafka topic of JSON events. Messages are keyed by ``key`` so one subject stays in one partition."""

    name: str
    topic: str
    fields: Sequence[Field]
    event_id: str
    event_time: str
    key: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        if not _NAME.match(self.name):
            raise PipelineError(f"source name {self.name!r} must match {_NAME.pattern} (it becomes a table name)")
        if not _TOPIC.match(self.topic) or self.topic.endswith(".dlq"):
            raise PipelineError(f"source {self.name!r}: topic {self.topic!r} is not a valid Kafka topic name "
                                "(letters, digits, '.', '_', '-'; not ending in .dlq)")
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise PipelineError(f"source {self.name!r}: duplicate field names in {names}")
        for f in self.fields:
            if not _NAME.match(f.name):
                raise PipelineError(f"source {self.name!r}: field name {f.name!r} must match {_NAME.pattern}")
        by_name = self.field_map
        for role, want in (("event_id", "string"), ("event_time", "timestamp"), ("key", "string")):
            fname = getattr(self, role)
            f = by_name.get(fname)
            if f is None:
                raise PipelineError(f"source {self.name!r}: {role} field {fname!r} is not among its fields {names}")
            if f.type != want or not f.required or f.nullable:
                raise PipelineError(f"source {self.name!r}: {role} field {fname!r} must be a required, "
                                    f"non-nullable {want}")

    @property
    def field_map(self) -> dict[str, Field]:
        return {f.name: f for f in self.fields}

    @property
    def dlq_topic(self) -> str:
        """Dead-letter topic for this source's rejected messages."""
        return f"{self.topic}.dlq"


@dataclass(frozen=True)
class View:
    """An aggregate view over one source, bucketed by event time (never by arrival time)."""

    name: str
    source: str
    keys: Sequence[str]
    bucket: timedelta
    aggregates: Sequence[Aggregate | Mean]
    where: Predicate | None = None  # only events for which it holds count (see Predicate)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "aggregates", tuple(self.aggregates))
        if not _NAME.match(self.name):
            raise PipelineError(f"view name {self.name!r} must match {_NAME.pattern} (it becomes a table name)")
        bucket_us = self.bucket // timedelta(microseconds=1)
        if bucket_us <= 0 or self.bucket % timedelta(seconds=1):
            raise PipelineError(f"view {self.name!r}: bucket {self.bucket} must be a positive whole number of seconds")
        if self.bucket > MAX_BUCKET:
            raise PipelineError(f"view {self.name!r}: bucket {self.bucket} is longer than the maximum "
                                f"{MAX_BUCKET.days} days; declare a shorter bucket")
        if not self.aggregates:
            raise PipelineError(f"view {self.name!r}: declare at least one aggregate")
        outs = list(self.keys) + [WINDOW_START] + [a.name for a in self.aggregates]
        if len(set(outs)) != len(outs):
            raise PipelineError(f"view {self.name!r}: output column names collide: {outs}")

    @property
    def bucket_us(self) -> int:
        return self.bucket // timedelta(microseconds=1)

    @property
    def input_fields(self) -> tuple[str, ...]:
        """Fields the view reads besides the event time: keys, aggregated columns, filtered fields."""
        cols = [*self.keys, *(a.column for a in self.stored_aggregates if a.column)]
        return tuple(dict.fromkeys([*cols, *(self.where.fields if self.where is not None else ())]))

    @property
    def means(self) -> tuple[Mean, ...]:
        """Derived means with the stored columns they divide resolved."""
        return tuple(self._resolve()[1])

    @property
    def stored_aggregates(self) -> tuple[Aggregate, ...]:
        """Mergeable columns physically stored by batch and speed (declared + hidden helpers for means)."""
        return tuple(self._resolve()[0])

    @property
    def output_columns(self) -> tuple[str, ...]:
        return (*self.keys, WINDOW_START, *(a.name for a in self.aggregates))

    def _resolve(self) -> tuple[list[Aggregate], list[Mean]]:
        stored = [a for a in self.aggregates if isinstance(a, Aggregate)]
        means: list[Mean] = []
        for m in (a for a in self.aggregates if isinstance(a, Mean)):
            s = next((a for a in stored if a.kind == "sum" and a.column == m.column), None)
            if s is None:
                s = Aggregate(f"__sum_{m.column}", "sum", m.column)
                stored.append(s)
            c = next((a for a in stored if a.kind == "count"), None)
            if c is None:
                c = Aggregate("__count", "count")
                stored.append(c)
            means.append(Mean(m.name, m.column, s.name, c.name))
        return stored, means


@dataclass(frozen=True)
class Pipeline:
    """Sources and the views computed from them. Construct it in a Python file as ``pipeline = Pipeline(...)``."""

    name: str
    sources: Sequence[Source]
    views: Sequence[View] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "views", tuple(self.views))
        if not _NAME.match(self.name):
            raise PipelineError(f"pipeline name {self.name!r} must match {_NAME.pattern}")
        if not self.sources:
            raise PipelineError(f"pipeline {self.name!r} declares no sources")
        _unique("source", [s.name for s in self.sources])
        _unique("topic", [s.topic for s in self.sources])
        _unique("view/source", [v.name for v in self.views] + [s.name for s in self.sources])
        sources = self.source_map
        for v in self.views:
            src = sources.get(v.source)
            if src is None:
                raise PipelineError(f"view {v.name!r}: unknown source {v.source!r}; known: {sorted(sources)}")
            fields = src.field_map
            for k in v.keys:
                if k not in fields:
                    raise PipelineError(f"view {v.name!r}: key {k!r} is not a field of source {src.name!r}")
                if fields[k].type == "timestamp":
                    raise PipelineError(f"view {v.name!r}: key {k!r} is a timestamp; bucket by event time instead")
                if fields[k].type == "number":
                    raise PipelineError(f"view {v.name!r}: key {k!r} is a float number; group by a decimal, "
                                        "integer or string field instead")
            if v.where is not None:
                resolve_predicate(v.where, src, f"view {v.name!r}")
            for a in v.aggregates:
                col = a.column
                if col is None:
                    continue
                f = fields.get(col)
                if f is None:
                    raise PipelineError(f"view {v.name!r}: aggregate {a.name!r} reads unknown field {col!r}")
                if isinstance(a, Mean) and (not f.required or f.nullable):
                    # sum skips nulls but the count counts every event: the quotient would not be a mean
                    raise PipelineError(f"view {v.name!r}: mean {a.name!r} over optional field {col!r} is not "
                                        "supported; make the field required or declare sum_ and count instead")
                if isinstance(a, Aggregate) and a.kind == "approx_distinct":
                    if f.type not in SKETCH_TYPES:
                        raise PipelineError(f"view {v.name!r}: approx_distinct {a.name!r} needs a string, integer or "
                                            f"decimal field; {col!r} is {f.type}")
                    if not isinstance(a.lg_k, int) or not 4 <= a.lg_k <= 21:
                        raise PipelineError(f"view {v.name!r}: approx_distinct {a.name!r}: lg_k must be an integer "
                                            f"from 4 to 21, not {a.lg_k!r}")
                numeric_only = isinstance(a, Mean) or a.kind == "sum"
                if numeric_only and f.type not in NUMERIC_TYPES:
                    raise PipelineError(f"view {v.name!r}: aggregate {a.name!r} needs an integer, decimal or number "
                                        f"field; {col!r} is {f.type}")
                if f.type == "timestamp":
                    raise PipelineError(f"view {v.name!r}: aggregate {a.name!r} over timestamp {col!r} "
                                        "is not supported")

    @property
    def source_map(self) -> dict[str, Source]:
        return {s.name: s for s in self.sources}

    @property
    def view_map(self) -> dict[str, View]:
        return {v.name: v for v in self.views}

    def source(self, name: str) -> Source:
        try:
            return self.source_map[name]
        except KeyError:
            known = sorted(self.source_map)
            raise PipelineError(f"unknown source {name!r}; pipeline {self.name!r} has {known}") from None

    def view(self, name: str) -> View:
        try:
            return self.view_map[name]
        except KeyError:
            raise PipelineError(f"unknown view {name!r}; pipeline {self.name!r} has {sorted(self.view_map)}") from None

    def source_of(self, view: View) -> Source:
        return self.source_map[view.source]

    def source_for_topic(self, topic: str) -> Source:
        for s in self.sources:
            if s.topic == topic:
                return s
        raise PipelineError(f"topic {topic!r} belongs to no source of pipeline {self.name!r}")

    def views_of(self, source: Source) -> tuple[View, ...]:
        return tuple(v for v in self.views if v.source == source.name)

    def where(self, view: View | str) -> Predicate | None:
        """The view's filter with its constants as stored values (timestamps in UTC µs, decimals as scaled
        integers); None: every event counts. What the engines interpret."""
        view = self.view(view) if isinstance(view, str) else view
        if view.where is None:
            return None
        return resolve_predicate(view.where, self.source_of(view), f"view {view.name!r}")

    def fingerprint(self, view: View | str) -> str:
        """The identity of a view's *definition*: a hash of everything its rows depend on besides the data.

        It covers the view (name, keys, bucket, every aggregate with its kind and column, means included) and its
        source (topic, event id, event time, key, and every field with its type and validation rules: a changed
        ``maximum`` of any field changes which events are valid, hence the view), and the view's filter (with its
        constants as stored values). A view without a filter, over fields of the first three types, has the
        fingerprint it had before filters and the decimal/boolean/number types existed. Every stored piece of a view
        (batch version, speed state and snapshot) records the fingerprint that made it; serving pairs only pieces
        whose fingerprint equals the declared one (docs/design.md, "Definitions change").
        """
        view = self.view(view) if isinstance(view, str) else view
        src = self.source_of(view)
        doc = {
            "view": {"name": view.name, "source": view.source, "keys": list(view.keys), "bucket_us": view.bucket_us,
                     "aggregates": [[type(a).__name__, a.name, getattr(a, "kind", "mean"), a.column,
                                     *([a.lg_k] if getattr(a, "kind", "") == "approx_distinct" else [])]
                                    for a in view.aggregates]},
            "source": {"name": src.name, "topic": src.topic, "event_id": src.event_id, "event_time": src.event_time,
                       "key": src.key, "fields": [field_doc(f) for f in src.fields]},
        }
        where = self.where(view)
        if where is not None:
            doc["view"]["where"] = where.doc()
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def legacy_fingerprint(self, view: View | str) -> str:
        """The fingerprint lambdalake 0.1 recorded in batch manifests (format 1), for upgraded lakes only."""
        view = self.view(view) if isinstance(view, str) else view
        src = self.source_of(view)
        text = repr((view.name, view.keys, view.bucket_us, view.stored_aggregates, src.name, src.fields, src.event_id,
                     src.event_time))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def fingerprints(self) -> dict[str, str]:
        """``{view name: fingerprint}`` of every declared view."""
        return {v.name: self.fingerprint(v) for v in self.views}


def _unique(what: str, names: Iterable[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise PipelineError(f"duplicate {what} name {n!r}")
        seen.add(n)


def load_pipeline(spec: str, *, fresh: bool = False) -> Pipeline:
    """Load a pipeline from a Python file path (``my/pipeline.py``) or a module path (``pkg.mod``).

    The module must define a module-level ``pipeline`` of type :class:`Pipeline`. A file is imported once per
    process; ``fresh`` imports it again (a running process noticing that the user edited it).
    """
    path = Path(spec)
    if spec.endswith(".py") or path.exists():
        if not path.is_file():
            raise PipelineError(f"pipeline file {spec!r} not found; pass --pipeline path/to/pipeline.py "
                                "or a module path like lambdalake.pipelines.clickstream")
        mod_name = f"_lambdalake_pipeline_{abs(hash(str(path.resolve())))}"
        if fresh:
            sys.modules.pop(mod_name, None)
        if mod_name in sys.modules:
            module = sys.modules[mod_name]
        else:
            mspec = importlib.util.spec_from_file_location(mod_name, path)
            if mspec is None or mspec.loader is None:
                raise PipelineError(f"cannot import pipeline file {spec!r}")
            module = importlib.util.module_from_spec(mspec)
            sys.modules[mod_name] = module
            try:
                mspec.loader.exec_module(module)
            except PipelineError:
                del sys.modules[mod_name]
                raise
            except Exception as exc:  # user code: report it, do not crash with a traceback
                del sys.modules[mod_name]
                raise PipelineError(f"pipeline file {spec!r} failed to import: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError as exc:
            raise PipelineError(f"pipeline module {spec!r} not found ({exc}); pass a file path or an importable "
                                "module path") from exc
        except PipelineError:
            raise
        except Exception as exc:
            raise PipelineError(f"pipeline module {spec!r} failed to import: {type(exc).__name__}: {exc}") from exc
    pipe = getattr(module, "pipeline", None)
    if not isinstance(pipe, Pipeline):
        raise PipelineError(f"{spec!r} defines no module-level `pipeline = Pipeline(...)`")
    return pipe
