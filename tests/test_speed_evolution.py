"""Speed layer, view definitions that change (issue 11): the real ``lambdalake speed`` process on the real broker.

For each kind of change the speed layer runs to caught-up with declaration A, is restarted with declaration B and
runs to caught-up again: every view's snapshot (blocks >= pruned_to) equals the independent oracle under B, views
B did not change keep exactly their rows, views B removed are gone, and every view records B's fingerprint. Going
back to A gives A's results exactly. A ``kill -9`` in the middle of a rebuild leaves the old rows under their old
fingerprint (marked as being rebuilt), and the restart is exact. A pipeline file edited while the speed layer runs
is applied without a restart.

Declarations are built with ``dataclasses.replace`` on the demo pipeline's own objects, never by hand.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lambdalake.clients import end_offsets
from lambdalake.layout import Layout, read_speed_snapshot_meta, speed_pointer
from lambdalake.pipeline import Pipeline, load_pipeline
from tests.oracle import parts_estimate, read_log
from tests.test_speed import (
    _aligned,
    all_positions_at_end,
    assert_snapshot_equals_oracle,
    kill,
    produce,
    publish_batch_version,
    start_speed,
    topics,
    wait_for,
)

pytestmark = pytest.mark.integration

CHANGES = {
    "bucket": """
views = [dataclasses.replace(v, bucket=timedelta(minutes=30)) if v.name == "pageviews_hourly" else v
         for v in _base.views]
""",
    "keys": """
views = [dataclasses.replace(v, keys=("product_id",)) if v.name == "revenue_daily" else v for v in _base.views]
""",
    "added_aggregate": """
views = [dataclasses.replace(v, aggregates=(*v.aggregates, max_("max_duration_ms", "duration_ms")))
         if v.name == "user_activity_daily" else v for v in _base.views]
""",
    "removed_view": """
views = [v for v in _base.views if v.name != "user_activity_daily"]
""",
    "added_view": """
views = [*_base.views, View("referrers_daily", source="pageviews", keys=["referrer"], bucket=timedelta(days=1),
                            aggregates=[count("views"), min_("min_duration_ms", "duration_ms")])]
""",
    "tightened_rule": """
src = _base.source("pageviews")
fields = [dataclasses.replace(f, maximum=60_000) if f.name == "duration_ms" else f for f in src.fields]
sources = [dataclasses.replace(s, fields=fields) if s.name == "pageviews" else s for s in _base.sources]
views = _base.views
""",
    "loosened_rule": """
src = _base.source("pageviews")
fields = [dataclasses.replace(f, minimum=-1_000, maximum=200_000_000) if f.name == "duration_ms" else f
          for f in src.fields]
sources = [dataclasses.replace(s, fields=fields) if s.name == "pageviews" else s for s in _base.sources]
views = _base.views
""",
}


def declare(tmp_path: Path, base: str, name: str, body: str | None) -> tuple[str, Pipeline]:
    """A pipeline file: the test's copy of the demo pipeline changed by ``body`` (None: unchanged)."""
    f = tmp_path / f"declared_{name}.py"
    f.write_text("import dataclasses\nfrom datetime import timedelta\n"
                 "from lambdalake.aggregates import count, max_, min_\n"
                 "from lambdalake.pipeline import View, load_pipeline\n"
                 f"_base = load_pipeline({base!r})\nsources = _base.sources\n" + (body or "views = _base.views\n")
                 + "pipeline = dataclasses.replace(_base, sources=sources, views=views)\n")
    return str(f), load_pipeline(str(f))


def snapshot_rows(home: Path) -> dict[str, list[tuple]]:
    """Rows of every view file of the visible snapshot, sorted (for 'untouched' comparisons)."""
    layout = Layout(home)
    snap = speed_pointer(layout)
    meta = read_speed_snapshot_meta(layout, snap)
    rows: dict[str, list[tuple]] = {}
    for name in meta.views:  # <view>.parquet and the view's part files (format 4: some of earlier snapshots)
        for entry in meta.files_of(name):
            f = layout.speed_file(snap, entry)
            if f.is_file():
                rows.setdefault(name, []).extend(tuple(r.values()) for r in pq.read_table(f).to_pylist())
    return {name: sorted(r, key=repr) for name, r in rows.items()}


def assert_current(home: Path, pipeline: Pipeline) -> None:
    """The visible snapshot holds exactly the declared views, each of the declared definition, none rebuilding."""
    layout = Layout(home)
    meta = read_speed_snapshot_meta(layout, speed_pointer(layout))
    assert set(meta.views) == {v.name for v in pipeline.views}, meta.views
    for v in pipeline.views:
        sv = meta.views[v.name]
        assert (sv.fingerprint, sv.target, sv.progress, sv.positions) == (pipeline.fingerprint(v), None, None, None), (
            v.name, sv)
    files = {f.name.split(".")[0] for f in layout.speed_snapshot(meta.snapshot).glob("*.parquet")}
    assert files == {v.name for v in pipeline.views}
    assert all(layout.speed_file(meta.snapshot, f).is_file() for v in meta.views for f in meta.files_of(v))


@pytest.mark.parametrize("change", list(CHANGES))
def test_changed_definition_is_rebuilt_on_restart_and_revert_is_exact(settings, pipeline, run_cli, tmp_path,
                                                                      change):
    a_file, a = declare(tmp_path, settings.pipeline, "A", None)
    b_file, b = declare(tmp_path, settings.pipeline, change, CHANGES[change])
    changed = {v.name for v in b.views if a.fingerprints.get(v.name) != b.fingerprint(v)}
    unchanged = {v.name for v in b.views} - changed
    assert changed or change == "removed_view"
    env_a, env_b = {"LAMBDALAKE_PIPELINE": a_file}, {"LAMBDALAKE_PIPELINE": b_file}

    # A lake whose speed state starts above a published batch watermark (pruned_to > 0 in some partitions).
    produce(settings, pipeline, 2500, seed=71)
    ends = end_offsets(settings, topics(pipeline))
    publish_batch_version(settings.home, "v001", {k: _aligned(e // 3, settings.handoff_block)
                                                  for k, e in ends.items()}, settings.handoff_block)
    run_cli("speed", "--until-caught-up", env=env_a)
    log = read_log(settings.bootstrap, topics(pipeline))
    meta = assert_snapshot_equals_oracle(a, settings.home, log)
    assert any(meta.pruned_to.values())
    assert_current(settings.home, a)
    rows_a = snapshot_rows(settings.home)

    # Restart with B: changed/added views are rebuilt from the log, the others keep their rows, removed ones go.
    res = run_cli("speed", "--until-caught-up", env=env_b)
    if changed:
        assert "rebuil" in res.stderr, res.stderr
    assert_snapshot_equals_oracle(b, settings.home, log)
    assert_current(settings.home, b)
    rows_b = snapshot_rows(settings.home)
    for name in unchanged:
        assert rows_b[name] == rows_a[name], name
    for name in changed & set(rows_a):
        if change != "tightened_rule" or name != "user_activity_daily":  # (the rule may not bite a daily count)
            assert rows_b[name] != rows_a[name], f"{name}: the change must show in the data"

    # More events: B continues from its checkpoint (no rebuild any more), still exact.
    produce(settings, pipeline, 800, seed=72, start="2026-01-05T20:00:00Z")
    res = run_cli("speed", "--until-caught-up", env=env_b)
    assert "rebuil" not in res.stderr, res.stderr
    log = read_log(settings.bootstrap, topics(pipeline))
    meta = assert_snapshot_equals_oracle(b, settings.home, log)
    all_positions_at_end(meta, end_offsets(settings, topics(pipeline)), b)

    # Reverting to A gives A's results exactly.
    run_cli("speed", "--until-caught-up", env=env_a)
    assert_snapshot_equals_oracle(a, settings.home, log)
    assert_current(settings.home, a)


def test_kill9_mid_rebuild_then_restart_is_exact(settings, pipeline, run_cli, cli_env, tmp_path):
    a_file, a = declare(tmp_path, settings.pipeline, "A", None)
    b_file, b = declare(tmp_path, settings.pipeline, "rule", CHANGES["tightened_rule"])
    produce(settings, pipeline, 3000, seed=81)
    run_cli("speed", "--until-caught-up", env={"LAMBDALAKE_PIPELINE": a_file})
    log = read_log(settings.bootstrap, topics(pipeline))
    rows_a = snapshot_rows(settings.home)
    layout = Layout(settings.home)
    positions_a = read_speed_snapshot_meta(layout, speed_pointer(layout)).positions

    # B starts rebuilding the pageviews views; the process SIGKILLs itself in the middle of the replay.
    proc = start_speed(cli_env, tmp_path / "logs", "--until-caught-up",
                       env={"LAMBDALAKE_PIPELINE": b_file, "LAMBDALAKE_SPEED_FAULT": "rebuild:3"})
    try:
        assert proc.wait(120) == -9, (tmp_path / "logs" / "speed-0.out").read_text()
    finally:
        kill(proc)
    # The checkpoint in force holds the old rows under their old fingerprint, marked as being rebuilt.
    meta = read_speed_snapshot_meta(layout, speed_pointer(layout))
    rebuilding = {"pageviews_hourly", "user_activity_daily"}
    for v in b.views:
        sv = meta.views[v.name]
        if v.name in rebuilding:
            assert (sv.fingerprint, sv.target) == (a.fingerprint(v.name), b.fingerprint(v)), (v.name, sv)
            assert sv.progress is not None and 0 <= sv.progress < 1
            # the kept old rows say which offsets they cover (A's final positions of their topic)
            topic = b.source_of(v).topic
            assert sv.positions == {k: n for k, n in positions_a.items() if k[0] == topic}
        else:
            assert (sv.fingerprint, sv.target) == (b.fingerprint(v), None), (v.name, sv)
    assert snapshot_rows(settings.home) == rows_a
    st = json.loads(run_cli("status", "--format", "json", env={"LAMBDALAKE_PIPELINE": b_file}).stdout)
    states = {v["view"]: (v["state"], v["detail"]) for v in st["views"]}
    assert states["pageviews_hourly"][0] == "rebuilding" and "speed" in states["pageviews_hourly"][1], states
    assert states["revenue_daily"] == ("current", ""), states

    run_cli("speed", "--until-caught-up", env={"LAMBDALAKE_PIPELINE": b_file})
    meta = assert_snapshot_equals_oracle(b, settings.home, log)
    all_positions_at_end(meta, end_offsets(settings, topics(pipeline)), b)
    assert_current(settings.home, b)
    # The tightened rule's counters are those of the new validation.
    from tests.oracle import oracle_counts

    want = oracle_counts(b, log)
    for t in topics(b):
        assert meta.counters[t] == {k: want[t][k] for k in ("valid", "invalid", "duplicates")}, t


def test_pipeline_file_edited_while_running_is_applied_without_restart(settings, pipeline, cli_env, tmp_path):
    live = tmp_path / "live_pipeline.py"
    a_file, a = declare(tmp_path, settings.pipeline, "A", None)
    b_file, b = declare(tmp_path, settings.pipeline, "bucket", CHANGES["bucket"])
    live.write_text(Path(a_file).read_text())
    produce(settings, pipeline, 1500, seed=91)
    layout = Layout(settings.home)
    env = {"LAMBDALAKE_PIPELINE": str(live)}
    proc = start_speed(cli_env, tmp_path / "logs", "--no-group", "--checkpoint-interval", "0.1", env=env)

    def current_for(p: Pipeline, ends) -> bool:
        snap = speed_pointer(layout)
        if snap is None:
            return False
        meta = read_speed_snapshot_meta(layout, snap)
        return (all(meta.positions.at(*k) >= e for k, e in ends.items())
                and {n: (sv.fingerprint, sv.target) for n, sv in meta.views.items()}
                == {v.name: (p.fingerprint(v), None) for v in p.views})

    try:
        ends = end_offsets(settings, topics(pipeline))
        wait_for(lambda: current_for(a, ends), 60, "speed to catch up with A")
        log = read_log(settings.bootstrap, topics(pipeline))
        assert_snapshot_equals_oracle(a, settings.home, log)
        # A broken edit is reported and ignored; the valid one after it is applied live.
        live.write_text("this is not python\n")
        wait_for(lambda: "cannot be used" in " ".join((tmp_path / "logs" / "speed-0.out").read_text().split()), 30,
                 "the broken pipeline to be reported", interval=0.2)
        assert proc.poll() is None
        live.write_text(Path(b_file).read_text())
        produce(settings, pipeline, 500, seed=92, start="2026-01-05T10:00:00Z")
        ends = end_offsets(settings, topics(pipeline))
        wait_for(lambda: current_for(b, ends), 60, "speed to rebuild for B while running", interval=0.2)
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        finally:
            kill(proc)
    log = read_log(settings.bootstrap, topics(pipeline))
    assert_snapshot_equals_oracle(b, settings.home, log)
    out = (tmp_path / "logs" / "speed-0.out").read_text()
    assert "Traceback" not in out, out


# --- Kappa replay ---------------------------------------------------------------------------------------------------


def _version_rows(home: Path, version: str, view: str, raw: bool = False) -> list[tuple]:
    """A version's stored rows; sketches as their estimates unless ``raw`` (the replay writes compact sketches,
    Spark its own serialization of the same registers: equal in estimate, not in bytes)."""
    t = pq.read_table(Layout(home).batch_version(version) / view)
    return sorted((tuple(parts_estimate([x]) if isinstance(x, bytes) and not raw else x for x in r.values())
                   for r in t.to_pylist()), key=repr)


@pytest.mark.slow
def test_replay_equals_the_spark_recompute_for_every_view(settings, pipeline, run_cli, spark):
    """`lambdalake replay` (log + speed interpreter) publishes a version equal to the Spark batch job's (master +
    Spark) at the same watermark, view by view, and to the oracle; serving can use it like any version."""
    from batch.job import run_batch
    from lambdalake.layout import current_batch_manifest
    from speed.replay import ENGINE

    produce(settings, pipeline, 3000, seed=101)
    run_cli("ingest", "--until-caught-up")
    spark_manifest = run_batch(settings, pipeline, spark=spark)
    spark_version = spark_manifest.version
    res = run_cli("replay")
    assert "published batch version" in res.stdout, res.stdout
    layout = Layout(settings.home)
    replayed = current_batch_manifest(layout)
    assert replayed.version != spark_version and replayed.engine == ENGINE
    assert replayed.watermark == spark_manifest.watermark and any(replayed.watermark.values())
    log = read_log(settings.bootstrap, topics(pipeline))
    from tests.oracle import assert_rows_equal, oracle_views

    expected = oracle_views(pipeline, log, below=dict(replayed.watermark))
    for v in pipeline.views:
        assert replayed.views[v.name].fingerprint == pipeline.fingerprint(v)
        assert _version_rows(settings.home, replayed.version, v.name) == _version_rows(
            settings.home, spark_version, v.name), v.name
        assert replayed.row_counts[v.name] == spark_manifest.row_counts[v.name]
        assert_rows_equal(_merged_output(v, _version_rows(settings.home, replayed.version, v.name, raw=True)),
                          expected[v.name], v.name)
    assert replayed.events == spark_manifest.events

    # --view: only that view is replayed (at the published watermark), the others are carried over.
    run_cli("replay", "--view", "revenue_daily")
    again = current_batch_manifest(layout)
    assert again.watermark == replayed.watermark
    assert again.views["pageviews_hourly"].computed_in == replayed.version
    assert again.views["revenue_daily"].computed_in == again.version
    for v in pipeline.views:
        assert _version_rows(settings.home, again.version, v.name) == _version_rows(
            settings.home, spark_version, v.name), v.name


def _merged_output(view, rows: list[tuple]) -> list[tuple]:
    """Stored batch rows as the view's output columns (means derived), for the oracle comparison."""
    from tests.test_speed import merge_stored

    cols = [*view.keys, "window_start", *(a.name for a in view.stored_aggregates)]
    dicts = []
    for r in rows:
        d = dict(zip(cols, r, strict=True))
        ws = d["window_start"]
        d["window_start"] = ws if isinstance(ws, int) else _epoch_us(ws)
        dicts.append(d)
    return merge_stored(view, dicts)


def _epoch_us(dt) -> int:
    from datetime import UTC, datetime

    d = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return d.days * 86_400_000_000 + d.seconds * 1_000_000 + d.microseconds


def test_replay_interpreter_equals_the_oracle_at_the_aligned_end_of_the_log(settings, pipeline):
    """The replay proper (no publish): the speed interpreter over the whole log up to the aligned end equals the
    oracle for every view, with exact dedup over the whole range (duplicates far apart included)."""
    from lambdalake.contracts import Positions
    from speed.replay import compute
    from tests.oracle import assert_rows_equal, oracle_counts, oracle_views

    produce(settings, pipeline, 2500, seed=111)
    ends = end_offsets(settings, topics(pipeline))
    w = Positions({k: _aligned(e, settings.handoff_block) for k, e in ends.items()})
    assert any(e != w[k] for k, e in ends.items()), "the tail past the aligned end must exist and be left out"
    tables, events = compute(settings, pipeline, list(pipeline.views), w)
    log = read_log(settings.bootstrap, topics(pipeline))
    expected = oracle_views(pipeline, log, below=dict(w))
    for v in pipeline.views:
        rows = [tuple(r.values()) for r in tables[v.name].to_pylist()]
        assert_rows_equal(_merged_output(v, rows), expected[v.name], v.name)
    below = [m for m in log if m.offset < w[(m.topic, m.partition)]]
    counts = oracle_counts(pipeline, below)
    assert events == {s.name: counts[s.topic]["valid"] for s in pipeline.sources}


@pytest.mark.slow
def test_checkpoint_of_the_previous_release_is_taken_over(settings, pipeline, cli_env, run_cli, tmp_path):
    """A speed checkpoint written by lambdalake 0.1 (no view fingerprints) is resumed without a manual step: every
    view is rebuilt once from the log, and the result is exact."""
    import subprocess
    import sys

    from tests.test_upgrade import PREVIOUS, REPO

    tree = tmp_path / "previous"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS], capture_output=True, timeout=120)
    if archive.returncode != 0:
        pytest.skip(f"git history without {PREVIOUS}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True, timeout=120)
    produce(settings, pipeline, 2000, seed=121)
    main = "import sys; from lambdalake.cli import main; sys.exit(main(sys.argv[1:]))"
    old = subprocess.run([sys.executable, "-c", main, "speed", "--until-caught-up"], cwd=tree,
                         env={**cli_env, "PYTHONPATH": str(tree)},
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert old.returncode == 0, old.stderr
    layout = Layout(settings.home)
    assert read_speed_snapshot_meta(layout, speed_pointer(layout)).format == 1
    produce(settings, pipeline, 500, seed=122, start="2026-01-05T06:00:00Z")
    res = run_cli("speed", "--until-caught-up")
    assert "0.1" in res.stderr and "rebuil" in res.stderr, res.stderr
    log = read_log(settings.bootstrap, topics(pipeline))
    meta = assert_snapshot_equals_oracle(pipeline, settings.home, log)
    all_positions_at_end(meta, end_offsets(settings, topics(pipeline)), pipeline)
    assert_current(settings.home, pipeline)


@pytest.mark.slow
def test_live_edit_during_a_live_stream_rebuilds_exactly(settings, pipeline, cli_env, tmp_path):
    """The rebuild chases a moving live position (pause/resume at S, the final catch-up) while events stream in and
    a batch version is handed off meanwhile; the end result is exact for the new definition."""
    import threading

    live = tmp_path / "live_pipeline.py"
    a_file, a = declare(tmp_path, settings.pipeline, "A", None)
    b_file, b = declare(tmp_path, settings.pipeline, "keys", CHANGES["keys"])
    live.write_text(Path(a_file).read_text())
    layout = Layout(settings.home)
    produce(settings, pipeline, 1500, seed=131)
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            produce(settings, pipeline, 3000, seed=132, rate=500, start="2026-01-05T08:00:00Z")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    proc = start_speed(cli_env, tmp_path / "logs", "--no-group", "--checkpoint-interval", "0.05",
                       env={"LAMBDALAKE_PIPELINE": str(live)})
    t = threading.Thread(target=stream)
    try:
        wait_for(lambda: speed_pointer(layout), 60, "a first snapshot")
        t.start()
        time.sleep(1.5)
        live.write_text(Path(b_file).read_text())
        time.sleep(2.5)
        ends = end_offsets(settings, topics(pipeline))
        publish_batch_version(settings.home, "v001", {k: _aligned(e // 2, settings.handoff_block)
                                                      for k, e in ends.items()}, settings.handoff_block)
        t.join(60)
        assert not errors, errors
        ends = end_offsets(settings, topics(pipeline))

        def settled() -> bool:
            meta = read_speed_snapshot_meta(layout, speed_pointer(layout))
            return (meta.batch_version == "v001" and all(meta.positions.at(*k) >= e for k, e in ends.items())
                    and all(meta.definition_matches(v.name, b.fingerprint(v)) for v in b.views))

        wait_for(settled, 60, "speed to rebuild for B and catch up", interval=0.2)
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        finally:
            kill(proc)
        t.join(60)
    log = read_log(settings.bootstrap, topics(pipeline))
    meta = assert_snapshot_equals_oracle(b, settings.home, log)
    assert any(meta.pruned_to.values())
    assert_current(settings.home, b)
