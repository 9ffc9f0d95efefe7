"""Writing a benchmark's result: ``bench/results/<prefix><UTC time>.json``, and its figures printed one a line
(value, baseline, ratio) — for the benchmarks that list their own ``figures`` (``bench_s3.py``, ``bench_cdc.py``),
which ``bench/run.py`` tabulates."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(prefix: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{prefix}{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    for f in result.get("figures", []):
        ratio = f"{f['value'] / f['baseline_value']:.3g}x" if f["value"] and f["baseline_value"] else "—"
        print(f"- {f['figure']}: {f['value']} {f['unit']} vs {f['baseline'] or '—'} {f['baseline_value']} "
              f"= {ratio} {f['note']}")
    print(f"results: {path}")
    return path
