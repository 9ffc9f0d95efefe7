"""Speed-layer benchmark (not a test): throughput, freshness, memory, and the raw kafka-python baseline.

Measures, against a real Kafka broker (the embedded one on a free port, or ``--bootstrap``):

1. ``raw_fetch``      — plain kafka-python consumption of N pre-produced messages (same consumer settings as the
                        speed layer): the client's ceiling on this machine.
2. ``fetch_validate`` — the same plus :class:`lambdalake.validation.Validator` on every message;
   ``fetch_validate_dedup`` — plus the dedup window on every valid one: the least per-event work of the speed
                        layer (its ratio to ``raw_fetch`` bounds the speed layer's; ``ratios_to_raw_fetch``).
   ``raw_fetch_confluent`` / ``fetch_validate_confluent`` (and ``..._2``: two processes at once, each over half the
                        partitions) — the same with librdkafka (confluent-kafka), the archiver's client: its ceilings.
   ``workers``          — ``lambdalake ingest|speed --until-caught-up --workers N``, process start to exit (each
                        ingest run on fresh topics, with the master dataset's bytes per event).
3. ``speed``          — the speed layer in-process (``SpeedLayer.run(until_caught_up=True)``: validate, dedup,
                        aggregate, checkpoint + publish every ``--checkpoint-interval``), events/s.
0. ``produce``        — ``lambdalake produce``'s sender (librdkafka) over pre-generated messages, next to the
                        previous one (a kafka-python producer) on ``--kafka-python-events`` of them.
4. ``freshness``      — for each ``--freshness-workers`` count and ``--rates`` value: a real ``lambdalake speed
                        --workers N`` process while the librdkafka producer sends at that rate for ``--duration``
                        s; produce -> visible (the first moment the union of the workers' published snapshots
                        is past the message's offset) p50/p99/max over sampled messages; the speed processes' RSS
                        every 0.5 s; the highest offered rate with p99 <= 1 s.
5. ``sustained_with_handoff`` — the same at ``--sustained-rate`` for ``--sustained-duration`` s while a simulated
                        batch layer publishes a version every ``--handoff-every`` s (watermark = the speed layer's
                        positions, block-aligned): the speed layer prunes, so its RSS should stay flat.

Results go to ``bench/results/speed-<UTC time>.json`` (git-ignored) and a summary is printed.

    .venv/bin/python bench/bench_speed.py                     # defaults: 300k events, rates 10k..40k, 15 s each
    .venv/bin/python bench/bench_speed.py --quick             # a short run (figures are noisier)
    .venv/bin/python bench/bench_speed.py --only-sustained    # just the RSS-with-handoff run
    .venv/bin/python bench/bench_speed.py --only-archiver --events 400000   # the archiver and both clients' ceilings
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from speed_baselines import (  # noqa: E402
    produce_all,
    produce_kafka_python,
    raw_fetch,
    raw_fetch_confluent,
    raw_fetch_confluent_processes,
    read_values,
)

from lambdalake.broker import EmbeddedBroker  # noqa: E402
from lambdalake.clients import end_offsets, ensure_topics, producer_config  # noqa: E402
from lambdalake.config import load_settings  # noqa: E402
from lambdalake.contracts import Positions  # noqa: E402
from lambdalake.embedded import free_port  # noqa: E402
from lambdalake.exceptions import InvariantViolation  # noqa: E402
from lambdalake.heads import master_files  # noqa: E402
from lambdalake.layout import Layout  # noqa: E402
from lambdalake.pipeline import load_pipeline  # noqa: E402
from lambdalake.procs import stop_group  # noqa: E402
from lambdalake.validation import Validator  # noqa: E402
from wiring.demo_stream import demo_messages  # noqa: E402

LAMBDALAKE = str(Path(sys.executable).parent / "lambdalake")


def pipeline_copy(directory: Path, suffix: str) -> Path:
    """The clickstream pipeline with topics renamed by ``suffix`` (fresh topics per measurement)."""
    f = directory / f"pipeline_{suffix}.py"
    f.write_text(
        "from lambdalake.fields import Source\n"
        "from lambdalake.pipeline import Pipeline, load_pipeline\n"
        "_p = load_pipeline('lambdalake.pipelines.clickstream')\n"
        "pipeline = Pipeline(_p.name, views=_p.views, sources=[Source(name=s.name, topic=f'{s.topic}."
        f"{suffix}', fields=s.fields, event_id=s.event_id, event_time=s.event_time, key=s.key) "
        "for s in _p.sources])\n")
    return f


def fresh(work: Path, bootstrap: str, block: int):
    suffix = uuid.uuid4().hex[:8]
    home = work / f"lake-{suffix}"
    home.mkdir()
    settings = load_settings(home=home, bootstrap=bootstrap, pipeline=str(pipeline_copy(work, suffix)),
                             partitions=4).with_(handoff_block=block)
    pipe = load_pipeline(settings.pipeline)
    ensure_topics(settings, pipe)
    return settings, pipe


def cli_run(settings, *args: str) -> float:
    """Wall seconds of one ``lambdalake`` command on ``settings``' lake (process start to exit)."""
    env = {**os.environ, "LAMBDALAKE_HOME": str(settings.home), "LAMBDALAKE_BOOTSTRAP": settings.bootstrap,
           "LAMBDALAKE_PIPELINE": settings.pipeline, "LAMBDALAKE_HANDOFF_BLOCK": str(settings.handoff_block)}
    t0 = time.perf_counter()
    subprocess.run([LAMBDALAKE, *args], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def master_size(settings) -> dict:
    """Master dataset bytes per archived event, next to the log's value bytes per valid message (what the archiver
    read): files of every source, rows from their footers."""
    from batch.master import file_rows

    layout = Layout(settings.home)
    pipe = load_pipeline(settings.pipeline)
    files = [f.path for s in pipe.sources for f in master_files(layout, s.name)]
    size, rows = sum(p.stat().st_size for p in files), sum(file_rows(p) for p in files)
    msgs = [m for s in pipe.sources for m in read_values(settings, s.topic)]
    valid = {s.topic: Validator(s) for s in pipe.sources}
    log_bytes = [len(v) for t, v in msgs if v is not None and valid[t](v).ok]
    return {"master_bytes": size, "master_rows": rows, "master_bytes_per_event": round(size / max(rows, 1), 1),
            "log_value_bytes_per_valid_message": round(sum(log_bytes) / max(len(log_bytes), 1), 1)}


def workers_scaling(work: Path, settings, events: int, messages: int, workers: list[int],
                    commands: tuple[str, ...] = ("ingest", "speed")) -> list[dict]:
    """``lambdalake ingest|speed --until-caught-up --workers N``, each on a fresh lake: wall time from process start
    to exit (Python start-up and spawning the workers included). The speed runs read the same topics; each ingest
    run gets fresh topics holding the same messages (an archiver writes the dead-letter topics: over the topics of
    an earlier run it would find their records there already and skip sending them)."""
    out = []
    for command in commands:
        for n in workers:
            home = work / f"lake-{command}-{n}-{uuid.uuid4().hex[:6]}"
            home.mkdir()
            run = settings.with_(home=home)
            if command == "ingest":
                topics, _ = fresh(work, settings.bootstrap, settings.handoff_block)
                produce_all(topics, load_pipeline(topics.pipeline), events)
                run = topics.with_(home=home)
            seconds = cli_run(run, command, "--until-caught-up", "--workers", str(n))
            out.append({"command": command, "workers": n, "messages": messages, "seconds": round(seconds, 2),
                        "per_second": round(messages / seconds)})
            if command == "ingest":
                out[-1].update(master_size(run))
            print(f"{command} --workers {n}: {out[-1]}", flush=True)
    return out


def speed_in_process(settings, pipe, interval: float) -> dict:
    from speed.consumer import SpeedLayer, SpeedOptions

    layer = SpeedLayer(settings, pipe, SpeedOptions(checkpoint_interval=interval))
    commits: list[float] = []  # wall time of each commit in the writer thread (steps 2-8), while consuming goes on
    commit = layer.store.commit

    def timed(capture):
        t = time.perf_counter()
        try:
            return commit(capture)
        finally:
            commits.append(time.perf_counter() - t)

    layer.store.commit = timed
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    stats = layer.run(until_caught_up=True)
    dt = time.perf_counter() - t0
    return {"messages": stats.messages, "seconds": round(dt, 3), "per_second": round(stats.messages / dt),
            "checkpoints": stats.checkpoints, "last_checkpoint_ms": round(stats.last_checkpoint_seconds * 1000, 1),
            "commit_ms": {"median": round(statistics.median(commits) * 1000, 1) if commits else None,
                          "max": round(max(commits, default=0) * 1000, 1),
                          "last (consumer idle)": round(commits[-1] * 1000, 1) if commits else None},
            "state_rows": layer.state_rows(),
            "rss_growth_mb": round((psutil.Process().memory_info().rss - rss0) / 2**20)}


class SpeedSetWatcher(threading.Thread):
    """Records (wall time after the read, positions) whenever the served speed positions change: the union of every
    speed worker's snapshot (:func:`lambdalake.speedset.read_speed_set`; a daemon is a group member publishing under
    ``views/speed/workers/g-...``, not at the root), read through the lake's store every ``every`` seconds. A time is
    late by up to one poll and its reads, never early."""

    def __init__(self, layout: Layout, every: float = 0.02):
        super().__init__(daemon=True)
        self.layout, self.every = layout, every
        self.seen: list[tuple[float, dict]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        from lambdalake.speedset import read_speed_set

        last = None
        while not self.stop.is_set():
            try:
                found = read_speed_set(self.layout)
            except (OSError, InvariantViolation):
                found = None
            if found is not None and (pos := dict(found.meta.positions.items())) != last:
                self.seen.append((time.time(), pos))
                last = pos
            time.sleep(self.every)


def publish_batch(home: Path, version: str, positions: Positions, block: int) -> None:
    """Simulate a batch publish (layout.py contract) at the block boundary below the speed positions, so the speed
    layer hands off and prunes — what keeps its memory bounded in production."""
    from lambdalake import contracts
    from lambdalake.contracts import BatchManifest, BatchPointer
    from lambdalake.layout import write_contract, write_pointer

    layout = Layout(home)
    wm = Positions({tp: s - s % block for tp, s in dict(positions).items()})
    d = layout.batch_version(version)
    d.mkdir(parents=True)
    write_contract(d / "manifest.json", BatchManifest(version=version, pipeline="bench", watermark=wm, block=block,
                                                      engine="bench-simulated-batch",
                                                      published_at=contracts.utc_now_iso(),
                                                      format=contracts.MANIFEST_FORMAT))
    write_pointer(layout.batch_pointer, BatchPointer(version))


def freshness(work: Path, bootstrap: str, block: int, rate: float, duration: float, interval: float,
              handoff_every: float | None = None, dedup_span: int = 100_000, workers: int = 1,
              lake: str = "") -> dict:
    """``lake``: an object-storage lake (``s3://...``, empty) instead of a fresh local one (no simulated handoffs)."""
    from confluent_kafka import Producer

    settings, pipe = fresh(work, bootstrap, block)
    if lake and handoff_every:
        raise ValueError("simulated batch handoffs write a local lake")
    n = int(rate * duration)
    # generated while sending (~13 us each), never held: 10 minutes at 10k/s would be ~20 GB of Python objects
    msgs = iter(demo_messages(pipe, n, seed=2, duplicate_fraction=0.0, malformed_fraction=0.0))
    env = dict(os.environ, LAMBDALAKE_HOME=lake or str(settings.home), LAMBDALAKE_BOOTSTRAP=bootstrap,
               LAMBDALAKE_PIPELINE=settings.pipeline, LAMBDALAKE_HANDOFF_BLOCK=str(block))
    if lake:
        env["LAMBDALAKE_WORK_DIR"] = str(settings.home)  # the machine's scratch; the lake is the bucket
    prod = Producer(producer_config(settings))
    delivered: list[tuple[float, str, int, int]] = []  # (sent at, topic, partition, offset) of sampled messages

    def sampled(sent_at: float):
        def on_delivery(err, msg) -> None:
            if err is None:
                delivered.append((sent_at, msg.topic(), msg.partition(), msg.offset()))
        return on_delivery

    def produce(m, **kw) -> None:
        while True:
            try:
                prod.produce(m.topic, m.value, m.key, **kw)
                return
            except BufferError:
                prod.poll(0.01)

    produce(next(msgs))
    sent = 1
    prod.flush(30)
    proc = subprocess.Popen([LAMBDALAKE, "speed", "--checkpoint-interval", str(interval), "--dedup-span",
                             str(dedup_span), "--workers", str(workers)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    watcher = SpeedSetWatcher(Layout.of(settings.home, lake), every=0.02 if lake else 0.005)
    rss: list[tuple[float, float]] = []
    try:
        watcher.start()
        deadline = time.monotonic() + 60
        while not watcher.seen:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("speed layer did not publish a first snapshot")
            time.sleep(0.05)
        procs = [psutil.Process(proc.pid)]
        stop_rss = threading.Event()

        def sample_rss() -> None:
            t0 = time.monotonic()
            while not stop_rss.wait(0.5):
                try:
                    total = sum(p.memory_info().rss for p in procs[0].children(recursive=True) + procs)
                except psutil.Error:
                    continue
                rss.append((round(time.monotonic() - t0, 1), round(total / 2**20, 1)))

        threading.Thread(target=sample_rss, daemon=True).start()
        every = max(1, int(rate // 200))  # ~200 samples per second
        handoffs = 0
        next_handoff = time.monotonic() + handoff_every if handoff_every else None
        t0 = time.perf_counter()
        wall0 = time.time()
        for i, m in enumerate(msgs, 1):
            sent += 1
            if i % every == 0:
                produce(m, on_delivery=sampled(time.time()))
            else:
                produce(m)
            if i % 256 == 0:
                prod.poll(0)
                if next_handoff is not None and time.monotonic() >= next_handoff and watcher.seen:
                    handoffs += 1
                    publish_batch(settings.home, f"bench{handoffs:04d}", watcher.seen[-1][1], block)
                    next_handoff += handoff_every
                ahead = i / rate - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        prod.flush(60)
        produce_seconds = time.perf_counter() - t0
        ends = end_offsets(settings, [s.topic for s in pipe.sources])
        caught = time.monotonic() + 120
        while time.monotonic() < caught:
            if watcher.seen and all(watcher.seen[-1][1].get(tp, 0) >= e for tp, e in ends.items()):
                break
            time.sleep(0.05)
        catch_up_seconds = time.time() - wall0
        stop_rss.set()
    finally:
        watcher.stop.set()
        stop_group(proc)
    lat = []
    for t_send, topic, partition, offset in delivered:
        for t_vis, pos in watcher.seen:
            if pos.get((topic, partition), 0) > offset:
                lat.append(max(0.0, t_vis - t_send))
                break
    lat.sort()

    def q(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None

    return {"target_rate": rate, "workers": workers, "achieved_produce_rate": round(sent / produce_seconds),
            "messages": sent, "samples": len(lat), "samples_sent": len(delivered),
            "freshness_ms": {"p50": q(0.50), "p99": q(0.99), "max": q(1.0)},
            "catch_up_seconds_after_start": round(catch_up_seconds, 2), "snapshots_seen": len(watcher.seen),
            "batch_handoffs": handoffs,
            "rss_mb": rss, "rss_mb_first_last_max": [rss[0][1], rss[-1][1], max(r for _, r in rss)] if rss else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--rates", default="10000,20000,30000,40000", help="offered rates of the freshness runs")
    ap.add_argument("--freshness-workers", default="1,2", help="speed worker counts of the freshness runs")
    ap.add_argument("--kafka-python-events", type=int, default=100_000,
                    help="messages sent by the previous kafka-python sender, the producer baseline (0: skip)")
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--checkpoint-interval", type=float, default=0.25)
    ap.add_argument("--block", type=int, default=1000)
    ap.add_argument("--bootstrap", default=None)
    ap.add_argument("--quick", action="store_true", help="100k events, 8 s per rate")
    ap.add_argument("--sustained-rate", type=float, default=5000.0,
                    help="rate of the sustained run with simulated batch handoffs (RSS should stay flat)")
    ap.add_argument("--sustained-duration", type=float, default=60.0)
    ap.add_argument("--handoff-every", type=float, default=5.0)
    ap.add_argument("--only-sustained", action="store_true")
    ap.add_argument("--only-archiver", action="store_true",
                    help="just the archiver's figures: both clients' raw fetch (+ validate) and `ingest --workers`")
    ap.add_argument("--workers", default="1,2", help="worker counts of the scale-out runs (ingest and speed)")
    ap.add_argument("--dedup-span", type=int, default=100_000,
                    help="dedup span of the sustained run (its windows fill after span offsets per partition)")
    args = ap.parse_args()
    if args.quick:
        args.events, args.duration = 100_000, 8.0
    out: dict = {"started": datetime.now(UTC).isoformat(), "cpus": os.cpu_count(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        work = Path(tmp)
        broker = None
        bootstrap = args.bootstrap
        if bootstrap is None:
            broker = EmbeddedBroker(work / "kafka-home", port=free_port(), controller_port=free_port(), heap="1g",
                                    tied_to_parent=True)
            bootstrap = broker.up(timeout=120)["bootstrap"]
        try:
            if args.sustained_duration > 0 and not args.only_archiver:
                res = freshness(work, bootstrap, args.block, args.sustained_rate, args.sustained_duration,
                                args.checkpoint_interval, handoff_every=args.handoff_every,
                                dedup_span=args.dedup_span)
                out["sustained_with_handoff"] = res
                print(f"sustained @ {args.sustained_rate:,.0f}/s with a batch handoff every {args.handoff_every}s: "
                      + json.dumps({k: v for k, v in res.items() if k != "rss_mb"}), flush=True)
            if args.only_sustained:
                return finish(out)
            settings, pipe = fresh(work, bootstrap, args.block)
            print(f"producing {args.events:,} events ...", flush=True)
            out["produce"] = produce_all(settings, pipe, args.events)
            print(f"  lambdalake produce's sender (librdkafka): {out['produce']}", flush=True)
            if args.kafka_python_events and not args.only_archiver:
                kp_settings, kp_pipe = fresh(work, bootstrap, args.block)
                out["produce_kafka_python"] = produce_kafka_python(kp_settings, kp_pipe, args.kafka_python_events)
                print(f"  previous sender (one kafka-python producer): {out['produce_kafka_python']}", flush=True)
            out["raw_fetch"] = raw_fetch(settings, pipe, validate=False)
            print(f"raw kafka-python fetch: {out['raw_fetch']}", flush=True)
            out["raw_fetch_confluent"] = raw_fetch_confluent(settings, pipe, validate=False)
            print(f"raw librdkafka fetch:   {out['raw_fetch_confluent']}", flush=True)
            out["fetch_validate"] = raw_fetch(settings, pipe, validate=True)
            print(f"fetch + validate:       {out['fetch_validate']}", flush=True)
            if not args.only_archiver:
                out["fetch_validate_dedup"] = raw_fetch(settings, pipe, validate=True, dedup=True)
                print(f"fetch + validate + dedup: {out['fetch_validate_dedup']}", flush=True)
            out["fetch_validate_confluent"] = raw_fetch_confluent(settings, pipe, validate=True)
            print(f"librdkafka + validate:  {out['fetch_validate_confluent']}", flush=True)
            out["raw_fetch_confluent_2"] = raw_fetch_confluent_processes(settings, 2, validate=False)
            print(f"raw librdkafka fetch, 2 processes:  {out['raw_fetch_confluent_2']}", flush=True)
            out["fetch_validate_confluent_2"] = raw_fetch_confluent_processes(settings, 2, validate=True)
            print(f"librdkafka + validate, 2 processes: {out['fetch_validate_confluent_2']}", flush=True)
            if args.only_archiver:
                out["workers"] = workers_scaling(work, settings, args.events, out["produce"]["messages"],
                                                 [int(n) for n in args.workers.split(",") if n], ("ingest",))
                out["load_average"] = os.getloadavg()
                return finish(out)
            out["speed"] = speed_in_process(settings, pipe, args.checkpoint_interval)
            print(f"speed layer (in-process, checkpoint every {args.checkpoint_interval}s): {out['speed']}",
                  flush=True)
            raw = out["raw_fetch"]["per_second"]
            out["ratios_to_raw_fetch"] = {k: round(out[k]["per_second"] / raw, 2)
                                          for k in ("fetch_validate", "fetch_validate_dedup", "speed")}
            print(f"per worker, as a ratio to the raw kafka-python fetch: {out['ratios_to_raw_fetch']} (the "
                  "speed layer's goal: 0.8; fetch + validate + dedup is the least per-event work it owes)", flush=True)
            out["workers"] = workers_scaling(work, settings, args.events, out["produce"]["messages"],
                                             [int(n) for n in args.workers.split(",") if n])
            out["freshness"] = []
            for workers in [int(n) for n in args.freshness_workers.split(",") if n]:
                for rate in [float(r) for r in args.rates.split(",") if r]:
                    res = freshness(work, bootstrap, args.block, rate, args.duration, args.checkpoint_interval,
                                    workers=workers)
                    out["freshness"].append(res)
                    print(f"freshness @ {rate:,.0f}/s, {workers} speed worker(s): "
                          + json.dumps({k: v for k, v in res.items() if k != "rss_mb"}), flush=True)
            for workers in sorted({r["workers"] for r in out["freshness"]}):
                ok = [r["target_rate"] for r in out["freshness"] if r["workers"] == workers
                      and r["freshness_ms"]["p99"] is not None and r["freshness_ms"]["p99"] <= 1000
                      and r["achieved_produce_rate"] >= 0.95 * r["target_rate"]]
                out.setdefault("highest_rate_p99_within_1s", {})[str(workers)] = max(ok) if ok else None
            if out["freshness"]:
                print(f"highest offered rate with p99 <= 1 s (by speed workers): {out['highest_rate_p99_within_1s']}")
        finally:
            if broker is not None:
                broker.down(timeout=30)
    finish(out)


def finish(out: dict) -> None:
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"speed-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
