"""A table source's rows by key, computed by Spark from its stored changes (:func:`lambdalake.tables.change_columns`)
— :class:`lambdalake.tables.TableRows` over a DataFrame, with the same rule: per key the change of the newest
position (``_lsn``, then a streamed change after a snapshot read), the lowest offset among equal ones; nothing older
than the newest completed snapshot. ``tests/test_table_rows_engines.py`` holds it equal to the Python rule."""

from __future__ import annotations

from lambdalake.schema import OFFSET_COL
from lambdalake.tables import DELETED_COL, LSN_COL, OP_COL, RANK_COL, SNAPSHOT_END_COL, Table


def table_rows(changes, table: Table):
    """``(rows, snapshot)``: the rows by key in the stored form :func:`lambdalake.tables.row_columns` (tombstones
    included) and the newest completed snapshot's LSN (-1: none). One action for the snapshot, one shuffle by key."""
    from pyspark.sql import functions as F

    snapshot = changes.where(F.col(SNAPSHOT_END_COL)).agg(F.max(LSN_COL)).first()[0]
    snapshot = -1 if snapshot is None else int(snapshot)
    names = [c.name for c in table.columns]
    keys = list(table.primary_key)
    rest = [n for n in names if n not in keys]
    ranked = changes.where(F.col(LSN_COL) >= snapshot).select(
        *keys, F.struct(F.col(LSN_COL), F.when(F.col(OP_COL) == "r", 0).otherwise(1).alias(RANK_COL),
                        (-F.col(OFFSET_COL)).alias("_first"), (F.col(OP_COL) == "d").alias(DELETED_COL),
                        *[F.col(n) for n in rest]).alias("_change"))
    newest = ranked.groupBy(*keys).agg(F.max("_change").alias("_change"))
    deleted = F.col(f"_change.{DELETED_COL}")
    return newest.select(*[F.col(n) if n in keys else F.when(deleted, None).otherwise(F.col(f"_change.{n}")).alias(n)
                           for n in names],
                         F.col(f"_change.{LSN_COL}").alias(LSN_COL), F.col(f"_change.{RANK_COL}").cast("int")
                         .alias(RANK_COL), deleted.alias(DELETED_COL)), snapshot
