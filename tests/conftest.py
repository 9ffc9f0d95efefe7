"""Shared fixtures: ONE real Kafka broker and ONE Spark session per test session, cleaned up even on failure.

- ``kafka_broker``: the embedded Apache Kafka broker (real jars, KRaft) on a free port, data in a temp dir;
  it dies with the pytest process (PR_SET_PDEATHSIG) so a crashed run leaves no orphan.
- ``settings``: :class:`lambdalake.config.Settings` for a fresh lake directory per test, pointing at that
  broker, with unique topic names per test via the ``pipeline_factory`` fixture.
- ``spark``: a local Spark session shared by the whole run (created on first use).
- ``s3_server``: ONE embedded S3 server (SeaweedFS) per session, like the broker; ``s3_store``: a fresh bucket on it.
- ``postgres``, ``kafka_connect``: ONE embedded PostgreSQL and ONE Kafka Connect worker (Debezium) per session.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lambdalake.broker import EmbeddedBroker
from lambdalake.config import Settings, load_settings
from lambdalake.embedded import free_port
from lambdalake.pipeline import Pipeline, load_pipeline

REPO = Path(__file__).resolve().parent.parent
LAMBDALAKE = str(Path(sys.executable).parent / "lambdalake")


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory) -> Iterator[str]:
    """Bootstrap address of the session's real Kafka broker (or LAMBDALAKE_TEST_BOOTSTRAP if set)."""
    external = os.environ.get("LAMBDALAKE_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    home = tmp_path_factory.mktemp("kafka-home")
    broker = EmbeddedBroker(home, port=free_port(), controller_port=free_port(), heap="768m",
                            tied_to_parent=True)
    broker.up(timeout=120)
    try:
        yield broker.bootstrap
    finally:
        broker.down(timeout=30)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Endpoint and credentials (:class:`lambdalake.s3server.S3Access`) of the session's ONE embedded S3 server
    (SeaweedFS on 127.0.0.1, credentials required); it dies with the pytest process and is stopped even on failure."""
    from lambdalake.s3server import EmbeddedS3

    server = EmbeddedS3(tmp_path_factory.mktemp("s3-server"), tied_to_parent=True)
    try:
        server.up(timeout=90)
        yield server.access()
    finally:
        server.down(timeout=20)


@pytest.fixture
def s3_store(s3_server, unique_suffix):
    """An :class:`lambdalake.storage.s3.S3Store` at ``s3://<a fresh bucket>/lake`` on the session's S3 server."""
    from lambdalake.s3server import create_bucket
    from lambdalake.storage.s3 import S3Store

    bucket = f"lake-{unique_suffix}"
    create_bucket(s3_server, bucket)
    return S3Store(f"s3://{bucket}/lake", endpoint=s3_server.endpoint, access_key=s3_server.access_key,
                   secret_key=s3_server.secret_key, region="us-east-1")


@pytest.fixture
def lake(tmp_path) -> Path:
    """A fresh, empty lake directory for one test."""
    home = tmp_path / "lake"
    home.mkdir()
    return home


@pytest.fixture
def home(lake) -> Path:
    """Alias of ``lake`` (the serving tests call the lake directory its home)."""
    return lake


@pytest.fixture
def clickstream() -> Pipeline:
    """The shipped demo pipeline, unrenamed (for tests that never touch Kafka)."""
    return load_pipeline("lambdalake.pipelines.clickstream")


@pytest.fixture
def unique_suffix() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(kafka_broker, lake, tmp_path, unique_suffix) -> Settings:
    """Settings for a fresh lake and a unique copy of the clickstream pipeline (topics `<topic>.<suffix>`).

    The renamed pipeline is written to a file so subprocesses (``lambdalake ...``) load the very same one.
    """
    pipe_file = write_pipeline_copy(tmp_path, "lambdalake.pipelines.clickstream", unique_suffix)
    return load_settings(home=lake, bootstrap=kafka_broker, pipeline=str(pipe_file), partitions=4).with_(
        handoff_block=50)


def write_pipeline_copy(tmp_path: Path, spec: str, suffix: str) -> Path:
    """A pipeline file that imports ``spec`` and renames its topics with ``suffix``."""
    f = tmp_path / f"pipeline_{suffix}.py"
    f.write_text(
        "from lambdalake.fields import Source\n"
        "from lambdalake.pipeline import Pipeline, load_pipeline\n"
        f"_p = load_pipeline({spec!r})\n"
        "pipeline = Pipeline(_p.name, views=_p.views, sources=[Source(name=s.name, topic=f'{s.topic}."
        f"{suffix}', fields=s.fields, event_id=s.event_id, event_time=s.event_time, key=s.key) "
        "for s in _p.sources])\n"
    )
    return f


@pytest.fixture
def pipeline(settings) -> Pipeline:
    return load_pipeline(settings.pipeline)


@pytest.fixture
def cli_env(settings) -> dict[str, str]:
    """Environment for running the real ``lambdalake`` CLI in a subprocess against the test broker/lake."""
    env = dict(os.environ)
    env.update(LAMBDALAKE_HOME=str(settings.home), LAMBDALAKE_BOOTSTRAP=settings.bootstrap,
               LAMBDALAKE_PIPELINE=settings.pipeline, LAMBDALAKE_HANDOFF_BLOCK=str(settings.handoff_block),
               LAMBDALAKE_PARTITIONS=str(settings.partitions))
    return env


@pytest.fixture
def run_cli(cli_env) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``lambdalake <args>`` as a real subprocess; returns the CompletedProcess (text)."""

    def run(*args: str, check: bool = True, timeout: float = 300, env: dict | None = None):
        t0 = time.monotonic()
        res = subprocess.run([LAMBDALAKE, *args], capture_output=True, text=True, timeout=timeout,
                             env={**cli_env, **(env or {})}, stdin=subprocess.DEVNULL)
        CLI_SECONDS[args[0] if args else ""].append(time.monotonic() - t0)
        if check and res.returncode != 0:
            raise AssertionError(f"lambdalake {' '.join(args)} exited {res.returncode}\n"
                                 f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}")
        return res

    return run


def as_machine(monkeypatch, env: dict) -> None:
    """This test process reads the bucket as the machine of ``env`` does (its AWS settings and work directory)."""
    for k, v in env.items():
        if k.startswith(("AWS_", "LAMBDALAKE_WORK_DIR")):
            monkeypatch.setenv(k, v)


def machine_cli(env: dict, cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``lambdalake <args>`` on a "machine": its own environment (``LAMBDALAKE_WORK_DIR``, ``TMPDIR``) and working
    directory (the object-storage tests: machines share only Kafka and the bucket)."""
    res = subprocess.run([LAMBDALAKE, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.fixture
def s3_lake(s3_server, unique_suffix, cli_env, tmp_path):
    """(the lake URL, its store, the CLI environment of a machine with an empty working directory)."""
    from lambdalake.s3server import create_bucket
    from lambdalake.storage.s3 import S3Store

    bucket = f"lake-{unique_suffix}"
    create_bucket(s3_server, bucket)
    url = f"s3://{bucket}/prod/lake"
    store = S3Store(url, endpoint=s3_server.endpoint, access_key=s3_server.access_key,
                    secret_key=s3_server.secret_key, region="us-east-1")
    work = tmp_path / "machine-a"
    work.mkdir()
    env = {**cli_env, **s3_server.env(), "LAMBDALAKE_HOME": url, "LAMBDALAKE_WORK_DIR": str(work / "work"),
           "TMPDIR": str(work)}
    return url, store, env, work


@pytest.fixture
def own_s3_lake(cli_env, tmp_path):
    """A lake ``s3://killed/lake`` on an S3 server of the test's own (the session's one must survive a kill), and a
    machine with an empty working directory: (server, port, url, store, work, env). Stopped at the end."""
    from types import SimpleNamespace

    from lambdalake.embedded import free_port
    from lambdalake.s3server import EmbeddedS3, create_bucket
    from lambdalake.storage.s3 import S3Store

    port = free_port()
    server = EmbeddedS3(tmp_path / "own-s3", port=port, tied_to_parent=True)
    server.up(timeout=90)
    try:
        access = server.access()
        create_bucket(access, "killed")
        url = "s3://killed/lake"
        store = S3Store(url, endpoint=access.endpoint, access_key=access.access_key, secret_key=access.secret_key,
                        region="us-east-1")
        work = tmp_path / "machine"
        work.mkdir()
        env = {**cli_env, **access.env(), "LAMBDALAKE_HOME": url, "LAMBDALAKE_WORK_DIR": str(work / "work")}
        yield SimpleNamespace(server=server, port=port, url=url, store=store, work=work, env=env)
    finally:
        server.down(timeout=20)


def failed_in_one_line(daemon: subprocess.Popen, timeout: float) -> str:
    """Wait for ``daemon`` (stderr piped) to give up; it must have exited non-zero with an ``error:`` line and no
    traceback (returned: the last such line). Killed with its group if it does not stop in time."""
    from lambdalake.procs import stop_group

    try:
        _, err = daemon.communicate(timeout=timeout)
    finally:
        if daemon.returncode is None:
            stop_group(daemon, timeout=10, first=signal.SIGKILL)
            daemon.communicate()
    err = err.decode()
    assert daemon.returncode != 0 and "error:" in err and "Traceback" not in err, err[-2000:]
    return [line for line in err.splitlines() if "error:" in line][-1]


CLI_SECONDS: defaultdict[str, list[float]] = defaultdict(list)  # wall time of each `lambdalake <command>` run


def pytest_terminal_summary(terminalreporter) -> None:
    """Where the suite's time goes in CLI subprocesses (start-up included), to keep `make test` in its budget."""
    if CLI_SECONDS:
        terminalreporter.section("lambdalake CLI runs (command: runs, total s, mean s)")
        for cmd, secs in sorted(CLI_SECONDS.items(), key=lambda kv: -sum(kv[1])):
            terminalreporter.write_line(f"{cmd or '(none)':>12}: {len(secs):3d} runs, {sum(secs):7.1f} s, "
                                        f"{sum(secs) / len(secs):5.1f} s")


@pytest.fixture(scope="session")
def spark():
    """One local Spark session for the whole test run."""
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[2]").appName("lambdalake-tests")
               .config("spark.sql.shuffle.partitions", "4")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.driver.memory", "1g")
               .getOrCreate())
    try:
        yield session
    finally:
        session.stop()


@pytest.fixture
def clean_dir(tmp_path) -> Callable[[str], Path]:
    def make(name: str) -> Path:
        d = tmp_path / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    return make


# --- change data capture (docs/cdc.md) ----------------------------------------------------------------------------
def reachable_tmp_dir(prefix: str) -> Path:
    """A fresh directory the embedded PostgreSQL's own user can enter: run by root, PostgreSQL runs as the system
    user ``lambdalake``, and pytest's base temp directory (``/tmp/pytest-of-root``, 0700) would shut it out."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o711)  # others may pass through, not list
    return d


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """:class:`lambdalake.postgres.PostgresAccess` of the session's ONE embedded PostgreSQL 15 (wal_level=logical,
    127.0.0.1, password login); it dies with the pytest process and is stopped even on failure."""
    from lambdalake.postgres import EmbeddedPostgres

    d = reachable_tmp_dir("lambdalake-pg-")
    server = EmbeddedPostgres(d, tied_to_parent=True)
    try:
        server.up(timeout=90)
        yield server.access()
    finally:
        server.down(timeout=20)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def kafka_connect(kafka_broker, tmp_path_factory):
    """The session's ONE embedded Kafka Connect worker (standalone, Debezium's PostgreSQL connector) writing to
    ``kafka_broker``; it dies with the pytest process. Tests register their own connectors on it (lambdalake.connect
    ``capture``) and remove them."""
    from lambdalake.connect import EmbeddedConnect

    worker = EmbeddedConnect(tmp_path_factory.mktemp("connect"), kafka_broker, tied_to_parent=True)
    try:
        worker.up(timeout=120)
        yield worker
    finally:
        worker.down(timeout=30)
