"""The mergeable aggregates a view may declare: a closed set, each with the way two partial results combine.

::

    count()            number of events                      merge: add
    sum_(column)       sum of an integer/decimal/number      merge: add (decimals as scaled integers: exact)
    min_(column)       minimum                               merge: min
    max_(column)       maximum                               merge: max
    mean(column)       derived: sum / count, never stored    recomputed after merging
    approx_distinct(column, lg_k=12)
                       HLL sketch of the distinct values     merge: union; served as the estimate
                       (lambdalake.sketches: the same DataSketches format and estimate on every engine)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

AggKind = Literal["count", "sum", "min", "max", "approx_distinct"]
MergeKind = Literal["sum", "min", "max", "union"]


@dataclass(frozen=True)
class Aggregate:
    """A mergeable aggregate. ``column`` is None for count."""

    name: str
    kind: AggKind
    column: str | None = None
    # approx_distinct only: log2 of the sketch's registers. Not in repr: the 0.1 fingerprint hashed the repr.
    lg_k: int | None = field(default=None, repr=False)

    @property
    def merge(self) -> MergeKind:
        """How two partial results combine: counts and sums add, min/max fold, sketches union."""
        if self.kind == "approx_distinct":
            return "union"
        return "sum" if self.kind in ("count", "sum") else self.kind


@dataclass(frozen=True)
class Mean:
    """Derived aggregate ``sum(column) / count``; never stored, recomputed after every merge."""

    name: str
    column: str
    sum_name: str = ""  # resolved by View
    count_name: str = ""


def count(name: str) -> Aggregate:
    return Aggregate(name, "count")


def sum_(name: str, column: str) -> Aggregate:
    return Aggregate(name, "sum", column)


def min_(name: str, column: str) -> Aggregate:
    return Aggregate(name, "min", column)


def max_(name: str, column: str) -> Aggregate:
    return Aggregate(name, "max", column)


def mean(name: str, column: str) -> Mean:
    return Mean(name, column)


def approx_distinct(name: str, column: str, lg_k: int = 12) -> Aggregate:
    """Approximate number of distinct non-null values of a string, integer or decimal ``column`` per row: an HLL
    sketch with 2^lg_k registers (relative standard error ~1.04/sqrt(2^lg_k): 1.6% at 12), merged by union across
    batch and speed and across rows (:mod:`lambdalake.sketches`)."""
    return Aggregate(name, "approx_distinct", column, lg_k)
