"""Incremental batch runs (issue 17 items 2-3): a version built from the published one plus the events archived since
equals a full recompute, view by view and row by row; and the run falls back to a full recompute whenever the
published version cannot be extended exactly.

The lake is built by the product's own writers (``batch.master.master_table`` + ``write_parquet_atomic`` over the
demo stream as ``lambdalake.validation.Validator`` judges it), appended to in random steps that cut through files,
with late events, duplicates (also of events archived several appends before) and malformed messages. Each
incremental version is compared with the independent DuckDB interpretation of the declaration over all master
(``lambdalake/viewsql.py``'s SQL, not the Spark job) and verified by ``verify_published``; the last one is compared
row by row with a ``--full`` Spark recompute of the same watermark. Runs on the session Spark; no broker.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.incremental import incremental_base
from batch.inputs import select_inputs
from batch.job import run_batch
from batch.master import master_table, write_parquet_atomic
from batch.verify import verify_published
from lambdalake.config import load_settings
from lambdalake.erasure import new_request, request_path, write_request
from lambdalake.heads import master_files
from lambdalake.layout import Layout, current_batch_manifest
from lambdalake.pipeline import Pipeline, load_pipeline
from lambdalake.validation import Validator
from lambdalake.validsql import valid_predicate
from lambdalake.viewsql import master_events_sql, view_sql
from wiring.demo_stream import demo_messages
from wiring.produce import Message

pytestmark = pytest.mark.integration

PIPELINE = "lambdalake.pipelines.clickstream"
PARTITIONS = 2
BLOCK = 7  # watermarks fall inside files: a file straddling the published W is read again from W on


class Lake:
    """A master dataset grown by appends, each partition's log cut at random offsets."""

    def __init__(self, home: Path, pipeline: Pipeline, events: int, seed: int):
        self.home, self.pipeline, self.layout = home, pipeline, Layout(home)
        self.rng = random.Random(seed)
        msgs = list(demo_messages(pipeline, events, late_fraction=0.25, duplicate_fraction=0.08,
                                  malformed_fraction=0.03, seed=seed))
        by_topic = {s.topic: s for s in pipeline.sources}
        self.logs: dict[tuple[str, int], list[Message]] = {}
        for m in msgs:
            p = zlib.crc32(m.key or b"") % PARTITIONS  # the subject's partition, as Kafka's keyed producer does
            self.logs.setdefault((by_topic[m.topic].name, p), []).append(m)
        # duplicates of events archived long before (re-sent after several appends): counted once, at the first
        for log in self.logs.values():
            early = [m for m in log[: len(log) // 3] if m.kind == "valid"]
            log += self.rng.sample(early, min(3, len(early)))
        self.end = {k: 0 for k in self.logs}
        self.validators = {s.name: Validator(s) for s in pipeline.sources}

    def append(self, fraction: float) -> None:
        """Archive the next ``fraction`` of every partition's log (in one or two files per partition)."""
        for (src, p), log in self.logs.items():
            start = self.end[(src, p)]
            stop = min(len(log), start + max(1, round(len(log) * fraction * self.rng.uniform(0.6, 1.4))))
            if fraction >= 1:
                stop = len(log)
            if stop <= start:
                continue
            cut = self.rng.randint(start + 1, stop) if stop - start > 1 else stop
            for a, b in ((start, cut), (cut, stop)):
                if b > a:
                    self._write(src, p, a, b, log[a:b])
            self.end[(src, p)] = stop

    def _write(self, src_name: str, p: int, start: int, end: int, msgs: list[Message]) -> None:
        src = self.pipeline.source(src_name)
        rows = [(start + i, v.record) for i, v in enumerate(self.validators[src_name](m.value) for m in msgs)
                if v.ok]
        cols = {f.name: [r[f.name] for _, r in rows] for f in src.fields}
        table = master_table(src, cols, p, [o for o, _ in rows], [0] * len(rows))
        write_parquet_atomic(table, self.layout.master_file(src_name, p, start, end))


def expected_rows(layout: Layout, pipeline: Pipeline, manifest, view, valid: dict[str, str]) -> str:
    """The independent recomputation (DuckDB, lambdalake/viewsql.py's interpreter) of ``view`` at the version's W."""
    src = pipeline.source_of(view)
    wm = manifest.watermark.of_topic(src.topic)
    files = [str(f.path) for f in master_files(layout, src.name) if f.start < wm.get(f.partition, 0)]
    return view_sql(src, view, master_events_sql(src, files, wm, valid[src.name]))


def comparable(view, rows: str) -> str:
    """``rows`` (stored columns) with each sketch as its estimate: two sketches of the same values may differ in
    bytes (one built, one a union), never in their registers' estimate (lambdalake.sketches)."""
    cols = ", ".join(f'hll_count(list_value("{c}")) AS "{c}"' if c in sketch_columns(view) else f'"{c}"'
                     for c in [*view.keys, "window_start", *[a.name for a in view.stored_aggregates]])
    return f"SELECT {cols} FROM ({rows})"


def sketch_columns(view) -> set[str]:
    return {a.name for a in view.stored_aggregates if a.merge == "union"}


def assert_equals_recomputation(layout: Layout, pipeline: Pipeline, manifest) -> None:
    con = duckdb.connect()
    try:
        if any(sketch_columns(v) for v in pipeline.views):
            from lambdalake import sketches

            sketches.register(con)
        valid = {src.name: valid_predicate(con, src) for src in pipeline.sources}  # registers before queries
        for view in pipeline.views:
            got = comparable(view, "SELECT * FROM read_parquet("
                                   f"'{layout.batch_version(manifest.version) / view.name}/*.parquet')")
            want = comparable(view, expected_rows(layout, pipeline, manifest, view, valid))
            diff = con.execute(f"SELECT count(*) FROM (({got}) EXCEPT ALL ({want})) UNION ALL "
                               f"SELECT count(*) FROM (({want}) EXCEPT ALL ({got}))").fetchall()
            n = con.execute(f"SELECT count(*) FROM ({want})").fetchone()[0]
            assert [d[0] for d in diff] == [0, 0], f"{manifest.version}/{view.name}: {diff} rows differ of {n}"
            assert manifest.row_counts[view.name] == n
    finally:
        con.close()


def sorted_view(layout: Layout, version: str, view) -> pa.Table:
    """The stored rows, sorted; a sketch column as its estimate (see :func:`comparable`)."""
    t = pq.read_table(layout.batch_version(version) / view.name)
    for c in sketch_columns(view):
        from lambdalake import sketches

        i = t.column_names.index(c)
        t = t.set_column(i, c, pa.array([None if b is None else sketches.estimate([b]) for b in t.column(c)
                                         .to_pylist()], pa.int64()))
    return t.sort_by([(c, "ascending") for c in t.column_names])


def small_clickstream() -> Pipeline:
    """The demo pipeline with one view per source (count, sum, min, max, mean and, when declared, a sketch):
    every merge rule, two sources with their own id index, fewer Spark stages."""
    demo = load_pipeline(PIPELINE)
    return Pipeline(demo.name, sources=list(demo.sources),
                    views=[demo.view("pageviews_hourly"), demo.view("revenue_daily")])


def test_incremental_runs_equal_a_full_recompute_and_fall_back_to_full(tmp_path, spark):
    """Appends with late events and duplicates: every incremental version == the recomputation over all master and
    passes verify; the last one == a --full Spark recompute, row by row. Then each reason to fall back to a full
    recompute (changed definition, forget request, compaction, old full recompute, --full) is decided as such by
    :func:`batch.incremental.incremental_base`, the function run_batch asks."""
    from batch.compact import compact

    pipeline = small_clickstream()
    settings = load_settings(home=tmp_path / "lake", pipeline=PIPELINE).with_(handoff_block=BLOCK)
    lake = Lake(settings.home, pipeline, events=600, seed=17)
    layout = lake.layout

    lake.append(0.4)
    first = run_batch(settings, pipeline, spark=spark, keep=10)
    assert first.mode == "full" and first.mode_reason == "nothing is published yet"
    assert {s: i.rows for s, i in first.id_index.items()} == first.events
    versions = [first]
    for step in (0.2, 0.45):
        lake.append(step)
        m = run_batch(settings, pipeline, spark=spark, keep=10)
        assert (m.mode, m.based_on) == ("incremental", versions[-1].version), m.mode_reason
        assert m.full_at == first.full_at == first.started_at
        assert_equals_recomputation(layout, pipeline, m)
        versions.append(m)
    assert verify_published(settings, pipeline) is not None  # totals against all master, not only the new files
    last = versions[-1]
    # nothing archived since: a new version equal to the last one (views hard-linked, no Spark stage)
    same = run_batch(settings, pipeline, spark=spark, keep=10)
    assert same.mode == "incremental" and same.row_counts == last.row_counts and same.events == last.events
    assert same.id_index == last.id_index
    full = run_batch(settings, pipeline, spark=spark, keep=10, full=True)
    assert full.mode == "full" and "--full" in full.mode_reason and full.watermark == last.watermark
    assert full.events == last.events and full.row_counts == last.row_counts
    for view in pipeline.views:
        assert sorted_view(layout, last.version, view).equals(sorted_view(layout, full.version, view)), view.name
    # the id index of an incremental chain holds what a full recompute's does
    for src in pipeline.sources:
        assert last.id_index[src.name].rows == full.id_index[src.name].rows == full.events[src.name]
        assert len(last.id_index[src.name].segments) == 3 and len(full.id_index[src.name].segments) == 1

    # fallbacks to a full recompute
    lake.append(1.0)

    def decide(p: Pipeline = pipeline, **kw) -> tuple[bool, str]:
        inputs = select_inputs(layout, p, BLOCK)
        base, why = incremental_base(layout, p, current_batch_manifest(layout), inputs, BLOCK, **kw)
        return base is not None, why

    assert decide() == (True, f"merged {full.version} with the events archived since")
    assert decide(full=True) == (False, "full recompute requested (--full)")
    later = datetime.now(UTC) + timedelta(hours=25)
    ok, why = decide(now=later)
    assert not ok and "LAMBDALAKE_BATCH_FULL_EVERY" in why
    assert decide(now=later, full_every_h=0)[0]  # 0: never by age
    # a changed definition (a tightened rule changes every view of its source)
    pv = pipeline.source("pageviews")
    fields = [replace(f, maximum=60_000) if f.name == "duration_ms" else f for f in pv.fields]
    changed = Pipeline(pipeline.name, sources=[replace(pv, fields=fields), pipeline.source("purchases")],
                       views=pipeline.views)
    ok, why = decide(changed)
    assert not ok and "definition changed" in why
    # a forget request since the published version
    write_request(layout, new_request("purchases", "user-nobody"))
    ok, why = decide()
    assert not ok and "forgotten" in why
    request_path(layout, "purchases", "user-nobody").unlink()
    assert decide()[0]
    # a compaction rewrote files the published version read
    report = compact(settings.home, pipeline, target_rows=10_000)
    assert report.files_replaced
    ok, why = decide()
    assert not ok and "rewritten or removed" in why
