"""Kafka Connect with the Debezium PostgreSQL connector: the change stream of a PostgreSQL database into the log.

The embedded worker is Kafka's own ``ConnectStandalone`` run from the jars ``make install`` copies from Maven
Central into ``.cache/connect/libs`` (``infra/debezium/pom.xml``: connect-runtime, connect-json, Debezium's
PostgreSQL connector), against the project's Kafka. Its files live in one directory (``<home>/connect/`` for
``lambdalake cdc up``)::

    worker.properties   log4j2.properties   offsets.dat  (the source offsets: the last LSN sent, per connector)
    secrets.properties  (0600) the database passwords, read by the worker's FileConfigProvider (not in the REST API)
    connect.log  connect.out  connect.pid  connect.json  pid, REST URL, bootstrap

Connectors are registered through the worker's REST API (``PUT /connectors/<name>/config``, idempotent), the one
way for the embedded worker and for a user's own Connect cluster (``LAMBDALAKE_CONNECT``, its REST URL): see
:func:`capture`. A standalone worker keeps no connector across restarts, so ``lambdalake cdc up`` registers them
again; their offsets (``offsets.dat``) make the connector resume after the last LSN it sent. The connector creates
its replication slot and its publication (``publication.autocreate.mode=filtered``: exactly the captured tables);
:func:`capture` sets ``REPLICA IDENTITY FULL`` on each table first (full before-images of updates and deletes).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lambdalake.embedded import EmbeddedServer, free_port, log4j2_file_config, port_open
from lambdalake.exceptions import ConfigError, LambdalakeError
from lambdalake.postgres import PostgresAccess

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LIBS = REPO_ROOT / ".cache" / "connect" / "libs"
CONNECTOR_CLASS = "io.debezium.connector.postgresql.PostgresConnector"
_TABLE = re.compile(r"^[A-Za-z_][\w$]*\.[A-Za-z_][\w$]*$")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,62}$")


class ConnectError(LambdalakeError):
    """Kafka Connect failed to start, or a connector cannot be registered or failed."""

    exit_code = 3


def connect_libs() -> Path:
    libs = Path(os.environ.get("LAMBDALAKE_CONNECT_LIBS") or DEFAULT_LIBS)
    if not any(libs.glob("connect-runtime-*.jar")) or not any(libs.glob("debezium-connector-postgres-*.jar")):
        raise ConnectError(f"Kafka Connect / Debezium jars not found in {libs}; run `make install` (fetches them "
                           "with Maven) or set LAMBDALAKE_CONNECT_LIBS")
    return libs


def connect_url() -> str | None:
    """The user's own Kafka Connect REST URL (``LAMBDALAKE_CONNECT``), or None: the embedded worker is used."""
    raw = os.environ.get("LAMBDALAKE_CONNECT")
    if not raw:
        return None
    if not re.match(r"^https?://[^/\s:]+(:\d{1,5})?/?$", raw):
        raise ConfigError(f"LAMBDALAKE_CONNECT={raw!r} is not a Kafka Connect REST URL like http://host:8083")
    return raw.rstrip("/")


@dataclass(frozen=True)
class Capture:
    """One Debezium connector: ``tables`` (``schema.table``) of a database, into topics ``<prefix>.<schema>.<table>``
    with ``partitions`` each; its replication slot and publication are named after it."""

    name: str
    tables: tuple[str, ...]
    prefix: str = "cdc"
    partitions: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"connector name {self.name!r}: use letters, digits, '_', '.', '-' (at most 63)")
        if not _NAME.match(self.prefix):
            raise ConfigError(f"topic prefix {self.prefix!r}: use letters, digits, '_', '.', '-'")
        if not self.tables:
            raise ConfigError("no table to capture: name at least one as schema.table (e.g. --table public.orders)")
        for t in self.tables:
            if not _TABLE.match(t):
                raise ConfigError(f"table {t!r}: write it as schema.table, e.g. public.orders")
        if self.partitions < 1:
            raise ConfigError(f"partitions must be >= 1, not {self.partitions}")

    @property
    def slot(self) -> str:
        return re.sub(r"\W", "_", self.name.lower())[:63]

    def topic(self, table: str) -> str:
        return f"{self.prefix}.{table}"

    def config(self, db: PostgresAccess, password: str | None = None) -> dict[str, str]:
        """The connector's configuration; ``password`` replaces the clear one (a config-provider reference)."""
        return {
            "connector.class": CONNECTOR_CLASS, "tasks.max": "1", "plugin.name": "pgoutput",
            "database.hostname": db.host, "database.port": str(db.port), "database.user": db.user,
            "database.password": password or db.password, "database.dbname": db.database,
            "topic.prefix": self.prefix, "table.include.list": ",".join(self.tables),
            "slot.name": self.slot, "publication.name": f"{self.slot}_pub",
            "publication.autocreate.mode": "filtered", "snapshot.mode": "initial",
            "decimal.handling.mode": "string",  # JSON without schemas: a decimal as text, not base64 bytes
            "tombstones.on.delete": "true",
            "poll.interval.ms": "100",  # how long the task waits for changes before a batch (default 500)
            "heartbeat.interval.ms": "10000",  # the slot advances while the captured tables are idle
            "topic.creation.default.replication.factor": "-1",
            "topic.creation.default.partitions": str(self.partitions),
            **{k: str(v) for k, v in self.extra.items()},
        }


class EmbeddedConnect(EmbeddedServer):
    """A standalone Kafka Connect worker under ``dir`` with its REST API on 127.0.0.1:``port`` (default: a free
    one), writing to the Kafka at ``bootstrap``. ``tied_to_parent=True`` makes it die with its owner."""

    name = "Kafka Connect"
    error = ConnectError

    def __init__(self, dir: Path, bootstrap: str, port: int | None = None, heap: str = "512m",
                 tied_to_parent: bool = False):
        self.dir = Path(dir).absolute()
        self.bootstrap = bootstrap
        self.port = port
        self.heap = heap
        self.tied_to_parent = tied_to_parent

    # files ------------------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.dir / "connect.json"

    @property
    def pid_file(self) -> Path:
        return self.dir / "connect.pid"

    @property
    def worker_file(self) -> Path:
        return self.dir / "worker.properties"

    @property
    def secrets_file(self) -> Path:
        return self.dir / "secrets.properties"

    @property
    def offsets_file(self) -> Path:
        return self.dir / "offsets.dat"

    @property
    def log_file(self) -> Path:
        return self.dir / "connect.log"

    @property
    def out_file(self) -> Path:
        return self.dir / "connect.out"

    def log_files(self) -> list[Path]:
        return [self.out_file, self.log_file]

    def is_ours(self, cmdline: list[str]) -> bool:
        return "org.apache.kafka.connect.cli.ConnectStandalone" in cmdline and str(self.worker_file) in cmdline

    def _write_config(self, port: int) -> None:
        self.worker_file.write_text("\n".join([
            "# written by lambdalake (lambdalake/connect.py)",
            f"bootstrap.servers={self.bootstrap}",
            f"listeners=http://127.0.0.1:{port}",
            "key.converter=org.apache.kafka.connect.json.JsonConverter",
            "value.converter=org.apache.kafka.connect.json.JsonConverter",
            "key.converter.schemas.enable=false",
            "value.converter.schemas.enable=false",
            f"offset.storage.file.filename={self.offsets_file}",
            "offset.flush.interval.ms=1000",  # at most ~1 s of changes sent again after a crash
            "plugin.discovery=service_load",  # Debezium's jars declare their connector: no classpath scan
            "config.providers=file",
            "config.providers.file.class=org.apache.kafka.common.config.provider.FileConfigProvider",
            f"config.providers.file.param.allowed.paths={self.dir}",
            "",
        ]))
        (self.dir / "log4j2.properties").write_text(log4j2_file_config(self.log_file, {"org.reflections": "ERROR"}))
        if not self.secrets_file.exists():
            fd = os.open(self.secrets_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)

    def password_ref(self, capture: Capture, db: PostgresAccess) -> str:
        """Keep ``db``'s password in the secrets file (0600); the reference the connector's config holds."""
        key = f"{capture.name}.password"
        lines = [ln for ln in self.secrets_file.read_text().splitlines() if not ln.startswith(f"{key}=")]
        escaped = db.password.replace("\\", "\\\\")
        tmp = self.secrets_file.with_name(f".secrets.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join([*lines, f"{key}={escaped}", ""]))
        os.replace(tmp, self.secrets_file)
        return f"${{file:{self.secrets_file}:{key}}}"

    # lifecycle --------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.status().get('port')}"

    def up(self, timeout: float = 90.0) -> dict:
        """Start the worker and wait until its REST API lists the Debezium PostgreSQL connector plugin.
        Idempotent: a running worker is left as it is (its state returned)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        pid = self.running_pid()
        if pid is not None:
            state = self.status()
            if state.get("bootstrap") != self.bootstrap:
                raise ConnectError(f"the embedded Kafka Connect in {self.dir} (pid {pid}) writes to "
                                   f"{state.get('bootstrap')}, not {self.bootstrap}; run `lambdalake cdc down` first")
            return state
        port = self.port or free_port()
        if port_open("127.0.0.1", port):
            raise ConnectError(f"port {port} is already in use; choose another with --connect-port")
        self._write_config(port)
        libs = connect_libs()
        cmd = ["java", f"-Xmx{self.heap}", "-Xms64m", "-XX:+UseG1GC", "-XX:TieredStopAtLevel=1",
               "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
               "-cp", f"{libs}/*", "org.apache.kafka.connect.cli.ConnectStandalone", str(self.worker_file)]
        rest = f"http://127.0.0.1:{port}"
        return self.start(
            cmd, out=self.out_file, timeout=timeout, what=f"{rest} (REST API)",
            ready=lambda: port_open("127.0.0.1", port) and _has_plugin(rest),
            state=lambda pid: {"pid": pid, "url": rest, "port": port, "bootstrap": self.bootstrap,
                               "offsets": str(self.offsets_file), "started_at": time.time(),
                               "log": str(self.log_file)})

    def down(self, timeout: float = 30.0) -> bool:
        """Stop the worker (SIGTERM: connectors stop and flush their offsets; SIGKILL after ``timeout``)."""
        return self.stop(timeout) is not None


# --- REST ----------------------------------------------------------------------------------------------------------
def rest(url: str, method: str = "GET", body: dict | None = None, timeout: float = 30.0):
    """One Connect REST call; the JSON answer (None for 204), ConnectError with Connect's message otherwise."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                         "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            raw = res.read()
            return json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("message", "")
        except ValueError:
            message = exc.reason
        raise ConnectError(f"Kafka Connect {method} {url}: HTTP {exc.code}: {str(message).splitlines()[0][:300]}")\
            from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectError(f"Kafka Connect at {url} does not answer ({reason}); is it running? "
                           "(`lambdalake cdc up`, or check LAMBDALAKE_CONNECT)") from None


def _has_plugin(base: str) -> bool:
    try:
        plugins = rest(f"{base}/connector-plugins", timeout=3)
    except ConnectError:
        return False
    return any(p.get("class") == CONNECTOR_CLASS for p in plugins or [])


def prepare_tables(db: PostgresAccess, tables: tuple[str, ...]) -> None:
    """Check each table exists and has a primary key; set ``REPLICA IDENTITY FULL`` (updates and deletes then
    carry the whole old row in ``before``)."""
    from psycopg import sql

    with db.connect(autocommit=True) as conn:
        for table in tables:
            schema, name = table.split(".", 1)
            row = conn.execute(
                "SELECT c.relreplident, EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)"
                " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')", (schema, name)).fetchone()
            if row is None:
                raise ConnectError(f"table {table} does not exist in database {db.database!r} at "
                                   f"{db.host}:{db.port}; create it first")
            if not row[1]:
                raise ConnectError(f"table {table} has no primary key; the CDC source keeps rows by primary key: "
                                   "add one (ALTER TABLE ... ADD PRIMARY KEY)")
            if row[0] != "f":
                conn.execute(sql.SQL("ALTER TABLE {}.{} REPLICA IDENTITY FULL").format(
                    sql.Identifier(schema), sql.Identifier(name)))


def capture(base: str, capture: Capture, db: PostgresAccess, *, password_ref: str | None = None,
            timeout: float = 60.0) -> dict:
    """Capture ``capture.tables`` of ``db``: REPLICA IDENTITY FULL on each, then the connector registered (or its
    configuration replaced) at the Connect REST API ``base``; waits until the connector and its task run. Returns
    the connector's status. A connector that fails raises ConnectError with the first line of its trace."""
    prepare_tables(db, capture.tables)
    rest(f"{base}/connectors/{capture.name}/config", "PUT", capture.config(db, password_ref))
    return wait_running(base, capture.name, timeout)


def wait_running(base: str, name: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    st: dict = {}
    while time.monotonic() < deadline:
        try:
            st = rest(f"{base}/connectors/{name}/status", timeout=5)
        except ConnectError as exc:
            if "HTTP 404" not in str(exc):
                raise
            st = {}
        states = [st.get("connector", {}).get("state")] + [t.get("state") for t in st.get("tasks", [])]
        failed = [t for t in [st.get("connector", {}), *st.get("tasks", [])] if t.get("state") == "FAILED"]
        if failed:
            trace = (failed[0].get("trace") or "").strip().splitlines()
            raise ConnectError(f"connector {name} failed: {trace[0][:400] if trace else 'no trace'}")
        if len(states) > 1 and all(s == "RUNNING" for s in states):
            return st
        time.sleep(0.5)
    raise ConnectError(f"connector {name} is not running after {timeout:.0f}s (status: {st or 'none'})")


def connectors(base: str) -> dict[str, dict]:
    """Every connector of the Connect at ``base`` with its status."""
    out = rest(f"{base}/connectors?expand=status") or {}
    return {name: doc.get("status", {}) for name, doc in out.items()}


def remove(base: str, name: str) -> bool:
    """Delete connector ``name`` (its slot stays in the database: drop it there). True if it existed."""
    try:
        rest(f"{base}/connectors/{name}", "DELETE")
        return True
    except ConnectError as exc:
        if "HTTP 404" in str(exc):
            return False
        raise


def slot_lag(db: PostgresAccess) -> list[dict]:
    """Each logical replication slot of ``db``'s cluster: name, active, WAL held back (bytes), WAL status."""
    with db.connect() as conn:
        rows = conn.execute(
            "SELECT slot_name, active, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,"
            " wal_status, safe_wal_size FROM pg_replication_slots WHERE slot_type = 'logical' ORDER BY 1").fetchall()
    return [{"slot": r[0], "active": r[1], "lag_bytes": r[2], "wal_status": r[3], "safe_wal_size": r[4]}
            for r in rows]
