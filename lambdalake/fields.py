"""Sources and their fields: the declared shape of one topic's JSON events (types, validation rules, exact decimals).

A :class:`Source` is a Kafka topic with a JSON schema, an event-id field, an event-time field and a subject/key
field. Field types: string, integer, timestamp, decimal (exact, stored as a scaled integer), boolean, number
(float64). :mod:`lambdalake.validation` decides a message against these rules; :mod:`lambdalake.pipeline` builds
views over sources.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Literal

from lambdalake.exceptions import PipelineError

FieldType = Literal["string", "integer", "timestamp", "decimal", "boolean", "number"]

# The names of sources, fields, views and pipelines (they become table and column names).
NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


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


def check_names(kind: str, name: str, topic: str, names: Sequence[str], what: str) -> None:
    """A PipelineError unless a source's ``name``, ``topic`` and its ``what`` (field, column) ``names`` are valid:
    names become table and column names, the topic one a source may read (not a dead-letter topic)."""
    if not NAME.match(name):
        raise PipelineError(f"{kind} name {name!r} must match {NAME.pattern} (it becomes a table name)")
    if not _TOPIC.match(topic) or topic.endswith(".dlq"):
        raise PipelineError(f"{kind} {name!r}: topic {topic!r} is not a valid Kafka topic name (letters, digits, "
                            "'.', '_', '-'; not ending in .dlq)")
    if len(set(names)) != len(names):
        raise PipelineError(f"{kind} {name!r}: duplicate {what} names in {list(names)}")
    for n in names:
        if not NAME.match(n):
            raise PipelineError(f"{kind} {name!r}: {what} name {n!r} must match {NAME.pattern}")


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
        names = [f.name for f in self.fields]
        check_names("source", self.name, self.topic, names, "field")
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

