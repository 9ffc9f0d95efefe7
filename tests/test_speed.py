"""Speed layer: its published state equals the independent oracle (tests/oracle.py) — over late, duplicated and
malformed events, across restarts, batch handoffs (including a batch rollback) and a fresh start below a published
watermark.

Comparison is independent of engine code: snapshot rows are read from the published Parquet files, merged over
partitions and blocks here in plain Python following the declaration's merge kinds, and compared with the oracle's
DuckDB SQL over the events read back from Kafka.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import namedtuple
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from lambdalake import contracts
from lambdalake.aggregates import count, max_, mean, min_, sum_
from lambdalake.clients import end_offsets, ensure_topics
from lambdalake.config import Settings
from lambdalake.contracts import BatchManifest, BatchPointer, Positions, SpeedSnapshotMeta
from lambdalake.dedup import DedupWindow
from lambdalake.fields import Field, Source
from lambdalake.layout import (
    Layout,
    batch_pointer,
    read_speed_snapshot_meta,
    speed_pointer,
    write_contract,
    write_pointer,
)
from lambdalake.pipeline import Pipeline, View
from tests.conftest import LAMBDALAKE
from tests.oracle import LogMessage, assert_rows_equal, oracle_counts, oracle_views, parts_estimate, read_log
from wiring.demo_stream import demo_messages
from wiring.produce import send

# --- reading published speed state, independently of engine code -------------------------------------------------


def read_speed_snapshot(home: Path | Layout, snapshot: str | None = None
                        ) -> tuple[SpeedSnapshotMeta, dict[str, list[dict]]]:
    """(snapshot.json, {view: rows as dicts with window_start in epoch µs}) of the visible (or given) snapshot, read
    through the lake's store (``home``: a local lake, or the Layout of any lake)."""
    layout = home if isinstance(home, Layout) else Layout(home)
    if snapshot is None:
        snapshot = speed_pointer(layout)
    own = f"{layout.speed_prefix}/{snapshot}/"
    meta = read_speed_snapshot_meta(layout, snapshot)
    views: dict[str, list[dict]] = {}
    # the contract: a view's rows are the union of the files its entry lists (format 3; format 4: a part file of
    # an earlier snapshot as "<snapshot>/<name>"), else <view>.parquet; the snapshot's own prefix holds no other
    listed = {layout.speed_file_key(snapshot, f) for name in meta.views for f in meta.files_of(name)}
    written = [k for k in layout.store.list(own) if k.endswith(".parquet")]
    for key in written:
        assert key in listed, f"{key} is not listed in snapshot.json"
    for name in sorted(set(meta.views) | {k[len(own):].split(".")[0] for k in written}):
        for entry in meta.files_of(name):
            key = layout.speed_file_key(snapshot, entry)
            assert layout.store.exists(key), f"snapshot {own} lacks a file of {name}: {entry}"
            t = pq.read_table(pa.BufferReader(layout.store.get(key)))
            assert t.schema.field("_partition").type == pa.int32()
            assert t.schema.field("_block_start").type == pa.int64()
            assert t.schema.field("window_start").type == pa.timestamp("us", tz="UTC")
            t = t.set_column(t.schema.get_field_index("window_start"), "window_start",
                             t.column("window_start").cast(pa.int64()))
            views.setdefault(name, []).extend(t.to_pylist())
    for name, sv in meta.views.items():
        if sv.files:
            assert len(views.get(name, [])) == sv.rows, (name, sv.rows)
    return meta, views


def _merge(kind: str, a, b):
    if kind == "union":  # sketches: collect the parts, estimated at the end (tests.oracle.parts_estimate)
        return [*a, b]
    if a is None:
        return b
    if b is None:
        return a
    return a + b if kind in ("count", "sum") else (min(a, b) if kind == "min" else max(a, b))


def merge_stored(view: View, rows: Iterable[dict]) -> list[tuple]:
    """Output rows (keys, window_start, declared aggregates incl. means) from stored-aggregate rows of any blocks."""
    stored = view.stored_aggregates
    acc: dict[tuple, dict] = {}
    for r in rows:
        k = tuple(r[c] for c in view.keys) + (r["window_start"],)
        cur = acc.get(k)
        if cur is None:
            acc[k] = {a.name: [r[a.name]] if a.merge == "union" else r[a.name] for a in stored}
        else:
            for a in stored:
                cur[a.name] = _merge(a.merge, cur[a.name], r[a.name])
    means = {m.name: m for m in view.means}
    out = []
    for k, vals in acc.items():
        row = list(k)
        for a in view.aggregates:
            if a.name in means:
                m = means[a.name]
                s, c = vals[m.sum_name], vals[m.count_name]
                row.append(None if s is None or not c else s / c)
            elif getattr(a, "kind", "") == "approx_distinct":
                row.append(parts_estimate(vals[a.name]))
            else:
                row.append(vals[a.name])
        out.append(tuple(row))
    return sorted(out, key=lambda r: tuple((x is None, x) for x in r))


def visible_rows(rows: list[dict], topic_watermark: dict[int, int]) -> list[dict]:
    """Serving's rule, re-stated: a speed row counts iff its block starts at or above W of its partition."""
    return [r for r in rows if r["_block_start"] >= topic_watermark.get(r["_partition"], 0)]


def assert_snapshot_equals_oracle(pipeline: Pipeline, home: Path | Layout, messages: list[LogMessage],
                                  snapshot: str | None = None) -> dict:
    """The snapshot's merged views == oracle over offsets [pruned_to, S) — and with batch rows below, over [0, S)."""
    meta, views = read_speed_snapshot(home, snapshot)
    positions, pruned = meta.positions, meta.pruned_to
    upto = oracle_views(pipeline, messages, below=positions)
    below = oracle_views(pipeline, messages, below=pruned, sketches=True) if pruned else None
    for v in pipeline.views:
        src = pipeline.source_of(v)
        rows = views[v.name]
        for r in rows:  # nothing the speed layer handed off may remain
            assert r["_block_start"] >= pruned.get((src.topic, r["_partition"]), 0), (v.name, r)
            assert r["_block_start"] % meta.block == 0
        combined = list(rows)
        if below is not None:  # the "batch" side: oracle rows below W, as stored aggregates
            combined += [dict(zip(v.output_columns, r, strict=True)) for r in below[v.name]]  # sketches as stored
        assert_rows_equal(merge_stored(v, combined), upto[v.name], v.name)
    return meta


def all_positions_at_end(meta: SpeedSnapshotMeta, ends: dict[tuple[str, int], int], pipeline: Pipeline) -> None:
    for s in pipeline.sources:
        for (t, p), end in ends.items():
            if t == s.topic:
                assert meta.positions.at(t, p) == end, (t, p, meta.positions, end)


# --- process helpers ---------------------------------------------------------------------------------------------


def start_speed(cli_env: dict, log_dir: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """A real `lambdalake speed` process (stderr/stdout to files)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    n = len(list(log_dir.glob("speed-*.out")))
    out = open(log_dir / f"speed-{n}.out", "wb")
    try:
        return subprocess.Popen([LAMBDALAKE, "speed", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**cli_env, **(env or {})})
    finally:
        out.close()


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def wait_for(pred, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def produce(settings: Settings, pipeline: Pipeline, events: int, seed: int, rate: float | None = None,
            start: str = "2026-01-05T00:00:00Z") -> None:
    ensure_topics(settings, pipeline)
    send(settings, demo_messages(pipeline, events, seed=seed, start=start, span=timedelta(hours=30),
                                 late_fraction=0.1, duplicate_fraction=0.05, malformed_fraction=0.03),
         rate=rate, progress=False)


def topics(pipeline: Pipeline) -> list[str]:
    return [s.topic for s in pipeline.sources]


def publish_batch_version(home: Path, version: str, watermark: dict[tuple[str, int], int], block: int) -> None:
    """A test-only batch publisher following the layout.py contract (manifest + CURRENT pointer switch)."""
    layout = Layout(home)
    d = layout.batch_version(version)
    d.mkdir(parents=True)
    assert all(w % block == 0 for w in watermark.values())
    write_contract(d / "manifest.json", BatchManifest(
        version=version, pipeline="test", watermark=Positions(watermark), block=block, engine="test-publisher",
        published_at=contracts.utc_now_iso(), format=contracts.MANIFEST_FORMAT))
    write_pointer(layout.batch_pointer, BatchPointer(version))


# --- 1. in-process: generic interpretation, nulls, negative times, restore mid-block ------------------------------

EV = Source(name="ev", topic="t.ev", key="user", event_id="id", event_time="ts", fields=[
    Field.string("id"), Field.timestamp("ts"), Field.string("user"),
    Field.string("cat", required=False, nullable=True),
    Field.integer("n", required=False, nullable=True), Field.integer("m", minimum=-5, maximum=5)])
EV_PIPE = Pipeline("props", sources=[EV], views=[
    View("by_cat", source="ev", keys=["cat"], bucket=timedelta(seconds=7),
         aggregates=[count("c"), sum_("s", "n"), min_("lo", "n"), max_("hi", "n"), min_("first_user", "user"),
                     max_("last_user", "user")]),
    View("total", source="ev", keys=[], bucket=timedelta(days=1), aggregates=[mean("avg_m", "m"), count("c")]),
    View("by_user_cat", source="ev", keys=["user", "cat"], bucket=timedelta(hours=1),
         aggregates=[max_("hi_m", "m"), sum_("s_m", "m")]),
])
Rec = namedtuple("Rec", "offset value")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _event(i: int, us: int, user: str, cat, n, m) -> bytes:
    doc = {"id": f"e{i}", "ts": (EPOCH + timedelta(microseconds=us)).isoformat().replace("+00:00", "Z"),
           "user": user, "m": m}
    if cat is not ...:
        doc["cat"] = cat
    if n is not ...:
        doc["n"] = n
    return json.dumps(doc).encode()


message_st = st.one_of(
    st.tuples(st.integers(0, 40), st.integers(-3 * 86_400_000_000, 3 * 86_400_000_000),
              st.sampled_from(["ann", "bob", "zoë"]), st.sampled_from([None, ..., "a", "b"]),
              st.sampled_from([None, ..., 0, -7, 3, 10**12]), st.integers(-5, 5)).map(lambda t: _event(*t)),
    st.sampled_from([b"{", b"[]", b'{"id": "x"}', b"", b'{"id":"e1","ts":"1970-01-01T00:00:00Z","user":"u",'
                     b'"m": 6}']),
)


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.lists(message_st, max_size=60), min_size=1, max_size=3), cut=st.floats(0, 1))
def test_state_equals_oracle_with_restore_in_between(tmp_path_factory, parts, cut):
    """Feed records straight into the speed layer (no Kafka): null keys/values, negative event times, duplicates,
    invalid messages; checkpoint at an arbitrary cut (often mid-block), restore into a new process-like object,
    continue. The published snapshot must equal the oracle, and the restored run must equal an uninterrupted one."""
    from speed.consumer import SpeedLayer, SpeedOptions
    from speed.recovery import recover

    home = tmp_path_factory.mktemp("lake")
    s = Settings(home=home, pipeline="x", handoff_block=7)
    msgs = [LogMessage(EV.topic, p, o, None, v) for p, vals in enumerate(parts) for o, v in enumerate(vals)]

    def feed(layer, lo: float, hi: float) -> None:
        for p, vals in enumerate(parts):
            a, b = int(len(vals) * lo), int(len(vals) * hi)
            layer.positions.setdefault((EV.topic, p), 0)
            layer.windows.setdefault((EV.topic, p), DedupWindow(10_000))
            layer.new_ids.setdefault((EV.topic, p), [])
            if b > a:
                layer._apply(EV.topic, p, [Rec(o, vals[o]) for o in range(a, b)])

    first = SpeedLayer(s, EV_PIPE, SpeedOptions())
    recover(first)
    feed(first, 0, cut)
    first.checkpoint_now()
    second = SpeedLayer(s, EV_PIPE, SpeedOptions())
    recover(second)
    feed(second, cut, 1)
    second.checkpoint_now()
    meta = assert_snapshot_equals_oracle(EV_PIPE, home, msgs)
    want = oracle_counts(EV_PIPE, msgs)[EV.topic]
    assert meta.counters[EV.topic] == {k: want[k] for k in ("valid", "invalid", "duplicates")}


def _rows(table: pa.Table) -> list:
    t = table.set_column(table.schema.get_field_index("window_start"), "window_start",
                         table.column("window_start").cast(pa.int64()))
    return sorted(t.to_pylist(), key=repr)


def test_snapshots_write_what_changed_and_always_hold_the_whole_state(tmp_path):
    """Format 3: a checkpoint writes the open blocks and the blocks sealed since the previous snapshot (one part
    file, merged with the newest parts not larger) and links the other parts. Through 40 checkpoints (segments of
    sealed blocks merged in memory on the way), a batch
    handoff that prunes inside part files and a restart, every snapshot's listed files hold exactly the in-memory
    state (nothing twice, nothing missing), most parts are links, the part count stays small, and the published
    rows equal the oracle."""
    from speed.batch_watch import BatchVersion
    from speed.consumer import SpeedLayer, SpeedOptions
    from speed.prune import hand_off_to
    from speed.recovery import recover
    from speed.state import MAX_PART_FILES

    s = Settings(home=tmp_path, pipeline="x", handoff_block=7)
    rng = random.Random(5)
    vals = [[_event(rng.randint(0, 300) if rng.random() < 0.1 else 1000 * p + o, rng.randint(0, 10**8),
                    rng.choice(["ann", "bob", "zoë"]), rng.choice([None, ..., "a", "b"]), rng.choice([None, 3, 10]),
                    rng.randint(-5, 5)) for o in range(520)] for p in range(2)]
    msgs = [LogMessage(EV.topic, p, o, None, v) for p, vs in enumerate(vals) for o, v in enumerate(vs)]

    def started() -> SpeedLayer:
        layer = SpeedLayer(s, EV_PIPE, SpeedOptions())
        recover(layer)
        for p in range(2):
            layer.positions.setdefault((EV.topic, p), 0)
            layer.windows.setdefault((EV.topic, p), DedupWindow(10_000))
            layer.new_ids.setdefault((EV.topic, p), [])
        return layer

    layer = started()
    linked = most_parts = 0
    for a in range(0, 520, 13):
        for p in range(2):
            layer._apply(EV.topic, p, [Rec(o, vals[p][o]) for o in range(a, min(a + 13, 520))])
        layer.checkpoint_now()
        meta, views = read_speed_snapshot(tmp_path)
        for name, table in layer.states[EV.topic].view_tables().items():
            assert sorted(views.get(name, []), key=repr) == _rows(table), (a, name)
            parts = meta.views[name].files[:-1]
            most_parts = max(most_parts, len(parts))
            linked += sum(not f.startswith(f"{meta.snapshot}/") for f in parts)  # referenced, not rewritten
        if a == 390:  # a batch version covering blocks of both partitions, cutting through part files
            hand_off_to(layer, BatchVersion("v1", Positions({(EV.topic, 0): 98, (EV.topic, 1): 140})))
        if a == 455:
            layer = started()
    assert linked > 20 and 2 <= most_parts <= MAX_PART_FILES, (linked, most_parts)
    # (the oracle's rows below the handed-off watermark hold a mean's output, not its stored sum and count)
    assert_snapshot_equals_oracle(Pipeline("props", sources=[EV], views=[v for v in EV_PIPE.views if not v.means]),
                                  tmp_path, msgs)


# --- 2. the real process against the real broker ------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_speed_process_equals_oracle_and_resumes(settings, pipeline, run_cli):
    """`lambdalake speed --until-caught-up` over late, duplicated and malformed events == oracle; a second run
    after more events resumes from its checkpoint (no double counting, no gap)."""
    produce(settings, pipeline, 2500, seed=7)
    res = run_cli("speed", "--until-caught-up", "--checkpoint-interval", "0.05")
    assert "valid" in res.stdout
    msgs = read_log(settings.bootstrap, topics(pipeline))
    meta = assert_snapshot_equals_oracle(pipeline, settings.home, msgs)
    all_positions_at_end(meta, end_offsets(settings, topics(pipeline)), pipeline)
    want = oracle_counts(pipeline, msgs)
    for t in topics(pipeline):
        assert meta.counters[t] == {k: want[t][k] for k in ("valid", "invalid", "duplicates")}

    # Kafka's committed group offsets mirror the positions (lag monitoring only; never read back).
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap)
    try:
        committed = admin.list_group_offsets({f"lambdalake-speed-{pipeline.name}": None})
    finally:
        admin.close()
    assert {(tp.topic, tp.partition): om.offset for tp, om in committed[f"lambdalake-speed-{pipeline.name}"].items()
            if tp.topic in topics(pipeline)} == dict(meta.positions)

    produce(settings, pipeline, 1500, seed=8, start="2026-01-05T20:00:00Z")  # overlaps buckets of the first run
    run_cli("speed", "--until-caught-up", "--checkpoint-interval", "0.05")
    msgs = read_log(settings.bootstrap, topics(pipeline))
    meta = assert_snapshot_equals_oracle(pipeline, settings.home, msgs)
    all_positions_at_end(meta, end_offsets(settings, topics(pipeline)), pipeline)
    want = oracle_counts(pipeline, msgs)
    for t in topics(pipeline):
        assert meta.counters[t] == {k: want[t][k] for k in ("valid", "invalid", "duplicates")}

    # Old snapshots stay readable for readers, and the checkpoint directory holds no orphans.
    snaps = [p.name for p in (settings.home / "views" / "speed").iterdir() if p.name.isdigit()]
    assert meta.snapshot in snaps
    assert not [p for p in (settings.home / "views" / "speed").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.integration
def test_sigterm_writes_final_checkpoint_and_exits_zero(settings, pipeline, cli_env, tmp_path):
    produce(settings, pipeline, 800, seed=3)
    proc = start_speed(cli_env, tmp_path / "logs", "--no-group", "--checkpoint-interval", "1.0")
    try:
        ends = end_offsets(settings, topics(pipeline))
        layout = Layout(settings.home)
        wait_for(lambda: speed_pointer(layout), 60, "a first snapshot")
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "logs" / "speed-0.out").read_text()
    finally:
        kill(proc)
    msgs = read_log(settings.bootstrap, topics(pipeline))
    meta = assert_snapshot_equals_oracle(pipeline, settings.home, msgs)
    all_positions_at_end(meta, ends, pipeline)
    proc2 = start_speed(cli_env, tmp_path / "logs", "--until-caught-up")
    try:
        assert proc2.wait(60) == 0  # a second writer can start, i.e. the lock was released
    finally:
        kill(proc2)


@pytest.mark.integration
def test_second_speed_process_is_refused(settings, pipeline, cli_env, run_cli, tmp_path):
    produce(settings, pipeline, 100, seed=1)
    proc = start_speed(cli_env, tmp_path / "logs", "--no-group")
    try:
        wait_for(lambda: speed_pointer(Layout(settings.home)), 60, "a first snapshot")
        res = run_cli("speed", "--until-caught-up", check=False)
        assert res.returncode == 5
        assert "another `lambdalake speed`" in res.stderr and str(proc.pid) in res.stderr
    finally:
        kill(proc)


def test_unreachable_broker_retries_with_backoff_then_fails_clearly(run_cli):
    t0 = time.monotonic()
    res = run_cli("speed", "--broker-timeout", "4", check=False,
                  env={"LAMBDALAKE_BOOTSTRAP": "127.0.0.1:1"}, timeout=120)
    assert res.returncode == 3, res.stderr
    assert "cannot reach Kafka at 127.0.0.1:1" in res.stderr
    assert "retrying in" in res.stderr and "gave up after" in res.stderr
    assert "Traceback" not in res.stderr
    assert time.monotonic() - t0 >= 4


# --- 3. handoff ------------------------------------------------------------------------------------------------


def _aligned(n: int, block: int) -> int:
    return n - n % block


@pytest.mark.integration
@pytest.mark.slow
def test_handoff_while_running_is_exact_and_never_double_counts(settings, pipeline, cli_env, tmp_path):
    """Batch versions are published while the speed layer consumes a live stream. At every instant a reader that
    pairs (batch version, speed snapshot) the serving way gets exactly the oracle over offsets < max(S, W);
    after each publish the speed layer drops exactly the covered blocks."""
    block = settings.handoff_block
    layout = Layout(settings.home)
    ensure_topics(settings, pipeline)
    producer_error: list[BaseException] = []

    def stream() -> None:
        try:
            produce(settings, pipeline, 3000, seed=11, rate=1500)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            producer_error.append(exc)

    t = threading.Thread(target=stream)
    t.start()
    proc = start_speed(cli_env, tmp_path / "logs", "--no-group", "--checkpoint-interval", "0.05")
    checks = 0
    try:
        versions = 0
        while t.is_alive() or versions < 3:
            time.sleep(0.4)
            snap = read_speed_snapshot_meta(layout, speed_pointer(layout)) if speed_pointer(layout) else None
            if snap is None:
                continue
            # The "batch job" chooses W at a block boundary at or below what exists; sometimes ahead of speed.
            ends = end_offsets(settings, topics(pipeline))
            versions += 1
            if versions % 3 == 0:  # ahead of the speed layer: everything that exists
                w = {k: _aligned(e, block) for k, e in ends.items()}
            else:  # at or behind the speed layer's published positions
                w = {k: _aligned(snap.positions.at(*k), block) for k in ends}
            version = f"v{versions:03d}"
            publish_batch_version(settings.home, version, w, block)
            # A reader, the serving way: batch CURRENT, then speed CURRENT; retry if speed handed off further.
            msgs = None
            for _ in range(3):
                bver = batch_pointer(layout)
                batch_w = contracts.read(layout.batch_version(bver) / "manifest.json", BatchManifest).watermark
                meta, views = read_speed_snapshot(settings.home)
                if any(w > batch_w.at(*k) for k, w in meta.pruned_to.items()):
                    continue
                msgs = msgs or read_log(settings.bootstrap, topics(pipeline))
                spos = meta.positions
                upto = {k: max(spos.get(k, 0), batch_w.get(k, 0)) for k in set(spos) | set(batch_w)}
                expected = oracle_views(pipeline, msgs, below=upto)
                batch_side = oracle_views(pipeline, msgs, below=batch_w, sketches=True)
                for v in pipeline.views:
                    src = pipeline.source_of(v)
                    wt = {p: x for (tt, p), x in batch_w.items() if tt == src.topic}
                    rows = visible_rows(views[v.name], wt) + [dict(zip(v.output_columns, r, strict=True))
                                                              for r in batch_side[v.name]]
                    assert_rows_equal(merge_stored(v, rows), expected[v.name], f"{v.name} @ {bver}")
                checks += 1
                break
            # The speed layer prunes exactly the covered blocks once it sees the version.
            wait_for(lambda v=version: read_speed_snapshot(settings.home)[0].batch_version == v,
                     30, f"speed to hand off to {version}")
            meta, views = read_speed_snapshot(settings.home)
            for v in pipeline.views:
                src = pipeline.source_of(v)
                for r in views[v.name]:
                    assert r["_block_start"] >= w[(src.topic, r["_partition"])]
        t.join()
        assert not producer_error, producer_error
        wait_for(lambda: all(
            read_speed_snapshot(settings.home)[0].positions.at(tt, p) >= e
            for (tt, p), e in end_offsets(settings, topics(pipeline)).items()), 60, "speed to catch up")
        assert proc.poll() is None, "the speed layer died"
    finally:
        kill(proc)
        t.join(60)
    assert checks >= 3
    msgs = read_log(settings.bootstrap, topics(pipeline))
    meta = assert_snapshot_equals_oracle(pipeline, settings.home, msgs)
    assert meta.pruned_to, "nothing was handed off"


@pytest.mark.integration
@pytest.mark.slow
def test_fresh_start_below_published_watermark_and_batch_rollback(settings, pipeline, run_cli):
    """No checkpoint, batch published: speed starts at W - span, filling only the dedup window below W (duplicates
    straddling W are not counted). Then a batch rollback to a lower W: the speed layer rebuilds what it dropped."""
    block = settings.handoff_block
    produce(settings, pipeline, 3000, seed=5)
    ends = end_offsets(settings, topics(pipeline))
    w_high = {k: _aligned(e * 2 // 3, block) for k, e in ends.items()}
    publish_batch_version(settings.home, "v001", w_high, block)
    run_cli("speed", "--until-caught-up", "--dedup-span", "10000")
    msgs = read_log(settings.bootstrap, topics(pipeline))
    meta = assert_snapshot_equals_oracle(pipeline, settings.home, msgs)
    assert meta.pruned_to == Positions(w_high)
    # Straddling duplicates exist in this stream, so the check above really exercised the dedup fill.
    straddling = 0
    for t in topics(pipeline):
        first: dict[tuple[int, bytes], int] = {}
        for m in sorted((m for m in msgs if m.topic == t), key=lambda m: (m.partition, m.offset)):
            try:
                eid = json.loads(m.value)["event_id"]
            except Exception:  # noqa: BLE001 - malformed
                continue
            k = (m.partition, str(eid))
            if k in first and first[k] < w_high[(t, m.partition)] <= m.offset:
                straddling += 1
            first.setdefault(k, m.offset)
    assert straddling > 0

    # Rollback: an older (lower) watermark is published; the speed layer must recompute blocks it dropped.
    w_low = {k: _aligned(e // 3, block) for k, e in ends.items()}
    publish_batch_version(settings.home, "v002", w_low, block)
    produce(settings, pipeline, 300, seed=6)
    run_cli("speed", "--until-caught-up", "--dedup-span", "10000")
    msgs = read_log(settings.bootstrap, topics(pipeline))
    meta = assert_snapshot_equals_oracle(pipeline, settings.home, msgs)
    assert meta.batch_version == "v002"
    all_positions_at_end(meta, end_offsets(settings, topics(pipeline)), pipeline)


@pytest.mark.integration
def test_block_size_disagreement_is_refused(settings, pipeline, run_cli):
    produce(settings, pipeline, 50, seed=2)
    publish_batch_version(settings.home, "v001", {}, 100)
    res = run_cli("speed", "--until-caught-up", check=False)
    assert res.returncode == 4 and "handoff block 100" in res.stderr, res.stderr


# --- 4. status ----------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_status_reports_positions_lag_and_batch(settings, pipeline, run_cli):
    produce(settings, pipeline, 600, seed=4)
    run_cli("speed", "--until-caught-up")
    ends = end_offsets(settings, topics(pipeline))
    w = {k: _aligned(e, settings.handoff_block) for k, e in ends.items()}
    publish_batch_version(settings.home, "v007", w, settings.handoff_block)
    produce(settings, pipeline, 100, seed=9)
    st = json.loads(run_cli("status", "--format", "json").stdout)
    assert st["batch_version"] == "v007" and st["speed_snapshot"] and st["speed_running_pid"] is None
    assert st["speed_freshness_seconds"] is not None and st["speed_freshness_seconds"] >= 0
    new_ends = end_offsets(settings, topics(pipeline))
    assert {(r["topic"], r["partition"]) for r in st["partitions"]} == set(new_ends)
    for r in st["partitions"]:
        k = (r["topic"], r["partition"])
        assert r["end_offset"] == new_ends[k]
        assert r["speed_position"] == ends[k]
        assert r["batch_watermark"] == w[k]
        assert r["lag"] == new_ends[k] - ends[k]
        assert r["dlq"] == 0
    table = run_cli("status").stdout
    assert "v007" in table and "speed position" in table


def test_state_updater_is_generated_from_the_declaration_only():
    """Changing the declaration changes the behaviour, with no per-view code: a min over strings, a zero-key view."""
    from speed.state import compile_updater

    upd = compile_updater(EV, EV_PIPE.views)
    rows = [{}, {}, {}]
    upd({"id": "1", "ts": -1, "user": "bob", "cat": None, "n": None, "m": 2}, rows)
    upd({"id": "2", "ts": -7_000_001, "user": "ann", "cat": None, "n": 5, "m": -1}, rows)
    assert rows[0] == {(None, -7_000_000): [1, None, None, None, "bob", "bob"],
                       (None, -14_000_000): [1, 5, 5, 5, "ann", "ann"]}
    assert rows[1] == {(-86_400_000_000,): [2, 1]}  # count, hidden __sum_m (the mean's numerator)
    assert os.environ.get("LAMBDALAKE_SPEED_FAULT") is None
