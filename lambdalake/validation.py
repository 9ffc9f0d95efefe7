"""Event validation: the one module that decides whether a Kafka message is a valid event of a source.

The verdict is a pure function of the message bytes and the source's declaration (never of the clock, the
consumer or the position), so the archiver, the speed layer and any re-run reach the same verdict.

Rules (documented contract; the test oracle re-implements them independently):

1. The value is present (not a tombstone) and at most :data:`MAX_MESSAGE_BYTES` (1 MiB).
2. It is UTF-8 (reason ``not UTF-8``; encoded surrogates are not UTF-8) and JSON (RFC 8259, reason ``not JSON``)
   whose top level is an object. ``NaN``/``Infinity`` are not JSON. Numbers must fit a 64-bit integer or a double
   anywhere in the document (the parser's range); lone surrogate escapes (``"\\ud800"``) are not JSON.
3. Every required field is present; an optional field that is absent is null.
4. Types are strict JSON types: an integer is a JSON number without fraction or exponent (``1.0``, ``"1"``,
   ``true`` are not integers); a string is a JSON string.
5. Strings: length in Unicode code points within [min_length, max_length]; must fully match ``pattern``.
   Integers: within [minimum, maximum].
6. Timestamps: RFC 3339 ``date-time`` with a mandatory offset (``Z`` or ``±HH:MM``), e.g.
   ``2026-11-26T10:00:00.123Z``; fractional seconds beyond microseconds (any number of digits) are truncated;
   leap second ``:60`` is rejected. The instant, in UTC, must lie in the supported range :data:`FIRST_INSTANT`
   ``0002-01-01T00:00:00Z`` .. :data:`LAST_INSTANT` ``9999-12-31T23:59:59.999999Z``: years 1..9999 are what
   every layer renders (Python ``datetime``, Spark, DuckDB, JSON/CSV output), and the first year is left out so
   that a ``window_start`` (the instant floored to a view's bucket, at most
   :data:`lambdalake.instants.MAX_BUCKET` = 365 days) never falls before year 1 either. Stored as UTC
   microseconds since the epoch.
7. Decimals (``Field.decimal(name, scale=s)``): a JSON number (not a string) whose exact value, read from the
   number as written (``1.5e1`` is 15), has at most ``s`` fractional digits (trailing zeros do not count: ``1.50``
   is valid at scale 1, ``1.55`` is not) and at most 18 digits in all once scaled; stored as the integer
   value x 10^s. Booleans: JSON ``true``/``false`` only. Numbers (``Field.number``): any JSON number (integer or
   not), stored as the nearest float64.
8. Unknown extra fields are allowed and ignored.

``validate`` never raises for any input bytes: it returns :class:`Valid` or :class:`Invalid` (with a reason a
human can act on).

Two paths, one verdict. :class:`Validator` compiles, once per source, a msgspec ``Struct`` type from the declared
fields (types, required/nullable, ``Meta`` length and range constraints) and decodes each message straight into
it — the *fast path*, C code end to end for a valid message. The *reference path*
(:class:`ReferenceValidator`, the rules above written out one check at a time over ``orjson``) decides every
message the fast path does not accept, and writes the reason, so dead-letter reasons name the field exactly as
before. The fast path only ever *accepts*, and only where msgspec provably reads JSON as the rules do: a message
with exactly the declared fields (msgspec skips unknown fields without checking their UTF-8, number range or
nesting, which rule 2 covers), and timestamps whose text has the shape on which msgspec's RFC 3339 parser gives
the rules' instant (it rounds fractional seconds beyond microseconds where the rules truncate, and accepts a space
between date and time and ``±HHMM`` offsets; :func:`rfc3339_shape`). Everything else — invalid messages, extra
fields, such timestamps — takes the reference path, so extra fields cost speed, never correctness.
``tests/test_validation.py`` proves that both paths and the test oracle agree on arbitrary documents and bytes;
``bench/bench_validation.py`` measures both against the JSON parse alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, ClassVar

import msgspec
import orjson

from lambdalake.fields import DECIMAL_DIGITS, Field, Source, decimal_units, field_doc
from lambdalake.instants import EPOCH, FIRST_INSTANT_US, LAST_INSTANT_US, SUPPORTED_RANGE, epoch_us, parse_rfc3339_us

MAX_MESSAGE_BYTES = 1024 * 1024
# The meaning of the rules above, as a number: raise it whenever a change of this module can turn a verdict (as
# 2 did: any number of fraction digits accepted, the supported instant range). Part of :func:`rules_fingerprint`.
RULES_VERSION = 2  # decimal/boolean/number (rule 7) added no verdict to fields of the older types


def rules_fingerprint(source: Source) -> str:
    """Identity of the rules a message of ``source`` is judged by: its declared fields (types and every rule) and
    :data:`RULES_VERSION`. The archiver records it with each range's rejected messages; the batch job re-validates
    rejected messages only where the declared fingerprint differs (a loosened rule can make them valid)."""
    doc = {"rules": RULES_VERSION, "fields": [field_doc(f) for f in source.fields]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]

class Valid(msgspec.Struct, frozen=True, gc=False):
    """A valid event: ``record`` maps every declared field name to its value (timestamps as UTC µs ints).

    (A msgspec ``Struct``: built in C, a third of a frozen dataclass's cost on the hot path.)"""

    record: dict[str, Any]

    ok: ClassVar[bool] = True


class Invalid(msgspec.Struct, frozen=True, gc=False):
    """A rejected message and why."""

    reason: str

    ok: ClassVar[bool] = False


Verdict = Valid | Invalid


def field_checker(f: Field) -> Callable[[Any], str | None]:
    """Returns check(value) -> error text or None; value is known present and not None."""
    name = f.name
    if f.type == "integer":
        lo, hi = f.minimum, f.maximum

        def check_int(v: Any) -> str | None:
            if type(v) is not int:
                return f"field {name!r}: expected integer, got {json_type(v)}"
            if lo is not None and v < lo:
                return f"field {name!r}: {v} is below the minimum {lo}"
            if hi is not None and v > hi:
                return f"field {name!r}: {v} is above the maximum {hi}"
            return None

        return check_int
    if f.type == "string":
        lo_len, hi_len = f.min_length, f.max_length
        rx = re.compile(f.pattern) if f.pattern else None

        def check_str(v: Any) -> str | None:
            if type(v) is not str:
                return f"field {name!r}: expected string, got {json_type(v)}"
            n = len(v)
            if lo_len is not None and n < lo_len:
                return f"field {name!r}: length {n} is below the minimum {lo_len}"
            if hi_len is not None and n > hi_len:
                return f"field {name!r}: length {n} is above the maximum {hi_len}"
            if rx is not None and rx.fullmatch(v) is None:
                return f"field {name!r}: {v[:40]!r} does not match {f.pattern}"
            return None

        return check_str
    if f.type == "boolean":

        def check_bool(v: Any) -> str | None:
            return None if type(v) is bool else f"field {name!r}: expected boolean, got {json_type(v)}"

        return check_bool
    if f.type in ("number", "decimal"):
        what = "number" if f.type == "number" else "decimal number"

        def check_num(v: Any) -> str | None:
            return None if type(v) in (int, float) else f"field {name!r}: expected {what}, got {json_type(v)}"

        return check_num
    if f.type == "timestamp":

        def check_ts(v: Any) -> str | None:
            if type(v) is not str:
                return f"field {name!r}: expected an RFC 3339 timestamp string, got {json_type(v)}"
            return None

        return check_ts
    raise AssertionError(f"unknown field type {f.type}")


def decimal_reason(name: str, text: str, scale: int) -> str:
    return (f"field {name!r}: {text[:40]} is not a decimal with at most {scale} fractional digits and "
            f"{DECIMAL_DIGITS} digits in all")


def json_type(v: Any) -> str:
    if v is None:
        return "null"
    if type(v) is bool:
        return "boolean"
    if type(v) is int:
        return "integer"
    if type(v) is float:
        return "number with fraction/exponent"
    if type(v) is str:
        return "string"
    if type(v) is list:
        return "array"
    if type(v) is dict:
        return "object"
    return type(v).__name__


class ReferenceValidator:
    """The rules written out one check at a time (the reference path; see the module docstring)."""

    def __init__(self, source: Source):
        self.source = source
        self._fields = [(f.name, f.required, f.nullable, f.type == "timestamp", field_checker(f))
                        for f in source.fields]
        self._scales = {f.name: f.scale for f in source.fields if f.type == "decimal"}
        self._numbers = frozenset(f.name for f in source.fields if f.type == "number")

    def __call__(self, value: bytes | None) -> Verdict:
        try:
            return self._validate(value)
        except Exception as exc:  # paranoid: the contract is "never raises"; a bug here must not stop a consumer
            return Invalid(f"validator error: {type(exc).__name__}: {exc}")

    def _validate(self, value: bytes | None) -> Verdict:
        if value is None:
            return Invalid("empty message (null value / tombstone)")
        if len(value) > MAX_MESSAGE_BYTES:
            return Invalid(f"message is {len(value)} bytes, above the limit of {MAX_MESSAGE_BYTES}")
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as bad:
                return Invalid(f"not UTF-8: byte 0x{value[bad.start]:02x} at position {bad.start} ({bad.reason})")
            return Invalid(f"not JSON: {str(exc)[:200]}")
        if type(doc) is not dict:
            return Invalid(f"expected a JSON object, got {json_type(doc)}")
        record: dict[str, Any] = {}
        raw: dict[str, msgspec.Raw] | None = None
        for name, required, nullable, is_ts, check in self._fields:
            if name not in doc:
                if required:
                    return Invalid(f"missing required field {name!r}")
                record[name] = None
                continue
            v = doc[name]
            if v is None:
                if not (nullable or not required):
                    return Invalid(f"field {name!r}: null is not allowed")
                record[name] = None
                continue
            err = check(v)
            if err is not None:
                return Invalid(err)
            if is_ts:
                us = parse_rfc3339_us(v)
                if us is None:
                    return Invalid(f"field {name!r}: {v[:60]!r} is not an RFC 3339 timestamp with timezone")
                if not FIRST_INSTANT_US <= us <= LAST_INSTANT_US:
                    return Invalid(f"field {name!r}: {v[:60]!r} is outside the supported range "
                                   f"{SUPPORTED_RANGE} (UTC)")
                v = us
            elif name in self._scales:
                if type(v) is float and (v != v or v in (float("inf"), float("-inf"))):
                    return Invalid(f"field {name!r}: not a finite number")
                if raw is None:  # the number as written: orjson's float has lost the exact digits
                    raw = msgspec.json.decode(value, type=dict[str, msgspec.Raw])
                text = bytes(raw[name]).decode()
                units = decimal_units(text, self._scales[name])  # type: ignore[arg-type]
                if units is None:
                    return Invalid(decimal_reason(name, text, self._scales[name]))  # type: ignore[arg-type]
                v = units
            elif type(v) is int and name in self._numbers:
                v = float(v)
            record[name] = v
        return Valid(record)


# --- the fast path: msgspec Structs compiled from the declaration ---------------------------------------------------
_TZ_DATETIME = Annotated[datetime, msgspec.Meta(tz=True)]


def _field_type(f: Field, datetimes: bool = False) -> Any:
    if f.type == "integer":
        t: Any = Annotated[int, msgspec.Meta(ge=f.minimum, le=f.maximum)]
    elif f.type == "string":
        # patterns are full-matched after decoding (Validator): msgspec searches, and its pattern check costs twice a
        # Python fullmatch call
        t = Annotated[str, msgspec.Meta(min_length=f.min_length, max_length=f.max_length)]
    elif f.type == "boolean":
        t = bool
    elif f.type == "number":
        t = float  # msgspec reads an integer literal as the nearest double too, and refuses one beyond a double
    elif f.type == "decimal":
        return msgspec.Raw  # the number as written (null included), read after decoding (Validator)
    else:
        # a tz-aware datetime read by msgspec, trusted only where its text has the rules' shape (Validator)
        t = _TZ_DATETIME if datetimes else str
    return t | None if (f.nullable or not f.required) else t


def compile_struct(source: Source, *, datetimes: bool = False) -> type[msgspec.Struct]:
    """The msgspec ``Struct`` type of a source's events that the fast path accepts: exactly the declared fields
    (an unknown field sends the message to the reference path), strict JSON types, ``Meta`` length/range limits.
    Timestamps are strings, or with ``datetimes`` tz-aware datetimes parsed by msgspec."""
    fields = [(f.name, _field_type(f, datetimes)) if f.required else (f.name, _field_type(f, datetimes), None)
              for f in source.fields]
    return msgspec.defstruct(f"{source.name}_event{'_dt' if datetimes else ''}", fields, kw_only=True,
                             forbid_unknown_fields=True)


def rfc3339_shape(text: bytes) -> bool:
    """Whether an RFC 3339 text that msgspec's parser accepts is read by it exactly as by the rules (rule 6):
    ``T``/``t`` between date and time (msgspec also takes a space), at most 6 fraction digits (msgspec rounds more,
    the rules truncate), an offset ``Z``/``z`` or ``±HH:MM`` (msgspec also takes ``±HHMM``). The fields themselves
    (digits, calendar, offset range) are msgspec's to check; ``tests/test_validation.py`` proves the agreement."""
    n = len(text)
    if n < 20 or text[10] not in (84, 116) or 92 in text:  # T t, no escape
        return False
    if text[-1] in (90, 122):  # Z z
        tail = 1
    elif text[-3] == 58 and text[-6] in (43, 45):  # ±HH:MM
        tail = 6
    else:
        return False
    frac = n - 19 - tail
    return frac == 0 or (2 <= frac <= 7 and text[19] == 46)


def plain_decimal_units(text: bytes, scale: int) -> int | None:
    """:func:`lambdalake.fields.decimal_units` of a JSON number text, in integer arithmetic when it has no
    exponent (the common ``19.99``), by ``decimal_units`` otherwise."""
    if 101 in text or 69 in text:  # e E
        return decimal_units(text.decode(), scale)
    neg = text[0] == 45
    body = text[1:] if neg else text
    dot = body.find(b".")
    if dot < 0:
        whole, frac = body, b""
    else:
        whole, frac = body[:dot], body[dot + 1:].rstrip(b"0")
    if len(frac) > scale:
        return None
    n = int(whole + frac + b"0" * (scale - len(frac)))
    if n >= _DECIMAL_LIMIT:
        return None
    return -n if neg else n


_DECIMAL_LIMIT = 10 ** DECIMAL_DIGITS
_NUMBER_START = frozenset(b"-0123456789")
_asdict = msgspec.structs.asdict
# After a timestamp key (``"name"``, the last one in the message): a colon (a space either side allowed) and a string
# in the shape on which msgspec's RFC 3339 reading equals rule 6 (see :func:`rfc3339_shape`; the characters left to
# ``[^"]`` are msgspec's to check: it only accepts digits, dashes and colons there).
_SHAPE_AFTER_KEY = rb' ?: ?"[^"]{10}[Tt][^"]{8}(?:\.[0-9]{1,6})?(?:[Zz]|[+-][^"]{2}:[^"]{2})"'


class Validator:
    """Compiled validator for one source; call it with the message value bytes (see the module docstring).

    Fast path: msgspec decodes the bytes straight into a compiled ``Struct`` (rules 1-5 in C for a message made of
    exactly the declared fields; patterns are full-matched after decoding), timestamps as tz-aware datetimes parsed
    by msgspec. Its RFC 3339 reading is laxer than rule 6 in three ways (a space instead of ``T``, ``±HHMM``
    offsets, rounding beyond microseconds), so the raw text of each timestamp must have the rules' shape: in a
    message without backslashes every ``"`` delimits a string, so the last ``"name"`` token followed by a colon is
    the key msgspec (and the rules) read, and one anchored regex match checks the text after it. A message with
    escapes (or an unusual layout around a timestamp key) is decoded with timestamps as strings whose shape is
    checked before msgspec converts them. Anything the fast path does not accept goes to the reference path, which
    decides and words the reason.
    """

    def __init__(self, source: Source):
        self.source = source
        self.reference = ReferenceValidator(source)
        self.struct = compile_struct(source)
        self.struct_dt = compile_struct(source, datetimes=True)
        self._decode = msgspec.json.Decoder(self.struct).decode
        self._decode_dt = msgspec.json.Decoder(self.struct_dt).decode
        self._patterns = [(f.name, re.compile(f.pattern).fullmatch) for f in source.fields if f.pattern]
        self._timestamps = [(f.name, b'"' + f.name.encode() + b'"') for f in source.fields if f.type == "timestamp"]
        self._shapes = [(name, token, re.compile(re.escape(token) + _SHAPE_AFTER_KEY).match)
                        for name, token in self._timestamps]
        self._decimals = [(f.name, f.scale, f.nullable or not f.required) for f in source.fields
                          if f.type == "decimal"]
        self._rest = bool(self._patterns or self._decimals)

    def __call__(self, value: bytes | None) -> Verdict:
        try:
            if value.find(b"\\") < 0 and len(value) <= MAX_MESSAGE_BYTES:  # type: ignore[union-attr]
                record = _asdict(self._decode_dt(value))
                for name, token, shape in self._shapes:
                    dt = record[name]
                    if dt is not None:
                        if shape(value, value.rfind(token)) is None:
                            record = self._read_strings(value)  # an unusual layout: decided on the strings
                            break
                        delta = dt - EPOCH
                        us = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
                        if not FIRST_INSTANT_US <= us <= LAST_INSTANT_US:
                            return self.reference(value)
                        record[name] = us
            elif value is None or len(value) > MAX_MESSAGE_BYTES:
                return self.reference(value)
            else:
                record = self._read_strings(value)
            if record is None or (self._rest and not self._read_rest(record)):
                return self.reference(value)
        except Exception:  # noqa: BLE001 - not accepted by the fast path: the reference path decides and says why
            return self.reference(value)
        return Valid(record)

    def _read_strings(self, value: bytes) -> dict[str, Any] | None:
        """The fast path with timestamps decoded as strings; None where it does not accept the message."""
        record = _asdict(self._decode(value))
        for name, _ in self._timestamps:
            ts = record[name]
            if ts is not None:
                if not rfc3339_shape(ts.encode()):
                    return None
                us = epoch_us(msgspec.convert(ts, _TZ_DATETIME))
                if not FIRST_INSTANT_US <= us <= LAST_INSTANT_US:
                    return None
                record[name] = us
        return record

    def _read_rest(self, record: dict[str, Any]) -> bool:
        """Patterns and decimals (rule 7: the number as written, scaled exactly); False where not accepted."""
        for name, fullmatch in self._patterns:
            v = record[name]
            if v is not None and fullmatch(v) is None:
                return False
        for name, scale, null_ok in self._decimals:
            r = record[name]
            if r is None:
                continue
            text = bytes(r)
            if text == b"null":
                if not null_ok:
                    return False
                record[name] = None
                continue
            if text[0] not in _NUMBER_START:
                return False
            units = plain_decimal_units(text, scale)
            if units is None:
                return False
            record[name] = units
        return True


def validate(source: Source, value: bytes | None) -> Verdict:
    """Validate one message value against ``source`` (convenience; build a :class:`Validator` in hot loops)."""
    return Validator(source)(value)
