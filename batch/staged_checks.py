"""The checks of a view's staged output before anything is published (step 4 of the run protocol,
:mod:`batch.job`): schema as declared, no null in non-nullable keys, one row per (keys, window_start), and the count
aggregate sums to the deduplicated events of its source."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.exceptions import StagedCheckFailed
from lambdalake.pipeline import WINDOW_START, Pipeline, View
from lambdalake.schema import arrow_schema, view_columns


def expected_schema(pipeline: Pipeline, view: View) -> pa.Schema:
    """Arrow schema of a batch view as declared (the layout contract; Spark writes every column nullable)."""
    return arrow_schema(view_columns(pipeline.source_of(view), view), nullability=False)


def check_staged(pipeline: Pipeline, view: View, files: Path | Mapping[str, pq.ParquetFile],
                 events: int | None) -> int:
    """Step 4 for one view: schema, null keys, row counts (the count aggregate sums to the deduplicated events
    read — at most that many for a filtered view, which may also be empty; a non-empty input yields rows), and no
    duplicate (keys, window_start). ``files``: the staged files by name (opened on the lake's store), or a local
    directory holding them. Returns the row count."""
    if isinstance(files, Path):
        files = {f.name: pq.ParquetFile(f) for f in sorted(files.glob("*.parquet"))}
    want = expected_schema(pipeline, view)
    rows = 0
    nullable_keys = {f.name for f in pipeline.source_of(view).fields if not f.required or f.nullable}
    count_col = next((a.name for a in view.stored_aggregates if a.kind == "count"), None)
    counted = 0
    group_cols = [*view.keys, WINDOW_START]
    groups: list[pa.Table] = []
    for name, pf in sorted(files.items()):
        got = pf.schema_arrow
        if [(x.name, x.type) for x in got] != [(x.name, x.type) for x in want]:
            raise StagedCheckFailed(f"view {view.name!r}: staged file {name} has schema "
                                       f"{[(x.name, str(x.type)) for x in got]}, declared "
                                       f"{[(x.name, str(x.type)) for x in want]}; nothing was published")
        rows += pf.metadata.num_rows
        strict_keys = [k for k in group_cols if k not in nullable_keys]
        table = pf.read(columns=group_cols + ([count_col] if count_col else []))
        groups.append(table.select(group_cols))
        for k in strict_keys:
            if table.column(k).null_count:
                raise StagedCheckFailed(f"view {view.name!r}: {table.column(k).null_count} null values in key "
                                           f"{k!r} ({name}); nothing was published")
        if count_col:
            counted += pc.sum(table.column(count_col)).as_py() or 0
    if groups and pa.concat_tables(groups).group_by(group_cols).aggregate([]).num_rows != rows:
        raise StagedCheckFailed(f"view {view.name!r}: some (keys, window_start) appear in more than one row; "
                                   "nothing was published")
    filtered = view.where is not None
    if events and not rows and not filtered:
        raise StagedCheckFailed(f"view {view.name!r}: {events} events were read but no rows were written; "
                                   "nothing was published")
    if count_col and events is not None and (counted > events if filtered else counted != events):
        raise StagedCheckFailed(f"view {view.name!r}: counts sum to {counted} but {events} deduplicated events "
                                   "were read; nothing was published")
    return rows
