"""The logical schema of everything stored, derived once from the declaration; one small type table per engine.

Logical types are the field types of :mod:`lambdalake.fields` (``string``, ``integer``, ``timestamp``,
``decimal``, ``boolean``, ``number``) plus ``int32`` for the partition column. Each engine maps them with its own
table and nothing else:

=============  ====================  ==========  ===============
logical        Arrow (here)          Spark       DuckDB
=============  ====================  ==========  ===============
string         string                StringType  VARCHAR
integer        int64                 LongType    BIGINT
timestamp      timestamp[us, UTC]    Timestamp   TIMESTAMPTZ
decimal        int64 (x 10^scale)    LongType    BIGINT (served as DECIMAL(18|38, scale))
boolean        bool                  BooleanType BOOLEAN
number         float64               DoubleType  DOUBLE
int32          int32                 IntegerType INTEGER
binary         binary                BinaryType  (not served)
sketch         binary                BinaryType  BLOB (served as its estimate, lambdalake.sketches)
=============  ====================  ==========  ===============

A decimal is stored as its scaled integer (``12.34`` at scale 2 is 1234) in every file, so every engine sums it
exactly as an integer; :attr:`Column.scale` says how to read it, and serving presents it as a SQL decimal.

(the Spark table is in :mod:`batch.spark_types`, the DuckDB one in :mod:`lambdalake.viewsql`).

Stored columns:

- master file: the source's fields, ``_partition``, ``_offset``, ``_ingest_time`` (:func:`master_columns`);
- batch view: keys, ``window_start``, stored aggregates — count is ``integer``, approx_distinct a ``sketch``,
  sum/min/max keep the field's type (a sum of a decimal is the scaled integer sum) (:func:`view_columns`);
- speed view: ``_partition``, ``_block_start``, then the batch view's columns (:func:`speed_view_columns`);
- rejected file: ``_partition``, ``_offset``, ``_ingest_time``, ``_value`` (binary), ``_reason``
  (:func:`rejected_columns`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from lambdalake.fields import Source
from lambdalake.pipeline import WINDOW_START, Pipeline, View

PARTITION_COL = "_partition"
OFFSET_COL = "_offset"
INGEST_COL = "_ingest_time"
BLOCK_COL = "_block_start"
VALUE_COL = "_value"  # rejected files: the message bytes as in the log
REASON_COL = "_reason"  # rejected files: why the archiver found the message invalid

TS_TYPE = pa.timestamp("us", tz="UTC")
ARROW_TYPES: dict[str, pa.DataType] = {"string": pa.string(), "integer": pa.int64(), "timestamp": TS_TYPE,
                                       "int32": pa.int32(), "binary": pa.binary(), "decimal": pa.int64(),
                                       "boolean": pa.bool_(), "number": pa.float64(),
                                       "sketch": pa.binary()}


@dataclass(frozen=True)
class Column:
    """One stored column: its name, logical type and whether it can hold null."""

    name: str
    type: str
    nullable: bool = True
    scale: int | None = None  # decimal: the stored integer is the value x 10^scale
    total: bool = False  # a sum (served wider: DECIMAL(38, scale) rather than DECIMAL(18, scale))


def master_columns(source: Source) -> tuple[Column, ...]:
    cols = [Column(f.name, f.type, not f.required or f.nullable, f.scale) for f in source.fields]
    return (*cols, Column(PARTITION_COL, "int32", nullable=False), Column(OFFSET_COL, "integer", nullable=False),
            Column(INGEST_COL, "timestamp", nullable=False))


def rejected_columns() -> tuple[Column, ...]:
    """A rejected file: the invalid messages of one archived range, as the log holds them (``_value`` is null for
    a message without a value), with the archiver's reason."""
    return (Column(PARTITION_COL, "int32", nullable=False), Column(OFFSET_COL, "integer", nullable=False),
            Column(INGEST_COL, "timestamp", nullable=False), Column(VALUE_COL, "binary"),
            Column(REASON_COL, "string", nullable=False))


def view_columns(source: Source, view: View) -> tuple[Column, ...]:
    """Stored columns of a view (batch layout; speed adds its position columns in front)."""
    fields = source.field_map
    cols = [Column(k, fields[k].type, scale=fields[k].scale) for k in view.keys]
    cols.append(Column(WINDOW_START, "timestamp", nullable=False))
    for a in view.stored_aggregates:
        if a.kind == "count":
            cols.append(Column(a.name, "integer", nullable=False))
        elif a.kind == "approx_distinct":  # an HLL sketch of the column's values (lambdalake.sketches)
            cols.append(Column(a.name, "sketch"))
        elif a.kind == "sum":  # an integer or decimal sum is an int64 (decimal: scaled), a number sum a float64
            f = fields[a.column]
            cols.append(Column(a.name, f.type, scale=f.scale, total=True))
        else:
            cols.append(Column(a.name, fields[a.column].type, scale=fields[a.column].scale))
    return tuple(cols)


def speed_view_columns(source: Source, view: View) -> tuple[Column, ...]:
    return (Column(PARTITION_COL, "int32", nullable=False), Column(BLOCK_COL, "integer", nullable=False),
            *view_columns(source, view))


def pipeline_view_columns(pipeline: Pipeline, view: View) -> tuple[Column, ...]:
    return view_columns(pipeline.source_of(view), view)


def arrow_type(logical: str) -> pa.DataType:
    return ARROW_TYPES[logical]


def arrow_schema(columns: tuple[Column, ...], *, nullability: bool = True) -> pa.Schema:
    """Arrow schema of ``columns``; ``nullability=False`` marks every column nullable (what Spark writes)."""
    return pa.schema([pa.field(c.name, ARROW_TYPES[c.type], nullable=c.nullable or not nullability)
                      for c in columns])


def read_parquet_file(path: Path) -> pa.Table:
    """One parquet file read whole: the speed snapshots' and checkpoints' small files (not ``pq.read_table``: a
    dataset per file costs twice the read of a small one, and imports pyarrow.dataset with pandas, ~0.5 s a start)."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as f:
        return f.read()
