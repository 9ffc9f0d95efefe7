"""The audit's report: the checks, what each compared, and the differences found (rows compared as multisets)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

LOG_MASTER, MASTER_BATCH, LOG_SPEED, MERGED = "log-master", "master-batch", "log-speed", "merged"
CHECKS = (LOG_MASTER, MASTER_BATCH, LOG_SPEED, MERGED)
MAX_DIFFERENCES = 20  # differences listed in a report (all are counted)
ROW_EXAMPLES = 5  # differing rows named per view and check


@dataclass(frozen=True)
class Difference:
    """One thing that does not hold: which check, about what (a view, a partition, an offset), and how."""

    check: str
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.check}: {self.subject}: {self.detail}"


@dataclass
class CheckResult:
    """What one check compared (positions, rows, bytes), how long it took, and notes (what it skipped, and why)."""

    name: str
    compared: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    differences: int = 0

    def add(self, key: str, n: int) -> None:
        self.compared[key] = self.compared.get(key, 0) + n


@dataclass
class AuditReport:
    """The outcome of :func:`audit`: the pair audited, each check's result, and the first differences."""

    home: str
    pipeline: str
    batch_version: str | None = None
    speed_snapshot: str | None = None
    watermark: dict = field(default_factory=dict)
    positions: dict = field(default_factory=dict)
    sample: float = 1.0
    views: list[str] = field(default_factory=list)
    checks: dict[str, CheckResult] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)
    total_differences: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.total_differences == 0

    def differ(self, check: str, subject: str, detail: str) -> None:
        self.total_differences += 1
        if check in self.checks:
            self.checks[check].differences += 1
        if len(self.differences) < MAX_DIFFERENCES:
            self.differences.append(Difference(check, subject, detail))

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "home": self.home, "pipeline": self.pipeline, "batch_version": self.batch_version,
                "speed_snapshot": self.speed_snapshot, "watermark": self.watermark, "speed_positions": self.positions,
                "sample": self.sample, "views": self.views, "seconds": round(self.seconds, 3),
                "checks": {n: dataclasses.asdict(c) | {"seconds": round(c.seconds, 3)} for n, c in self.checks.items()},
                "differences": [dataclasses.asdict(d) for d in self.differences],
                "total_differences": self.total_differences,
                "differences_not_listed": self.total_differences - len(self.differences)}



def fmt_value(v: Any) -> str:
    if isinstance(v, datetime):
        return v.isoformat().replace("+00:00", "Z")
    return repr(v)


def _row_text(names: list[str], row: tuple) -> str:
    return "(" + ", ".join(f"{n}={fmt_value(v)}" for n, v in zip(names, row, strict=True)) + ")"


def scalar(con: Any, sql: str) -> Any:
    """The one value of ``sql``, the result consumed (DuckDB refuses ``register`` while a result is unfinished)."""
    return con.execute(sql).fetchall()[0][0]


def _float_close(a: Any, b: Any) -> bool:
    return isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def compare_rows(report: AuditReport, check: str, subject: str, con: Any, actual: str, expected: str,
                 group: list[str], actual_name: str, expected_name: str) -> tuple[int, int]:
    """Compare two relations with the same columns as multisets (``EXCEPT ALL`` both ways); report differences.

    Rows of the same group (``group`` columns) on both sides are reported as one changed row naming the columns
    that differ. Returns (rows of actual, rows of expected).
    """
    n_actual = scalar(con, f"SELECT count(*) FROM ({actual})")
    n_expected = scalar(con, f"SELECT count(*) FROM ({expected})")
    cur = con.execute(f"SELECT * FROM ({actual}) EXCEPT ALL SELECT * FROM ({expected})")
    names = [d[0] for d in cur.description]
    extra = cur.fetchall()
    missing = con.execute(f"SELECT * FROM ({expected}) EXCEPT ALL SELECT * FROM ({actual})").fetchall()
    if not extra and not missing:
        return n_actual, n_expected
    gi = [names.index(g) for g in group]
    want = {tuple(r[i] for i in gi): r for r in missing}
    shown = 0

    def differ(text: str) -> None:  # the first ROW_EXAMPLES are listed, all are counted
        nonlocal shown
        if shown < ROW_EXAMPLES:
            report.differ(check, subject, text)
        else:
            report.total_differences += 1
            report.checks[check].differences += 1
        shown += 1

    for row in extra:
        key = tuple(row[i] for i in gi)
        other = want.pop(key, None)
        if other is not None:
            cols = [f"{n}={fmt_value(a)} ({expected_name}: {fmt_value(b)})"
                    for n, a, b in zip(names, row, other, strict=True)
                    if a != b and not _float_close(a, b)]
            # float sums differ only in summation order (docs/pipelines.md, "Field types and filters"): no difference
            if not cols:
                continue
            differ(f"{actual_name} row {_row_text(group, key)} has " + ", ".join(cols))
        else:
            differ(f"{actual_name} has a row {expected_name} does not: {_row_text(names, row)}")
    for row in want.values():
        differ(f"{actual_name} lacks a row of {expected_name}: {_row_text(names, row)}")
    if shown:
        report.checks[check].notes.append(f"{subject}: {len(extra)} rows of {actual_name} and {len(missing)} of "
                                          f"{expected_name} differ ({n_actual} vs {n_expected} rows)")
    return n_actual, n_expected


@contextmanager
def timed(report: AuditReport, name: str) -> Iterator[CheckResult]:
    result = report.checks.setdefault(name, CheckResult(name))
    t0 = time.monotonic()
    try:
        yield result
    finally:
        result.seconds += time.monotonic() - t0
