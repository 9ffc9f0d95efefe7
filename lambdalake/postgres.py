"""The embedded PostgreSQL server of the CDC source: Debian's PostgreSQL 15 (``make postgresql`` installs it), one
cluster started and stopped by the project, for ``lambdalake cdc up`` and the tests. Its files live in one directory
(``<home>/postgres/`` for ``lambdalake cdc up``)::

    access.json   (0600) superuser name, password (generated on first start), database and port
    pgdata/       the cluster (initdb'd on first start), owned by the server's user, 0700
    server.out    the server's log (stderr)     postgres.pid     postgres.json  pid, port, database, started_at

What it guarantees: TCP on 127.0.0.1 only (no Unix socket), SCRAM passwords for every connection (replication
included), ``wal_level=logical`` with the WAL a replication slot may hold back capped (``max_slot_wal_keep_size``:
a slot that falls further behind is invalidated instead of filling the disk). PostgreSQL refuses to run as root:
run by root (CI), the server, initdb and the cluster's files belong to the unprivileged system user
``lambdalake`` (created on first use), which must be able to reach the directory. ``tied_to_parent=True`` (tests)
makes it die with the process that started it (a fast shutdown: SIGINT, which does not wait for clients).

With ``LAMBDALAKE_POSTGRES`` set (a ``postgresql://user:password@host:port/database`` URL), nothing here is started:
every command uses that database (:func:`postgres_url`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from lambdalake.embedded import EmbeddedServer, free_port, port_open
from lambdalake.exceptions import ConfigError, LambdalakeError

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SERVER_USER = "lambdalake"  # the unprivileged system user a root-started server runs as
SUPERUSER = "lambdalake"
DATABASE = "lambdalake"


class PostgresError(LambdalakeError):
    """The embedded PostgreSQL server failed to start or stop, or a database is not as the CDC source needs it."""

    exit_code = 3


def pg_bin() -> Path:
    bin_dir = Path(os.environ.get("LAMBDALAKE_PG_BIN") or PG_BIN)
    if not os.access(bin_dir / "postgres", os.X_OK):
        raise PostgresError(f"PostgreSQL 15 not found in {bin_dir}: run `make postgresql` (Debian's postgresql-15; "
                            "needs root or sudo) or set LAMBDALAKE_PG_BIN to its bin directory")
    return bin_dir


@dataclass(frozen=True)
class PostgresAccess:
    """Where a PostgreSQL database is and how to log in: the embedded server's, or ``LAMBDALAKE_POSTGRES``'s."""

    host: str
    port: int
    user: str
    password: str
    database: str

    @property
    def url(self) -> str:
        return (f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}@{self.host}:{self.port}/"
                f"{quote(self.database, safe='')}")

    @property
    def shown(self) -> str:
        """The URL without its password (for output and logs)."""
        return f"postgresql://{self.user}:***@{self.host}:{self.port}/{self.database}"

    def connect(self, **kwargs):
        """A psycopg connection (the ``cdc`` extra)."""
        try:
            import psycopg
        except ImportError:
            raise ConfigError("the PostgreSQL driver is missing: pip install 'lambdalake[cdc]' (make install adds "
                              "it)") from None
        return psycopg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               dbname=self.database, connect_timeout=5, **kwargs)


def parse_postgres_url(url: str, name: str = "LAMBDALAKE_POSTGRES") -> PostgresAccess:
    """A ``postgresql://user:password@host:port/database`` URL, or ConfigError saying what is wrong with it."""
    example = "postgresql://user:password@host:5432/database"
    try:
        parts = urlsplit(url)
        port = parts.port or 5432
    except ValueError as exc:
        raise ConfigError(f"{name}={_masked(url)!r} is not a URL like {example}: {exc}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{name}={_masked(url)!r} must start with postgresql://, like {example}")
    missing = [what for what, value in (("host", parts.hostname), ("user", parts.username),
                                        ("database", parts.path.lstrip("/"))) if not value]
    if missing:
        raise ConfigError(f"{name}={_masked(url)!r} lacks the {' and '.join(missing)}; write it like {example}")
    return PostgresAccess(parts.hostname, port, unquote(parts.username), unquote(parts.password or ""),
                          unquote(parts.path.lstrip("/")))


def _masked(url: str) -> str:
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        if parts.password:
            return url.replace(f":{parts.password}@", ":***@", 1)
    return url


def postgres_url() -> PostgresAccess | None:
    """The user's own PostgreSQL (``LAMBDALAKE_POSTGRES``), or None: the embedded server is used."""
    raw = os.environ.get("LAMBDALAKE_POSTGRES")
    return parse_postgres_url(raw) if raw else None


class EmbeddedPostgres(EmbeddedServer):
    """A PostgreSQL 15 cluster under ``dir`` on 127.0.0.1:``port`` (default: the port of its last start if free,
    else a free one). ``max_slot_wal_keep_size`` caps the WAL a replication slot holds back."""

    name = "PostgreSQL"
    error = PostgresError
    death_signal = signal.SIGINT  # fast shutdown: a smart one (SIGTERM) would wait for every client
    stop_signal = signal.SIGINT

    def __init__(self, dir: Path, port: int | None = None, tied_to_parent: bool = False,
                 max_slot_wal_keep_size: str = "1GB", server_user: str = SERVER_USER):
        self.dir = Path(dir).absolute()
        self.port = port
        self.tied_to_parent = tied_to_parent
        self.max_slot_wal_keep_size = max_slot_wal_keep_size
        self.server_user = server_user

    # files ------------------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.dir / "postgres.json"

    @property
    def pid_file(self) -> Path:
        return self.dir / "postgres.pid"

    @property
    def access_file(self) -> Path:
        return self.dir / "access.json"

    @property
    def data_dir(self) -> Path:
        return self.dir / "pgdata"

    @property
    def out_file(self) -> Path:
        return self.dir / "server.out"

    def log_files(self) -> list[Path]:
        return [self.out_file]

    def is_ours(self, cmdline: list[str]) -> bool:
        return bool(cmdline) and cmdline[0].endswith("postgres") and str(self.data_dir) in cmdline

    def access(self) -> PostgresAccess:
        """Address and credentials of the running server (PostgresError if it is not running)."""
        st = self.status()
        if not st["running"] or "port" not in st:
            raise PostgresError(f"the embedded PostgreSQL in {self.dir} is not running; start it with "
                                "`lambdalake cdc up`")
        doc = self._access_doc()
        return PostgresAccess("127.0.0.1", int(st["port"]), doc["user"], doc["password"], doc["database"])

    def _access_doc(self) -> dict:
        """Superuser, password, database and last port: generated on first use, kept (0600) across restarts."""
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(self.access_file.read_text())
            if {"user", "password", "database"} <= doc.keys():
                return doc
        doc = {"user": SUPERUSER, "password": secrets.token_urlsafe(24), "database": DATABASE}
        self._write_access(doc)
        return doc

    def _write_access(self, doc: dict) -> None:
        tmp = self.access_file.with_name(f".access.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
        os.replace(tmp, self.access_file)

    # lifecycle --------------------------------------------------------------------------------------------
    def up(self, timeout: float = 60.0) -> dict:
        """initdb on first start, start the server and wait until it accepts a password login; create the
        database. Idempotent: a running server is left as it is (its state returned)."""
        bin_dir = pg_bin()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700 if os.geteuid() != 0 else 0o711)  # root: the server's user passes through
        pid = self.running_pid()
        if pid is not None:
            state = self.status()
            if self.port not in (None, state.get("port")):
                raise PostgresError(f"the embedded PostgreSQL in {self.dir} is already running on port "
                                    f"{state.get('port')}; run `lambdalake cdc down` first")
            return state
        user = self._server_user()
        doc = self._access_doc()
        port = self.port or doc.get("port") or free_port()
        if port_open("127.0.0.1", port):
            if self.port:
                raise PostgresError(f"port {port} is already in use; choose another with --pg-port")
            port = free_port()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(bin_dir, user, doc["password"])
        doc["port"] = port
        self._write_access(doc)
        settings = {"listen_addresses": "127.0.0.1", "port": str(port), "unix_socket_directories": "",
                    "wal_level": "logical", "max_wal_senders": "10", "max_replication_slots": "10",
                    "max_slot_wal_keep_size": self.max_slot_wal_keep_size, "password_encryption": "scram-sha-256",
                    "log_min_messages": "warning", "log_line_prefix": "%m [%p] "}
        cmd = [str(bin_dir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        access = PostgresAccess("127.0.0.1", port, doc["user"], doc["password"], "postgres")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        state = self.start(
            cmd, out=self.out_file, env=env, user=user, timeout=timeout, what=f"127.0.0.1:{port} (a password login)",
            ready=lambda: port_open("127.0.0.1", port) and _answers(access),
            state=lambda pid: {"pid": pid, "port": port, "host": "127.0.0.1", "database": doc["database"],
                               "user": doc["user"], "credentials": str(self.access_file),
                               "max_slot_wal_keep_size": self.max_slot_wal_keep_size, "started_at": time.time(),
                               "log": str(self.out_file)})
        _ensure_database(access, doc["database"])
        return state

    def down(self, timeout: float = 30.0) -> bool:
        """Stop the server (fast shutdown, SIGKILL after ``timeout``). True if one was running. Data stays."""
        return self.stop(timeout) is not None

    def _server_user(self) -> tuple[int, int] | None:
        """(uid, gid) to run the server as when we are root (the user created if missing), else None (ourselves).
        The cluster's directory is made the user's; every directory above it must let the user through."""
        if os.geteuid() != 0:
            return None
        try:
            pw = pwd.getpwnam(self.server_user)
        except KeyError:
            useradd = shutil.which("useradd") or "/usr/sbin/useradd"
            res = subprocess.run([useradd, "--system", "--user-group", "--no-create-home", "--home-dir",
                                  "/nonexistent", "--shell", "/usr/sbin/nologin", self.server_user],
                                 capture_output=True, text=True)
            if res.returncode != 0 and "already exists" not in res.stderr:
                raise PostgresError(f"cannot create the system user {self.server_user!r} PostgreSQL runs as "
                                    f"(it refuses root): {res.stderr.strip()[:200]}") from None
            pw = pwd.getpwnam(self.server_user)
        blocked = _unreachable(self.dir, pw.pw_uid, pw.pw_gid)
        if blocked is not None:
            raise PostgresError(f"PostgreSQL runs as the user {self.server_user!r} (it refuses root), which cannot "
                                f"enter {blocked}; let it through (chmod o+x {blocked}) or put the lake home "
                                "(--home, LAMBDALAKE_HOME) where it can reach")
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.data_dir, pw.pw_uid, pw.pw_gid)
        return pw.pw_uid, pw.pw_gid

    def _initdb(self, bin_dir: Path, user: tuple[int, int] | None, password: str) -> None:
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        pwfile = self.dir / ".initdb-password"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        as_user = {"user": user[0], "group": user[1], "extra_groups": []} if user else {}
        if user:
            os.chown(pwfile, *user)
        try:
            res = subprocess.run([str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                                  f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=reject",
                                  "-E", "UTF8", "--no-locale", "--no-instructions"],
                                 capture_output=True, text=True, cwd=self.dir, timeout=120, **as_user)
        finally:
            pwfile.unlink(missing_ok=True)
        if res.returncode != 0:
            raise PostgresError(f"initdb of {self.data_dir} failed (exit {res.returncode}): "
                                f"{(res.stderr or res.stdout).strip()[-600:]}")
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text("# written by lambdalake: TCP from 127.0.0.1 only, SCRAM passwords, no Unix socket\n"
                       "host all all 127.0.0.1/32 scram-sha-256\n"
                       "host replication all 127.0.0.1/32 scram-sha-256\n")
        if user:
            os.chown(hba, *user)


def _unreachable(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory from / down to ``path`` that user ``uid`` (group ``gid``) may not enter, or None."""
    groups = {gid, *(g.gr_gid for g in _groups_of(uid))}
    for d in [*reversed(path.parents), path]:
        st = d.stat()
        bit = (stat.S_IXUSR if st.st_uid == uid else stat.S_IXGRP if st.st_gid in groups else stat.S_IXOTH)
        if not st.st_mode & bit and d != path:
            return d
    return None


def _groups_of(uid: int) -> list:
    import grp

    name = pwd.getpwuid(uid).pw_name
    return [g for g in grp.getgrall() if name in g.gr_mem]


def _answers(access: PostgresAccess) -> bool:
    try:
        with access.connect() as conn:
            conn.execute("SELECT 1")
        return True
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - any failure to log in means: not ready yet
        return False


def _ensure_database(access: PostgresAccess, name: str) -> None:
    with access.connect(autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            from psycopg import sql

            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
