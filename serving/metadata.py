"""What a connection read, as the ``lambdalake.*`` tables: ``status``, ``watermarks`` and ``views``.

- ``lambdalake.status`` (one row: versions read, freshness);
- ``lambdalake.watermarks`` (per topic-partition: batch watermark ``W``, speed position ``S``);
- ``lambdalake.views`` (per view: state ``current`` / ``rebuilding`` / ``stale``, served and declared definition
  fingerprints, the pieces read, rows on each side).

Built for the pair a connection (:mod:`serving.connection`) or the catalog file (:mod:`serving.catalog`) serves.
"""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb
import pyarrow as pa

from lambdalake.config import Settings
from lambdalake.pipeline import Pipeline
from lambdalake.viewsql import FN, ident, speed_visible_predicate
from serving.plans import CURRENT, REBUILDING, STALE, ViewPlan
from serving.published import PublishedPair

VIEW_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("name", pa.string()), ("source", pa.string()), ("topic", pa.string()), ("state", pa.string()),
    ("served_fingerprint", pa.string()), ("declared_fingerprint", pa.string()),
    ("batch_version", pa.string()), ("batch_rows", pa.int64()), ("speed_snapshot", pa.string()),
    ("speed_rows", pa.int64()), ("speed_rows_visible", pa.int64()), ("complete", pa.bool_()), ("note", pa.string()),
)


def view_row(con: duckdb.DuckDBPyConnection, pipeline: Pipeline, plan: ViewPlan, batch_rows: int | None,
             speed: str, absent: frozenset[str] = frozenset()) -> tuple:
    """One row of ``lambdalake.views`` (columns :data:`VIEW_COLUMNS`)."""
    view, pair = plan.view, plan.pair
    topic = pipeline.source_of(view).topic
    speed_rows = visible = None
    note = plan.message
    if pair is not None:
        watermark = pair.topic_watermark(topic)
        speed_rows, visible = con.execute(
            f"SELECT count(*), count(*) FILTER (WHERE {speed_visible_predicate(watermark)}) FROM {speed}").fetchone()
        if plan.state == CURRENT and pair.nothing_published:
            note = "nothing published yet"
        if absent:
            note = f"{note}; NULL: {', '.join(sorted(absent))} (not stored by that definition)"
    batch_version, speed_snapshot = plan.served_pieces
    return (view.name, view.source, topic, plan.state, plan.served, plan.defs.declared, batch_version, batch_rows,
            speed_snapshot, speed_rows, visible, plan.state == CURRENT, note)


def _utc(moment: datetime | float | None) -> datetime | None:
    if moment is None or isinstance(moment, datetime):
        return moment
    return datetime.fromtimestamp(float(moment), tz=UTC)


def install_metadata(con: duckdb.DuckDBPyConnection, pipeline: Pipeline, settings: Settings, pair: PublishedPair,
                      view_rows: list[tuple], catalog: str | None = None) -> None:
    """``lambdalake.status`` / ``lambdalake.watermarks`` / ``lambdalake.views`` (see :func:`metadata_tables`)."""
    db = f"{ident(catalog)}." if catalog else ""
    for name, table in metadata_tables(pipeline, settings, pair, view_rows).items():
        reg = f"_meta_{name}"
        con.register(reg, table)
        try:
            con.execute(f"CREATE OR REPLACE TABLE {db}_lake.{ident(name)} AS SELECT * FROM {ident(reg)}")
        finally:
            con.unregister(reg)
    con.execute(STATUS_VIEW.format(db=db, fn=FN))
    con.execute(f"CREATE OR REPLACE VIEW {db}lambdalake.watermarks AS SELECT * FROM {db}_lake.watermarks")
    con.execute(f"CREATE OR REPLACE VIEW {db}lambdalake.views AS SELECT * FROM {db}_lake.views")


STATUS_VIEW = (
    "CREATE OR REPLACE VIEW {db}lambdalake.status AS SELECT *, "
    "{fn}round({fn}epoch({fn}now()) - {fn}epoch(speed_created_at), 3) AS speed_age_seconds, "
    "{fn}round({fn}epoch({fn}now()) - {fn}epoch(batch_created_at), 3) AS batch_age_seconds FROM {db}_lake.status"
)


def metadata_tables(pipeline: Pipeline, settings: Settings, pair: PublishedPair,
                    view_rows: list[tuple]) -> dict[str, pa.Table]:
    """The metadata of a pair as Arrow tables (also written into the catalog file)."""
    manifest, snapshot = pair.manifest, pair.snapshot
    ts = pa.timestamp("us", tz="UTC")
    status = pa.table({
        "pipeline": [pipeline.name],
        "home": [str(settings.home)],
        "batch_version": pa.array([pair.batch_version], pa.string()),
        "batch_created_at": pa.array([None if manifest is None else manifest.published_time], ts),
        "speed_snapshot": pa.array([pair.speed_snapshot], pa.string()),
        "speed_created_at": pa.array([None if snapshot is None else snapshot.created_time], ts),
        "handoff_block": pa.array([pair.block or (None if manifest is None else manifest.block)], pa.int64()),
        "resolved_at": pa.array([_utc(pair.resolved_at)], ts),
        "nothing_published": [pair.nothing_published],
        "views_rebuilding": pa.array([sum(1 for r in view_rows if r[3] == REBUILDING)], pa.int64()),
        "views_stale": pa.array([sum(1 for r in view_rows if r[3] == STALE)], pa.int64()),
    })
    w, s, pruned = pair.watermark, pair.positions, pair.pruned_to
    keys = sorted(set(w) | set(s) | set(pruned))
    watermarks = pa.table({
        "topic": pa.array([t for t, _ in keys], pa.string()),
        "partition": pa.array([p for _, p in keys], pa.int32()),
        "batch_watermark": pa.array([w.get(k) for k in keys], pa.int64()),
        "speed_position": pa.array([s.get(k) for k in keys], pa.int64()),
        "speed_pruned_to": pa.array([pruned.get(k) for k in keys], pa.int64()),
        "speed_offsets_beyond_batch": pa.array(
            [max(0, s[k] - w.get(k, 0)) if k in s else None for k in keys], pa.int64()),
    })
    views = pa.table({name: pa.array([r[i] for r in view_rows], typ) for i, (name, typ) in enumerate(VIEW_COLUMNS)})
    return {"status": status, "watermarks": watermarks, "views": views}
