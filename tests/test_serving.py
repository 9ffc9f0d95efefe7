"""Serving layer: merge on query, exactness at the watermark, metadata, refresh and safety.

The tests build a synthetic lake the way the publishers do (files per the contracts of ``lambdalake.layout``,
manifests and snapshot metas through the classes of ``lambdalake.contracts``):
a list of events with (topic, partition, offset) is split at each partition's watermark ``W`` into a batch version
(events ``< W``) and a speed snapshot (events in ``[pruned_to, S)`` aggregated per handoff block, where blocks below
``W`` that the speed layer has not pruned yet are present too). The expected answer is computed straight from the
events in pure Python (no engine code, no SQL), so a merge that double counts or drops a block fails.
No Kafka is needed: serving never talks to it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lambdalake.aggregates import Aggregate, Mean, count, max_, mean, min_, sum_
from lambdalake.config import load_settings
from lambdalake.contracts import (
    MANIFEST_FORMAT,
    SNAPSHOT_FORMAT,
    BatchManifest,
    BatchPointer,
    BatchView,
    Positions,
    SpeedPointer,
    SpeedSnapshotMeta,
    SpeedView,
    utc_now_iso,
)
from lambdalake.exceptions import InvariantViolation, LambdalakeError
from lambdalake.fields import Field, Source
from lambdalake.handoff import speed_row_visible
from lambdalake.heads import master_files
from lambdalake.layout import Layout, read_batch_manifest, write_contract, write_pointer
from lambdalake.pipeline import Pipeline, View
from lambdalake.schema import arrow_schema, speed_view_columns, view_columns
from lambdalake.viewsql import speed_visible_predicate
from serving.connection import connect, pair_of, refresh
from tests.oracle import distinct_estimate, distinct_sketch

BLOCK = 10
T0 = datetime(2026, 1, 5, tzinfo=UTC)
ARROW = {"string": pa.string(), "integer": pa.int64(), "timestamp": pa.timestamp("us", tz="UTC")}


# --- an event model and publishers written for the tests (independent of batch/ and speed/) ------------------------
@dataclass(frozen=True)
class Event:
    topic: str
    partition: int
    offset: int
    fields: dict


def bucket_start(ts: datetime, bucket: timedelta) -> datetime:
    secs = int(bucket.total_seconds())
    epoch = int(ts.timestamp())
    return datetime.fromtimestamp(epoch - epoch % secs, tz=UTC)


def make_events(pipeline: Pipeline, n: int, partitions: int = 3, seed: int = 7) -> list[Event]:
    """Events of every source with per-partition offsets; late events (older buckets at newer offsets) included."""
    rng = random.Random(seed)
    out: list[Event] = []
    next_offset: dict[tuple[str, int], int] = defaultdict(int)
    for i in range(n):
        src = pipeline.sources[i % len(pipeline.sources)]
        p = rng.randrange(partitions)
        off = next_offset[(src.topic, p)]
        next_offset[(src.topic, p)] += 1
        minutes = i * 7 + (-rng.randrange(600) if rng.random() < 0.1 else 0)  # some late events
        doc: dict = {}
        for f in src.fields:
            if f.name == src.event_time:
                doc[f.name] = T0 + timedelta(minutes=max(0, minutes))
            elif f.name == src.event_id:
                doc[f.name] = f"e{i}"
            elif f.type == "integer":
                doc[f.name] = rng.randrange(f.minimum or 0, min(f.maximum or 10_000, 10_000) + 1)
            elif f.pattern == r"^[A-Z]{3}$":
                doc[f.name] = rng.choice(["EUR", "USD"])
            elif f.pattern == r"^[A-Z]{2}$":
                doc[f.name] = rng.choice(["FR", "DE", "US"])
            elif f.nullable and rng.random() < 0.3:
                doc[f.name] = None
            else:
                doc[f.name] = f"{f.name}-{rng.randrange(4)}"
        out.append(Event(src.topic, p, off, doc))
    return out


def _stored_value(a: Aggregate, evs: list[Event]):
    if a.kind == "count":
        return len(evs)
    vals = [e.fields[a.column] for e in evs if e.fields[a.column] is not None]
    if a.kind == "approx_distinct":
        return distinct_sketch(vals, a.lg_k)
    if a.kind == "sum":
        return sum(vals)
    if not vals:
        return None
    return min(vals) if a.kind == "min" else max(vals)


def stored_rows(pipeline: Pipeline, view: View, events: list[Event], extra=lambda e: ()) -> list[dict]:
    """Partial aggregates as a publisher stores them: one row per (extra..., keys, window_start)."""
    src = pipeline.source_of(view)
    groups: dict[tuple, list[Event]] = defaultdict(list)
    for e in events:
        if e.topic != src.topic:
            continue
        key = (*extra(e), *(e.fields[k] for k in view.keys),
               bucket_start(e.fields[src.event_time], view.bucket))
        groups[key].append(e)
    rows = []
    n_extra = len(extra(events[0])) if events else 0
    for key, evs in groups.items():
        row = dict(zip([*(["_partition", "_block_start"][:n_extra]), *view.keys, "window_start"], key, strict=True))
        row.update({a.name: _stored_value(a, evs) for a in view.stored_aggregates})
        rows.append(row)
    return rows


def expected_view(pipeline: Pipeline, view: View, events: list[Event]) -> set[tuple]:
    """The view computed directly over the events (declared aggregates only, means = sum / count)."""
    src = pipeline.source_of(view)
    groups: dict[tuple, list[Event]] = defaultdict(list)
    for e in events:
        if e.topic == src.topic:
            groups[(*(e.fields[k] for k in view.keys), bucket_start(e.fields[src.event_time], view.bucket))].append(e)
    out = set()
    for key, evs in groups.items():
        vals = []
        for a in view.aggregates:
            if isinstance(a, Mean):
                vals.append(round(sum(e.fields[a.column] or 0 for e in evs) / len(evs), 9))
            elif a.kind == "approx_distinct":
                vals.append(distinct_estimate([e.fields[a.column] for e in evs], a.lg_k))
            else:
                vals.append(_stored_value(a, evs))
        out.add((*key, *vals))
    return out


def _schema(pipeline: Pipeline, view: View, speed: bool) -> pa.Schema:
    cols = (speed_view_columns if speed else view_columns)(pipeline.source_of(view), view)
    return arrow_schema(cols, nullability=False)


def publish_batch(home: Path, pipeline: Pipeline, version: str, events: list[Event], watermark: dict,
                  block: int = BLOCK, files_per_view: int = 2, point: bool = True,
                  fingerprints: dict[str, str] | None = None, manifest_format: int = MANIFEST_FORMAT,
                  published_at: str | None = None) -> BatchManifest:
    """A batch version: events with offset < W[topic][p] per view, and its BatchManifest (watermark, block,
    row_counts, per-view fingerprints — the declared ones unless ``fingerprints`` says otherwise)."""
    layout = Layout(home)
    vdir = layout.batch_version(version)
    covered = [e for e in events if e.offset < watermark.get(e.topic, {}).get(e.partition, 0)]
    counts, views = {}, {}
    for view in pipeline.views:
        rows = stored_rows(pipeline, view, covered)
        counts[view.name] = len(rows)
        (vdir / view.name).mkdir(parents=True, exist_ok=True)
        for i in range(files_per_view):
            part = rows[i::files_per_view]
            pq.write_table(pa.Table.from_pylist(part, schema=_schema(pipeline, view, False)),
                           vdir / view.name / f"part-{i:05d}.parquet")
        (vdir / view.name / "_SUCCESS").write_text("")
        fp = (fingerprints or {}).get(view.name) or pipeline.fingerprint(view)
        views[view.name] = BatchView(fp, files=[f"part-{i:05d}.parquet" for i in range(files_per_view)],
                                     computed_in=version)
    manifest = BatchManifest(version=version, pipeline=pipeline.name, watermark=Positions.of_topics(watermark),
                             block=block, row_counts=counts, views=views, engine="test", format=manifest_format,
                             finished_at=utc_now_iso(),
                             published_at=published_at if manifest_format >= 2 else None)
    write_contract(vdir / "manifest.json", manifest)
    if point:
        write_pointer(layout.batch_pointer, BatchPointer(version))
    return manifest


def publish_speed(home: Path, pipeline: Pipeline, snapshot: str, events: list[Event], positions: dict,
                  pruned_to: dict | None = None, block: int = BLOCK, point: bool = True,
                  created_at: float | None = None, views: dict[str, SpeedView] | None = None,
                  snapshot_format: int = SNAPSHOT_FORMAT) -> SpeedSnapshotMeta:
    """A speed snapshot: events in [pruned_to, S) aggregated per (partition, block), and its SpeedSnapshotMeta
    (per view: the declared fingerprint unless ``views`` says otherwise; none at all for format 1)."""
    layout = Layout(home)
    sdir = layout.speed_snapshot(snapshot)
    sdir.mkdir(parents=True, exist_ok=True)
    pruned_to = pruned_to or {}

    def held(e: Event) -> bool:
        return pruned_to.get(e.topic, {}).get(e.partition, 0) <= e.offset < positions.get(e.topic, {}).get(
            e.partition, 0)

    part = [e for e in events if held(e)]
    rows = {}
    for view in pipeline.views:
        table = pa.Table.from_pylist(stored_rows(pipeline, view, part, extra=lambda e: (e.partition,
                                                                                          e.offset - e.offset % block)),
                                     schema=_schema(pipeline, view, True))
        pq.write_table(table, sdir / f"{view.name}.parquet")
        rows[view.name] = table.num_rows
    if snapshot_format < 2:
        views = {}
    elif views is None:
        views = {v.name: SpeedView(pipeline.fingerprint(v), rows=rows[v.name]) for v in pipeline.views}
    created = created_at if created_at is not None else datetime.now(UTC).timestamp()
    meta = SpeedSnapshotMeta(snapshot=snapshot, pipeline=pipeline.name, positions=Positions.of_topics(positions),
                             pruned_to=Positions.of_topics(pruned_to), block=block,
                             created_at=datetime.fromtimestamp(created, UTC).isoformat().replace("+00:00", "Z"),
                             created_at_unix=created, rows=rows, views=views, format=snapshot_format)
    write_contract(sdir / "snapshot.json", meta)
    if point:
        write_pointer(layout.speed_pointer, SpeedPointer(snapshot))
    return meta


def ends(events: list[Event]) -> dict[str, dict[int, int]]:
    out: dict[str, dict[int, int]] = defaultdict(dict)
    for e in events:
        out[e.topic][e.partition] = max(out[e.topic].get(e.partition, 0), e.offset + 1)
    return out


def query_view(con: duckdb.DuckDBPyConnection, view: View) -> set[tuple]:
    cols = [f'"{c}"' for c in view.output_columns]
    means = {a.name for a in view.aggregates if isinstance(a, Mean)}
    sel = ", ".join(f"round({c}, 9)" if c.strip('"') in means else c for c in cols)
    rows = con.sql(f'SELECT {sel} FROM "{view.name}"').to_arrow_table().to_pylist()
    return {tuple(r.values()) for r in rows}


@pytest.fixture
def serving_settings(home):
    """Settings for a lake without any Kafka (the bootstrap is never contacted by serving)."""
    return load_settings(home=home, pipeline="lambdalake.pipelines.clickstream")


def split_lake(home: Path, pipeline: Pipeline, events: list[Event], w_blocks: dict[int, int],
               pruned_blocks: dict[int, int] | None = None, version: str = "v000001", snapshot: str = "000000000001"):
    """Publish a batch version with W[p] = w_blocks[p] * BLOCK and a snapshot holding [pruned, S) of every topic."""
    end = ends(events)
    watermark = {t: {p: min(w_blocks.get(p, 0) * BLOCK, n - n % BLOCK) for p, n in ps.items()} for t, ps in end.items()}
    pruned = {t: {p: (pruned_blocks or {}).get(p, 0) * BLOCK for p in ps} for t, ps in end.items()}
    pruned = {t: {p: min(v, watermark[t][p]) for p, v in ps.items()} for t, ps in pruned.items()}
    publish_batch(home, pipeline, version, events, watermark)
    publish_speed(home, pipeline, snapshot, events, {t: dict(ps) for t, ps in end.items()}, pruned_to=pruned)
    return watermark


# --- merge on query -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("materialize", [True, False])
def test_merged_views_equal_direct_aggregation(home, serving_settings, clickstream, materialize):
    """Rows only in batch, only in speed, in both; unpruned speed blocks below W are excluded; min/max/mean right."""
    events = make_events(clickstream, 900)
    # partition 0: W = 3 blocks, speed not pruned at all (blocks 0..2 are in BOTH files: must count once)
    # partition 1: W = 5 blocks, speed pruned to 2 blocks; partition 2: no batch coverage (W = 0)
    watermark = split_lake(home, clickstream, events, {0: 3, 1: 5, 2: 0}, pruned_blocks={1: 2})
    assert any(w for ps in watermark.values() for w in ps.values())
    con = connect(serving_settings, clickstream, materialize=materialize)
    for view in clickstream.views:
        got = query_view(con, view)
        want = expected_view(clickstream, view, events)
        assert got == want, view.name
        cols = [d[0] for d in con.execute(f'SELECT * FROM "{view.name}" LIMIT 0').description]
        assert tuple(cols) == view.output_columns
    # Both sides really contributed (the test is not trivially all-batch or all-speed).
    sides = con.execute("SELECT name, batch_rows, speed_rows, speed_rows_visible FROM lambdalake.views").fetchall()
    for _, batch_rows, speed_rows, visible in sides:
        assert batch_rows > 0 and speed_rows > visible > 0


def test_unpruned_speed_rows_below_watermark_would_double_count(home, serving_settings, clickstream):
    """Sanity of the test model: without the W filter the same files give larger counts (so the filter matters)."""
    events = make_events(clickstream, 600)
    split_lake(home, clickstream, events, {0: 4, 1: 4, 2: 4})
    con = connect(serving_settings, clickstream)
    merged = con.execute('SELECT sum("views") FROM pageviews_hourly').fetchone()[0]
    naive = con.execute('SELECT (SELECT sum("views") FROM _lake.batch_pageviews_hourly) + '
                    '(SELECT sum("views") FROM _lake.speed_pageviews_hourly)').fetchone()[0]
    true_count = sum(1 for e in events if e.topic == clickstream.source("pageviews").topic)
    assert merged == true_count < naive


def test_speed_only_and_batch_only(home, serving_settings, clickstream):
    events = make_events(clickstream, 400)
    end = ends(events)
    publish_speed(home, clickstream, "000000000001", events, {t: dict(ps) for t, ps in end.items()})
    con = connect(serving_settings, clickstream)
    for view in clickstream.views:
        assert query_view(con, view) == expected_view(clickstream, view, events)
    # now only a batch version covering whole blocks (no speed snapshot at all)
    home2 = home.parent / "lake2"
    home2.mkdir()
    wm = {t: {p: n - n % BLOCK for p, n in ps.items()} for t, ps in end.items()}
    publish_batch(home2, clickstream, "v000001", events, wm)
    con2 = connect(serving_settings.with_(home=home2), clickstream)
    covered = [e for e in events if e.offset < wm[e.topic][e.partition]]
    for view in clickstream.views:
        assert query_view(con2, view) == expected_view(clickstream, view, covered)


def test_sql_predicate_matches_handoff_rule():
    """The generated SQL filter and lambdalake.handoff.speed_row_visible agree on every (partition, block)."""
    watermark = {0: 30, 2: 10}
    con = duckdb.connect()
    for p in range(4):
        for b in range(0, 60, 10):
            sql = f"SELECT {speed_visible_predicate(watermark)} FROM (SELECT {p} AS _partition, {b} AS _block_start)"
            assert con.execute(sql).fetchone()[0] == speed_row_visible(b, watermark.get(p, 0))


def test_watermark_not_multiple_of_block_raises(home, serving_settings, clickstream):
    events = make_events(clickstream, 300)
    end = ends(events)
    bad = {t: {p: 15 for p in ps} for t, ps in end.items()}  # block is 10
    publish_batch(home, clickstream, "v000001", events, bad)
    publish_speed(home, clickstream, "000000000001", events, {t: dict(ps) for t, ps in end.items()})
    with pytest.raises(InvariantViolation, match="not multiples of the speed snapshot's block 10"):
        connect(serving_settings, clickstream)


def test_block_size_mismatch_raises(home, serving_settings, clickstream):
    events = make_events(clickstream, 300)
    end = ends(events)
    publish_batch(home, clickstream, "v000001", events, {t: {p: 20 for p in ps} for t, ps in end.items()}, block=20)
    publish_speed(home, clickstream, "000000000001", events, {t: dict(ps) for t, ps in end.items()})
    with pytest.raises(InvariantViolation, match="same LAMBDALAKE_HANDOFF_BLOCK"):
        connect(serving_settings, clickstream)


def test_speed_pruned_past_watermark_raises(home, serving_settings, clickstream):
    """A snapshot pruned beyond the batch watermark would lose events: refuse instead of under-counting."""
    events = make_events(clickstream, 300)
    end = ends(events)
    publish_batch(home, clickstream, "v000001", events, {t: {p: 10 for p in ps} for t, ps in end.items()})
    publish_speed(home, clickstream, "000000000001", events, {t: dict(ps) for t, ps in end.items()},
                  pruned_to={t: {p: 20 for p in ps} for t, ps in end.items()})
    with pytest.raises(InvariantViolation, match="speed pruned to 20 > batch watermark 10"):
        connect(serving_settings, clickstream)


def test_manifest_row_count_mismatch_raises(home, serving_settings, clickstream):
    events = make_events(clickstream, 300)
    end = ends(events)
    publish_batch(home, clickstream, "v000001", events, {t: {p: 10 for p in ps} for t, ps in end.items()})
    vdir = Layout(home).batch_version("v000001") / "pageviews_hourly"
    next(iter(sorted(vdir.glob("*.parquet")))).unlink()
    with pytest.raises(InvariantViolation, match="manifest says"):
        connect(serving_settings, clickstream)


def test_speed_file_missing_columns_raises(home, serving_settings, clickstream):
    events = make_events(clickstream, 200)
    end = ends(events)
    publish_speed(home, clickstream, "000000000001", events, {t: dict(ps) for t, ps in end.items()})
    f = Layout(home).speed_snapshot("000000000001") / "revenue_daily.parquet"
    pq.write_table(pq.read_table(f).drop_columns(["_block_start"]), f)
    with pytest.raises(InvariantViolation, match="lacks columns"):
        connect(serving_settings, clickstream)


def test_empty_lake_has_every_table_with_the_right_schema(home, serving_settings, clickstream):
    con = connect(serving_settings, clickstream)
    for view in clickstream.views:
        assert con.execute(f'SELECT count(*) FROM "{view.name}"').fetchone()[0] == 0
        cols = [d[0] for d in con.execute(f'SELECT * FROM "{view.name}"').description]
        assert tuple(cols) == view.output_columns
    for src in clickstream.sources:
        cols = [d[0] for d in con.execute(f"SELECT * FROM master.{src.name}").description]
        assert cols == [f.name for f in src.fields] + ["_partition", "_offset", "_ingest_time"]
    status = con.execute("SELECT batch_version, speed_snapshot, nothing_published FROM lambdalake.status").fetchone()
    assert status == (None, None, True)
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE pageviews_hourly)").fetchall())
    assert types == {"url": "VARCHAR", "window_start": "TIMESTAMP WITH TIME ZONE", "views": "BIGINT",
                     "total_duration_ms": "BIGINT", "max_duration_ms": "BIGINT", "mean_duration_ms": "DOUBLE",
                     "unique_users": "BIGINT"}


def test_user_pipeline_declared_in_test_works_without_engine_change(home, tmp_path):
    """A second pipeline (own keys, min/max over strings, mean without a declared sum/count) just works."""
    signups = Source(name="signups", topic="shop.signups", key="user_id", event_id="event_id",
                     event_time="event_time",
                     fields=[Field.string("event_id"), Field.timestamp("event_time"), Field.string("user_id"),
                             Field.string("country", pattern=r"^[A-Z]{2}$"), Field.integer("age", minimum=0,
                                                                                            maximum=120)])
    pipe = Pipeline("shop", sources=[signups], views=[
        View("signups_by_country", source="signups", keys=["country"], bucket=timedelta(hours=6),
             aggregates=[mean("mean_age", "age"), min_("first_user", "user_id"), max_("oldest", "age")]),
        View("signups_total", source="signups", keys=[], bucket=timedelta(days=1),
             aggregates=[count("signups"), sum_("age_sum", "age")]),
    ])
    events = make_events(pipe, 500, partitions=2, seed=3)
    split_lake(home, pipe, events, {0: 7, 1: 2}, pruned_blocks={0: 3})
    settings = load_settings(home=home)
    con = connect(settings, pipe)
    for view in pipe.views:
        assert query_view(con, view) == expected_view(pipe, view, events), view.name
    assert [d[0] for d in con.execute("SELECT * FROM signups_by_country").description] == [
        "country", "window_start", "mean_age", "first_user", "oldest"]


def test_master_is_queryable(home, serving_settings, clickstream):
    src = clickstream.source("pageviews")
    schema = pa.schema([(f.name, ARROW[f.type]) for f in src.fields]
                       + [("_partition", pa.int32()), ("_offset", pa.int64()), ("_ingest_time", ARROW["timestamp"])])
    rows = [{"event_id": f"e{i}", "event_time": T0, "user_id": "u", "url": f"/{i % 3}", "referrer": None,
             "duration_ms": i, "_partition": 0, "_offset": i, "_ingest_time": T0} for i in range(10)]
    d = Layout(home).master_partition("pageviews", 0)
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:6], schema=schema), Layout(home).master_file("pageviews", 0, 0, 6))
    pq.write_table(pa.Table.from_pylist(rows[6:], schema=schema), Layout(home).master_file("pageviews", 0, 6, 10))
    (d / ".00000000000000000010-00000000000000000020.parquet.abcd.tmp").write_bytes(b"partial")
    con = connect(serving_settings, clickstream)
    got = con.execute("SELECT count(*), sum(duration_ms), max(_offset) FROM master.pageviews").fetchall()
    assert got == [(10, 45, 9)]
    assert con.execute("SELECT count(*) FROM master.purchases").fetchall() == [(0,)]


def test_connection_keeps_its_pair_until_refresh(home, serving_settings, clickstream):
    events = make_events(clickstream, 600)
    first = events[:300]
    end1 = ends(first)
    publish_speed(home, clickstream, "000000000001", first, {t: dict(ps) for t, ps in end1.items()})
    con = connect(serving_settings, clickstream)
    before = con.execute("SELECT sum(views) FROM pageviews_hourly").fetchone()[0]
    # a new batch version and a new speed snapshot (the old snapshot is pruned away entirely)
    split_lake(home, clickstream, events, {0: 5, 1: 5, 2: 5}, pruned_blocks={0: 5, 1: 5, 2: 5},
               version="v000002", snapshot="000000000002")
    import shutil

    shutil.rmtree(Layout(home).speed_snapshot("000000000001"))
    assert con.execute("SELECT sum(views) FROM pageviews_hourly").fetchone()[0] == before  # same pair, still readable
    assert pair_of(con).speed_snapshot == "000000000001"
    pair = refresh(con)
    assert (pair.batch_version, pair.speed_snapshot) == ("v000002", "000000000002")
    for view in clickstream.views:
        assert query_view(con, view) == expected_view(clickstream, view, events)


def test_materialized_connection_survives_batch_prune_lazy_one_does_not(home, serving_settings, clickstream):
    events = make_events(clickstream, 300)
    split_lake(home, clickstream, events, {0: 2, 1: 3, 2: 1})
    eager = connect(serving_settings, clickstream, materialize=True)
    lazy = connect(serving_settings, clickstream, materialize=False)
    import shutil

    shutil.rmtree(Layout(home).batch_version("v000001"))  # the batch layer pruned the version
    for view in clickstream.views:
        assert query_view(eager, view) == expected_view(clickstream, view, events)
    with pytest.raises(Exception, match="v000001"):
        lazy.execute("SELECT count(*) FROM pageviews_hourly").fetchall()


def test_metadata_tables(home, serving_settings, clickstream):
    events = make_events(clickstream, 300)
    wm = split_lake(home, clickstream, events, {0: 2, 1: 3, 2: 1})
    con = connect(serving_settings, clickstream)
    st = con.execute("SELECT batch_version, speed_snapshot, handoff_block, speed_age_seconds >= 0 "
                 "FROM lambdalake.status").fetchone()
    assert st == ("v000001", "000000000001", BLOCK, True)
    got = {(t, p): w for t, p, w in con.execute(
        "SELECT topic, partition, batch_watermark FROM lambdalake.watermarks").fetchall()}
    assert got == {(t, p): w for t, ps in wm.items() for p, w in ps.items()}
    positions = dict(((t, p), s) for t, p, s in con.execute(
        "SELECT topic, partition, speed_position FROM lambdalake.watermarks").fetchall())
    assert positions == {(t, p): n for t, ps in ends(events).items() for p, n in ps.items()}


def test_view_missing_from_batch_version_is_batch_pending(home, serving_settings, clickstream):
    """A view declared after the batch version was computed is refused (batch pending), the others answer."""
    events = make_events(clickstream, 300)
    split_lake(home, clickstream, events, {0: 2, 1: 2, 2: 2})
    layout = Layout(home)
    m = read_batch_manifest(layout, "v000001")
    del m.row_counts["user_activity_daily"], m.views["user_activity_daily"]
    write_contract(layout.batch_version("v000001") / "manifest.json", m)
    import shutil

    shutil.rmtree(layout.batch_version("v000001") / "user_activity_daily")
    con = connect(serving_settings, clickstream)
    flags = {r[0]: r[1:] for r in con.execute("SELECT name, complete, state FROM lambdalake.views").fetchall()}
    assert flags == {"pageviews_hourly": (True, "current"), "revenue_daily": (True, "current"),
                     "user_activity_daily": (False, "rebuilding")}
    with pytest.raises(duckdb.Error, match="view user_activity_daily is being rebuilt for its new definition: "
                                           "batch pending$"):
        con.execute("SELECT count(*) FROM user_activity_daily").fetchall()
    view = clickstream.view("pageviews_hourly")
    assert query_view(con, view) == expected_view(clickstream, view, events)


# --- safety -----------------------------------------------------------------------------------------------------------
@pytest.fixture
def safe_con(home, serving_settings, clickstream):
    events = make_events(clickstream, 200)
    split_lake(home, clickstream, events, {0: 2, 1: 2, 2: 2})
    return connect(serving_settings, clickstream)


@pytest.mark.parametrize("statement, refusal", [
    ("COPY (SELECT 1) TO '{out}/x.csv'", "disabled by configuration"),
    ("COPY pageviews_hourly TO '{lake}/views/batch/v000001/pageviews_hourly/part-00000.parquet' "
     "(FORMAT parquet, USE_TMP_FILE false)", "disabled by configuration"),
    ("EXPORT DATABASE '{out}/export'", "disabled by configuration"),
    ("ATTACH '{out}/other.duckdb' AS other", "disabled by configuration"),
    ("INSTALL httpfs", "disabled by configuration"),
    ("LOAD httpfs", "Loading external extensions is disabled"),
    ("SELECT * FROM read_csv('/etc/passwd')", "disabled by configuration"),
    ("SELECT * FROM read_text('{lake}/views/batch/CURRENT')", "disabled by configuration"),
    ("SELECT * FROM read_parquet('{lake}/views/batch/v000001/pageviews_hourly/part-00000.parquet')",
     "disabled by configuration"),
    ("SELECT * FROM 'https://example.com/data.parquet'", "disabled by configuration"),
    ("SET enable_external_access = true", "configuration has been locked"),
    ("SET allowed_directories = ['/']", "configuration has been locked"),
    ("SET autoinstall_known_extensions = true", "configuration has been locked"),
    ("SET temp_directory = '/tmp'", "configuration has been locked"),
])
def test_connection_refuses(safe_con, home, tmp_path, statement, refusal):
    sql = statement.format(out=tmp_path, lake=home)
    before = {p: p.stat().st_size for p in home.rglob("*") if p.is_file()}
    with pytest.raises(duckdb.Error, match=refusal):
        safe_con.execute(sql)
    assert {p: p.stat().st_size for p in home.rglob("*") if p.is_file()} == before  # nothing written in the lake
    assert not any(tmp_path.glob("x.csv")) and not (tmp_path / "export").exists()
    assert safe_con.execute("SELECT count(*) > 0 FROM pageviews_hourly").fetchone()[0]  # still serving


def test_connection_allows_any_select_and_display_settings(safe_con):
    assert safe_con.execute("WITH t AS (SELECT url, sum(views) v FROM pageviews_hourly GROUP BY url) "
                        "SELECT count(*) > 0 FROM t").fetchone()[0]
    safe_con.execute("SET TimeZone = 'Europe/Paris'")
    assert safe_con.execute("SELECT current_setting('TimeZone')").fetchone()[0] == "Europe/Paris"


def test_serving_connect_entry_point(home, clickstream):
    import serving

    events = make_events(clickstream, 200)
    split_lake(home, clickstream, events, {0: 1, 1: 2, 2: 3})
    con = serving.connect(home=home, pipeline="lambdalake.pipelines.clickstream")
    view = clickstream.view("pageviews_hourly")
    assert query_view(con, view) == expected_view(clickstream, view, events)


def test_errors_are_lambdalake_errors():
    from serving.exceptions import InconsistentPublishedState, QueryError

    assert issubclass(InconsistentPublishedState, InvariantViolation)
    assert issubclass(QueryError, LambdalakeError)


# --- a batch version published by the real batch job ---------------------------------------------------------------
def write_master(home: Path, pipeline: Pipeline, events: list[Event]) -> None:
    """The master dataset of ``events``: one file per (source, partition) covering its offsets [0, n)."""
    from lambdalake.schema import master_columns

    layout = Layout(home)
    for src in pipeline.sources:
        by_p: dict[int, list[Event]] = defaultdict(list)
        for e in events:
            if e.topic == src.topic:
                by_p[e.partition].append(e)
        for p, evs in by_p.items():
            evs.sort(key=lambda e: e.offset)
            rows = [{**e.fields, "_partition": p, "_offset": e.offset, "_ingest_time": T0} for e in evs]
            layout.master_partition(src.name, p).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(master_columns(src))),
                           layout.master_file(src.name, p, evs[0].offset, evs[-1].offset + 1))


@pytest.mark.slow
@pytest.mark.integration
def test_status_times_of_a_version_published_by_the_batch_job(home, serving_settings, clickstream, spark):
    """Issue 10: lambdalake.status.batch_created_at / batch_age_seconds come from the real manifest
    (``published_at``, set by batch publish), not from keys no manifest has."""
    from batch.job import run_batch

    events = make_events(clickstream, 600)
    write_master(home, clickstream, events)
    settings = serving_settings.with_(handoff_block=BLOCK)
    before = datetime.now(UTC)
    manifest = run_batch(settings, clickstream, spark=spark)
    assert isinstance(manifest, BatchManifest) and manifest.published_at
    con = connect(settings, clickstream)
    created, age, version = con.execute(
        "SELECT batch_created_at, batch_age_seconds, batch_version FROM lambdalake.status").fetchall()[0]
    assert version == manifest.version
    assert created is not None and before <= created <= datetime.now(UTC)
    assert created == manifest.published_time
    assert age is not None and age >= 0
    # and the version the job wrote answers exactly (no speed snapshot: batch only, whole blocks)
    covered = [e for e in events if e.offset < manifest.watermark.at(e.topic, e.partition)]
    for view in clickstream.views:
        assert query_view(con, view) == expected_view(clickstream, view, covered), view.name
    states = set(r[0] for r in con.execute("SELECT state FROM lambdalake.views").fetchall())
    assert states == {"current"}
    # issue 16: the job writes each view sorted by its keys then window_start, across its files (in name order)
    layout = Layout(home)
    for view in clickstream.views:
        files = sorted((layout.batch_version(manifest.version) / view.name).glob("*.parquet"))
        rows = [r for f in files for r in pq.read_table(f, columns=[*view.keys, "window_start"]).to_pylist()]
        order = [tuple((v is not None, v) for v in r.values()) for r in rows]  # Spark sorts NULLs first
        assert rows and order == sorted(order), view.name


def test_status_times_come_from_the_contracts(home, serving_settings, clickstream):
    """batch_created_at is the manifest's published_at (format 1: finished_at); speed_created_at the snapshot's."""
    events = make_events(clickstream, 300)
    end = ends(events)
    wm = {t: {p: 20 for p in ps} for t, ps in end.items()}
    published = "2026-03-01T10:00:00.250000Z"
    publish_batch(home, clickstream, "v000001", events, wm, published_at=published)
    meta = publish_speed(home, clickstream, "000000000001", events, {t: dict(ps) for t, ps in end.items()},
                         created_at=1_772_000_000.5)
    con = connect(serving_settings, clickstream)
    batch_at, speed_at, age = con.execute(
        "SELECT batch_created_at, speed_created_at, batch_age_seconds FROM lambdalake.status").fetchone()
    assert batch_at == datetime(2026, 3, 1, 10, 0, 0, 250000, tzinfo=UTC)
    assert speed_at == meta.created_time == datetime.fromtimestamp(1_772_000_000.5, UTC)
    assert age > 0
    # the catalog file carries the same metadata
    from serving.catalog import write_catalog

    path, _ = write_catalog(serving_settings, clickstream)
    cat = duckdb.connect(str(path), read_only=True)
    assert cat.execute("SELECT batch_created_at, speed_created_at, batch_age_seconds > 0, views_rebuilding "
                       "FROM lambdalake.status").fetchall() == [(batch_at, speed_at, True, 0)]
    assert cat.execute("SELECT name, state, served_fingerprint = declared_fingerprint FROM lambdalake.views "
                       "ORDER BY name").fetchall() == [(v.name, "current", True) for v in
                                                       sorted(clickstream.views, key=lambda v: v.name)]


def test_master_counts_once_during_an_interrupted_compaction(home, serving_settings, clickstream, monkeypatch):
    """Issue 10 item 3: a compaction killed between renaming its merged file into place and recording ``done``
    leaves the merged file AND the files it replaces on disk; master.<source> (connection and catalog file) reads
    each offset once (Layout.master_files)."""
    import os

    from batch.compact import compact
    from serving.catalog import write_catalog

    events = make_events(clickstream, 400, partitions=1)
    for chunk in (events[:150], events[150:]):  # two files per source, so a compaction has something to merge
        write_master(home, clickstream, chunk)
    layout = Layout(home)
    assert len(layout.master_files_on_disk("pageviews")) == 2
    real_replace = os.replace

    def crash_after_rename(src, dst, *a, **kw):
        real_replace(src, dst, *a, **kw)
        if str(dst).endswith(".parquet") and "/master/" in str(dst):
            raise KeyboardInterrupt("killed between rename and the done record")

    monkeypatch.setattr(os, "replace", crash_after_rename)
    with pytest.raises(KeyboardInterrupt):
        compact(home, clickstream, source="pageviews", target_rows=10_000)
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(layout.master_files_on_disk("pageviews")) == 3  # merged + both replaced files
    want = sum(1 for e in events if e.topic == clickstream.source("pageviews").topic)
    con = connect(serving_settings, clickstream)
    assert con.execute("SELECT count(*), count(DISTINCT _offset) FROM master.pageviews").fetchone() == (want, want)
    path, _ = write_catalog(serving_settings, clickstream)
    cat = duckdb.connect(str(path), read_only=True)
    assert cat.execute("SELECT count(*), count(DISTINCT _offset) FROM master.pageviews").fetchone() == (want, want)


# --- read-only, bounded, inside the lake (issue 14 items 2-4) -------------------------------------------------------
def _answers(con, clickstream) -> dict[str, set[tuple]]:
    return {v.name: query_view(con, v) for v in clickstream.views}


@pytest.mark.parametrize("statement", [
    "UPDATE _lake.watermarks SET batch_watermark = 0",
    "DELETE FROM _lake.watermarks",
    "INSERT INTO _lake.views SELECT * FROM _lake.views",
    "DROP TABLE _lake.watermarks",
    "DROP VIEW _lake.speed_pageviews_hourly",
    "CREATE OR REPLACE VIEW _lake.speed_pageviews_hourly AS SELECT * FROM _lake.speed_pageviews_hourly LIMIT 0",
    "DROP VIEW pageviews_hourly",
    "DROP VIEW _lake.batch_pageviews_hourly",
    "CREATE OR REPLACE VIEW pageviews_hourly AS SELECT 1 AS views",
    "CREATE OR REPLACE VIEW _lake.batch_pageviews_hourly AS SELECT * FROM _lake.batch_pageviews_hourly LIMIT 0",
    "ALTER VIEW pageviews_hourly RENAME TO gone",
    "CREATE TABLE mine AS SELECT 1 AS x",
    "DROP SCHEMA master CASCADE",
    "UPDATE _lake.status SET batch_version = 'v999999'",
    "USE memory",
])
def test_internal_relations_cannot_be_changed(safe_con, clickstream, statement):
    """Issue 14 item 2: user SQL cannot write, drop or replace anything the connection serves."""
    before = _answers(safe_con, clickstream)
    with pytest.raises(duckdb.Error, match="read-only mode|named \"memory\" found"):
        safe_con.execute(statement)
    assert _answers(safe_con, clickstream) == before


@pytest.mark.parametrize("side", ["batch", "speed"])
def test_a_replaced_registration_fails_the_query_instead_of_answering(safe_con, clickstream, side):
    """Both sides are Arrow registrations (temp views, the one part of the temp catalog that is ours): a user who
    drops and replaces one gets an error, never an answer from their relation."""
    reg = safe_con.execute("SELECT view_name FROM duckdb_views() WHERE database_name = 'temp' "
                           f"AND view_name LIKE '%{side}_pageviews_hourly'").fetchone()[0]
    safe_con.execute(f'CREATE TEMP TABLE copy AS SELECT * FROM "{reg}"')
    safe_con.execute(f'DROP VIEW "{reg}"')
    safe_con.execute(f'CREATE TEMP VIEW "{reg}" AS SELECT * FROM copy')
    with pytest.raises(duckdb.Error, match="dropped or replaced"):
        safe_con.execute("SELECT sum(views) FROM pageviews_hourly").fetchall()


def test_own_temp_objects_work_and_cannot_change_the_views(safe_con, clickstream):
    before = _answers(safe_con, clickstream)
    safe_con.execute("CREATE TEMP TABLE mine AS SELECT url, sum(views) AS v FROM pageviews_hourly GROUP BY url")
    assert safe_con.execute("SELECT count(*) FROM mine").fetchone()[0] > 0
    safe_con.execute("CREATE TEMP MACRO sum(x) AS 42")  # shadows the function for the user's own SQL only
    safe_con.execute("CREATE TEMP MACRO max(x) AS 42")
    assert _answers(safe_con, clickstream) == before


def test_refresh_keeps_the_connection_read_only(home, serving_settings, clickstream):
    events = make_events(clickstream, 200)
    split_lake(home, clickstream, events, {0: 1, 1: 1, 2: 1})
    con = connect(serving_settings, clickstream)
    con.execute("CREATE TEMP TABLE mine AS SELECT 1 AS x")
    refresh(con)
    assert con.execute("SELECT x FROM mine").fetchall() == [(1,)]  # the user's temp objects survive
    with pytest.raises(duckdb.Error, match="read-only mode"):
        con.execute("UPDATE _lake.watermarks SET batch_watermark = 0")
    assert query_view(con, clickstream.view("pageviews_hourly")) == \
        expected_view(clickstream, clickstream.view("pageviews_hourly"), events)


@pytest.mark.parametrize("statement", ["SET memory_limit = '10TB'", "SET threads = 1000", "RESET memory_limit",
                                       "SET enable_progress_bar = false"])
def test_limits_cannot_be_changed_from_sql(home, serving_settings, clickstream, statement):
    con = connect(serving_settings, clickstream, memory_limit="512MB", threads=1)
    with pytest.raises(duckdb.Error, match="configuration has been locked"):
        con.execute(statement)
    assert con.execute("SELECT current_setting('threads'), current_setting('memory_limit')").fetchone() == \
        (1, "488.2 MiB")


def test_statement_timeout_interrupts_and_the_connection_stays_usable(home, serving_settings, clickstream):
    import time

    con = connect(serving_settings, clickstream, timeout=0.3)
    t = time.monotonic()
    with pytest.raises(duckdb.InterruptException):
        con.execute("SELECT count(*) FROM range(1000000) a, range(1000000) b WHERE a.range + b.range = 7").fetchall()
    assert time.monotonic() - t < 30
    for _ in range(20):  # back-to-back short statements are not mistaken for one long one
        assert con.execute("SELECT count(*) FROM pageviews_hourly").fetchone()[0] == 0


def test_bad_limits_are_config_errors(serving_settings, clickstream):
    from lambdalake.exceptions import ConfigError

    for kwargs in ({"timeout": 0}, {"threads": 0}, {"memory_limit": "lots"}):
        with pytest.raises(ConfigError):
            connect(serving_settings, clickstream, **kwargs)


@pytest.mark.parametrize("target", ["master", "batch_file", "batch_pointer", "batch_version", "speed_file",
                                    "speed_pointer"])
def test_a_lake_file_resolving_outside_the_lake_is_refused(home, serving_settings, clickstream, tmp_path, target):
    """Issue 14 item 4: a symlink inside the lake pointing outside it is never followed; the error names it."""
    import shutil

    events = make_events(clickstream, 200)
    split_lake(home, clickstream, events, {0: 1, 1: 1, 2: 1})
    write_master(home, clickstream, events)
    layout = Layout(home)
    outside = tmp_path / "outside"
    outside.mkdir()
    link = {
        "master": master_files(layout, "pageviews")[0].path,
        "batch_file": next((layout.batch_version("v000001") / "pageviews_hourly").glob("*.parquet")),
        "batch_pointer": layout.batch_pointer,
        "batch_version": layout.batch_version("v000001"),
        "speed_file": layout.speed_snapshot("000000000001") / "pageviews_hourly.parquet",
        "speed_pointer": layout.speed_pointer,
    }[target]
    moved = outside / link.name
    shutil.move(link, moved)  # the very same content, only now outside the lake
    link.symlink_to(moved, target_is_directory=moved.is_dir())
    with pytest.raises(InvariantViolation, match=f"{link}.*outside the lake"):
        connect(serving_settings, clickstream)
