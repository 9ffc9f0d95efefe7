"""Unit tests (no Spark, no Kafka) of the batch publish protocol and the staged-output validation."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.exceptions import StagedCheckFailed
from batch.staged_checks import check_staged, expected_schema
from lambdalake.contracts import MANIFEST_FORMAT, BatchManifest, BatchView, Positions
from lambdalake.exceptions import InvariantViolation, PublishError
from lambdalake.layout import Layout, batch_pointer, read_batch_manifest
from lambdalake.pipeline import load_pipeline
from lambdalake.versions import new_staging_dir, publish, retire_versions, rollback

PIPE = load_pipeline("lambdalake.pipelines.clickstream")
TOPIC = "clickstream.pageviews"


def _manifest(w: int) -> BatchManifest:
    view = PIPE.view("pageviews_hourly")
    return BatchManifest(pipeline="clickstream", watermark=Positions.of_topics({TOPIC: {0: w}}), block=50,
                         views={view.name: BatchView(PIPE.fingerprint(view))}, format=MANIFEST_FORMAT)


def _publish(layout: Layout, w: int, keep: int = 5) -> BatchManifest:
    staging = new_staging_dir(layout)
    (staging / "pageviews_hourly").mkdir()
    return publish(layout, staging, _manifest(w), keep=keep)


def test_versions_are_monotonic_pointer_switches_and_prune_keeps_current_and_previous(tmp_path):
    layout = Layout(tmp_path)
    assert [_publish(layout, 50 * i).version for i in range(1, 5)] == ["v000001", "v000002", "v000003", "v000004"]
    assert batch_pointer(layout) == "v000004"
    # what publish returns is what it wrote: version, published_at and computed_in stamped in
    m = read_batch_manifest(layout, "v000004")
    assert m.version == "v000004" and m.published_at and m.views["pageviews_hourly"].computed_in == "v000004"
    assert m.watermark == Positions.of_topics({TOPIC: {0: 200}}) and m.format == MANIFEST_FORMAT
    assert rollback(tmp_path) == ("v000004", "v000003")
    assert rollback(tmp_path) == ("v000003", "v000002")
    # keep=2 would keep v3, v4 by age, but v2 is current and v1 its previous: all four survive this prune
    assert retire_versions(tmp_path, keep=2) == []
    m = _publish(layout, 250, keep=2)
    assert m.version == "v000005" and m == read_batch_manifest(layout, "v000005")
    assert layout.batch_versions() == ["v000004", "v000005"]
    with pytest.raises(PublishError):
        rollback(tmp_path)  # v5 -> v4 is fine ...
        rollback(tmp_path)  # ... but nothing is older than v4 any more
    assert batch_pointer(layout) == "v000004"


def test_publish_refuses_a_watermark_below_the_published_one(tmp_path):
    layout = Layout(tmp_path)
    _publish(layout, 100)
    with pytest.raises(InvariantViolation, match="below the published"):
        _publish(layout, 50)
    assert batch_pointer(layout) == "v000001"
    assert layout.batch_versions() == ["v000001"]


def test_dead_runs_staging_dirs_are_removed(tmp_path):
    layout = Layout(tmp_path)
    layout.batch_views.mkdir(parents=True)
    dead = layout.batch_views / "run-999999999-abcdef"
    dead_before_0_2 = layout.batch_views / ".staging-999999998-abcdef"  # the name an earlier release used
    dead.mkdir()
    dead_before_0_2.mkdir()
    mine = new_staging_dir(layout)
    assert not dead.exists() and not dead_before_0_2.exists() and mine.exists()
    assert mine.name.startswith("run-")


def _write_view(vdir, rows: list[dict], schema: pa.Schema | None = None) -> None:
    view = PIPE.view("pageviews_hourly")
    schema = schema or expected_schema(PIPE, view)
    vdir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), vdir / "part-0.parquet")


def _row(url="u", hour=0, views=2):
    return {"url": url, "window_start": datetime(2026, 1, 5, hour, tzinfo=UTC), "views": views,
            "total_duration_ms": 10, "max_duration_ms": 7, "__sum_duration_ms": 10}


@pytest.mark.parametrize("case", ["ok", "null_key", "duplicate_group", "count_mismatch", "schema"])
def test_validate_staged_catches_broken_output(tmp_path, case):
    view = PIPE.view("pageviews_hourly")
    vdir = tmp_path / view.name
    rows = [_row("a", 0, 2), _row("b", 0, 3)]
    events = 5
    schema = None
    if case == "null_key":
        rows[1]["url"] = None
    elif case == "duplicate_group":
        rows[1]["url"] = "a"
    elif case == "count_mismatch":
        events = 6
    elif case == "schema":
        want = expected_schema(PIPE, view)
        schema = want.set(want.get_field_index("views"), pa.field("views", pa.int32()))
    _write_view(vdir, rows, schema)
    if case == "ok":
        assert check_staged(PIPE, view, vdir, events) == 2
    else:
        with pytest.raises(StagedCheckFailed):
            check_staged(PIPE, view, vdir, events)
