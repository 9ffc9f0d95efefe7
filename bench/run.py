"""``make bench``: run the batch, speed and serving benchmarks and summarize them in one table.

Each benchmark is its own script in ``bench/`` (``bench_batch.py``, ``bench_speed.py``, ``bench_validation.py``,
``bench_serving.py``, ``bench_s3.py``, ``bench_cdc.py``) and
is run here as a child process with the sizes of the chosen profile; each writes its own JSON result into
``bench/results/``. This runner then collects those results, pulls out every figure next to its baseline (the
thing the figure should be judged against: raw kafka-python fetch for the speed layer, DuckDB over the same files
for the Spark recompute, a raw master scan for serving, ...) and writes

- ``bench/results/bench-<UTC time>.json``: machine info, date, profile, per benchmark its status, command, log,
  raw result file, and the figures;
- ``bench/results/bench-<UTC time>.md``: the same as a markdown table (also printed).

A benchmark that is missing, fails, times out or writes no result is reported as such in the table; the others
still run. ``bench/results/`` is git-ignored. Not part of ``make test``.

    make bench                                # full profile: tens of minutes
    make bench BENCH_ARGS=--quick             # a few minutes, noisier figures
    .venv/bin/python bench/run.py --quick --only speed,serving
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from lambdalake.procs import stop_group

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Bench:
    """One benchmark script: how to run it per profile and which result files it writes."""

    name: str
    script: str
    result_prefix: str  # its JSON results are bench/results/<prefix>*.json
    quick: tuple[str, ...]
    full: tuple[str, ...]
    timeout_quick: float
    timeout_full: float


BENCHES = [
    Bench("batch", "bench_batch.py", "bench_batch-",
          quick=("--sizes", "200000", "--archiver-events", "50000"),
          full=("--sizes", "1000000", "10000000", "--archiver-events", "1000000"),
          timeout_quick=900, timeout_full=5400),
    Bench("batch-incremental", "bench_batch.py", "bench_batch-",
          quick=("--sizes", "1000000", "--skip-archiver", "--incremental", "--repeat", "1"),
          full=("--sizes", "10000000", "--skip-archiver", "--incremental"),
          timeout_quick=1800, timeout_full=3600),
    Bench("speed", "bench_speed.py", "speed-",
          quick=("--quick", "--rates", "5000,20000", "--sustained-duration", "20"),
          full=(),
          timeout_quick=900, timeout_full=3600),
    Bench("validation", "bench_validation.py", "validation-",
          quick=("--messages", "30000", "--repeat", "3"), full=(),
          timeout_quick=600, timeout_full=1800),
    Bench("groups", "bench_groups.py", "bench_groups-",
          quick=("--kills", "4", "--rate", "1000", "--backlog", "100000"),
          full=("--kills", "20", "--rate", "5000", "--backlog", "300000", "--rounds", "3"),
          timeout_quick=1200, timeout_full=3600),
    Bench("serving", "bench_serving.py", "serving-",
          quick=("--sizes", "1000000", "--reps", "30", "--raw-reps", "10"),
          full=("--sizes", "1000000,10000000"),
          timeout_quick=900, timeout_full=3600),
    Bench("s3", "bench_s3.py", "bench_s3-", quick=("--quick",), full=(), timeout_quick=900, timeout_full=2700),
    Bench("cdc", "bench_cdc.py", "bench_cdc-", quick=("--changes", "20000"), full=("--changes", "100000"),
          timeout_quick=600, timeout_full=1200),
]


@dataclass
class Figure:
    """One measured number, the baseline it is judged against, and value / baseline."""

    bench: str
    figure: str
    value: float | None
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline_value:
            return None
        return self.value / self.baseline_value


@dataclass
class Outcome:
    bench: str
    status: str  # ok | missing | failed (exit N) | timeout | no result | unreadable result
    seconds: float = 0.0
    command: list[str] = field(default_factory=list)
    log: str | None = None
    result_file: str | None = None
    detail: str = ""


# --- machine -------------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    """What the figures depend on: CPU, memory, load at the start, versions."""
    import psutil

    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("pyspark", "duckdb", "pyarrow", "kafka-python"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30).stderr
        versions["java"] = java.splitlines()[0] if java else None
    except (OSError, subprocess.SubprocessError):
        versions["java"] = None
    kafka_jar = next(iter(sorted((REPO / ".cache" / "kafka" / "libs").glob("kafka_2.13-*.jar"))), None)
    versions["kafka broker"] = kafka_jar.stem.removeprefix("kafka_2.13-") if kafka_jar else None
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "host": platform.node(), "platform": platform.platform(), "cpu": cpu_model, "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(), "versions": versions, "git_commit": commit,
    }


# --- running one benchmark -----------------------------------------------------------------------------------------
def run_bench(bench: Bench, quick: bool, stamp: str, echo: bool) -> Outcome:
    script = REPO / "bench" / bench.script
    args = list(bench.quick if quick else bench.full)
    cmd = [sys.executable, str(script), *args]
    out = Outcome(bench.name, "missing", command=cmd)
    if not script.exists():
        out.detail = f"bench/{bench.script} does not exist"
        return out
    before = {p.name for p in RESULTS.glob(f"{bench.result_prefix}*.json")}
    log_path = RESULTS / "logs" / f"{stamp}-{bench.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out.log = str(log_path.relative_to(REPO))
    timeout = bench.timeout_quick if quick else bench.timeout_full
    t0 = time.monotonic()
    print(f"\n== {bench.name}: {shlex.join(['bench/' + bench.script, *args])} (log: {out.log})", flush=True)
    with open(log_path, "wb") as log:
        # its own process group, so a timeout or Ctrl-C stops everything it started (brokers, Spark JVMs)
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # live progress in the log
        try:
            _pump(proc, log, echo, deadline=t0 + timeout)
        except TimeoutError:
            stop_group(proc)
            out.status, out.detail = "timeout", f"stopped after {timeout:.0f}s"
        except BaseException:
            stop_group(proc)
            raise
    out.seconds = round(time.monotonic() - t0, 1)
    if out.status == "timeout":
        return out
    if proc.returncode != 0:
        out.status = f"failed (exit {proc.returncode})"
        out.detail = _tail(log_path)
        return out
    new = sorted((p for p in RESULTS.glob(f"{bench.result_prefix}*.json") if p.name not in before),
                 key=lambda p: p.stat().st_mtime)
    if not new:
        out.status, out.detail = "no result", f"exited 0 but wrote no bench/results/{bench.result_prefix}*.json"
        return out
    out.status, out.result_file = "ok", str(new[-1].relative_to(REPO))
    return out


def _pump(proc: subprocess.Popen, log, echo: bool, deadline: float) -> None:
    """Copy the child's output to its log (and stdout) until it exits or the deadline passes."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError
        if sel.select(timeout=1.0):
            chunk = proc.stdout.read1(65536)
            if not chunk:
                break
            log.write(chunk)
            log.flush()
            if echo:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
    proc.stdout.close()
    proc.wait(max(1.0, deadline - time.monotonic()))


def _tail(path: Path, lines: int = 6) -> str:
    try:
        return " | ".join(x.strip() for x in path.read_text(errors="replace").splitlines()[-lines:] if x.strip())
    except OSError:
        return ""


# --- figures per benchmark -----------------------------------------------------------------------------------------
def _rate(d: dict | None) -> float | None:
    return None if not d else d.get("per_second")


def batch_figures(r: dict, others: dict[str, dict]) -> list[Figure]:
    out = []
    if "archiver" in r:
        a = r["archiver"]
        raw = _rate((others.get("speed") or {}).get("raw_fetch"))
        out.append(Figure("batch", f"archiver throughput ({a.get('messages', 0):,} messages -> Parquet + DLQ)",
                          a.get("events_per_s"), "msg/s", "raw kafka-python fetch (speed bench, same broker setup)"
                          if raw else "", raw))
        if a.get("s3"):
            s3 = a["s3"]
            out.append(Figure("batch", f"archiver on the embedded S3 server ({s3['messages']:,} messages; "
                              f"{s3['requests_per_roll']} object requests per roll)", s3.get("events_per_s"),
                              "msg/s", "the same archiver on local disk, same run (goal >= 0.8x)",
                              a.get("events_per_s")))
    for rc in r.get("recompute", []):
        note = "" if rc.get("row_counts_match", True) else "ROW COUNTS DIFFER between Spark and DuckDB"
        out.append(Figure("batch", f"recompute all views, {rc['events']:,} events (Spark job, {r.get('spark', '')})",
                          rc.get("spark_seconds"), "s", "DuckDB SQL over the same master files",
                          rc.get("duckdb_seconds"), note))
        if rc.get("plain_spark_seconds"):
            out.append(Figure("batch", f"recompute all views, {rc['events']:,} events (Spark job)",
                              rc.get("spark_seconds"), "s", "plain-Spark ceiling (same session and files)",
                              rc.get("plain_spark_seconds"),
                              f"ceiling / DuckDB {rc.get('plain_spark_over_duckdb')}x"))
    for inc in r.get("incremental", []):
        note = "" if inc.get("versions_equal") else "INCREMENTAL AND FULL VERSIONS DIFFER"
        what = f"{inc['events']:,} events + {inc['appended']:,} appended"
        out.append(Figure("batch", f"incremental run, {what}", inc.get("incremental_seconds"), "s",
                          "full recompute of the same data", inc.get("full_seconds"), note))
        if inc.get("plain_spark_incremental_seconds"):
            out.append(Figure("batch", f"plain-Spark incremental floor, {what}",
                              inc.get("plain_spark_incremental_seconds"), "s", "full recompute of the same data",
                              inc.get("full_seconds"),
                              f"incremental / floor {inc.get('incremental_over_plain_spark')}x"))
    return out


def speed_figures(r: dict, others: dict[str, dict]) -> list[Figure]:
    out = []
    raw = _rate(r.get("raw_fetch"))
    if "speed" in r:
        out.append(Figure("speed", "speed layer throughput (validate, dedup, aggregate, checkpoint)",
                          _rate(r["speed"]), "msg/s", "raw kafka-python fetch", raw))
    if "fetch_validate" in r:
        out.append(Figure("speed", "fetch + validate only", _rate(r["fetch_validate"]), "msg/s",
                          "raw kafka-python fetch", raw))
    if "fetch_validate_dedup" in r:
        out.append(Figure("speed", "fetch + validate + dedup only (the least per-event work of the speed layer)",
                          _rate(r["fetch_validate_dedup"]), "msg/s", "raw kafka-python fetch", raw))
    # the archiver reads with librdkafka: its ceilings are librdkafka's fetch + validate, in 1 and 2 processes
    ceilings = {1: _rate(r.get("fetch_validate_confluent")), 2: _rate(r.get("fetch_validate_confluent_2"))}
    one = {w["command"]: w for w in r.get("workers", []) if w["workers"] == 1}
    for w in r.get("workers", []):
        what = "archiver" if w["command"] == "ingest" else "speed layer"
        base = one.get(w["command"])
        if what == "archiver" and ceilings.get(w["workers"]) is not None:
            scale = (f"; {w['per_second'] / base['per_second']:.2f}x 1 worker" if base is not None and w is not base
                     else "")
            out.append(Figure("speed", f"archiver CLI, {w['workers']} worker(s) (process start to exit)",
                              w["per_second"], "msg/s",
                              f"librdkafka fetch + validate, {w['workers']} process(es)", ceilings[w["workers"]],
                              f"{w['messages']:,} messages, fresh topics{scale}"))
            if w.get("master_bytes_per_event") is not None:
                out.append(Figure("speed", f"master bytes per event (archiver, {w['workers']} worker(s))",
                                  w["master_bytes_per_event"], "B", "log value bytes per valid message",
                                  w.get("log_value_bytes_per_valid_message"),
                                  f"{w['master_rows']:,} rows in {w['master_bytes']:,} bytes"))
        elif w["workers"] == 1:
            out.append(Figure("speed", f"{what} CLI, 1 worker (process start to exit)", w["per_second"], "msg/s",
                              "raw kafka-python fetch (one process)", raw))
        elif base is not None:
            out.append(Figure("speed", f"{what} CLI, {w['workers']} workers (process start to exit)",
                              w["per_second"], "msg/s", "the same with 1 worker", base["per_second"],
                              f"{w['messages']:,} messages; {os.cpu_count()} cores shared with the broker"))
    interval_ms = 1000 * float((r.get("args") or {}).get("checkpoint_interval") or 0) or None
    runs = [(f"@ {f['target_rate']:,.0f} msg/s", f) for f in r.get("freshness", [])]
    if "sustained_with_handoff" in r:
        s = r["sustained_with_handoff"]
        runs.append((f"@ {s['target_rate']:,.0f} msg/s with batch handoffs", s))
    for label, f in runs:
        fr = f.get("freshness_ms") or {}
        for q in ("p50", "p99"):
            out.append(Figure("speed", f"freshness {q} {label} (produce -> visible)", fr.get(q), "ms",
                              "checkpoint/publish interval" if interval_ms else "", interval_ms,
                              f"achieved produce rate {f.get('achieved_produce_rate', '?'):,}/s"
                              if isinstance(f.get("achieved_produce_rate"), int | float) else ""))
        rss = f.get("rss_mb_first_last_max")
        if rss:
            out.append(Figure("speed", f"speed process RSS at the end {label}", rss[1], "MB",
                              "RSS at the start of the run", rss[0], f"max {rss[2]} MB"))
    return out


def serving_figures(r: dict, others: dict[str, dict]) -> list[Figure]:
    out = []
    for size, s in (r.get("sizes") or {}).items():
        n = f"{int(size):,} events"
        for kind, q in (s.get("queries") or {}).items():
            out.append(Figure("serving", f"{kind} p50, {n} (merged views)", q.get("merged_p50_ms"), "ms",
                              "same answer from the raw master (DuckDB scan)", q.get("raw_p50_ms")))
            out.append(Figure("serving", f"{kind} p99, {n} (merged views)", q.get("merged_p99_ms"), "ms",
                              "raw master p99", q.get("raw_p99_ms")))
            if q.get("ceiling_p50_ms") is not None:
                out.append(Figure("serving", f"{kind} p50, {n} (merged views)", q.get("merged_p50_ms"), "ms",
                                  "same SQL over an in-memory DuckDB table of the same rows (ceiling)",
                                  q.get("ceiling_p50_ms")))
        if "connect_ms_p50" in s:
            out.append(Figure("serving", f"connect() p50, {n} (batch side materialized)", s["connect_ms_p50"],
                              "ms", "lazy connect (materialize=False)", s.get("connect_lazy_ms_p50")))
        if s.get("connect_floor_ms_p50") is not None:
            out.append(Figure("serving", f"connect() p50, {n}", s.get("connect_lazy_ms_p50"), "ms",
                              "floor: open DuckDB, register datasets over the same files", s["connect_floor_ms_p50"]))
        cli, start = s.get("cli_point_lookup") or {}, s.get("cli_start_floor") or {}
        if cli.get("first_byte_ms_p50") is not None:
            out.append(Figure("serving", f"`lambdalake sql` point lookup, first byte, {n}", cli["first_byte_ms_p50"],
                              "ms", "floor: an interpreter importing DuckDB and pyarrow.dataset",
                              start.get("import_duckdb_pyarrow_ms_p50")))
    return out


def group_figures(r: dict, others: dict[str, dict]) -> list[Figure]:
    out = []
    settings = (f"group session timeout {r.get('session_timeout_s')} s; speed checkpoint interval "
                f"{r.get('checkpoint_interval_s')} s; archiver roll {r.get('archive_roll_seconds')} s")
    for layer in ("archiver", "speed"):
        c = (r.get("cost") or {}).get(layer)
        if c:
            static, group = (", ".join(f"{x['per_second']:,}" for x in c[v]) for v in ("static", "group"))
            out.append(Figure("groups", f"{layer}: {c['backlog']:,}-message backlog, 2 group members "
                              f"({c['commands']['group']}; process start to caught up)",
                              c.get("group_median_per_second"), "msg/s",
                              f"2 static shares, same run ({c['commands']['static']})",
                              c.get("static_median_per_second"),
                              f"median of {c['rounds']} alternating runs each: static {static}; group {group} msg/s; "
                              f"{settings}"))
    for layer in ("archiver", "speed"):
        g = r.get(layer)
        if g:
            failed = len(g.get("did_not_recover") or [])
            n = g.get("recovered", g["kills"])
            what = (f"{layer}: kill -9 of one of two group members -> past the log end again (%s of {n} kills at "
                    f"{r.get('rate', 0):,.0f} msg/s)")
            note = f"{settings} (the timeout bounds it from below)"
            if failed:
                note += f"; {failed} of {g['kills']} kills NOT recovered within {g.get('kill_timeout_s')} s"
            if g.get("slow"):
                note += f"; {len(g['slow'])} slower than twice the session timeout"
            out.append(Figure("groups", what % "p50", g.get("p50"), "s", "the same wait without a kill",
                              g.get("baseline_p50"), note))
            out.append(Figure("groups", what % f"p99, inclusive quantile; max {g.get('max')} s", g.get("p99"), "s",
                              "the same wait without a kill", g.get("baseline_p50"), note))
    return out


def validation_figures(r: dict, others: dict[str, dict]) -> list[Figure]:
    out = []
    for source, mixes in (r.get("sources") or {}).items():
        for mix, m in mixes.items():
            rates = m.get("per_second") or {}
            for name in ("compiled", "reference"):
                out.append(Figure("validation", f"{source}, {mix} messages: {name} validator (one core)",
                                  rates.get(name), "msg/s", "orjson.loads alone (the JSON parse)",
                                  rates.get("orjson.loads")))
    return out


EXTRACT: dict[str, Callable[[dict, dict[str, dict]], list[Figure]]] = {
    "batch": batch_figures, "batch-incremental": batch_figures, "speed": speed_figures, "serving": serving_figures,
    "validation": validation_figures, "groups": group_figures,
    "s3": lambda r, others: [Figure("s3", **f) for f in r["figures"]],  # bench_s3.py writes its figures itself
    "cdc": lambda r, others: [Figure("cdc", **f) for f in r["figures"]]}  # so does bench_cdc.py


# --- report --------------------------------------------------------------------------------------------------------
def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    if abs(v) >= 100:
        s = f"{v:,.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.3g}"
    return f"{s} {unit}".strip()


def markdown(info: dict, profile: str, outcomes: list[Outcome], figures: list[Figure], started: str) -> str:
    v = info["versions"]
    lines = [
        f"# lambdalake benchmarks — {started} ({profile} profile)",
        "",
        f"- machine: {info['cpu']}, {info['cpus']} CPUs, {info['memory_gb']} GB RAM; {info['platform']}",
        f"- load average at start: {', '.join(f'{x:.2f}' for x in info['load_average_at_start'])} "
        "(other work on the machine skews every figure)",
        f"- python {info['python']}, pyspark {v.get('pyspark')}, duckdb {v.get('duckdb')}, pyarrow {v.get('pyarrow')}, "
        f"kafka-python {v.get('kafka-python')}, Kafka broker {v.get('kafka broker')}, {v.get('java')}",
        f"- git commit {info['git_commit']}",
        "",
        "| benchmark | status | seconds | result file | detail |",
        "|---|---|---:|---|---|",
    ]
    for o in outcomes:
        lines.append(f"| {o.bench} | {o.status} | {o.seconds:.0f} | {o.result_file or '—'} | "
                     f"{(o.detail or '').replace('|', '/')[:300] or (o.log or '')} |")
    lines += ["", "Ratio = value / baseline: below 1 a time is shorter (or a rate lower) than its baseline's.", "",
              "| benchmark | figure | value | baseline | baseline value | ratio (value / baseline) | note |",
              "|---|---|---:|---|---:|---:|---|"]
    for f in figures:
        ratio = f.ratio
        lines.append(f"| {f.bench} | {f.figure} | {_num(f.value, f.unit)} | {f.baseline or '—'} | "
                     f"{_num(f.baseline_value, f.unit)} | {'—' if ratio is None else f'{ratio:.3g}×'} | {f.note} |")
    if not figures:
        lines.append("| — | no figures (every benchmark failed or was skipped) | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a few minutes in all (noisier figures)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(b.name for b in BENCHES)}")
    ap.add_argument("--quiet", action="store_true", help="do not echo the benchmarks' own output")
    args = ap.parse_args(argv)
    wanted = [b for b in BENCHES if not args.only or b.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {b.name for b in BENCHES}
    if unknown:
        ap.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {[b.name for b in BENCHES]}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    profile = "quick" if args.quick else "full"
    info = machine_info()

    outcomes = [run_bench(b, args.quick, stamp, echo=not args.quiet) for b in wanted]
    results: dict[str, dict] = {}
    for o in outcomes:
        if o.status == "ok":
            try:
                results[o.bench] = json.loads((REPO / o.result_file).read_text())
            except (OSError, ValueError) as exc:
                o.status, o.detail = "unreadable result", f"{o.result_file}: {exc}"
    figures: list[Figure] = []
    for o in outcomes:
        if o.bench not in results:
            continue
        try:
            figures += EXTRACT[o.bench](results[o.bench], results)
        except (KeyError, TypeError, ValueError) as exc:  # the script's result format changed
            o.detail = f"result format not understood ({type(exc).__name__}: {exc}); see {o.result_file}"

    report = markdown(info, profile, outcomes, figures, started)
    summary = {"started_at": started, "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
               "profile": profile, "machine": info, "load_average_at_end": os.getloadavg(),
               "benchmarks": [asdict(o) for o in outcomes],
               "figures": [{**asdict(f), "ratio": f.ratio} for f in figures]}
    (RESULTS / f"bench-{stamp}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (RESULTS / f"bench-{stamp}.md").write_text(report)
    print("\n" + report)
    print(f"wrote bench/results/bench-{stamp}.md and .json")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
