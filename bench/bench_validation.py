"""Validation alone: messages/s per core of decode + validate, per schema (issue 12, item 1).

Figures, all in one process on one core (CPU time), best of ``--repeat`` rounds, interleaved so that load on the box
hits every contender alike:

- ``orjson.loads`` — the JSON parse alone: the ceiling of any validator that builds Python objects per message;
- ``msgspec decode`` — msgspec decoding into the compiled ``Struct`` alone (no record, no timestamp conversion):
  the C floor of the compiled validator;
- ``reference`` — :class:`lambdalake.validation.ReferenceValidator` (the rules one check at a time);
- ``previous`` — the compiled validator of the previous release (timestamps decoded as strings, then
  checked, parsed and converted in Python; decimals through ``Decimal``), kept here as the baseline;
- ``compiled`` — :class:`lambdalake.validation.Validator` (timestamps parsed by msgspec, shape-checked by one regex
  match; plain decimals in integer arithmetic).

Schemas: the demo's ``pageviews`` and ``purchases`` (valid messages from the demo generator, and a mix with
``--malformed-fraction`` invalid ones) and the ``orders`` pipeline's ``order_lines`` (decimals, a boolean, a float).
Results: ``bench/results/validation-<utc time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import msgspec
import orjson

from lambdalake.fields import Source, decimal_units
from lambdalake.instants import FIRST_INSTANT_US, LAST_INSTANT_US, epoch_us
from lambdalake.pipeline import load_pipeline
from lambdalake.validation import (
    _TZ_DATETIME,
    MAX_MESSAGE_BYTES,
    ReferenceValidator,
    Valid,
    Validator,
    compile_struct,
)
from wiring.demo_stream import demo_messages

REPO = Path(__file__).resolve().parent.parent


def parse_only(value: bytes | None) -> object:
    """The ceiling: orjson's parse, with the same never-raise contract as a validator."""
    try:
        return orjson.loads(value)
    except (orjson.JSONDecodeError, TypeError):
        return None


def decode_only(source: Source):
    decode = msgspec.json.Decoder(compile_struct(source, datetimes=True)).decode

    def run(value: bytes | None) -> object:
        try:
            return decode(value)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - invalid messages: msgspec raises DecodeError, UnicodeDecodeError, ...
            return None

    return run


class PreviousValidator:
    """The compiled fast path as released before issue 12 item 1 (for the old-vs-new figure only)."""

    def __init__(self, source: Source):
        import re

        self.reference = ReferenceValidator(source)
        self._decode = msgspec.json.Decoder(compile_struct(source)).decode
        self._patterns = [(f.name, re.compile(f.pattern).fullmatch) for f in source.fields if f.pattern]
        self._timestamps = [f.name for f in source.fields if f.type == "timestamp"]
        self._decimals = [(f.name, f.scale, f.nullable or not f.required) for f in source.fields
                          if f.type == "decimal"]

    @staticmethod
    def _reads_like_the_rules(ts: str) -> bool:
        if ts[10:11] not in ("T", "t"):
            return False
        dot = ts.find(".", 19)
        if dot < 0:
            return True
        end = len(ts) - (1 if ts[-1:] in ("Z", "z") else 6)
        return end - dot - 1 <= 6

    def __call__(self, value: bytes | None):
        try:
            if value is None or len(value) > MAX_MESSAGE_BYTES:
                return self.reference(value)
            record = msgspec.structs.asdict(self._decode(value))
            for name in self._timestamps:
                ts = record[name]
                if ts is not None:
                    if not self._reads_like_the_rules(ts):
                        return self.reference(value)
                    us = epoch_us(msgspec.convert(ts, _TZ_DATETIME))
                    if not FIRST_INSTANT_US <= us <= LAST_INSTANT_US:
                        return self.reference(value)
                    record[name] = us
            for name, scale, null_ok in self._decimals:
                r = record[name]
                if r is None:
                    continue
                text = bytes(r)
                if text == b"null":
                    if not null_ok:
                        return self.reference(value)
                    record[name] = None
                    continue
                if text[:1] not in (b"-", b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9"):
                    return self.reference(value)
                units = decimal_units(text.decode(), scale)
                if units is None:
                    return self.reference(value)
                record[name] = units
        except Exception:  # noqa: BLE001
            return self.reference(value)
        for name, fullmatch in self._patterns:
            v = record[name]
            if v is not None and fullmatch(v) is None:
                return self.reference(value)
        return Valid(record)


def order_lines(n: int, malformed_fraction: float, seed: int = 7) -> list[bytes]:
    """Order lines of the ``orders`` pipeline: prices and taxes as written by a shop, discounts and weights often
    absent, offsets mixed; a ``malformed_fraction`` with one field broken."""
    rng = random.Random(seed)
    t0 = datetime(2026, 1, 5, tzinfo=UTC)
    out = []
    for i in range(n):
        at = t0 + timedelta(seconds=i * 7, microseconds=rng.randrange(1_000_000))
        if rng.random() < 0.3:
            at = at.astimezone(timezone(timedelta(hours=rng.choice([-5, 1, 2]))))
        doc: dict = {"line_id": f"l-{seed}-{i}", "ordered_at": at.isoformat().replace("+00:00", "Z"),
                     "order_id": f"o-{i // 3}", "sku": f"A-{rng.randrange(500)}",
                     "currency": rng.choice(["EUR", "USD"]),
                     "quantity": rng.randrange(1, 20), "price": f"{rng.randrange(100, 100_000) / 100:.2f}",
                     "tax": f"{rng.randrange(0, 100_000) / 10_000:.4f}", "returned": rng.random() < 0.05}
        if rng.random() < 0.3:
            doc["discount"] = f"{rng.randrange(0, 1000) / 100:.2f}"
        if rng.random() < 0.5:
            doc["weight_kg"] = round(rng.uniform(0.05, 30), 3)
        raw = orjson.dumps(doc)
        for name in ("price", "tax", "discount"):  # decimals as JSON numbers, not strings
            if name in doc:
                raw = raw.replace(f'"{name}":"{doc[name]}"'.encode(), f'"{name}":{doc[name]}'.encode())
        if rng.random() < malformed_fraction:
            raw = raw.replace(b'"currency":"', b'"currency":"x')
        out.append(raw)
    return out


def measure(messages: list[bytes], contenders: dict, repeat: int) -> dict[str, float]:
    best = dict.fromkeys(contenders, 0.0)
    for _ in range(repeat):
        for name, fn in contenders.items():
            t0 = time.process_time()
            for m in messages:
                fn(m)
            best[name] = max(best[name], len(messages) / max(time.process_time() - t0, 1e-9))
    return {k: round(v) for k, v in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000, help="messages per source and round")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--malformed-fraction", type=float, default=0.02)
    args = ap.parse_args()
    pipeline = load_pipeline("lambdalake.pipelines.clickstream")
    orders = load_pipeline("lambdalake.pipelines.orders").source("order_lines")
    out: dict = {"args": vars(args), "python": platform.python_version(), "load_average": os.getloadavg(),
                 "sources": {}}
    print(f"load average at start: {os.getloadavg()[0]:.2f} (figures under load are not comparable)", flush=True)
    for mix, frac in (("valid", 0.0), ("mixed", args.malformed_fraction)):
        msgs = list(demo_messages(pipeline, args.messages * 2, malformed_fraction=frac, seed=7))
        cases = [(src, [m.value for m in msgs if m.topic == src.topic][: args.messages]) for src in pipeline.sources]
        cases.append((orders, order_lines(args.messages, frac)))
        for src, values in cases:
            rates = measure(values, {"orjson.loads": parse_only, "msgspec decode": decode_only(src),
                                     "reference": ReferenceValidator(src), "previous": PreviousValidator(src),
                                     "compiled": Validator(src)}, args.repeat)
            gain = rates["compiled"] / max(rates["previous"], 1)
            out["sources"].setdefault(src.name, {})[mix] = {"messages": len(values), "per_second": rates,
                                                            "compiled_vs_previous": round(gain, 2)}
            print(f"{src.name:11s} {mix:6s} " + "  ".join(f"{k} {v:,}/s" for k, v in rates.items())
                  + f"  (compiled/previous {gain:.2f}x)", flush=True)
    out["load_average_end"] = os.getloadavg()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = REPO / "bench" / "results" / f"validation-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
