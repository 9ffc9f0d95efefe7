"""Demo event generator (``lambdalake produce``) and file loader (``lambdalake load``).

The generator sends exactly ``events`` distinct valid events of the clickstream demo, plus
``round(events * duplicate_fraction)`` duplicates and ``round(events * malformed_fraction)`` malformed messages
on top. Everything is deterministic per seed: event ids, payloads, keys (hence partitions) and the interleaving.

Shape: Zipf-popular urls and products, ``max(50, events // 20)`` users, event time advancing from ``start`` over
``span`` (default 72 h, so a run covers many hours and several days), a ``late_fraction`` of events stamped up to
3 hours behind the stream, duplicates re-sent within the last 64 valid messages (same key, same bytes), and
malformed messages of many kinds (bad JSON, missing fields, wrong types, out of range, huge, binary, ...).
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import msgspec
import orjson

from lambdalake.clients import producer_config
from lambdalake.config import Settings
from lambdalake.exceptions import ConfigError
from lambdalake.fields import Field, Source, decimal_units
from lambdalake.pipeline import Pipeline

LATE_MAX = timedelta(hours=3)
DUP_DISTANCE = 64
DEFAULT_START = "2026-01-05T00:00:00Z"
CURRENCIES = ["EUR", "USD", "GBP", "JPY"]
REFERRERS = ["https://www.google.com/", "https://news.ycombinator.com/", "https://t.co/x", "", None]


@dataclass(slots=True)
class Message:
    topic: str
    key: bytes | None
    value: bytes | None
    kind: str  # "valid" | "duplicate" | "malformed:<what>"


@dataclass
class ProduceReport:
    sent: Counter = field(default_factory=Counter)  # valid | duplicate | malformed | row -> messages
    malformed: Counter = field(default_factory=Counter)  # what was wrong -> messages
    per_topic: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.sent.values())


class _Zipf:
    """Deterministic Zipf(s) sampler over ``n`` items."""

    def __init__(self, n: int, s: float, rng: random.Random):
        weights = [1.0 / (i + 1) ** s for i in range(n)]
        self.cum = list(itertools.accumulate(weights))
        self.rng = rng

    def __call__(self) -> int:
        return bisect.bisect_left(self.cum, self.rng.random() * self.cum[-1])


_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)


def _fmt_time(us: int, rng: random.Random) -> str:
    """RFC 3339 with a varying (but valid) offset, so consumers must normalise to UTC."""
    dt = _EPOCH_UTC + timedelta(microseconds=us)
    choice = rng.random()
    if choice < 0.7:
        if dt.year >= 1000:  # the same text as the strftime below, at a third of its cost
            return dt.isoformat(timespec="microseconds")[:-6] + "Z"
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    off = timedelta(hours=rng.choice([-5, 1, 2, 9]), minutes=rng.choice([0, 30]))
    return dt.astimezone(timezone(off)).isoformat(timespec="milliseconds" if choice < 0.85 else "seconds")


def _parse_start(start: str) -> int:
    from lambdalake.instants import parse_rfc3339_us

    us = parse_rfc3339_us(start)
    if us is None:
        raise ConfigError(f"--start {start!r} is not an RFC 3339 timestamp with timezone, e.g. {DEFAULT_START}")
    return us


def demo_messages(pipeline: Pipeline, events: int, *, late_fraction: float = 0.05,
                  duplicate_fraction: float = 0.02, malformed_fraction: float = 0.01, seed: int = 42,
                  start: str = DEFAULT_START, span: timedelta = timedelta(hours=72)) -> Iterator[Message]:
    """The deterministic demo stream (clickstream pipeline). Arguments are checked now, not on first use."""
    for name, frac in (("--late-fraction", late_fraction), ("--duplicate-fraction", duplicate_fraction),
                       ("--malformed-fraction", malformed_fraction)):
        if not 0.0 <= frac <= 1.0:
            raise ConfigError(f"{name} {frac} must be between 0 and 1")
    if events < 0:
        raise ConfigError(f"--events {events} must be >= 0")
    try:
        pv, pu = pipeline.source("pageviews"), pipeline.source("purchases")
    except Exception:
        raise ConfigError(f"the demo generator needs the clickstream pipeline; {pipeline.name!r} has sources "
                          f"{sorted(pipeline.source_map)}; use `lambdalake load` for other pipelines") from None
    return _demo_stream(pv, pu, events, late_fraction, duplicate_fraction, malformed_fraction, seed,
                        _parse_start(start), span)


def _demo_stream(pv: Source, pu: Source, events: int, late_fraction: float, duplicate_fraction: float,
                 malformed_fraction: float, seed: int, start_us: int, span: timedelta) -> Iterator[Message]:
    rng = random.Random(seed)
    step_us = max(1, (span // timedelta(microseconds=1)) // max(1, events))
    n_users = max(50, events // 20)
    urls = [f"https://shop.example/{p}" for p in ("", "cart", "checkout", "search", "about")] + [
        f"https://shop.example/product/{i}" for i in range(400)]
    products = [f"sku-{i:05d}" for i in range(300)]
    url_z, prod_z, user_z = _Zipf(len(urls), 1.1, rng), _Zipf(len(products), 1.2, rng), _Zipf(n_users, 0.8, rng)

    n_dup = round(events * duplicate_fraction)
    n_bad = round(events * malformed_fraction)
    remaining = {"valid": events, "duplicate": n_dup, "malformed": n_bad}
    recent: list[Message] = []
    valid_i = 0
    malformed_kinds = _malformed_makers(pv, pu)

    bisect_right = bisect.bisect_right
    while any(remaining.values()):
        # rng.choices(kinds, weights=remaining counts)[0], written out (same single rng.random() draw, same pick)
        kinds: list[str] = []
        cum: list[int] = []
        total = 0
        for k, v in remaining.items():
            if v > 0 and (k != "duplicate" or recent):
                total += v
                kinds.append(k)
                cum.append(total)
        if not kinds:  # only duplicates left but nothing sent yet to duplicate
            break
        kind = kinds[bisect_right(cum, rng.random() * (total + 0.0), 0, len(kinds) - 1)]
        remaining[kind] -= 1
        if kind == "valid":
            now_us = start_us + valid_i * step_us
            et = now_us - (rng.randrange(LATE_MAX // timedelta(microseconds=1)) if rng.random() < late_fraction
                           else 0)
            user = f"user-{user_z():06d}"
            if rng.random() < 0.85:
                doc = {"event_id": f"pv-{seed}-{valid_i}", "event_time": _fmt_time(et, rng), "user_id": user,
                       "url": urls[url_z()], "duration_ms": int(rng.expovariate(1 / 30000)) % 86_400_001}
                ref = rng.choice(REFERRERS)
                if ref is not None or rng.random() < 0.5:  # absent and null both mean null
                    doc["referrer"] = ref
                src = pv
            else:
                doc = {"event_id": f"pu-{seed}-{valid_i}", "event_time": _fmt_time(et, rng), "user_id": user,
                       "product_id": products[prod_z()], "amount_cents": 99 + int(rng.paretovariate(1.5) * 900),
                       "currency": rng.choice(CURRENCIES)}
                src = pu
            valid_i += 1
            msg = Message(src.topic, user.encode(), orjson.dumps(doc), "valid")
            recent.append(msg)
            if len(recent) > DUP_DISTANCE:
                recent.pop(0)
            yield msg
        elif kind == "duplicate":
            orig = rng.choice(recent)
            yield Message(orig.topic, orig.key, orig.value, "duplicate")
        else:
            what, make = rng.choice(malformed_kinds)
            topic, value = make(rng)
            yield Message(topic, f"user-{user_z():06d}".encode(), value, f"malformed:{what}")


def _malformed_makers(pv: Source, pu: Source) -> list[tuple[str, Callable[[random.Random], tuple[str, bytes]]]]:
    def base(rng: random.Random) -> dict:
        return {"event_id": f"bad-{rng.getrandbits(48):x}", "event_time": "2026-01-05T12:00:00Z",
                "user_id": "user-bad", "url": "https://shop.example/", "duration_ms": 1000}

    def with_(change: Callable[[dict], None]) -> Callable[[random.Random], tuple[str, bytes]]:
        def make(rng: random.Random) -> tuple[str, bytes]:
            d = base(rng)
            change(d)
            return pv.topic, orjson.dumps(d)
        return make

    def purchase(change: Callable[[dict], None]) -> Callable[[random.Random], tuple[str, bytes]]:
        def make(rng: random.Random) -> tuple[str, bytes]:
            d = {"event_id": f"bad-{rng.getrandbits(48):x}", "event_time": "2026-01-05T12:00:00Z",
                 "user_id": "user-bad", "product_id": "sku-00001", "amount_cents": 500, "currency": "EUR"}
            change(d)
            return pu.topic, orjson.dumps(d)
        return make

    return [
        ("bad_json", lambda rng: (pv.topic, b'{"event_id": "x", "event_time": ')),
        ("not_object", lambda rng: (pv.topic, b'["event_id", 1]')),
        ("binary", lambda rng: (pu.topic, bytes(rng.getrandbits(8) for _ in range(64)))),
        ("empty", lambda rng: (pv.topic, b"")),
        ("huge", lambda rng: (pv.topic, orjson.dumps({**base(rng), "pad": "x" * (1024 * 1024 + 10)}))),
        ("missing_field", with_(lambda d: d.pop("url"))),
        ("number_in_quotes", with_(lambda d: d.update(duration_ms="1000"))),
        ("float_for_int", with_(lambda d: d.update(duration_ms=1000.0))),
        ("bool_for_int", with_(lambda d: d.update(duration_ms=True))),
        ("out_of_range", with_(lambda d: d.update(duration_ms=86_400_001))),
        ("negative", with_(lambda d: d.update(duration_ms=-1))),
        ("no_timezone", with_(lambda d: d.update(event_time="2026-01-05T12:00:00"))),
        ("bad_date", with_(lambda d: d.update(event_time="2026-02-30T12:00:00Z"))),
        ("empty_user", with_(lambda d: d.update(user_id=""))),
        ("long_event_id", with_(lambda d: d.update(event_id="e" * 129))),
        ("null_event_id", with_(lambda d: d.update(event_id=None))),
        ("bad_currency", purchase(lambda d: d.update(currency="eur"))),
        ("zero_amount", purchase(lambda d: d.update(amount_cents=0))),
        ("invalid_utf8", lambda rng: (pu.topic, b'{"event_id": "\xff\xfe"}')),
    ]


def send(settings: Settings, messages: Iterable[Message], *, rate: float | None = None,
         total: int | None = None, progress: bool = True) -> ProduceReport:
    """Send messages (acks=all, idempotent producer; per-key order kept) at up to ``rate`` messages/s; returns what
    was sent once every message is acknowledged, or raises :class:`BrokerError` if any was not."""
    from confluent_kafka import KafkaException, Producer
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lambdalake.clients import unreachable
    from lambdalake.exceptions import BrokerError

    if rate is not None and rate <= 0:
        raise ConfigError(f"--rate {rate} must be > 0 (messages per second)")
    failures: list[object] = []

    def on_error(err: object, msg: object) -> None:  # called for failed deliveries only
        failures.append(err)

    prod = Producer(producer_config(settings, **{"delivery.report.only.error": True, "on_delivery": on_error}))
    try:
        prod.list_topics(timeout=5)
    except KafkaException as exc:
        raise unreachable(settings, exc) from exc
    report = ProduceReport()
    sent, malformed, per_topic = report.sent, report.malformed, report.per_topic
    produce, poll = prod.produce, prod.poll
    t0 = time.monotonic()
    bar = Progress(TextColumn("producing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress, transient=True)
    left, flushed = 0, False
    try:
        with bar:
            task = bar.add_task("produce", total=total)
            i = 0
            for i, m in enumerate(messages, 1):
                while True:
                    try:
                        produce(m.topic, m.value, m.key)
                        break
                    except BufferError:  # the local queue is full: let the producer send some
                        poll(0.05)
                kind = m.kind
                if kind == "valid" or kind == "row":
                    sent[kind] += 1
                else:
                    kind, _, what = kind.partition(":")
                    sent[kind] += 1
                    if what:
                        malformed[what] += 1
                per_topic[m.topic] += 1
                if rate is not None:
                    ahead = i / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
                if i % 1024 == 0:
                    poll(0)
                    bar.update(task, completed=i)
            left, flushed = prod.flush(150), True
            bar.update(task, completed=report.total)
    except KafkaException as exc:
        raise BrokerError(f"Kafka refused a message: {exc}") from exc
    finally:
        if not flushed:
            prod.flush(30)  # interrupted or failed: what was handed over still goes out
    if failures or left:
        first = f"; first error: {failures[0]}" if failures else ""
        raise BrokerError(f"{len(failures) + left} messages were not acknowledged by Kafka{first}")
    report.seconds = time.monotonic() - t0
    return report


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
