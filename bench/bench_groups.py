"""Group membership benchmark (not a test): what a worker's death costs when the layers run as consumer groups.

Against a real broker (the embedded one on a free port), while a producer sends at ``--rate`` messages/s:

1. ``archiver``: two ``lambdalake ingest`` daemons (members of the archivers' group); ``--kills`` times, kill -9 one
   member and time until every partition is archived up to the log end seen at the kill (its partitions taken over
   once its session expires), then start a new member in its place.
2. ``speed``: the same with two ``lambdalake speed --group`` members, timing until the union of the published
   snapshots is past the log end seen at the kill (served fresh again).

Each kill's time is death -> caught up; p50/p99/max over the kills, next to the session timeout (6 s) that bounds
how soon the group notices a dead member, and the same wait with no kill (the baseline: what it takes a live member
to catch up with what arrived meanwhile).

    .venv/bin/python bench/bench_groups.py --kills 10 --rate 2000
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lambdalake.broker import EmbeddedBroker  # noqa: E402
from lambdalake.clients import end_offsets, ensure_topics  # noqa: E402
from lambdalake.config import load_settings  # noqa: E402
from lambdalake.embedded import free_port  # noqa: E402
from lambdalake.heads import archived_positions  # noqa: E402
from lambdalake.layout import Layout  # noqa: E402
from lambdalake.pipeline import load_pipeline  # noqa: E402
from lambdalake.procs import stop_group  # noqa: E402
from lambdalake.speedset import read_speed_set  # noqa: E402
from wiring.demo_stream import demo_messages  # noqa: E402
from wiring.produce import send  # noqa: E402

LAMBDALAKE = str(REPO / ".venv" / "bin" / "lambdalake")
SESSION_TIMEOUT_S = 6.0


def _pipeline_file(workdir: Path) -> Path:
    suffix = uuid.uuid4().hex[:8]
    f = workdir / "pipeline_groups.py"
    f.write_text("from lambdalake.fields import Source\nfrom lambdalake.pipeline import Pipeline, load_pipeline\n"
                 "_p = load_pipeline('lambdalake.pipelines.clickstream')\n"
                 "pipeline = Pipeline(_p.name, views=_p.views, sources=[Source(name=s.name, topic=f'{s.topic}."
                 f"{suffix}', fields=s.fields, event_id=s.event_id, event_time=s.event_time, key=s.key) "
                 "for s in _p.sources])\n")
    return f


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([LAMBDALAKE, *args], env=env, stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _caught_up(layer: str, settings, pipeline, target: dict) -> bool:
    layout = Layout(settings.home)
    if layer == "archiver":
        got = {(s.topic, p): e for s in pipeline.sources for p, e in archived_positions(layout, s.name).items()}
    else:
        found = read_speed_set(layout)
        got = {} if found is None else dict(found.meta.positions)
    return all(got.get(k, 0) >= e for k, e in target.items())


def _wait(layer: str, settings, pipeline, timeout: float = 120.0) -> float:
    """Seconds until ``layer`` is past the log end seen now."""
    target = end_offsets(settings, [s.topic for s in pipeline.sources])
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if _caught_up(layer, settings, pipeline, target):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise RuntimeError(f"{layer} did not catch up within {timeout}s")


def bench_layer(layer: str, settings, pipeline, env: dict, kills: int, workdir: Path) -> dict:
    args = ["ingest"] if layer == "archiver" else ["speed", "--group", "--checkpoint-interval", "0.1"]
    members = [_start(args, env, workdir / f"{layer}-{i}.log") for i in range(2)]
    try:
        time.sleep(SESSION_TIMEOUT_S + 2)  # both joined and assigned
        _wait(layer, settings, pipeline)
        baseline = [_wait(layer, settings, pipeline) for _ in range(max(3, kills // 2))]
        took = []
        for k in range(kills):
            victim = members.pop(0)
            stop_group(victim, timeout=10, first=signal.SIGKILL)
            took.append(_wait(layer, settings, pipeline))
            print(f"{layer} kill {k + 1}/{kills}: caught up again after {took[-1]:.2f}s", file=sys.stderr)
            members.append(_start(args, env, workdir / f"{layer}-{k + 2}.log"))
            time.sleep(SESSION_TIMEOUT_S + 2)  # the new member joined; the next kill hits a settled group
        q = statistics.quantiles(took, n=100, method="inclusive") if len(took) >= 2 else took * 99
        return {"kills": kills, "seconds": [round(t, 2) for t in took], "p50": round(statistics.median(took), 2),
                "p99": round(q[98], 2), "max": round(max(took), 2),
                "baseline_p50": round(statistics.median(baseline), 2), "session_timeout_s": SESSION_TIMEOUT_S}
    finally:
        for m in members:
            stop_group(m, timeout=30, first=signal.SIGTERM)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--rate", type=float, default=2000.0, help="messages/s sent while measuring")
    ap.add_argument("--layers", default="archiver,speed")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="lambdalake-groups-"))
    broker = EmbeddedBroker(workdir / "kafka-home", port=free_port(), controller_port=free_port(), heap="1g",
                            tied_to_parent=True)
    bootstrap = broker.up(timeout=120)["bootstrap"]
    stop = threading.Event()
    result: dict = {"bench": "groups", "at": datetime.now(UTC).isoformat(timespec="seconds"), "rate": args.rate}
    try:
        pfile = _pipeline_file(workdir)
        settings = load_settings(home=workdir / "lake", bootstrap=bootstrap, pipeline=str(pfile), partitions=4)
        pipeline = load_pipeline(str(pfile))
        ensure_topics(settings, pipeline)
        env = {**os.environ, "LAMBDALAKE_HOME": str(settings.home), "LAMBDALAKE_BOOTSTRAP": bootstrap,
               "LAMBDALAKE_PIPELINE": str(pfile), "LAMBDALAKE_ARCHIVE_ROLL_SECONDS": "0.5",
               "LAMBDALAKE_LOG": "INFO"}
        send(settings, demo_messages(pipeline, 20_000, seed=1), progress=False)
        stream = itertools.takewhile(lambda _: not stop.is_set(), demo_messages(pipeline, 10_000_000, seed=2))
        feeder = threading.Thread(target=lambda: send(settings, stream, rate=args.rate, progress=False), daemon=True)
        feeder.start()
        for layer in args.layers.split(","):
            result[layer] = bench_layer(layer, settings, pipeline, env, args.kills, workdir)
            r = result[layer]
            print(f"{layer}: death -> caught up p50 {r['p50']}s, p99 {r['p99']}s, max {r['max']}s over {r['kills']} "
                  f"kills (no kill: {r['baseline_p50']}s; session timeout {r['session_timeout_s']}s)")
    finally:
        stop.set()
        broker.down()
    out = REPO / "bench" / "results" / f"bench_groups-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
