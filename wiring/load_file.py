"""The file loader (``lambdalake load``): a CSV / TSV / Parquet / JSON-lines file's rows as messages of one source.

CSV, TSV and Parquet rows are converted to the source's declared types and checked whole before anything is sent
(:func:`check_file`, also ``lambdalake load --check``); JSON lines are sent byte-for-byte. The messages go to
:func:`wiring.produce.send`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import msgspec
import orjson

from lambdalake.exceptions import ConfigError
from lambdalake.fields import Field, Source, decimal_units
from lambdalake.pipeline import Pipeline
from wiring.produce import Message


def file_messages(pipeline: Pipeline, path: Path, source_name: str) -> Iterator[Message]:
    """Rows of a CSV / TSV / Parquet / JSON-lines file as messages of ``source_name`` (keyed by its key field).

    JSON lines are sent byte-for-byte (so a replay is faithful, invalid lines included: consumers dead-letter
    them). CSV, TSV and Parquet rows are *typed loading* (:func:`check_file`): every declared column is converted
    to its declared type (not the reader's guess), the whole file is checked first, and if any row cannot be
    converted or is not a valid event of the source, nothing is sent (:class:`ConfigError` naming the rows).
    """
    src = pipeline.source(source_name)
    suffix = _suffix(path)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _jsonl_stream(src, path)
    check = check_file(pipeline, path, source_name)
    if check.problems:
        raise ConfigError(check.refusal(path))
    return (Message(src.topic, key, value, "row") for _, key, value, _ in _typed_rows(src, path, suffix))


def _suffix(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"file {str(path)!r} not found")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".tsv"):
        raise ConfigError(f"cannot load {path.name!r}: use .csv, .tsv, .parquet or .jsonl")
    return suffix


def _jsonl_stream(src: Source, path: Path) -> Iterator[Message]:
    with open(path, "rb") as fh:
        for line in fh:
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            key = None
            try:
                doc = orjson.loads(line)
                if isinstance(doc, dict) and isinstance(doc.get(src.key), str):
                    key = doc[src.key].encode()
            except orjson.JSONDecodeError:
                pass
            yield Message(src.topic, key, line, "row")


@dataclass
class FileCheck:
    """What :func:`check_file` found: rows read and the problems (``(where, reason)``, where = ``line N`` of a
    CSV/TSV file or ``row N`` of a Parquet file / ``line N`` of JSON lines), the first :data:`MAX_PROBLEMS` kept."""

    rows: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    bad_rows: int = 0

    def refusal(self, path: Path) -> str:
        first = "; ".join(f"{w}: {r}" for w, r in self.problems[:3])
        more = "; ..." if self.bad_rows > 3 else ""
        return (f"{path.name}: {self.bad_rows} of {self.rows} rows cannot be sent ({first}{more}); nothing was "
                "sent. Fix them (run `lambdalake load --check` to list them) and load again")


MAX_PROBLEMS = 1000


def check_file(pipeline: Pipeline, path: Path, source_name: str) -> FileCheck:
    """Dry run of ``lambdalake load`` (``--check``): convert every row as a load would and validate it with the
    source's rules (:class:`lambdalake.validation.Validator`, what the consumers apply). Sends nothing."""
    from lambdalake.validation import Validator

    src = pipeline.source(source_name)
    suffix = _suffix(path)
    validate = Validator(src)
    out = FileCheck()

    def problem(where: str, reason: str) -> None:
        out.bad_rows += 1
        if len(out.problems) < MAX_PROBLEMS:
            out.problems.append((where, reason))

    if suffix in (".jsonl", ".ndjson", ".json"):
        with open(path, "rb") as fh:
            for n, line in enumerate(fh, start=1):
                line = line.rstrip(b"\r\n")
                if not line.strip():
                    continue
                out.rows += 1
                verdict = validate(line)
                if not verdict.ok:
                    problem(f"line {n}", verdict.reason)
        return out
    for where, _, value, error in _typed_rows(src, path, suffix):
        out.rows += 1
        if error is not None:
            problem(where, error)
            continue
        verdict = validate(value)
        if not verdict.ok:
            problem(where, verdict.reason)
    return out


class _Unconvertible(ValueError):
    pass


_INT = re.compile(r"[+-]?\d+")
_NUM = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _from_text(f: Field, text: str) -> object:
    """A CSV cell (or a string value of a Parquet column) as the declared type's JSON value."""
    t = f.type
    if t == "string":
        return text
    if t == "integer":
        if not _INT.fullmatch(text) or not -2**63 <= int(text) < 2**63:
            raise _Unconvertible(f"column {f.name!r}: {text[:40]!r} is not an integer")
        return int(text)
    if t in ("decimal", "number"):
        if not _NUM.fullmatch(text):
            raise _Unconvertible(f"column {f.name!r}: {text[:40]!r} is not a number")
        return _from_value(f, Decimal(text))
    if t == "boolean":
        low = text.lower()
        if low not in ("true", "false"):
            raise _Unconvertible(f"column {f.name!r}: {text[:40]!r} is not true or false")
        return low == "true"
    from lambdalake.instants import parse_rfc3339_us

    if parse_rfc3339_us(text) is None:
        raise _Unconvertible(f"column {f.name!r}: {text[:40]!r} is not an RFC 3339 timestamp with an offset")
    return text


def _from_value(f: Field, v: object) -> object:
    """A typed (Parquet) value as the declared type's JSON value."""
    if isinstance(v, str):
        return _from_text(f, v)
    t = f.type
    if t == "string":
        if isinstance(v, datetime):
            return _rfc3339(v)
        return str(v).lower() if isinstance(v, bool) else str(v)
    if t == "timestamp" and isinstance(v, datetime):
        return _rfc3339(v)
    if t == "boolean" and isinstance(v, bool):
        return v
    if not isinstance(v, bool) and isinstance(v, (int, float, Decimal)):
        if t == "integer" and (isinstance(v, int) or (isinstance(v, (float, Decimal)) and v == int(v))):
            return int(v)
        if t == "number":
            return float(v)
        if t == "decimal":
            assert f.scale is not None
            units = decimal_units(repr(v) if isinstance(v, float) else v, f.scale)
            if units is None:
                raise _Unconvertible(f"column {f.name!r}: {v} is not a decimal with at most {f.scale} fractional "
                                     "digits and 18 digits in all")
            return Decimal(units).scaleb(-f.scale)
    raise _Unconvertible(f"column {f.name!r}: {str(v)[:40]!r} ({type(v).__name__}) cannot be read as {t}")


def _rfc3339(v: datetime) -> str:
    if v.tzinfo is not None:
        v = v.astimezone(UTC)
    return v.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _typed_rows(src: Source, path: Path, suffix: str) -> Iterator[tuple[str, bytes | None, bytes, str | None]]:
    """``(where, key, value, error)`` per row of a CSV/TSV/Parquet file: the row converted to the declared types
    (error None) or why it cannot be. Empty CSV cells and nulls are omitted (absent), except that an empty cell of a
    required, non-nullable string column is the empty string. Undeclared columns are sent as read."""
    encode = msgspec.json.Encoder(decimal_format="number").encode
    fields = src.field_map
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=10_000):
            for row in batch.to_pylist():
                n += 1
                yield _typed_row(f"row {n}", row, fields, src.key, encode, text=False)
        return
    import csv

    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ",", strict=True)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ConfigError(f"{path.name}: line 1 is not {suffix[1:].upper()}: {exc}") from exc
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield f"line {reader.line_num}", None, b"", f"not {suffix[1:].upper()}: {exc}"
                continue
            where = f"line {reader.line_num}"
            if len(cells) != len(header):
                yield where, None, b"", f"{len(cells)} cells, the header has {len(header)}"
                continue
            yield _typed_row(where, dict(zip(header, cells, strict=True)), fields, src.key, encode, text=True)


def _typed_row(where: str, row: dict, fields: dict[str, Field], key_field: str, encode: Callable[[object], bytes],
               *, text: bool) -> tuple[str, bytes | None, bytes, str | None]:
    doc: dict[str, object] = {}
    try:
        for name, v in row.items():
            f = fields.get(name)
            if v is None or (text and v == "" and not (f is not None and f.type == "string" and f.required
                                                        and not f.nullable)):
                continue
            if f is None:
                doc[name] = _rfc3339(v) if isinstance(v, datetime) else v
            else:
                doc[name] = _from_text(f, v) if text else _from_value(f, v)
        value = encode(doc)
    except (_Unconvertible, ArithmeticError) as exc:
        return where, None, b"", str(exc)
    except (TypeError, msgspec.EncodeError) as exc:
        return where, None, b"", f"cannot be written as JSON: {exc}"
    key = doc.get(key_field)
    return where, (str(key).encode() if key is not None else None), value, None
