"""Group membership benchmark (not a test): what a worker's death costs when the layers run as consumer groups, and
what membership costs in throughput against static shares.

Against a real broker (the embedded one on a free port):

1. **Cost of membership** (``--backlog N``, skipped with ``--kills-only``): N messages produced once into fresh
   topics, then per layer, alternately (static, group, static, group, ... ``--rounds`` times each), two workers
   consume the whole backlog into a fresh lake each: static shares (``lambdalake ingest --until-caught-up --workers
   2``; ``lambdalake speed --no-group --workers 2``) against group members (``lambdalake ingest --workers 2``;
   ``lambdalake speed --group --workers 2``, daemons stopped with SIGTERM once caught up). Each run is timed from
   process start to every partition archived (``lambdalake.heads.archived_positions``) or in the published speed
   set (``read_speed_set(...).meta.positions``) up to the backlog's end offsets: messages/s per run, and the ratio
   of the medians group / static (below 1: membership costs throughput). The group runs include joining the group.
2. **A worker's death** (``--kills K``, skipped with ``--cost-only``), while a producer sends at ``--rate``
   messages/s: two members of a layer's group (``lambdalake ingest``; ``lambdalake speed --group``); K times, kill
   -9 one member and time from the kill until every partition is archived (archiver) or in the union of the
   published snapshots (speed) up to the log end seen at the kill; then start a new member in its place and wait
   for the group to settle. p50 and p99 over the kills: p99 is ``statistics.quantiles(n=100, method='inclusive')``,
   which with 20 kills interpolates between the two largest (0.81 of the way to the max); the max is reported next
   to it. Baseline: the same wait with no kill (what it takes a live member to catch up with what arrived
   meanwhile). A kill not recovered within ``--kill-timeout`` is reported (lagging partitions) and counted as
   failed, not averaged in; a takeover slower than twice the session timeout has its lag at that moment recorded.

Settings in the output: the group session timeout (6 s, both layers), the speed layer's ``--checkpoint-interval``
and the archiver's roll age (``LAMBDALAKE_ARCHIVE_ROLL_SECONDS``), which bound how soon a caught-up worker shows.

    .venv/bin/python bench/bench_groups.py --kills 20 --rate 2000 --backlog 300000
    .venv/bin/python bench/bench_groups.py --cost-only --backlog 300000 --rounds 3
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
SESSION_TIMEOUT_S = 6.0  # batch.archiver.GROUP_CONFIG, speed.group: session.timeout.ms 6000


def _pipeline_file(workdir: Path, name: str) -> Path:
    """The demo clickstream pipeline over topics of its own (a fresh suffix)."""
    suffix = uuid.uuid4().hex[:8]
    f = workdir / f"{name}.py"
    f.write_text("from lambdalake.fields import Source\nfrom lambdalake.pipeline import Pipeline, load_pipeline\n"
                 "_p = load_pipeline('lambdalake.pipelines.clickstream')\n"
                 "pipeline = Pipeline(_p.name, views=_p.views, sources=[Source(name=s.name, topic=f'{s.topic}."
                 f"{suffix}', fields=s.fields, event_id=s.event_id, event_time=s.event_time, key=s.key) "
                 "for s in _p.sources])\n")
    return f


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([LAMBDALAKE, *args], env=env, stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _lag(layer: str, home: Path, pipeline, target: dict) -> dict[str, int]:
    """{"topic[p]": messages behind target} of the partitions not yet past ``target``."""
    layout = Layout(home)
    if layer == "archiver":
        got = {(s.topic, p): e for s in pipeline.sources for p, e in archived_positions(layout, s.name).items()}
    else:
        found = read_speed_set(layout)
        got = {} if found is None else dict(found.meta.positions)
    return {f"{t}[{p}]": e - got.get((t, p), 0) for (t, p), e in sorted(target.items()) if got.get((t, p), 0) < e}


def _wait(layer: str, home: Path, pipeline, target: dict, t0: float, timeout: float, *, poll: float = 0.05,
          slow_after: float | None = None, proc: subprocess.Popen | None = None) -> dict:
    """Wait until ``layer`` is past ``target``: {"seconds": since t0 or None on timeout, "lag": ...}. ``lag`` is the
    lag seen ``slow_after`` seconds after t0 (a slow takeover), or at the timeout. ``proc`` exiting is an error."""
    out: dict = {"seconds": None}
    while (now := time.monotonic()) - t0 < timeout:
        lag = _lag(layer, home, pipeline, target)
        if not lag:
            out["seconds"] = time.monotonic() - t0
            return out
        if slow_after is not None and now - t0 >= slow_after and "lag" not in out:
            out["lag"] = lag
            out["lag_at_s"] = round(now - t0, 2)
        if proc is not None and proc.poll() is not None and _lag(layer, home, pipeline, target):
            raise RuntimeError(f"{layer} exited ({proc.returncode}) before catching up: {lag}")
        time.sleep(poll)
    out["lag"], out["lag_at_s"] = _lag(layer, home, pipeline, target), round(timeout, 2)
    return out


def _assignments(log: Path, started: float) -> list[float]:
    """Seconds from ``started`` (wall clock) to each "assigned" line of a member's log: how long joining took."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if " assigned " in line:
            try:
                at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
            out.append(round(at - started, 2))
    return out


def _summary(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) >= 2 else values * 99
    return {"p50": round(statistics.median(values), 2), "p99": round(q[98], 2), "max": round(max(values), 2)}


# --- 1. cost of membership -----------------------------------------------------------------------------------------
def cost_commands(layer: str, checkpoint_interval: float) -> dict[str, list[str]]:
    if layer == "archiver":
        return {"static": ["ingest", "--until-caught-up", "--workers", "2"], "group": ["ingest", "--workers", "2"]}
    speed = ["speed", "--checkpoint-interval", str(checkpoint_interval), "--workers", "2"]
    return {"static": [*speed, "--no-group"], "group": [*speed, "--group"]}


def bench_cost(layer: str, pipeline, env: dict, target: dict, backlog: int, rounds: int, workdir: Path,
               checkpoint_interval: float) -> dict:
    commands = cost_commands(layer, checkpoint_interval)
    runs: dict[str, list[dict]] = {"static": [], "group": []}
    for r, variant in itertools.product(range(rounds), ("static", "group")):
        home = workdir / f"cost-{layer}-{variant}-{r}"
        log = workdir / f"cost-{layer}-{variant}-{r}.log"
        load = os.getloadavg()[0]
        t0, wall0 = time.monotonic(), time.time()
        proc = _start(commands[variant], {**env, "LAMBDALAKE_HOME": str(home)}, log)
        try:
            w = _wait(layer, home, pipeline, target, t0, timeout=600, poll=0.1, proc=proc)
        finally:
            stop_group(proc, timeout=60, first=signal.SIGTERM)
        if w["seconds"] is None:
            raise RuntimeError(f"{layer} {variant} did not consume the backlog in 600 s: {w['lag']} (log {log})")
        run = {"seconds": round(w["seconds"], 2), "per_second": round(backlog / w["seconds"]),
               "load_1m_at_start": round(load, 2)}
        if variant == "group":  # a member that joins late (or is evicted) shows as a late assignment
            run["assigned_at_s"] = _assignments(log, wall0)
        runs[variant].append(run)
        print(f"{layer} {variant} round {r + 1}/{rounds}: {backlog:,} messages in {w['seconds']:.2f}s = "
              f"{backlog / w['seconds']:,.0f}/s (load {load:.2f})"
              + (f"; assignments at {run['assigned_at_s']} s" if "assigned_at_s" in run else ""), file=sys.stderr)
    med = {v: statistics.median(x["per_second"] for x in runs[v]) for v in runs}
    return {"commands": {v: f"lambdalake {' '.join(c)}" for v, c in commands.items()}, "backlog": backlog,
            "rounds": rounds, "static": runs["static"], "group": runs["group"],
            "static_median_per_second": round(med["static"]), "group_median_per_second": round(med["group"]),
            "ratio_group_over_static": round(med["group"] / med["static"], 3)}


# --- 2. a worker's death -------------------------------------------------------------------------------------------
def bench_kills(layer: str, settings, pipeline, env: dict, kills: int, workdir: Path, checkpoint_interval: float,
                kill_timeout: float) -> dict:
    args = ["ingest"] if layer == "archiver" else ["speed", "--group", "--checkpoint-interval",
                                                     str(checkpoint_interval)]
    topics = [s.topic for s in pipeline.sources]
    home = settings.home

    def wait_now(**kw) -> dict:
        t0 = time.monotonic()
        return _wait(layer, home, pipeline, end_offsets(settings, topics), t0, **kw)

    members = [_start(args, env, workdir / f"{layer}-{i}.log") for i in range(2)]
    logs = {m.pid: str(workdir / f"{layer}-{i}.log") for i, m in enumerate(members)}
    try:
        time.sleep(SESSION_TIMEOUT_S + 2)  # both joined and assigned
        if wait_now(timeout=kill_timeout)["seconds"] is None:
            raise RuntimeError(f"{layer}: the two members did not catch up within {kill_timeout}s")
        baseline = [wait_now(timeout=kill_timeout)["seconds"] for _ in range(max(3, kills // 2))]
        took, slow, failed = [], [], []
        for k in range(kills):
            victim = members.pop(0)
            t0 = time.monotonic()
            stop_group(victim, timeout=10, first=signal.SIGKILL)
            w = _wait(layer, home, pipeline, end_offsets(settings, topics), t0, timeout=kill_timeout,
                      slow_after=2 * SESSION_TIMEOUT_S)
            detail = {"kill": k + 1, "victim_pid": victim.pid, "victim_log": logs.get(victim.pid),
                      "survivor_pid": members[0].pid, "survivor_log": logs.get(members[0].pid),
                      "at": datetime.now(UTC).isoformat(timespec="seconds"), "load_1m": round(os.getloadavg()[0], 2),
                      **{k2: w[k2] for k2 in ("lag", "lag_at_s") if k2 in w}}
            if w["seconds"] is None:
                failed.append(detail)
                print(f"{layer} kill {k + 1}/{kills}: NOT caught up within {kill_timeout}s: {detail}",
                      file=sys.stderr)
            else:
                took.append(w["seconds"])
                if "lag" in w:
                    slow.append({**detail, "seconds": round(w["seconds"], 2)})
                print(f"{layer} kill {k + 1}/{kills}: caught up again after {w['seconds']:.2f}s"
                      + (f" (slow: lag at {w['lag_at_s']}s {w['lag']})" if "lag" in w else ""), file=sys.stderr)
            log = workdir / f"{layer}-{k + 2}.log"
            members.append(_start(args, env, log))
            logs[members[-1].pid] = str(log)
            time.sleep(SESSION_TIMEOUT_S + 2)  # the new member joined; the next kill hits a settled group
        out = {"kills": kills, "recovered": len(took), "seconds": [round(t, 2) for t in took],
               **(_summary(took) if took else {"p50": None, "p99": None, "max": None}),
               "p99_method": "statistics.quantiles(n=100, method='inclusive') over the recovered kills",
               "baseline_p50": round(statistics.median(baseline), 2) if None not in baseline else None,
               "session_timeout_s": SESSION_TIMEOUT_S, "slow": slow, "did_not_recover": failed,
               "kill_timeout_s": kill_timeout}
        if failed:  # an honest p99 is not known: at least the timeout
            out["p99"] = out["max"] = None
        return out
    finally:
        for m in members:
            stop_group(m, timeout=30, first=signal.SIGTERM)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10, help="kill -9s per layer (20 for a p99 worth its name)")
    ap.add_argument("--rate", type=float, default=2000.0, help="messages/s sent while killing")
    ap.add_argument("--kill-timeout", type=float, default=120.0, help="seconds a takeover may take before it counts "
                    "as failed")
    ap.add_argument("--backlog", type=int, default=300_000, help="messages consumed by static shares and by group "
                    "members (the cost of membership)")
    ap.add_argument("--rounds", type=int, default=2, help="static, group runs per layer, alternately")
    ap.add_argument("--layers", default="archiver,speed")
    ap.add_argument("--checkpoint-interval", type=float, default=0.1, help="the speed workers' (seconds)")
    ap.add_argument("--roll-seconds", type=float, default=0.5, help="the archiver's LAMBDALAKE_ARCHIVE_ROLL_SECONDS")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--cost-only", action="store_true", help="only the throughput cost of membership")
    only.add_argument("--kills-only", action="store_true", help="only the kills")
    args = ap.parse_args()
    layers = args.layers.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="lambdalake-groups-"))
    broker = EmbeddedBroker(workdir / "kafka-home", port=free_port(), controller_port=free_port(), heap="1g",
                            tied_to_parent=True)
    bootstrap = broker.up(timeout=120)["bootstrap"]
    stop = threading.Event()
    result: dict = {"bench": "groups", "at": datetime.now(UTC).isoformat(timespec="seconds"), "rate": args.rate,
                    "args": vars(args), "session_timeout_s": SESSION_TIMEOUT_S,
                    "checkpoint_interval_s": args.checkpoint_interval, "archive_roll_seconds": args.roll_seconds,
                    "load_average_at_start": os.getloadavg(), "cpus": os.cpu_count()}
    base_env = {**os.environ, "LAMBDALAKE_BOOTSTRAP": bootstrap, "LAMBDALAKE_ARCHIVE_ROLL_SECONDS":
                str(args.roll_seconds), "LAMBDALAKE_LOG": "INFO"}
    settings_note = (f"session timeout {SESSION_TIMEOUT_S}s, speed checkpoint interval {args.checkpoint_interval}s, "
                     f"archiver roll {args.roll_seconds}s")
    try:
        if not args.kills_only:
            pfile = _pipeline_file(workdir, "pipeline_cost")
            settings = load_settings(home=workdir / "cost-produce", bootstrap=bootstrap, pipeline=str(pfile),
                                     partitions=4)
            pipeline = load_pipeline(str(pfile))
            ensure_topics(settings, pipeline)
            t0 = time.monotonic()
            send(settings, demo_messages(pipeline, args.backlog, seed=3), progress=False)
            print(f"backlog: {args.backlog:,} messages produced in {time.monotonic() - t0:.1f}s", file=sys.stderr)
            target = end_offsets(settings, [s.topic for s in pipeline.sources])
            env = {**base_env, "LAMBDALAKE_PIPELINE": str(pfile)}
            result["cost"] = {}
            for layer in layers:
                c = result["cost"][layer] = bench_cost(layer, pipeline, env, target, args.backlog, args.rounds,
                                                       workdir, args.checkpoint_interval)
                print(f"{layer}: {c['backlog']:,} messages, 2 workers: static "
                      f"{[x['per_second'] for x in c['static']]}/s, group {[x['per_second'] for x in c['group']]}/s; "
                      f"group/static (medians) {c['ratio_group_over_static']} ({settings_note})")
        if not args.cost_only:
            pfile = _pipeline_file(workdir, "pipeline_kills")
            settings = load_settings(home=workdir / "lake", bootstrap=bootstrap, pipeline=str(pfile), partitions=4)
            pipeline = load_pipeline(str(pfile))
            ensure_topics(settings, pipeline)
            env = {**base_env, "LAMBDALAKE_HOME": str(settings.home), "LAMBDALAKE_PIPELINE": str(pfile)}
            send(settings, demo_messages(pipeline, 20_000, seed=1), progress=False)
            stream = itertools.takewhile(lambda _: not stop.is_set(), demo_messages(pipeline, 10_000_000, seed=2))
            feeder = threading.Thread(target=lambda: send(settings, stream, rate=args.rate, progress=False),
                                      daemon=True)
            feeder.start()
            for layer in layers:
                r = result[layer] = bench_kills(layer, settings, pipeline, env, args.kills, workdir,
                                                args.checkpoint_interval, args.kill_timeout)
                print(f"{layer}: death -> caught up p50 {r['p50']}s, p99 {r['p99']}s (inclusive quantile), max "
                      f"{r['max']}s over {r['recovered']} of {r['kills']} kills"
                      + (f", {len(r['did_not_recover'])} NOT recovered in {args.kill_timeout}s"
                         if r["did_not_recover"] else "")
                      + (f", {len(r['slow'])} slower than {2 * SESSION_TIMEOUT_S}s" if r["slow"] else "")
                      + f" (no kill: {r['baseline_p50']}s; {args.rate:,.0f} msg/s; {settings_note})")
    finally:
        stop.set()
        broker.down()
        result["load_average_at_end"] = os.getloadavg()
    print(f"load average at start {result['load_average_at_start']}, at end {result['load_average_at_end']}; "
          f"work dir {workdir}")
    out = REPO / "bench" / "results" / f"bench_groups-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
