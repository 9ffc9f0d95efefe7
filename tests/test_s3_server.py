"""The embedded S3 server (lambdalake/s3server.py) and the S3 backend's errors (lambdalake/storage/s3.py), on the real
SeaweedFS server: bound to 127.0.0.1 only, anonymous requests refused, credentials required, conditional writes
exact, gone when its owner is killed with -9, ``lambdalake s3 up/status/down``, and one line (never a traceback)
for a wrong secret, a closed port or a missing bucket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from lambdalake.embedded import free_port
from lambdalake.exceptions import ConfigError, LambdalakeError
from lambdalake.s3server import EmbeddedS3, S3Access, create_bucket
from lambdalake.storage.base import StorageError
from lambdalake.storage.local import LocalStore
from lambdalake.storage.s3 import S3Store

LAMBDALAKE = str(Path(sys.executable).parent / "lambdalake")


def server_pid(endpoint: str) -> int:
    port = int(endpoint.rsplit(":", 1)[1])
    pids = {c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert len(pids) == 1, pids
    return pids.pop()


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert isinstance(exc, LambdalakeError), type(exc)
    assert "\n" not in text and "Traceback" not in text and "Debug source" not in text, text
    return text


def store_as(access: S3Access, bucket: str, **changes) -> S3Store:
    args = {"endpoint": access.endpoint, "access_key": access.access_key, "secret_key": access.secret_key,
            "region": access.region, **changes}
    return S3Store(f"s3://{bucket}/lake", **args)


def test_every_port_is_bound_to_localhost_only(s3_server):
    proc = psutil.Process(server_pid(s3_server.endpoint))
    assert Path(proc.exe()).name == "weed" and "mini" in proc.cmdline()
    listening = [c.laddr for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 8  # master, volume, filer, S3 and admin, each with its gRPC port
    assert {addr.ip for addr in listening} == {"127.0.0.1"}, listening


def test_anonymous_requests_are_refused(s3_server, s3_store):
    s3_store.put("views/batch/CURRENT", b"v1")
    base = f"{s3_server.endpoint}/{s3_store.bucket}"
    for method, url in [("GET", f"{s3_server.endpoint}/"), ("GET", f"{base}?list-type=2"),
                        ("GET", f"{base}/lake/views/batch/CURRENT"), ("PUT", f"{base}/lake/views/batch/CURRENT"),
                        ("DELETE", f"{base}/lake/views/batch/CURRENT"), ("PUT", f"{s3_server.endpoint}/anon-made")]:
        req = urllib.request.Request(url, data=b"anonymous" if method == "PUT" else None, method=method)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 403, (method, url, err.value.code)
    assert s3_store.get("views/batch/CURRENT") == b"v1"


def test_a_wrong_secret_or_key_is_one_line_and_writes_nothing(s3_server, s3_store):
    for changes, code in [({"secret_key": "not-the-secret"}, "SignatureDoesNotMatch"),
                          ({"access_key": "NOBODY", "secret_key": "x"}, "InvalidAccessKeyId")]:
        intruder = store_as(s3_server, s3_store.bucket, **changes)
        for attempt in (lambda s=intruder: s.put("k", b"x"), lambda s=intruder: s.put_if_absent("k", b"x"),
                        lambda s=intruder: s.get("k"), lambda s=intruder: s.list()):
            with pytest.raises(StorageError) as err:
                attempt()
            text = one_line(err.value)
            assert s3_server.endpoint in text and code in text and "AWS_SECRET_ACCESS_KEY" in text, text
    assert not s3_store.exists("k")


def test_conditional_create_and_compare_and_swap_hold_on_the_server(s3_store):
    assert s3_store.put_if_absent("head", b"a") is not None
    assert s3_store.put_if_absent("head", b"b") is None
    v1 = s3_store.get_versioned("head")
    assert v1.data == b"a"
    v2 = s3_store.swap("head", b"c", v1.etag)
    assert v2 is not None and v2 != v1.etag
    assert s3_store.swap("head", b"d", v1.etag) is None  # stale: someone swapped since
    assert s3_store.swap("absent", b"x", v1.etag) is None  # If-Match on no object at all
    assert s3_store.get_versioned("head").data == b"c" and not s3_store.exists("absent")
    # racing writers: exactly one wins each kind of race (tests/test_storage.py is the full race gate; SeaweedFS
    # serializes contended conditional writes on a lock it retries each second, so a race of N takes up to ~N/2 s)
    for round_ in range(2):
        key = f"race/{round_}"
        wins = _race(8, lambda i, k=key: s3_store.put_if_absent(k, f"w{i}".encode()))
        assert len(wins) == 1 and s3_store.get(key) == f"w{wins[0]}".encode()
        etag = s3_store.get_versioned(key).etag
        wins = _race(8, lambda i, k=key, e=etag: s3_store.swap(k, f"s{i}".encode(), e))
        assert len(wins) == 1 and s3_store.get(key) == f"s{wins[0]}".encode()


def _race(n: int, write) -> list[int]:
    """Run ``write(i)`` in ``n`` threads released together; the indexes whose write returned an ETag."""
    gate, results = threading.Barrier(n), [None] * n

    def run(i: int) -> None:
        gate.wait()
        results[i] = write(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [i for i, r in enumerate(results) if r is not None]


def test_a_missing_bucket_is_one_line_and_is_never_created(s3_server):
    store = store_as(s3_server, f"no-such-{uuid.uuid4().hex[:10]}")
    for attempt in (lambda: store.put("k", b"x"), lambda: store.put_if_absent("k", b"x"),
                    lambda: store.swap("k", b"x", None), lambda: store.get("k"), lambda: store.exists("k"),
                    lambda: store.size("k"), lambda: store.list(), lambda: store.delete("k")):
        with pytest.raises(StorageError) as err:
            attempt()
        text = one_line(err.value)
        assert f"no bucket {store.bucket!r} at {s3_server.endpoint}" in text, text


def test_a_closed_port_is_one_line(monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = S3Store("s3://lake/x", endpoint=endpoint, access_key="k", secret_key="s")
    t0 = time.monotonic()
    for attempt in (lambda: store.get("k"), lambda: store.put_if_absent("k", b"x"), lambda: store.list()):
        with pytest.raises(StorageError) as err:
            attempt()
        text = one_line(err.value)
        assert f"cannot reach the S3 endpoint {endpoint}" in text and "AWS_ENDPOINT_URL" in text, text
    assert time.monotonic() - t0 < 30  # bounded retries, not obstore's default of minutes
    with pytest.raises(ConfigError, match="not a lake key"):  # a bad key is refused before any request
        store.get("a//b")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(StorageError) as err:  # an S3-compatible endpoint without credentials: refused at once
        S3Store("s3://lake/x", endpoint=endpoint)
    assert "AWS_ACCESS_KEY_ID" in one_line(err.value)


def test_the_pyarrow_file_system_reaches_the_same_lake(s3_store):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, base = s3_store.arrow_filesystem()
    assert base == f"{s3_store.bucket}/lake"
    pq.write_table(pa.table({"x": [1, 2, 3]}), f"{base}/master/p=0/part.parquet", filesystem=fs)
    assert s3_store.list("master") == ["master/p=0/part.parquet"]
    s3_store.put("views/one.txt", b"1")
    assert fs.open_input_file(f"{base}/views/one.txt").read() == b"1"
    assert pq.read_table(f"{base}/master/p=0/part.parquet", filesystem=fs)["x"].to_pylist() == [1, 2, 3]


def test_the_server_dies_when_its_owner_is_killed_with_minus_9(tmp_path):
    code = ("import sys, time\nfrom pathlib import Path\nfrom lambdalake.s3server import EmbeddedS3\n"
            f"state = EmbeddedS3(Path({str(tmp_path / 's3')!r}), tied_to_parent=True).up()\n"
            "print(state['pid'], flush=True)\ntime.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL)
    try:
        pid = int(owner.stdout.readline())
        weed = psutil.Process(pid)
        assert "mini" in weed.cmdline()
        owner.kill()  # SIGKILL: the owner gets no chance to stop anything
        owner.wait(10)
        gone, alive = psutil.wait_procs([weed], timeout=30)
        assert not alive, f"weed (pid {pid}) outlived its owner killed with -9"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)
        EmbeddedS3(tmp_path / "s3").down(timeout=10)


def test_cli_s3_up_status_down(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["LAMBDALAKE_HOME"] = str(tmp_path / "home")
    port = free_port()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([LAMBDALAKE, "s3", *args], capture_output=True, text=True, env=env, timeout=120,
                              stdin=subprocess.DEVNULL)

    try:
        up = cli("up", "--port", str(port))
        assert up.returncode == 0, up.stderr
        exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines()
                       if line.startswith("export "))
        assert exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}" and exports["AWS_REGION"] == "us-east-1"
        server = EmbeddedS3(tmp_path / "home" / "s3")
        assert oct(server.identities_file.stat().st_mode & 0o777) == "0o600"
        access = S3Access(exports["AWS_ENDPOINT_URL"], exports["AWS_ACCESS_KEY_ID"], exports["AWS_SECRET_ACCESS_KEY"])
        create_bucket(access, "cli-lake")
        store_as(access, "cli-lake").put("a", b"kept")

        again = cli("up", "--port", str(port))  # idempotent: the same server, the same exports
        assert again.returncode == 0 and again.stdout.splitlines()[1:] == up.stdout.splitlines()[1:], again
        status = cli("status")
        assert status.returncode == 0 and f"endpoint {exports['AWS_ENDPOINT_URL']}" in status.stdout
        pid = status.stdout.split("pid ", 1)[1].split(",", 1)[0]
        assert psutil.Process(int(pid)).is_running()

        down = cli("down")
        assert down.returncode == 0 and "S3 server stopped" in down.stdout, down
        assert not psutil.pid_exists(int(pid)) or psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
        stopped = cli("status")
        assert stopped.returncode == 1 and "not running" in stopped.stdout

        restarted = cli("up", "--port", str(port))  # the same credentials and data after a restart
        assert restarted.returncode == 0 and restarted.stdout.splitlines()[1:] == up.stdout.splitlines()[1:]
        assert store_as(access, "cli-lake").get("a") == b"kept"
        with_bucket = cli("up", "--port", str(port), "--bucket", "cli-made", "--bucket", "cli-lake")
        assert with_bucket.returncode == 0 and "buckets cli-made, cli-lake" in with_bucket.stdout, with_bucket
        store_as(access, "cli-made").put("b", b"x")  # it exists now; an existing one is left as it was
        assert store_as(access, "cli-lake").get("a") == b"kept"
        bad = cli("up", "--port", str(port), "--bucket", "Not_A_Bucket")
        assert bad.returncode != 0 and "not an S3 lake URL" in bad.stderr and "Traceback" not in bad.stderr
        busy = cli("up", "--port", str(free_port()))
        assert busy.returncode != 0 and busy.stderr.startswith("error: ") and "Traceback" not in busy.stderr
        assert len(busy.stderr.strip().splitlines()) == 1, busy.stderr
    finally:
        EmbeddedS3(tmp_path / "home" / "s3").down(timeout=10)
    assert cli("down").stdout.strip() == "no embedded S3 server was running"


def test_a_server_that_cannot_start_says_why(tmp_path, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(StorageError, match=f"port {taken.getsockname()[1]} is already in use"):
            EmbeddedS3(tmp_path / "busy", port=taken.getsockname()[1]).up()
    fake = tmp_path / "weed"  # a binary that fails at once: the error carries its last log lines
    fake.write_text("#!/bin/sh\necho 'F1207 cannot open data directory: disk on fire'\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("LAMBDALAKE_WEED", str(fake))
    with pytest.raises(StorageError) as err:
        EmbeddedS3(tmp_path / "broken").up(timeout=20)
    assert "exited with code 3 during start-up" in str(err.value) and "disk on fire" in str(err.value)
    assert EmbeddedS3(tmp_path / "broken").status()["running"] is False


def test_an_internal_port_taken_before_the_server_binds_it_is_retried(tmp_path, monkeypatch):
    """The internal ports are chosen free, but another process may bind one before SeaweedFS does: the server is
    started again on other ports, not given up."""
    import socket

    import lambdalake.s3server as s3server

    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    real, calls = s3server._ports, []

    def first_collides(s3_port: int) -> dict[str, int]:
        ports = real(s3_port)
        if not calls:
            ports["master.port"] = taken.getsockname()[1]
        calls.append(ports)
        return ports

    monkeypatch.setattr(s3server, "_ports", first_collides)
    server = EmbeddedS3(tmp_path / "s3", tied_to_parent=True)
    try:
        state = server.up(timeout=90)
        assert len(calls) == 2 and state["ports"]["master.port"] != taken.getsockname()[1]
    finally:
        server.down(timeout=20)
        taken.close()


_KILLED_WRITER = r'''
import os, sys, time
from lambdalake.storage.local import LocalStore
from lambdalake.storage.s3 import S3Store
fs, base = S3Store(sys.argv[1]).arrow_filesystem()
out = fs.open_output_stream(f"{base}/{sys.argv[2]}")
out.write(os.urandom(12 << 20))  # more than pyarrow's 10 MB part: the upload starts in parts
out.flush()
print("writing", flush=True)
time.sleep(120)
'''


def _uploads(client, bucket: str) -> list[str]:
    return sorted(u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def test_a_writer_killed_mid_upload_leaves_parts_that_gc_aborts_after_the_grace_period(s3_lake, run_cli):
    """A data-file writer (pyarrow here; Spark's s3a alike) killed with -9 while it uploads a large file in parts
    leaves an incomplete multipart upload: no object, invisible to a listing, yet stored. Garbage collection aborts
    it once older than the grace period — only under the lake's prefix, never another application's upload in the
    same bucket (not even under a prefix that merely starts with the lake's)."""
    url, store, env, work = s3_lake
    client = store._uploads_client()
    key = "views/batch/run-1-0123456789ab/part-00000.parquet"
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, url, key], env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        deadline = time.monotonic() + 30
        while not (ups := client.list_multipart_uploads(Bucket=store.bucket).get("Uploads")):
            assert time.monotonic() < deadline, "the writer started no multipart upload"
            time.sleep(0.1)
        deadline = time.monotonic() + 30  # its first part stored
        while not client.list_parts(Bucket=store.bucket, Key=ups[0]["Key"], UploadId=ups[0]["UploadId"]).get("Parts"):
            assert time.monotonic() < deadline, "the writer stored no part"
            time.sleep(0.1)
    finally:
        writer.kill()
        writer.wait()
    others = [f"{store.prefix}house/app.bin", "elsewhere/app.bin"]  # "prod/lakehouse/...": not the lake's
    for other in others:
        client.create_multipart_upload(Bucket=store.bucket, Key=other)
    lake_key = f"{store.prefix}/{key}"
    assert _uploads(client, store.bucket) == sorted([lake_key, *others]) and store.list() == []

    assert store.abort_stale_uploads("", 3600) == []  # young: it may be a live writer's
    assert store.abort_stale_uploads("master", 0) == []  # another prefix of the lake
    res = run_cli("compact", "--gc-only", "--gc-grace", "0", env=env)
    assert "aborted 1 incomplete multipart uploads" in res.stdout and f"aborted the upload of {key}" in res.stdout, \
        res.stdout
    assert _uploads(client, store.bucket) == sorted(others)
    assert store.abort_stale_uploads("", 0) == []
    assert LocalStore(work / "lake").abort_stale_uploads("", 0) == []  # a file system has none


def test_a_batch_runs_garbage_collection_does_not_fail_when_uploads_cannot_be_listed(s3_store, monkeypatch, tmp_path,
                                                                                       caplog):
    """Credentials without s3:ListBucketMultipartUploads: a batch run's collection warns and goes on (`lambdalake
    compact` reports it); the run is not failed by its predecessors' garbage."""
    from lambdalake.layout import Layout
    from lambdalake.versions import collect_garbage

    def refused(self, prefix, older_than):
        raise StorageError("S3 at x refused the credentials for bucket 'b' (AccessDenied)")

    monkeypatch.setattr(S3Store, "abort_stale_uploads", refused)
    assert collect_garbage(Layout(tmp_path / "work", store=s3_store)) == []
    assert "incomplete multipart uploads not aborted" in caplog.text and "AccessDenied" in caplog.text
