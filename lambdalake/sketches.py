"""Distinct-count sketches (``approx_distinct``): one format and one estimate on every engine.

A view's ``approx_distinct(name, column, lg_k=12)`` stores, per row, an Apache DataSketches **HLL sketch** of the
column's non-null values (``lg_k``: log2 of the number of registers; relative standard error ~1.04/sqrt(2^lg_k),
1.6% at 12). Every engine writes the same binary format and hashes values the same way (MurmurHash3, seed 9001:
a string as its UTF-8 bytes, an integer or a decimal's scaled integer as a 64-bit integer):

- the batch job (Spark 4 ``hll_sketch_agg``, DataSketches Java), stored as Spark serializes it;
- the speed layer (the ``datasketches`` Python package, DataSketches C++), stored compact (:func:`to_bytes`);
- serving, audit and verify (DuckDB, through the functions :func:`register` adds to a connection).

Sketches of disjoint or overlapping parts merge by *union* (register-wise max), which is what the batch/speed merge
does per row and what a roll-up across rows does: ``hll_count(list(sketch))``. The union of the parts has the same
registers as a sketch of all the events, whatever the split. The **estimate** is defined from the registers alone —
the union's composite estimate (:func:`estimate`) — never the HIP estimate a sketch updated in order would give
(that one depends on the order and split of updates, so two engines would disagree). So the served value of an
``approx_distinct`` column is the same number whichever engine built which part, and a test can compare it exactly.

DuckDB has no DataSketches functions; :func:`register` adds vectorized Python functions (``serving.connect()``,
``lambdalake sql``, audit, verify). The stock DuckDB CLI opening the catalog file has none of them: there an
``approx_distinct`` column is NULL, and ``sketches.<view>`` holds no merged sketch (see
docs/pipelines.md, "Approximate distinct counts").
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Any

import pyarrow as pa

DEFAULT_LG_K = 12
MIN_LG_K, MAX_LG_K = 4, 21  # what both DataSketches HLL and Spark's hll_sketch_agg accept


@cache
def _ds() -> Any:
    """The datasketches module, imported on first use (it imports numpy: ~0.15 s that `lambdalake sql` without a
    sketch need not pay)."""
    import datasketches

    return datasketches


def _target() -> Any:
    return _ds().tgt_hll_type.HLL_8  # Spark's layout; a union's result is written in it too

# DuckDB functions added by register(): name -> what it computes
FUNCTIONS = {
    "hll_count": "the distinct-count estimate of the union of a list of sketches (BIGINT; NULL for a NULL list)",
    "hll_union": "the union of a list of sketches, as one sketch (BLOB)",
    "hll_sketch_varchar": "a sketch of a list of strings (nulls skipped) at lg_k (BLOB)",
    "hll_sketch_bigint": "a sketch of a list of 64-bit integers (nulls skipped) at lg_k (BLOB)",
}


def new(lg_k: int) -> Any:
    """An empty HLL sketch (``datasketches.hll_sketch``)."""
    return _ds().hll_sketch(lg_k, _target())


def of_values(values: Iterable[object], lg_k: int) -> Any:
    """A sketch of ``values`` (strings or ints; None skipped)."""
    s = new(lg_k)
    for v in values:
        if v is not None:
            s.update(v)
    return s


def to_bytes(sketch: Any) -> bytes:
    return sketch.serialize_compact()


def from_bytes(data: bytes) -> Any:
    return _ds().hll_sketch.deserialize(data)


def _union(parts: Iterable[Any]) -> Any:
    """The union of ``parts`` at their smallest ``lg_k`` (a union gadget of a larger ``lg_k`` holds the same values
    in another mode and estimates differently), in a canonical state: its result is fed twice to a new union, so a
    result in HLL mode is always *out of order* and estimated from its registers alone (a union of coupon-mode
    sketches may otherwise convert to HLL in order and keep a HIP estimate that depends on the split)."""
    sketches = [from_bytes(p) if isinstance(p, bytes | bytearray | memoryview) else p for p in parts if p is not None]
    lg_k = min((s.lg_config_k for s in sketches), default=DEFAULT_LG_K)
    ds = _ds()
    un = ds.hll_union(lg_k)
    for s in sketches:
        un.update(s)
    merged = un.get_result(_target())
    canon = ds.hll_union(lg_k)
    canon.update(merged)
    canon.update(merged)
    return canon


def estimate(parts: Iterable[Any]) -> int:
    """The canonical estimate of the union of ``parts`` (0 for no parts): rounded composite estimate."""
    un = _union(parts)
    return round(un.get_estimate())


def union_bytes(parts: Iterable[Any]) -> bytes:
    """The union of ``parts`` as one compact sketch (its ``lg_k`` is the smallest of the parts')."""
    un = _union(parts)
    return to_bytes(un.get_result(_target()))


def _hll_count(lists: pa.Array) -> pa.Array:
    return pa.array([None if parts is None else estimate(parts) for parts in lists.to_pylist()], pa.int64())


def _hll_union(lists: pa.Array) -> pa.Array:
    return pa.array([None if parts is None else union_bytes(parts) for parts in lists.to_pylist()], pa.binary())


def _hll_sketch(values: pa.Array, lg_k: pa.Array) -> pa.Array:
    ks = lg_k.to_pylist()
    return pa.array([None if vs is None else to_bytes(of_values(vs, k or DEFAULT_LG_K))
                     for vs, k in zip(values.to_pylist(), ks, strict=True)], pa.binary())


def register(con) -> None:
    """Add the :data:`FUNCTIONS` to a DuckDB connection (before it is locked down). Idempotent: a function already
    there is kept (asked by creating it, not by listing ``duckdb_functions()``, which costs ~60 ms a connection)."""
    import duckdb
    from duckdb.sqltypes import BIGINT, BLOB, INTEGER, VARCHAR

    specs = [("hll_count", _hll_count, [duckdb.list_type(BLOB)], BIGINT),
             ("hll_union", _hll_union, [duckdb.list_type(BLOB)], BLOB),
             ("hll_sketch_varchar", _hll_sketch, [duckdb.list_type(VARCHAR), INTEGER], BLOB),
             ("hll_sketch_bigint", _hll_sketch, [duckdb.list_type(BIGINT), INTEGER], BLOB)]
    for name, fn, params, ret in specs:
        try:
            con.create_function(name, fn, params, ret, type="arrow", null_handling="special", side_effects=False)
        except duckdb.NotImplementedException as exc:
            if "already created" not in str(exc):
                raise


def estimate_sql(sketch_list: str) -> str:
    """DuckDB SQL of the canonical estimate (:func:`estimate`) of the union of a LIST of sketches, with the function
    :func:`register` added, qualified by its catalog so that nothing a user defines can shadow it."""
    return f"system.main.hll_count({sketch_list})"


def sketch_sql(values_list: str, field_type: str, lg_k: int) -> str:
    """DuckDB SQL building a sketch from a LIST of a field's stored values (string, or integer/decimal)."""
    fn = "hll_sketch_varchar" if field_type == "string" else "hll_sketch_bigint"
    return f"{fn}({values_list}, {int(lg_k)})"
