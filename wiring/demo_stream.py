"""The demo event generator (``lambdalake produce``): the deterministic clickstream for :func:`wiring.produce.send`.

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
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone

import orjson

from lambdalake.exceptions import ConfigError
from lambdalake.fields import Source
from lambdalake.pipeline import Pipeline
from wiring.produce import Message

LATE_MAX = timedelta(hours=3)
DUP_DISTANCE = 64
DEFAULT_START = "2026-01-05T00:00:00Z"
CURRENCIES = ["EUR", "USD", "GBP", "JPY"]
REFERRERS = ["https://www.google.com/", "https://news.ycombinator.com/", "https://t.co/x", "", None]


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
