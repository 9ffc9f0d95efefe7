"""lambdalake: a Lambda-architecture engine (Kafka log -> Parquet master + Spark batch views, kafka-python
speed layer, DuckDB merge-on-query).

Public API (stable names):

- :class:`lambdalake.pipeline.Pipeline`, :class:`~lambdalake.fields.Source`, :class:`~lambdalake.fields.Field`,
  :class:`~lambdalake.pipeline.View`, aggregates (:mod:`lambdalake.aggregates`) :func:`count`, :func:`sum_`,
  :func:`min_`, :func:`max_`, :func:`mean`, :func:`approx_distinct`, view filters (:mod:`lambdalake.predicates`)
  :class:`Predicate`, :func:`eq`, ..., :func:`and_`, :func:`or_` — declare a pipeline.
- :func:`lambdalake.config.load_settings` — resolve configuration.

This package is the core every layer imports and it imports no layer: a ready, read-only DuckDB connection over the
merged views is :func:`serving.connect` (the serving layer; ``lambdalake.connect`` before 0.2).
"""

from lambdalake.aggregates import approx_distinct, count, max_, mean, min_, sum_
from lambdalake.fields import Field, Source
from lambdalake.pipeline import Pipeline, View
from lambdalake.predicates import Predicate, and_, between, eq, ge, gt, in_, is_null, le, lt, ne, not_null, or_

__version__ = "0.2.0"

__all__ = ["Field", "Pipeline", "Source", "View", "count", "sum_", "min_", "max_", "mean", "approx_distinct",
           "__version__",
           "Predicate", "eq", "ne", "lt", "le", "gt", "ge", "between", "in_", "is_null", "not_null", "and_", "or_"]

