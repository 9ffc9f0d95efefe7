r"""The declared field rules compiled to Spark: a boolean column that holds for a stored master row valid under the
rules declared *now* (:func:`valid_rows`, with the semantics of :mod:`lambdalake.validation`), which the batch job
applies before dedup (:mod:`batch.spark_dedup`; why, in :mod:`batch.job`: "Field rules at batch time").

Limits of the compiled rules (the archiver applied the exact rules; these only re-check stored values):

- ``pattern`` is a Python ``re`` pattern; Spark evaluates it with Java's ``java.util.regex`` as
  ``(?dU)\A(?:<pattern>)\z`` — a full match like ``re.fullmatch``, ``.``/``^``/``$`` treating only ``\n`` as a
  line break (``UNIX_LINES``) and ``\d``/``\w``/``\s``/``\b`` as Unicode classes (``UNICODE_CHARACTER_CLASS``),
  as in Python. The two dialects agree on the common syntax (classes, quantifiers, groups, alternation, anchors,
  ``(?i)``; ``tests/test_batch_evolution.py`` checks it on the demo patterns and edge strings); Python-only syntax
  (``(?P<name>...)``, ``(?P=name)``, ``\Z``, conditional groups) is refused with a :class:`PipelineError`, and
  Unicode class membership can differ for rare code points: Python's ``\s`` also matches U+001C..U+001F, Java's
  does not. POSIX bracket classes (``[[:alpha:]]``) are Java syntax; Python reads them as plain characters.
- Length is counted in Unicode code points on both sides (Spark ``length``, Python ``len``).
- A field that becomes *required but nullable* cannot be re-checked: master stores an absent optional field and an
  explicit null alike (null), so such rows are kept.
"""

from __future__ import annotations

import re

from lambdalake.exceptions import PipelineError
from lambdalake.fields import DECIMAL_DIGITS, Field, Source
from lambdalake.instants import FIRST_INSTANT_US, LAST_INSTANT_US

_PYTHON_ONLY_REGEX = re.compile(r"\(\?P[<=]|\\Z|\(\?\(")


def java_pattern(field: Field) -> str:
    """The Java regex that full-matches like ``re.fullmatch(field.pattern, value)`` (see the module docstring)."""
    assert field.pattern is not None
    bad = _PYTHON_ONLY_REGEX.search(field.pattern)
    if bad:
        raise PipelineError(f"field {field.name!r}: pattern {field.pattern!r} uses Python-only regex syntax "
                            f"{bad.group(0)!r}, which the Spark batch job cannot evaluate; write it without it "
                            "(e.g. (?<name>...) for a named group, $ or \\z instead of \\Z)")
    return rf"(?dU)\A(?:{field.pattern})\z"


def valid_rows(source: Source):
    """A Spark boolean column: the stored master row is valid under the *declared* field rules (rules 3 and 5 of
    :mod:`lambdalake.validation`: required/nullable, minimum/maximum, min_length/max_length in code points, pattern
    as a full match) and the supported timestamp range of rule 6 (which rows archived before that rule existed may
    break). Master values are already typed, so the type rules need no re-check. None: no rule can reject a
    row."""
    from pyspark.sql import functions as F

    conds = []
    for f in source.fields:
        col = F.col(f.name)
        rules = []
        if f.type == "integer":
            if f.minimum is not None:
                rules.append(col >= F.lit(f.minimum))
            if f.maximum is not None:
                rules.append(col <= F.lit(f.maximum))
        elif f.type == "string":
            if f.min_length is not None and f.min_length > 0:
                rules.append(F.length(col) >= F.lit(f.min_length))
            if f.max_length is not None:
                rules.append(F.length(col) <= F.lit(f.max_length))
            if f.pattern:
                rules.append(col.rlike(java_pattern(f)))
        elif f.type == "timestamp":
            rules.append(F.unix_micros(col).between(F.lit(FIRST_INSTANT_US), F.lit(LAST_INSTANT_US)))
        elif f.type == "decimal":  # the scaled integer has at most 18 digits (rule 7)
            rules.append(F.abs(col) < F.lit(10 ** DECIMAL_DIGITS).cast("long"))
        value_ok = None
        for r in rules:
            value_ok = r if value_ok is None else value_ok & r
        if f.required and not f.nullable:  # null is invalid (absent, or null where null is not allowed)
            conds.append(col.isNotNull() if value_ok is None else col.isNotNull() & value_ok)
        elif value_ok is not None:
            conds.append(col.isNull() | value_ok)
    out = None
    for c in conds:
        out = c if out is None else out & c
    return out
