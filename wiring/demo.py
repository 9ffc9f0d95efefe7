"""``make run``: the end-to-end Lambda demo on embedded defaults.

1. Start the embedded Kafka broker (unless one runs already or ``LAMBDALAKE_BOOTSTRAP`` points elsewhere), create
   the topics.
2. Start the archiver (``lambdalake ingest``) and the speed layer (``lambdalake speed``) as real processes.
3. Produce a demo stream (late, duplicated and malformed events included) for about a minute; half-way through,
   run one Spark batch (``lambdalake batch``) and publish it while events keep flowing.
4. Wait until the speed layer has caught up, then show merged query results, what came from batch vs speed, the
   watermark, freshness, DLQ counts, and a cross-check against the log.
5. Stop everything it started — also on Ctrl-C or failure — and say how to continue.

``--s3`` (``make run-s3``) runs the same demo with the lake in a bucket (``s3://lake/demo``) of the embedded S3
server (started under the lake directory's ``s3/`` unless one runs there, and stopped with the demo): archiver,
speed layer, Spark batch and serving reach it through the standard AWS variables it sets for them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from lambdalake.broker import EmbeddedBroker
from lambdalake.clients import end_offsets, ensure_topics
from lambdalake.config import Settings, fix_handoff_block, load_settings
from lambdalake.embedded import free_port, port_open
from lambdalake.exceptions import LambdalakeError
from lambdalake.procs import new_session_tied_to_parent, stop_group

LAMBDALAKE = str(Path(sys.executable).parent / "lambdalake")
DEMO_HANDOFF_BLOCK = 200


@contextlib.contextmanager
def embedded_kafka(home: Path | None, port: int | None, console: Console) -> Iterator[Settings]:
    """Settings pointing at a running broker; starts (and later stops) the embedded one if needed."""
    if os.environ.get("LAMBDALAKE_BOOTSTRAP"):
        settings = load_settings(home=home)
        console.print(f"using the Kafka cluster at {settings.bootstrap} (LAMBDALAKE_BOOTSTRAP)")
        yield settings
        return
    base = load_settings(home=home)
    broker = EmbeddedBroker(base.home)
    if broker.running_pid() is not None:
        settings = load_settings(home=home)
        console.print(f"using the embedded Kafka broker already running at {settings.bootstrap}")
        yield settings
        return
    if port is None:
        port = 9092 if not (port_open("127.0.0.1", 9092) or port_open("127.0.0.1", 9093)) else free_port()
    broker = EmbeddedBroker(base.home, port=port, controller_port=free_port() if port != 9092 else None,
                            tied_to_parent=True)
    with console.status(f"starting the embedded Kafka broker (Apache Kafka, KRaft) on port {port} ..."):
        state = broker.up()
    console.print(f"started Kafka broker pid {state['pid']} at {state['bootstrap']} (log: {state['log']})")
    try:
        yield load_settings(home=home, bootstrap=state["bootstrap"])
    finally:
        with console.status("stopping the Kafka broker ..."):
            broker.down()
        console.print("stopped the Kafka broker")


class Process:
    """A `lambdalake ...` child process with its output in a log file; stopped with SIGTERM (final checkpoint)."""

    def __init__(self, name: str, args: list[str], env: dict, log: Path):
        self.name, self.log = name, log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen([LAMBDALAKE, *args], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=new_session_tied_to_parent)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-8:])
            raise LambdalakeError(f"the {self.name} process exited with code {self.proc.returncode}; "
                                  f"last lines of {self.log}:\n{tail}")

    def stop(self, timeout: float = 30) -> None:
        stop_group(self.proc, timeout)


S3_DEMO_LAKE = "s3://lake/demo"


@contextlib.contextmanager
def embedded_s3(home: Path, console: Console) -> Iterator[str]:
    """The demo's lake on the embedded S3 server under ``home/s3``: its URL, with this process's AWS variables
    pointing at the server (children inherit them) and the machine's work directory in ``home/s3-work`` (unless
    ``LAMBDALAKE_WORK_DIR`` says otherwise). A server already running there is used and left running."""
    from lambdalake.s3server import EmbeddedS3

    server = EmbeddedS3(home / "s3", port=free_port(), tied_to_parent=True)
    started = not server.status()["running"]
    if started:
        with console.status("starting the embedded S3 server (SeaweedFS) ..."):
            server.up(timeout=90)
    access = server.access()
    console.print(f"{'started' if started else 'using'} the S3 server at {access.endpoint} (data in {server.dir})")
    env = {**access.env(), "LAMBDALAKE_WORK_DIR": os.environ.get("LAMBDALAKE_WORK_DIR") or str(home / "s3-work")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        server.create_bucket(S3_DEMO_LAKE.removeprefix("s3://").split("/")[0])
        yield S3_DEMO_LAKE
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if started:
            server.down()
            console.print("stopped the S3 server")


def _env(settings: Settings) -> dict:
    env = dict(os.environ)
    env.update(LAMBDALAKE_HOME=settings.lake or str(settings.home), LAMBDALAKE_BOOTSTRAP=settings.bootstrap,
               LAMBDALAKE_PIPELINE=settings.pipeline)
    return env


def run_demo(events: int, rate: float | None, port: int | None, home: Path | None, console: Console,
             s3: bool = False) -> None:
    console.print(Rule("lambdalake demo: a Lambda architecture on a real Kafka log"))
    with embedded_kafka(home, port, console) as settings:
        if not s3:
            _run(settings, events, rate, console)
            _how_to_continue(settings, console)
            return
        with embedded_s3(settings.home, console) as url:
            lake = load_settings(home=url, bootstrap=settings.bootstrap, object_storage=True)
            _run(lake, events, rate, console)
        _how_to_continue(lake, console)


def _run(settings: Settings, events: int, rate: float | None, console: Console) -> None:
    from lambdalake.pipeline import load_pipeline
    from wiring.demo_stream import demo_messages
    from wiring.produce import send

    pipeline = load_pipeline(settings.pipeline)
    # a demo-sized handoff block, so the mid-stream batch covers whole blocks of every partition
    fix_handoff_block(settings.home, DEMO_HANDOFF_BLOCK, settings.lake)
    settings = load_settings(home=settings.lake or settings.home, bootstrap=settings.bootstrap,
                             object_storage=True)
    console.print(f"lake: {settings.lake or settings.home} (handoff block: {settings.handoff_block} offsets)")
    created = ensure_topics(settings, pipeline)
    if created:
        console.print(f"created topics: {', '.join(created)}")
    topics = [s.topic for s in pipeline.sources]
    # a new seed per run on the same log, so a second `make run` adds new events instead of duplicates
    seed = 42 + sum(end_offsets(settings, topics).values())
    env, logs = _env(settings), settings.home / "logs"

    console.print(Rule("1. archiver (Kafka → Parquet master) and speed layer start as their own processes"))
    procs: list[Process] = []
    try:
        # roll master files every 5 s so the mid-stream batch has recent data to cover (default: 60 s)
        procs.append(Process("archiver", ["ingest", "--roll-seconds", "5"], env, logs / "ingest.log"))
        procs.append(Process("speed layer", ["speed"], env, logs / "speed.log"))
        console.print(f"lambdalake ingest (pid {procs[0].proc.pid}) and lambdalake speed "
                      f"(pid {procs[1].proc.pid}); logs in {logs}")

        n_dup, n_bad = round(events * 0.02), round(events * 0.01)
        total = events + n_dup + n_bad
        console.print(Rule(f"2. producing {events:,} events (+{n_dup} duplicates, +{n_bad} malformed, "
                           f"5% up to 3 h late) at {rate or 'max'} msg/s"))
        batch_result: dict = {}
        batch_thread = threading.Thread(target=_batch_midway, args=(settings, env, logs, batch_result, pipeline),
                                        daemon=True)
        messages = demo_messages(pipeline, events, seed=seed)
        first_half = (m for i, m in zip(range(total // 2), messages, strict=False))
        report = send(settings, first_half, rate=rate, total=total // 2, progress=True)
        console.print(f"half-way ({report.total:,} messages): starting a Spark batch run while the stream "
                      "goes on ...")
        batch_thread.start()
        report2 = send(settings, messages, rate=rate, total=total - report.total, progress=True)
        for p in procs:
            p.check_alive()
        console.print(f"produced {report.total + report2.total:,} messages in "
                      f"{report.seconds + report2.seconds:.0f}s")
        with console.status("waiting for the Spark batch run to publish ..."):
            batch_thread.join(600)
        if batch_result.get("error"):
            raise LambdalakeError(batch_result["error"])
        console.print(f"batch: {batch_result.get('summary', '').strip()}")

        console.print(Rule("3. waiting for the speed layer to catch up with the log"))
        _wait_caught_up(settings, pipeline, topics, console)
    finally:
        for p in reversed(procs):
            p.stop()
    console.print("stopped the archiver and the speed layer (final checkpoint written)")
    _show_results(settings, pipeline, console)


def _batch_midway(settings: Settings, env: dict, logs: Path, result: dict, pipeline=None) -> None:
    # The archiver rolls master files every few seconds; give it until one whole handoff block is archived.
    from lambdalake.heads import archived_positions
    from lambdalake.layout import Layout

    layout, deadline = Layout.of(settings.home, settings.lake), time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            end >= settings.handoff_block for s in pipeline.sources
            for end in archived_positions(layout, s.name).values()):
        time.sleep(0.5)
    with open(logs / "batch.log", "ab") as fh:
        res = subprocess.run([LAMBDALAKE, "batch"], env=env, stdout=subprocess.PIPE, stderr=fh, text=True,
                             stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        result["error"] = f"the Spark batch run failed (exit {res.returncode}); see {logs / 'batch.log'}"
    result["summary"] = res.stdout


def _wait_caught_up(settings: Settings, pipeline, topics: list[str], console: Console, timeout: float = 120) -> None:
    from serving import connect
    from serving.connection import pair_of

    ends = end_offsets(settings, topics)
    deadline = time.monotonic() + timeout
    while True:
        con = connect(settings=settings, pipeline=pipeline)
        pair = pair_of(con)
        con.close()
        covered = {k: max(pair.watermark.get(k, 0), pair.positions.get(k, 0)) for k in ends}
        behind = sum(max(0, e - covered[k]) for k, e in ends.items())
        if behind == 0:
            console.print("every message of the log is now visible to queries")
            return
        if time.monotonic() > deadline:
            console.print(f"[yellow]still {behind} messages behind after {timeout:.0f}s; showing what is visible[/]")
            return
        time.sleep(0.5)


def _table(con, sql: str, title: str) -> Table:
    cur = con.execute(sql)
    t = Table(title=title, title_justify="left")
    for d in cur.description:
        t.add_column(d[0], justify="right" if d[0] not in ("url", "product_id", "currency", "user_id", "topic",
                                                          "view", "source") else "left")
    for row in cur.fetchall():
        t.add_row(*[(f"{v:,.1f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
                    for v in row])
    return t


def _show_results(settings: Settings, pipeline, console: Console) -> None:
    from serving import connect
    from wiring.topic_counts import count_topics

    console.print(Rule("4. merged views (batch ⊕ speed), queried through DuckDB"))
    con = connect(settings=settings, pipeline=pipeline)
    try:
        if "pageviews_hourly" in pipeline.view_map:
            console.print(_table(con, """
                SELECT url, sum(views) AS views, round(sum(total_duration_ms) / sum(views) / 1000, 1) AS mean_s,
                       max(unique_users) AS "max users/hour"
                FROM pageviews_hourly GROUP BY url ORDER BY views DESC LIMIT 5""",
                "top pages (all hours): SELECT url, sum(views) ... FROM pageviews_hourly"))
            if "unique_users" in pipeline.view("pageviews_hourly").output_columns:
                console.print(_table(con, """
                    SELECT strftime(window_start, '%Y-%m-%d') AS day, hll_count(list(unique_users)) AS unique_users,
                           count(DISTINCT url) AS pages
                    FROM sketches.pageviews_hourly GROUP BY day ORDER BY day LIMIT 8""",
                    "unique users per day, rolled up from the hourly HLL sketches: FROM sketches.pageviews_hourly"))
        if "revenue_daily" in pipeline.view_map:
            console.print(_table(con, """
                SELECT strftime(window_start, '%Y-%m-%d') AS day, currency, sum(orders) AS orders,
                       sum(revenue_cents) / 100 AS revenue
                FROM revenue_daily GROUP BY ALL ORDER BY day, currency LIMIT 8""",
                "revenue per day and currency: FROM revenue_daily"))
        console.print(Rule("5. where each answer came from"))
        console.print(_table(con, """SELECT name AS view, batch_version, batch_rows, speed_rows, speed_rows_visible
                                     FROM lambdalake.views ORDER BY name""",
                             "rows per side (speed rows below the batch watermark are not visible)"))
        console.print(_table(con, """
            SELECT topic, partition, coalesce(batch_watermark, 0) AS "batch W", speed_position AS "speed S",
                   speed_offsets_beyond_batch AS "offsets only in speed"
            FROM lambdalake.watermarks ORDER BY topic, partition""",
            "positions: batch covers offsets < W, speed adds blocks ≥ W up to S"))
        st = con.execute("SELECT batch_version, speed_snapshot, speed_age_seconds FROM lambdalake.status").fetchone()
        console.print(f"batch version {st[0]}, speed snapshot {st[1]} (published {st[2]:.1f}s ago)")

        console.print(Rule("6. cross-check against the log itself"))
        counts = {c.topic: c for c in count_topics(settings, pipeline)}
        for v in pipeline.views:
            src = pipeline.source_of(v)
            count_col = next((a.name for a in v.stored_aggregates if a.kind == "count"), None)
            if count_col is None:
                continue
            merged = con.execute(f'SELECT coalesce(sum("{count_col}"), 0) FROM {v.name}').fetchone()[0]
            tc = counts[src.topic]
            ok = "[green]equal[/]" if merged == tc.valid else "[red]DIFFERENT[/]"
            console.print(f"{v.name}: sum({count_col}) = {merged:,} vs {tc.valid:,} valid deduplicated events in "
                          f"{src.topic} → {ok}  (duplicates dropped: {tc.duplicates:,}, invalid: {tc.invalid:,})")
        dlq = ", ".join(f"{c.topic} {c.messages:,}" for c in counts.values() if c.topic.endswith(".dlq"))
        console.print(f"dead-letter topics (invalid messages with reason, bytes and position): {dlq}")
    finally:
        con.close()


def _how_to_continue(settings: Settings, console: Console) -> None:
    home = settings.home
    console.print(Rule("how to continue"))
    if settings.lake:
        console.print(
            f"The lake stays in the bucket {settings.lake} of the embedded S3 server (stopped now; its data stay in "
            "the s3/ directory of the local lake directory). To query it:\n"
            "  eval \"$(.venv/bin/lambdalake s3 up --port 8333)\"   # that server again, its AWS_* variables exported\n"
            f"  export LAMBDALAKE_HOME={settings.lake} LAMBDALAKE_WORK_DIR={home}\n"
            "  .venv/bin/lambdalake sql \"SELECT * FROM pageviews_hourly LIMIT 10\"; .venv/bin/lambdalake status\n"
            "Serving keeps a local mirror of the published views in this machine's work directory "
            f"({home}); docs/operations.md, \"A lake on object storage\".", highlight=False)
        return
    console.print(
        "The lake stays in " + str(home) + ". Everything below reads it; none of it needs Kafka running:\n"
        "  .venv/bin/lambdalake sql \"SELECT * FROM pageviews_hourly ORDER BY views DESC LIMIT 10\"\n"
        "  .venv/bin/lambdalake sql \"SELECT * FROM lambdalake.watermarks\" --format csv\n"
        "  .venv/bin/python -c \"import serving; print(serving.connect().sql('FROM revenue_daily LIMIT 5'))\"\n"
        "  .venv/bin/lambdalake catalog   # then: duckdb " + str(home / "lake.duckdb") + "\n"
        "Run the live pipeline yourself: lambdalake kafka up; lambdalake ingest & lambdalake speed &; "
        "lambdalake produce --events 100000 --rate 5000; lambdalake batch; lambdalake status\n"
        "Schedule batches from the Airflow UI: make airflow.   Compare approaches: notebooks/.")
