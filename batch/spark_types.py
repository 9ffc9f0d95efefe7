"""The Spark type of each logical type (:mod:`lambdalake.schema`) — the only Spark type table of this engine — and
the Spark schemas of the files the batch job reads: master rows, a view's stored rows, the event-id index."""

from __future__ import annotations

from lambdalake.fields import Source
from lambdalake.pipeline import View
from lambdalake.schema import PARTITION_COL, master_columns, view_columns

# The Spark type of each logical type (lambdalake.schema): the only type table of this engine.
SPARK_TYPES = {"string": "StringType", "integer": "LongType", "timestamp": "TimestampType", "int32": "IntegerType",
               "binary": "BinaryType", "decimal": "LongType", "boolean": "BooleanType", "number": "DoubleType",
               "sketch": "BinaryType"}


def spark_type(logical: str):
    from pyspark.sql import types as T

    return getattr(T, SPARK_TYPES[logical])()


def _spark_schema(source: Source):
    from pyspark.sql import types as T

    return T.StructType([T.StructField(c.name, spark_type(c.type), True) for c in master_columns(source)])


def _index_schema(src: Source):
    from pyspark.sql import types as T

    return T.StructType([T.StructField(PARTITION_COL, T.IntegerType(), True),
                         T.StructField(src.event_id, T.StringType(), True)])


def _view_schema(src: Source, view: View):
    from pyspark.sql import types as T

    return T.StructType([T.StructField(c.name, spark_type(c.type), True) for c in view_columns(src, view)])
