"""SQL generated from the one view declaration: typed relations of the published files and the merge.

Nothing here knows a particular view: every statement is derived from :class:`lambdalake.pipeline.View`
(``keys``, ``stored_aggregates`` and their ``merge``, ``means``, ``output_columns``). The connection
(:mod:`serving.connection`) and the catalog file (:mod:`serving.catalog`) both use it, so the Python API,
``lambdalake sql`` and the DuckDB CLI answer with the same SQL.

The merge of view ``V`` (batch rows are offsets ``< W``, visible speed rows are blocks ``>= W``)::

    SELECT keys, window_start, declared aggregates (means = sum / count, as DOUBLE)
    FROM (SELECT keys, window_start, merge(stored) ...            -- count/sum: sum, min: min, max: max,
                                                                  -- sketch: list, estimated as hll_count(list)
          FROM (SELECT keys, window_start, stored FROM batch
                UNION ALL
                SELECT keys, window_start, stored FROM speed
                WHERE _block_start >= CASE _partition WHEN p THEN W[p] ... ELSE 0 END)
          GROUP BY keys, window_start)

Stored columns are :mod:`lambdalake.schema`'s (one logical schema per view); :data:`DUCKDB_TYPES` is this
engine's only type table. A view that may not be served (its definition is being rebuilt) is
:func:`refusing_select` over the same merge: same columns, every scan fails with the one-line reason.
"""

from __future__ import annotations

from collections.abc import Sequence

from lambdalake.aggregates import Aggregate, Mean
from lambdalake.fields import Source
from lambdalake.pipeline import WINDOW_START, View
from lambdalake.schema import BLOCK_COL, PARTITION_COL, Column, view_columns
from lambdalake.sketches import estimate_sql

# The DuckDB type of each logical type of lambdalake.schema (the engine's one type table).
DUCKDB_TYPES = {"string": "VARCHAR", "integer": "BIGINT", "timestamp": "TIMESTAMPTZ", "int32": "INTEGER",
                "decimal": "BIGINT", "boolean": "BOOLEAN", "number": "DOUBLE", "sketch": "BLOB"}

Columns = Sequence[Column]
# Functions in generated SQL are qualified with the built-in catalog: a user's TEMP MACRO named like one (``sum``)
# cannot change what a view computes.
FN = "system.main."


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A quoted SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def duckdb_type(column: Column) -> str:
    return DUCKDB_TYPES[column.type]


def typed_select(columns: Columns, relation: str, absent: frozenset[str] | set[str] = frozenset(), *,
                 presented: bool = False, estimates: bool = False) -> str:
    """SELECT every column of ``relation`` cast to its contract type (published files are checked, not trusted).

    Columns named in ``absent`` are NULL of their type (a stale answer from pieces of an earlier definition that
    did not store them). ``presented``: as served to users (decimals as SQL decimals, :func:`present`).
    ``estimates``: sketches as their estimates (:func:`estimate_sql`): how two relations holding sketches of the
    same values built by different engines compare equal (their bytes may differ).
    """
    shown = present if presented else _as_is
    if estimates:
        def shown(expr: str, c: Column, _shown=shown) -> str:
            return estimate_sql(f"{FN}list_value({expr})") if c.type == "sketch" else _shown(expr, c)
    cols = ", ".join(
        shown(f"CAST({'NULL' if c.name in absent else ident(c.name)} AS {duckdb_type(c)})", c) + f" AS {ident(c.name)}"
        for c in columns)
    return f"SELECT {cols} FROM {relation}"


def empty_select(columns: Columns, *, presented: bool = False) -> str:
    """A relation with ``columns`` and no rows (``presented``: typed as served, see :func:`typed_select`)."""
    shown = present if presented else _as_is
    cols = ", ".join(shown(f"CAST(NULL AS {duckdb_type(c)})", c) + f" AS {ident(c.name)}" for c in columns)
    return f"SELECT {cols} WHERE false"


def refusing_select(relation: str, message: str) -> str:
    """The columns of ``relation`` (a subquery), but every scan fails with ``message`` (DuckDB's ``error()``): the
    view of a definition that cannot be served yet. Binding (DESCRIBE, ``LIMIT 0``) still works."""
    return (f"SELECT answer.* FROM (SELECT 1 AS one WHERE {FN}error({literal(message)})) AS refused "
            f"LEFT JOIN ({relation}) AS answer ON true")


def speed_visible_predicate(watermark: dict[int, int]) -> str:
    """SQL form of :func:`lambdalake.handoff.speed_row_visible`: ``_block_start >= W[_partition]``, W = 0 if absent.

    ``watermark`` is {partition: W} of the view's topic in the connection's batch version.
    """
    if not watermark:
        return f"{BLOCK_COL} >= 0"
    cases = " ".join(f"WHEN {int(p)} THEN {int(w)}" for p, w in sorted(watermark.items()))
    return f"{BLOCK_COL} >= CASE {PARTITION_COL} {cases} ELSE 0 END"


def present(expr: str, column: Column) -> str:
    """How a stored column is served: a decimal (stored as its scaled integer) as ``DECIMAL(18, scale)`` — a sum as
    ``DECIMAL(38, scale)`` — computed exactly (integer times a decimal unit); every other type as stored."""
    if column.type != "decimal":
        return expr
    p, s = (38 if column.total else 18), int(column.scale or 0)
    unit = "1" if s == 0 else "0." + "0" * (s - 1) + "1"
    return f"CAST(CAST({expr} AS DECIMAL({p}, 0)) * CAST({literal(unit)} AS DECIMAL({p}, {s})) AS DECIMAL({p}, {s}))"


def _as_is(expr: str, column: Column) -> str:
    return expr


def _merge_expr(a: Aggregate, column: Column) -> str:
    col = ident(a.name)
    if a.merge == "union":  # the parts' sketches; the output estimates their union
        return f"{FN}list({col}) FILTER (WHERE {col} IS NOT NULL) AS {col}"
    if a.merge == "sum" and column.type == "number":  # float64 partial sums add as DOUBLE
        return f"{FN}sum({col}) AS {col}"
    if a.merge == "sum":  # DuckDB widens sum(BIGINT) to HUGEINT; partial counts/sums are int64 by contract
        return f"CAST({FN}sum({col}) AS BIGINT) AS {col}"
    return f"{FN}{a.merge}({col}) AS {col}"


def _output_expr(a: Aggregate | Mean, means: dict[str, Mean], columns: dict[str, Column], sketch_functions: bool
                 ) -> str:
    if isinstance(a, Aggregate) and a.kind == "approx_distinct":
        # without the sketch functions (the stock DuckDB CLI) the estimate is absent, never guessed
        value = estimate_sql(ident(a.name)) if sketch_functions else "CAST(NULL AS BIGINT)"
        return f"{value} AS {ident(a.name)}"
    if isinstance(a, Mean):
        m = means[a.name]
        total = f"CAST({ident(m.sum_name)} AS DOUBLE)"
        scale = columns[m.sum_name].scale if columns[m.sum_name].type == "decimal" else 0
        if scale:  # a decimal sum is stored scaled
            total = f"({total} / 1e{int(scale)})"
        return f"{total} / {FN}nullif({ident(m.count_name)}, 0) AS {ident(m.name)}"
    return f"{present(ident(a.name), columns[a.name])} AS {ident(a.name)}"


def merged_view_sql(view: View, batch: str, speed: str, watermark: dict[int, int], source: Source, *,
                    sketch_functions: bool = True, sketches: bool = False) -> str:
    """The SELECT of a merged view over the typed relations ``batch`` and ``speed`` (names or subqueries) of
    ``source``'s view: partial aggregates merge as stored (decimals as scaled integers; sketches by union), then
    decimals are presented as SQL decimals (:func:`present`) and sketches as their estimates.

    Output columns are exactly ``view.output_columns``, in order. ``sketch_functions``: the connection has
    :func:`lambdalake.sketches.register`'s functions (False: ``approx_distinct`` columns are NULL). ``sketches``:
    instead, the keys, ``window_start`` and each ``approx_distinct``'s merged sketch (a BLOB to roll up further).
    """
    columns = {c.name: c for c in view_columns(source, view)}
    group = [ident(k) for k in view.keys] + [ident(WINDOW_START)]
    stored = [ident(a.name) for a in view.stored_aggregates]
    part_cols = ", ".join(group + stored)
    merged = ", ".join(group + [_merge_expr(a, columns[a.name]) for a in view.stored_aggregates])
    means = {m.name: m for m in view.means}
    outs = ", ".join([f"{present(ident(k), columns[k])} AS {ident(k)}" for k in view.keys] + [ident(WINDOW_START)]
                     + ([f"{FN}hll_union({ident(a.name)}) AS {ident(a.name)}" for a in view.stored_aggregates
                         if a.merge == "union"] if sketches else
                        [_output_expr(a, means, columns, sketch_functions) for a in view.aggregates]))
    return (
        f"SELECT {outs} FROM (\n"
        f"  SELECT {merged} FROM (\n"
        f"    SELECT {part_cols} FROM {batch}\n"
        f"    UNION ALL\n"
        f"    SELECT {part_cols} FROM {speed} WHERE {speed_visible_predicate(watermark)}\n"
        f"  ) AS parts GROUP BY {', '.join(group)}\n"
        f") AS merged"
    )
