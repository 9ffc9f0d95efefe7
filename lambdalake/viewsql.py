"""The DuckDB interpreter of a view definition: SQL generated from the one declaration, nothing else.

Nothing here knows a particular view: every statement is derived from :class:`lambdalake.pipeline.View`
(``keys``, ``bucket``, ``where``, ``stored_aggregates`` and their ``merge``, ``means``, ``output_columns``). It only
builds strings (DuckDB is never imported here); its users run them:

- serving (:mod:`serving.connection`, the catalog file :mod:`serving.catalog`) reads the published files as typed
  relations (:func:`typed_select`) and merges them (:func:`merged_view_sql`), so the Python API, ``lambdalake sql``
  and the DuckDB CLI answer with the same SQL;
- the independent re-check of a published version (:mod:`batch.verify`) and ``lambdalake audit``
  (:mod:`audit.check`) recompute a view from events with :func:`master_events_sql`, :func:`view_sql` and
  :func:`output_sql` — every stored row of a view, and its output columns — never with the code paths that
  produced it (the declared field rules as a predicate: :mod:`lambdalake.validsql`).

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
engine's only type table.
"""

from __future__ import annotations

from collections.abc import Sequence

from lambdalake.aggregates import Aggregate, Mean
from lambdalake.fields import Source
from lambdalake.pipeline import WINDOW_START, View
from lambdalake.predicates import Predicate, resolve_predicate
from lambdalake.schema import BLOCK_COL, OFFSET_COL, PARTITION_COL, Column, view_columns
from lambdalake.sketches import estimate_sql, sketch_sql

# The DuckDB type of each logical type of lambdalake.schema (the engine's one type table).
DUCKDB_TYPES = {"string": "VARCHAR", "integer": "BIGINT", "timestamp": "TIMESTAMPTZ", "int32": "INTEGER",
                "decimal": "BIGINT", "boolean": "BOOLEAN", "number": "DOUBLE", "sketch": "BLOB"}

Columns = Sequence[Column]
# Functions in generated SQL are qualified with the built-in catalog: a user's TEMP MACRO named like one (``sum``)
# cannot change what a view computes.
FN = "system.main."
FOLD = {"sum": "sum", "min": "min", "max": "max", "union": "union"}  # each merge rule (Aggregate.merge) in words


# --- quoting and types ---------------------------------------------------------------------------------------------
def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A quoted SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def sql_list(paths: list[str]) -> str:
    """A SQL list of string literals (the files of a ``read_parquet``)."""
    return "[" + ", ".join(literal(p) for p in paths) + "]"


def duckdb_type(column: Column) -> str:
    return DUCKDB_TYPES[column.type]


# --- typed relations of stored columns -----------------------------------------------------------------------------
def typed_select(columns: Columns, relation: str, absent: frozenset[str] | set[str] = frozenset(), *,
                 presented: bool = False, estimates: bool = False, extra: Sequence[str] = ()) -> str:
    """SELECT every column of ``relation`` cast to its contract type (published files are checked, not trusted).

    Columns named in ``absent`` are NULL of their type (a stale answer from pieces of an earlier definition that
    did not store them). ``presented``: as served to users (decimals as SQL decimals, :func:`present`).
    ``estimates``: sketches as their estimates (:func:`estimate_sql`): how two relations holding sketches of the
    same values built by different engines compare equal (their bytes may differ). ``extra``: further columns of
    ``relation`` selected as they are.
    """
    shown = present if presented else _as_is
    if estimates:
        def shown(expr: str, c: Column, _shown=shown) -> str:
            return estimate_sql(f"{FN}list_value({expr})") if c.type == "sketch" else _shown(expr, c)
    cols = ", ".join(
        shown(f"CAST({'NULL' if c.name in absent else ident(c.name)} AS {duckdb_type(c)})", c) + f" AS {ident(c.name)}"
        for c in columns) + "".join(f", {ident(name)}" for name in extra)
    return f"SELECT {cols} FROM {relation}"


def empty_select(columns: Columns, *, presented: bool = False) -> str:
    """A relation with ``columns`` and no rows (``presented``: typed as served, see :func:`typed_select`)."""
    shown = present if presented else _as_is
    cols = ", ".join(shown(f"CAST(NULL AS {duckdb_type(c)})", c) + f" AS {ident(c.name)}" for c in columns)
    return f"SELECT {cols} WHERE false"


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


# --- a view recomputed from events ---------------------------------------------------------------------------------
def fold_sql(a: Aggregate) -> str:
    """SQL folding a stored aggregate over all rows with its merge rule (a sketch: the estimate of the union)."""
    col = ident(a.name)
    return estimate_sql(f"list({col})") if a.merge == "union" else f"{FOLD[a.merge]}({col})"


def aggregate_sql(a: Aggregate, source: Source) -> str:
    """SQL of a stored aggregate over events (valid, deduplicated, filtered): what one group's row stores."""
    col = ident(a.column or "")
    if a.kind == "count":
        return "count(*)"
    if a.kind == "sum":
        total = "DOUBLE" if source.field_map[a.column or ""].type == "number" else "BIGINT"  # decimals: scaled ints
        return f"CAST(sum({col}) AS {total})"
    if a.kind == "approx_distinct":
        return sketch_sql(f"list({col})", source.field_map[a.column or ""].type, a.lg_k or 0)
    return f"{a.kind}({col})"


def master_events_sql(source: Source, files: list[str] | str, watermark: dict[int, int], valid: str) -> str:
    """Valid events below the watermark, the row with the lowest offset per (partition, event id); ``files``: the
    master files, or a relation (SQL) holding their rows."""
    cases = " ".join(f"WHEN {p} THEN {w}" for p, w in sorted(watermark.items()))
    below = f"{OFFSET_COL} < (CASE {PARTITION_COL} {cases} ELSE 0 END)" if watermark else "FALSE"
    relation = files if isinstance(files, str) else f"read_parquet({sql_list(files)})"
    return (f"SELECT * FROM {relation} WHERE {below} AND {valid} "
            f"QUALIFY row_number() OVER (PARTITION BY {PARTITION_COL}, {ident(source.event_id)} "
            f"ORDER BY {OFFSET_COL}) = 1")


def view_sql(source: Source, view: View, events: str, block: int | None = None) -> str:
    """The stored rows of ``view`` computed over ``events`` (a relation of master-schema rows: valid, deduplicated
    events), one row per group: keys, ``window_start``, stored aggregates — the batch layout; with ``block``, grouped
    by ``_partition`` and ``_block_start`` (offset floored to the block) too, in front — the speed layout.

    The independent interpretation of a view (DuckDB): :mod:`audit` recomputes batch views from master and speed
    rows from the log with it. ``window_start`` is the event time floored to the bucket (floor also before 1970),
    a UTC ``TIMESTAMPTZ``; count and sum are BIGINT, min/max keep the field's type.
    """
    t, b = f"epoch_us({ident(source.event_time)})", view.bucket_us
    cols = [ident(k) for k in view.keys]
    cols.append(f"make_timestamptz({t} - ((({t} % {b}) + {b}) % {b})) AS {ident(WINDOW_START)}")
    if block:
        cols = [PARTITION_COL, f"({OFFSET_COL} - {OFFSET_COL} % {int(block)}) AS {BLOCK_COL}", *cols]
    for a in view.stored_aggregates:
        cols.append(f"{aggregate_sql(a, source)} AS {ident(a.name)}")
    where = "" if view.where is None else \
        f" WHERE {where_sql(resolve_predicate(view.where, source, f'view {view.name!r}'), source)}"
    return f"SELECT {', '.join(cols)} FROM ({events}) AS events{where} GROUP BY ALL"


def where_sql(pred: Predicate, source: Source) -> str:
    """DuckDB SQL of a resolved view filter over master-typed rows: a comparison or ``in`` on a null field is false,
    and/or are two-valued; timestamps compare as UTC µs, decimals as their stored scaled integers."""
    if pred.op in ("and", "or"):
        return "(" + f" {pred.op.upper()} ".join(where_sql(a, source) for a in pred.args) + ")"
    f = source.field_map[pred.field or ""]
    col = ident(f.name)
    if pred.op in ("is_null", "not_null"):
        return f"({col} IS {'NOT ' if pred.op == 'not_null' else ''}NULL)"
    value = f"epoch_us({col})" if f.type == "timestamp" else col

    def lit(v: object) -> str:
        if isinstance(v, bool):
            return "TRUE" if v else "FALSE"
        if isinstance(v, str):
            return literal(v)
        if isinstance(v, float):
            return f"CAST('{v!r}' AS DOUBLE)"
        return str(int(v))  # type: ignore[call-overload]

    if pred.op == "in":
        return f"({col} IS NOT NULL AND {value} IN ({', '.join(lit(v) for v in pred.values)}))"
    op = {"eq": "=", "ne": "<>", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}[pred.op]
    return f"({col} IS NOT NULL AND {value} {op} {lit(pred.values[0])})"


def output_sql(view: View, stored: str, source: Source | None = None) -> str:
    """The output columns of ``view`` (``view.output_columns``) over ``stored`` (one row per group, stored columns):
    declared aggregates as stored; a mean is its stored sum over its stored count, as DOUBLE. With ``source``,
    decimals as served (``DECIMAL(18|38, scale)``; a mean's decimal sum divided by 10^scale)."""
    means = {m.name: m for m in view.means}
    columns = {c.name: c for c in view_columns(source, view)} if source is not None else {}

    def shown(name: str) -> str:
        c = columns.get(name)
        return ident(name) if c is None else f"{present(ident(name), c)} AS {ident(name)}"

    cols = [shown(k) for k in view.keys] + [ident(WINDOW_START)]
    for a in view.aggregates:
        m = means.get(a.name)
        if isinstance(a, Aggregate) and a.kind == "approx_distinct":
            cols.append(f"{estimate_sql(f'list_value({ident(a.name)})')} AS {ident(a.name)}")
            continue
        if m is None:
            cols.append(shown(a.name))
            continue
        c = columns.get(m.sum_name)
        total = f"CAST({ident(m.sum_name)} AS DOUBLE)"
        if c is not None and c.type == "decimal" and c.scale:
            total = f"({total} / 1e{int(c.scale)})"
        cols.append(f"{total} / NULLIF({ident(m.count_name)}, 0) AS {ident(m.name)}")
    return f"SELECT {', '.join(cols)} FROM ({stored}) AS stored"


# --- the merge of the batch and speed sides ------------------------------------------------------------------------
def speed_visible_predicate(watermark: dict[int, int]) -> str:
    """SQL form of :func:`lambdalake.handoff.speed_row_visible`: ``_block_start >= W[_partition]``, W = 0 if absent.

    ``watermark`` is {partition: W} of the view's topic in the connection's batch version.
    """
    if not watermark:
        return f"{BLOCK_COL} >= 0"
    cases = " ".join(f"WHEN {int(p)} THEN {int(w)}" for p, w in sorted(watermark.items()))
    return f"{BLOCK_COL} >= CASE {PARTITION_COL} {cases} ELSE 0 END"


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


# --- the merge split: rows without a speed part served as stored, the few others merged ----------------------------
ESTIMATE_PREFIX = "__estimate_"


def estimate_column(name: str) -> str:
    """The column holding a stored estimate of sketch column ``name`` (:mod:`lambdalake.servingcopy`)."""
    return ESTIMATE_PREFIX + name


HAS_SPEED = "__has_speed"
ONE_PREFIX = "__one_"


def one_column(name: str) -> str:
    """The tail's column holding sketch column ``name``'s only part (the group's list is then NULL)."""
    return ONE_PREFIX + name


def first_speed_window_sql(speed: str, watermark: dict[int, int]) -> str:
    """The earliest ``window_start`` of a visible speed row (NULL: none), in microseconds since the epoch."""
    return (f"SELECT {FN}epoch_us({FN}min({ident(WINDOW_START)})) FROM {speed} "
            f"WHERE {speed_visible_predicate(watermark)}")


def since_sql(first_us: int | None) -> str:
    """:func:`first_speed_window_sql`'s answer as a TIMESTAMPTZ constant (DuckDB prunes the batch side's row
    groups by it; NULL: no visible speed row, no batch row is in the tail)."""
    if first_us is None:
        return "CAST(NULL AS TIMESTAMPTZ)"
    return f"{FN}make_timestamptz(CAST({int(first_us)} AS BIGINT))"


def speed_groups_sql(view: View, batch: str, speed: str, watermark: dict[int, int], source: Source,
                     estimates: frozenset[str] = frozenset(), since: str | None = None) -> str:
    """The tail of a merged view: every group from ``since`` on (the earliest ``window_start`` of a visible speed
    row, :func:`since_sql`; None: computed here — the newest windows, and those of late events), its batch row and
    visible speed rows merged as :func:`merged_view_sql` merges them, plus ``__has_speed`` and, for the names in
    ``estimates``, the stored estimate of the batch row (``__estimate_<name>`` of ``batch``). A sketch column holds
    the LIST of the parts' sketches of a group with two or more, ``__one_<name>`` the sketch of a group with
    exactly one (most groups; storing a list per group was most of a connect's time). A serving connection
    computes these few rows once; :func:`split_view_sql` serves them."""
    columns = {c.name: c for c in view_columns(source, view)}
    group = [ident(k) for k in view.keys] + [ident(WINDOW_START)]
    stored = [ident(a.name) for a in view.stored_aggregates]
    est = [ident(estimate_column(e)) for e in sorted(estimates)]

    def merge(a: Aggregate) -> str:
        if a.merge != "union":
            return _merge_expr(a, columns[a.name])
        col = ident(a.name)
        return (f"CASE WHEN {FN}count({col}) > 1 THEN {FN}list({col}) FILTER (WHERE {col} IS NOT NULL) END AS {col}, "
                f"CASE WHEN {FN}count({col}) = 1 THEN {FN}any_value({col}) END AS {ident(one_column(a.name))}")

    merged = ", ".join(group + [merge(a) for a in view.stored_aggregates]
                       + [f"{FN}max({e}) AS {e}" for e in est] + [f"{FN}bool_or({HAS_SPEED}) AS {HAS_SPEED}"])
    visible = f"(SELECT {', '.join(group + stored)} FROM {speed} WHERE {speed_visible_predicate(watermark)})"
    first = since if since is not None else f"(SELECT {FN}min({ident(WINDOW_START)}) FROM {visible} AS first)"
    return (
        f"SELECT {merged} FROM (\n"
        f"  SELECT {', '.join(group + stored + est)}, false AS {HAS_SPEED} FROM {batch} AS b "
        f"WHERE b.{ident(WINDOW_START)} >= {first}\n"
        f"  UNION ALL\n"
        f"  SELECT {', '.join(group + stored + [f'CAST(NULL AS BIGINT) AS {e}' for e in est])}, true AS {HAS_SPEED} "
        f"FROM {visible} AS v\n"
        f") AS parts GROUP BY {', '.join(group)}"
    )


def split_view_sql(view: View, batch: str, tail: str | None, source: Source,
                   estimates: frozenset[str] = frozenset(), since: str | None = None) -> str:
    """A merged view as the union of (a) the batch rows before ``since`` (the earliest ``window_start`` of a
    visible speed row: no speed part can belong to them), served as stored, and (b) ``tail``
    (:func:`speed_groups_sql`, e.g. a table of it; None: no visible speed row, (a) is every batch row). Same rows
    and output columns as :func:`merged_view_sql` (a batch version holds one row per group). An ``approx_distinct``
    of a row without a speed part is the estimate stored with it (``__estimate_<name>``, for the names in
    ``estimates``; else computed per row the same way: the canonical estimate of the one sketch, NULL for none) —
    only rows with a speed part estimate a union per query (of the same parts: the one, or the list)."""
    columns = {c.name: c for c in view_columns(source, view)}
    means = {m.name: m for m in view.means}
    keys = [f"{present(ident(k), columns[k])} AS {ident(k)}" for k in view.keys] + [ident(WINDOW_START)]

    def stored_estimate(a: Aggregate | Mean) -> str:
        col = ident(a.name)
        if a.name in estimates:
            return ident(estimate_column(a.name))
        return f"CASE WHEN {col} IS NULL THEN NULL ELSE {estimate_sql(f'{FN}list_value({col})')} END"

    def sketched(a: Aggregate | Mean) -> bool:
        return isinstance(a, Aggregate) and a.kind == "approx_distinct"

    alone = keys + [f"{stored_estimate(a)} AS {ident(a.name)}" if sketched(a)
                    else _output_expr(a, means, columns, True) for a in view.aggregates]
    if tail is None or since is None:
        return f"SELECT {', '.join(alone)} FROM {batch} AS alone"

    def tail_estimate(a: Aggregate | Mean) -> str:
        one = ident(one_column(a.name))
        union = estimate_sql(f"CASE WHEN {one} IS NULL THEN {ident(a.name)} ELSE {FN}list_value({one}) END")
        if a.name not in estimates:
            return f"{union} AS {ident(a.name)}"
        return f"CASE WHEN {HAS_SPEED} THEN {union} ELSE {ident(estimate_column(a.name))} END AS {ident(a.name)}"

    both = keys + [tail_estimate(a) if sketched(a) else _output_expr(a, means, columns, True)
                   for a in view.aggregates]
    return (
        f"SELECT {', '.join(alone)} FROM {batch} AS alone WHERE {ident(WINDOW_START)} < {since}\n"
        f"UNION ALL\n"
        f"SELECT {', '.join(both)} FROM {tail} AS tail"
    )
