"""View filters (``View(where=...)``): declarative predicates over a source's fields, resolved to stored values.

A view may keep only some events with a filter built from :func:`eq`, :func:`in_`, :func:`between`, :func:`and_`,
... (see :class:`Predicate`); :func:`resolve_predicate` checks it against the source and converts its constants to
the values the engines store (timestamps in UTC µs, decimals as scaled integers).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from lambdalake.exceptions import PipelineError
from lambdalake.fields import DECIMAL_DIGITS, Field, Source, decimal_units
from lambdalake.instants import FIRST_INSTANT_US, LAST_INSTANT_US, parse_rfc3339_us

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
