"""The rows-by-key rule of table sources on every engine that will run it: Spark (batch/spark_tables.py, from the
stored changes) and DuckDB (lambdalake.tables.merged_rows_sql, merging stored sides by key) against the Python rule
(lambdalake.tables.TableRows), over random workloads with Connect crashes of both kinds and any split."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch.spark_tables import table_rows
from lambdalake.tables import (
    TOMBSTONE,
    TableRows,
    changes_to_arrow,
    decode_change,
    merged_rows_sql,
    rows_from_arrow,
    rows_to_arrow,
)
from tests.test_tables import ORDERS, rows_of, workloads

INGEST_US = 1_796_000_000_000_000


def stored_changes(log) -> pa.Table:
    """The log's changes as the archive will store them (offset = the message's index; tombstones skipped)."""
    decoded = [(i, decode_change(ORDERS, m)) for i, m in enumerate(log)]
    return changes_to_arrow(ORDERS, [(i, c) for i, c in decoded if c is not TOMBSTONE], 0, INGEST_US)


def current_rows(arrow: pa.Table) -> list[dict]:
    """Rows as TableRows.rows() gives them (timestamps as UTC microseconds)."""
    i = arrow.schema.get_field_index("placed_at")
    return arrow.set_column(i, "placed_at", arrow["placed_at"].cast(pa.int64())).to_pylist()


@pytest.mark.integration
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workloads())
def test_spark_computes_the_rows_by_key_of_the_stored_changes(spark, workload):
    log, _ = workload
    rows, snapshot = table_rows(spark.createDataFrame(stored_changes(log)), ORDERS)
    assert rows_from_arrow(ORDERS, rows.toArrow(), snapshot) == rows_of(log)


@settings(max_examples=200, deadline=None)
@given(workloads(), st.data())
def test_duckdb_merges_stored_sides_by_key_into_the_rows_of_all_changes(workload, data):
    log, _ = workload
    w = data.draw(st.integers(0, len(log)))
    batch, speed, full = rows_of(log[:w]), rows_of(log[w:]), rows_of(log)
    assert rows_from_arrow(ORDERS, rows_to_arrow(ORDERS, full), full.snapshot) == full  # the stored form round-trips
    con = duckdb.connect()
    con.register("batch_rows", rows_to_arrow(ORDERS, batch))
    con.register("speed_rows", rows_to_arrow(ORDERS, speed))
    got = con.sql(merged_rows_sql(ORDERS, [("batch_rows", batch.snapshot), ("speed_rows", speed.snapshot)]))
    assert current_rows(got.to_arrow_table().sort_by("id")) == list(full.rows())
    con.close()


def test_an_empty_side_and_no_side():
    con = duckdb.connect()
    con.register("empty", rows_to_arrow(ORDERS, TableRows()))
    assert con.execute(merged_rows_sql(ORDERS, [("empty", -1)])).fetchall() == []
