"""The declared field rules compiled to DuckDB: which master rows are valid, as one SQL predicate.

The same rules :mod:`lambdalake.validation` applies to a message, over master rows in DuckDB, for the independent
recomputations of a view (:mod:`batch.verify`, :mod:`audit.check`; the view itself: :mod:`lambdalake.viewsql`).

Field rules in SQL: required/nullable, minimum/maximum and min_length/max_length (DuckDB ``length`` counts code
points, as :mod:`lambdalake.validation` does) are SQL predicates; a ``pattern`` is full-matched by Python's ``re``
(the validator's own dialect) in a DuckDB function over the distinct values, registered on the connection that runs
the predicate.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from lambdalake.fields import Source
from lambdalake.instants import FIRST_INSTANT_US, LAST_INSTANT_US
from lambdalake.viewsql import ident


def _pattern_function(con: Any, name: str, pattern: str) -> None:
    """``name(VARCHAR) -> BOOLEAN``: ``re.fullmatch(pattern, value)``, evaluated once per distinct value."""
    fullmatch = re.compile(pattern).fullmatch

    def matches(values: pa.Array) -> pa.Array:
        ok = [v for v in pc.unique(values).to_pylist() if v is not None and fullmatch(v) is not None]
        return pc.is_in(values, value_set=pa.array(ok, pa.string()))

    con.create_function(name, matches, ["VARCHAR"], "BOOLEAN", type="arrow")


def valid_predicate(con: Any, source: Source) -> str:
    """SQL predicate over a master row: valid under the declared field rules (registers pattern functions)."""
    conds = []
    for f in source.fields:
        col = ident(f.name)
        rules = []
        if f.type == "integer":
            if f.minimum is not None:
                rules.append(f"{col} >= {int(f.minimum)}")
            if f.maximum is not None:
                rules.append(f"{col} <= {int(f.maximum)}")
        elif f.type == "string":
            if f.min_length is not None:
                rules.append(f"length({col}) >= {int(f.min_length)}")
            if f.max_length is not None:
                rules.append(f"length({col}) <= {int(f.max_length)}")
            if f.pattern:
                fn = f"lambdalake_match_{source.name}_{f.name}"
                _pattern_function(con, fn, f.pattern)
                rules.append(f"{fn}({col})")
        elif f.type == "timestamp":  # the supported range (lambdalake.validation rule 6)
            rules.append(f"epoch_us({col}) BETWEEN {FIRST_INSTANT_US} AND {LAST_INSTANT_US}")
        elif f.type == "decimal":  # the scaled integer has at most 18 digits (rule 7)
            rules.append(f"abs({col}) < {10 ** 18}")
        value_ok = " AND ".join(rules) or "TRUE"
        if f.required and not f.nullable:
            conds.append(f"({col} IS NOT NULL AND {value_ok})")
        else:
            conds.append(f"({col} IS NULL OR ({value_ok}))")
    return " AND ".join(conds) or "TRUE"
