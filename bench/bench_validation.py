"""Validation alone: messages/s per core of decode + validate for the demo schema (issue 12, item 1).

Figures, all in one process on one core, best of ``--repeat`` rounds, interleaved so that load on the box hits every
contender alike:

- ``orjson.loads`` — the JSON parse alone: the ceiling of any validator that builds Python objects per message;
- ``reference`` — :class:`lambdalake.validation.ReferenceValidator` (the rules one check at a time, the previous
  release's validator);
- ``compiled`` — :class:`lambdalake.validation.Validator` (msgspec Struct compiled from the declaration).

Messages come from the demo generator (valid ones, and a mix with ``--malformed-fraction`` invalid ones).
Results: ``bench/results/validation-<utc time>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

from lambdalake.pipeline import load_pipeline
from lambdalake.produce import demo_messages
from lambdalake.validation import ReferenceValidator, Validator

REPO = Path(__file__).resolve().parent.parent


def parse_only(value: bytes | None) -> object:
    """The ceiling: orjson's parse, with the same never-raise contract as a validator."""
    try:
        return orjson.loads(value)
    except (orjson.JSONDecodeError, TypeError):
        return None


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
    out: dict = {"args": vars(args), "python": platform.python_version(), "sources": {}}
    for mix, frac in (("valid", 0.0), ("mixed", args.malformed_fraction)):
        msgs = list(demo_messages(pipeline, args.messages * 2, malformed_fraction=frac, seed=7))
        for src in pipeline.sources:
            values = [m.value for m in msgs if m.topic == src.topic][: args.messages]
            rates = measure(values, {"orjson.loads": parse_only, "reference": ReferenceValidator(src),
                                     "compiled": Validator(src)}, args.repeat)
            out["sources"].setdefault(src.name, {})[mix] = {"messages": len(values), "per_second": rates}
            print(f"{src.name:10s} {mix:6s} " + "  ".join(f"{k} {v:,}/s" for k, v in rates.items()), flush=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = REPO / "bench" / "results" / f"validation-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
