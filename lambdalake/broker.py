"""The embedded Kafka broker: real Apache Kafka 4.x, KRaft, single node, started and stopped by the project.

The embedded broker is the official ``kafka.Kafka`` main class run from the jars that ``make install`` copies
from Maven Central into ``.cache/kafka/libs`` (``infra/kafka/pom.xml``). Its files live under
``<home>/kafka/``::

    server.properties  log4j2.properties  data/  server.log  broker.out  broker.pid  broker.json

``broker.json`` records pid and bootstrap address; :func:`lambdalake.config.load_settings` reads it so every
command finds the embedded broker without configuration. With ``LAMBDALAKE_BOOTSTRAP`` set, nothing here is
started and every client talks to that cluster.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

from lambdalake.embedded import EmbeddedServer, log4j2_file_config, port_open
from lambdalake.exceptions import BrokerError
from lambdalake.layout import Layout

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LIBS = REPO_ROOT / ".cache" / "kafka" / "libs"


def kafka_libs() -> Path:
    libs = Path(os.environ.get("LAMBDALAKE_KAFKA_LIBS") or DEFAULT_LIBS)
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise BrokerError(f"Kafka broker jars not found in {libs}; run `make install` (fetches them with Maven) "
                          "or set LAMBDALAKE_KAFKA_LIBS")
    return libs


class EmbeddedBroker(EmbeddedServer):
    """A single-node KRaft broker+controller under ``<home>/kafka``.

    ``tied_to_parent=True`` (tests, the demo) makes the broker die with the Python process that started it, so a
    crashed test run never leaves an orphan; ``lambdalake kafka up`` starts a detached daemon instead.
    """

    name = "Kafka broker"
    error = BrokerError

    def __init__(self, home: Path, port: int = 9092, controller_port: int | None = None,
                 heap: str = "512m", tied_to_parent: bool = False):
        self.dir = Layout(home).kafka
        self.port = port
        self.controller_port = controller_port or port + 1
        self.heap = heap
        self.tied_to_parent = tied_to_parent

    # files ------------------------------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def state_file(self) -> Path:
        return self.dir / "broker.json"

    @property
    def pid_file(self) -> Path:
        return self.dir / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "server.log"

    @property
    def out_file(self) -> Path:
        return self.dir / "broker.out"

    def _write_config(self) -> Path:
        data = self.dir / "data"
        props = self.dir / "server.properties"
        props.write_text("\n".join([
            "# written by lambdalake; edit --port/--controller-port instead",
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={data}",
            "num.partitions=4",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "log.retention.hours=-1",
            "message.max.bytes=2097152",
            "auto.create.topics.enable=false",
            "",
        ]))
        (self.dir / "log4j2.properties").write_text(log4j2_file_config(
            self.log_file, {"kafka": "INFO", "state.change.logger": "WARN"}))
        return props

    def _java(self, *args: str) -> list[str]:
        libs = kafka_libs()
        return ["java", f"-Xmx{self.heap}", "-Xms128m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
                "-cp", f"{libs}/*", *args]

    # lifecycle --------------------------------------------------------------------------------------------
    def is_ours(self, cmdline: list[str]) -> bool:
        return "kafka.Kafka" in cmdline and str(self.dir / "server.properties") in cmdline

    def log_files(self) -> list[Path]:
        return [self.out_file, self.log_file]

    def up(self, timeout: float = 90.0) -> dict:
        """Format storage on first start, start the broker, wait until it serves metadata. Idempotent."""
        self.dir.mkdir(parents=True, exist_ok=True)
        pid = self.running_pid()
        if pid is not None:
            state = self.status()
            if state.get("port") == self.port:
                return state
            raise BrokerError(f"an embedded broker is already running (pid {pid}) on port {state.get('port')}; "
                              "run `lambdalake kafka down` first")
        for port in (self.port, self.controller_port):
            if port_open("127.0.0.1", port):
                raise BrokerError(f"port {port} is already in use; choose another with --port/--controller-port "
                                  "or point LAMBDALAKE_BOOTSTRAP at the Kafka already there")
        props = self._write_config()
        if not (self.dir / "data" / "meta.properties").exists():
            cluster_id = self._run_tool("kafka.tools.StorageTool", "random-uuid").strip().splitlines()[-1]
            self._run_tool("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props))
        return self.start(
            self._java("kafka.Kafka", str(props)), out=self.out_file, timeout=timeout, what=self.bootstrap,
            ready=lambda: port_open("127.0.0.1", self.port) and _serves_metadata(self.bootstrap),
            state=lambda pid: {"pid": pid, "bootstrap": self.bootstrap, "port": self.port,
                               "controller_port": self.controller_port, "started_at": time.time(),
                               "log": str(self.log_file)})

    def down(self, timeout: float = 30.0) -> bool:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout``). True if one was running."""
        return self.stop(timeout) is not None

    def _run_tool(self, main: str, *args: str) -> str:
        res = subprocess.run(self._java(main, *args), capture_output=True, text=True, cwd=self.dir, timeout=120)
        if res.returncode != 0:
            raise BrokerError(f"{main} {' '.join(args[:1])} failed (exit {res.returncode}): "
                              f"{(res.stderr or res.stdout).strip()[-800:]}")
        return res.stdout


def _serves_metadata(bootstrap: str) -> bool:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000,
                                 bootstrap_timeout_ms=3000, client_id="lambdalake-probe")
    except (KafkaError, OSError, ValueError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()
