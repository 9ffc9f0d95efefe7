"""The typed contracts of lambdalake/contracts.py, the definition fingerprint and the settings split."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from lambdalake import contracts
from lambdalake.aggregates import min_
from lambdalake.config import load_settings
from lambdalake.contracts import (
    BatchManifest,
    BatchView,
    InputFile,
    Positions,
    SpeedSnapshotMeta,
    SpeedView,
    decode,
    encode,
)
from lambdalake.exceptions import ConfigError, InvariantViolation
from lambdalake.pipeline import Pipeline, load_pipeline

DEMO = load_pipeline("lambdalake.pipelines.clickstream")


def _manifest() -> BatchManifest:
    return BatchManifest(
        pipeline=DEMO.name, block=1000, format=contracts.MANIFEST_FORMAT,
        watermark=Positions({("clickstream.pageviews", 0): 3000, ("clickstream.pageviews", 1): 1000}),
        archived=Positions({("clickstream.pageviews", 0): 3500, ("clickstream.pageviews", 1): 1200}),
        inputs=[InputFile("master/pageviews/p=0/x.parquet", "pageviews", 0, 0, 3500, 10, "ab", 3400)],
        row_counts={v.name: 1 for v in DEMO.views},
        views={v.name: BatchView(DEMO.fingerprint(v), ["part-0.parquet"]) for v in DEMO.views},
        engine="spark 4", published_at=contracts.utc_now_iso())


def test_positions_are_one_mapping_with_one_wire_form():
    pos = Positions({("b", 1): 5, ("a", 0): 7})
    assert list(pos) == [("a", 0), ("b", 1)]
    assert pos.nested() == {"a": {"0": 7}, "b": {"1": 5}}
    assert Positions.from_nested(pos.nested()) == pos
    assert pos.at("a", 0) == 7 and pos.at("a", 9) == 0
    assert pos.of_topic("b") == {1: 5}
    assert Positions.of_topics({"a": {0: 7}, "b": {1: 5}}) == pos
    with pytest.raises(InvariantViolation):
        Positions.from_nested({"a": {"zero": 1}})


def test_manifest_round_trips_and_is_strict():
    m = _manifest()
    again = decode(encode(m), BatchManifest)
    assert again == m and again.watermark.at("clickstream.pageviews", 0) == 3000
    assert again.published_time is not None
    bad = encode(m).replace(b'"block": 1000', b'"block": "1000"')
    with pytest.raises(InvariantViolation, match="block"):
        decode(bad, BatchManifest, "manifest.json")


def test_manifest_of_the_first_release_decodes_and_matches_by_legacy_fingerprint():
    # what lambdalake 0.1 wrote: no format, no published_at, fingerprints from the repr-based hash
    old = contracts.to_builtins(_manifest())
    del old["format"], old["published_at"]
    view = DEMO.view("pageviews_hourly")
    old["views"][view.name]["fingerprint"] = DEMO.legacy_fingerprint(view)
    m = decode(contracts.msgspec.json.encode(old), BatchManifest)
    assert m.format == 1
    assert m.definition_matches(view.name, DEMO.fingerprint(view), DEMO.legacy_fingerprint(view))
    # a format-2 manifest never accepts the legacy fingerprint
    m2 = contracts.msgspec.structs.replace(m, format=2)
    assert not m2.definition_matches(view.name, DEMO.fingerprint(view), DEMO.legacy_fingerprint(view))
    assert m.published_time is None or m.published_time == contracts.parse_utc(m.finished_at)


def test_speed_snapshot_meta_round_trips_with_rebuild_progress():
    meta = SpeedSnapshotMeta(positions=Positions({("t", 0): 10}), pruned_to=Positions({("t", 0): 0}), block=5,
                             views={"v": SpeedView("abc", rows=3, target="def", progress=0.5)},
                             format=contracts.SNAPSHOT_FORMAT)
    again = decode(encode(meta), SpeedSnapshotMeta)
    assert again == meta and again.views["v"].progress == 0.5


def _changed(view_name: str, **changes) -> Pipeline:
    views = [dataclasses.replace(v, **changes) if v.name == view_name else v for v in DEMO.views]
    return dataclasses.replace(DEMO, views=views)


@pytest.mark.parametrize("changes", [
    {"bucket": timedelta(minutes=30)},
    {"keys": ("url", "user_id")},
    {"aggregates": (*DEMO.view("pageviews_hourly").aggregates, min_("min_duration_ms", "duration_ms"))},
])
def test_fingerprint_changes_with_the_view_and_only_that_view(changes):
    changed = _changed("pageviews_hourly", **changes)
    before, after = DEMO.fingerprints, changed.fingerprints
    assert before["pageviews_hourly"] != after["pageviews_hourly"]
    assert {k: v for k, v in before.items() if k != "pageviews_hourly"} == \
        {k: v for k, v in after.items() if k != "pageviews_hourly"}


def test_fingerprint_covers_validation_rules_of_the_source():
    src = DEMO.source("pageviews")
    fields = [dataclasses.replace(f, maximum=60_000) if f.name == "duration_ms" else f for f in src.fields]
    tighter = dataclasses.replace(DEMO, sources=[dataclasses.replace(src, fields=fields) if s is src else s
                                                 for s in DEMO.sources])
    for v in DEMO.views:
        same_source = v.source == "pageviews"
        assert (tighter.fingerprint(v) != DEMO.fingerprint(v)) == same_source, v.name
    # deterministic across loads
    assert load_pipeline("lambdalake.pipelines.clickstream").fingerprints == DEMO.fingerprints


def test_commands_without_kafka_need_no_bootstrap(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMBDALAKE_BOOTSTRAP", "not-an-address")
    settings = load_settings(home=tmp_path)  # the lake alone resolves fine
    assert settings.home == tmp_path.resolve()
    with pytest.raises(ConfigError, match="not host:port"):
        _ = settings.bootstrap
    assert load_settings(home=tmp_path, bootstrap="h:1").kafka.bootstrap == "h:1"
