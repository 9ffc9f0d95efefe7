"""The S3 backend of the storage seam: a lake under ``s3://bucket/prefix`` on AWS S3 or any S3-compatible server
(SeaweedFS — :mod:`lambdalake.s3server` —, MinIO, ...), through obstore (the Rust ``object_store`` crate).

One request per operation: get / get_versioned = GET (bytes and ETag in one answer), put = PUT, put_if_absent =
PUT with ``If-None-Match: *`` (obstore ``mode="create"``), swap = PUT with ``If-Match: <etag>`` (obstore
``mode={"e_tag": ...}``; ``expected=None``: ``If-None-Match: *``), exists / size / modified = HEAD (``modified``:
its ``Last-Modified``), list = ListObjectsV2 pages, delete = DELETE. Objects are written in one PUT (never a
multipart upload): a failed write leaves nothing. Other writers of the lake's data files (Spark's s3a, pyarrow) do
upload large files in parts: the incomplete uploads a crash leaves are aborted by garbage collection
(:meth:`S3Store.abort_stale_uploads`, through boto3: object_store cannot list uploads).

Settings, the standard AWS variables unless given: ``AWS_ENDPOINT_URL`` (``AWS_ENDPOINT_URL_S3`` first; none: AWS
itself; ``http://`` allowed; path-style requests), ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``; default us-east-1),
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``). A wrong endpoint, bucket or credential
is a :class:`StorageError` of one line naming the endpoint and bucket and what to check.

A retried conditional PUT whose first attempt succeeded but whose answer was lost comes back "precondition failed":
protocols recognise their own write by a writer id and sequence in the body (see :mod:`lambdalake.storage.base`).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import urlsplit

from lambdalake.exceptions import ConfigError
from lambdalake.storage.base import ObjectMissing, StorageError, Versioned, check_key

if TYPE_CHECKING:
    import pyarrow.fs

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CODE = re.compile(r"<Code>([^<]+)</Code>")
RETRIES = 3  # per request, on connection errors and 5xx answers (obstore backs off from 100 ms to 2 s)
RETRY_SECONDS = 15.0  # no retry starts later than this after the first attempt
CONNECT_SECONDS = 5.0
REQUEST_SECONDS = 120.0


@dataclass(frozen=True)
class S3Settings:
    """Where and as whom: resolved once from arguments, else the standard AWS variables."""

    endpoint: str | None  # http(s)://host[:port] of an S3-compatible server; None: AWS S3 itself
    region: str
    access_key: str | None  # None: obstore's own chain (instance profile, web identity, ...)
    secret_key: str | None
    session_token: str | None = None

    @classmethod
    def resolve(cls, endpoint: str | None = None, region: str | None = None, access_key: str | None = None,
                secret_key: str | None = None) -> S3Settings:
        env = os.environ
        endpoint = (endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or "").rstrip("/")
        if endpoint and not _endpoint_ok(endpoint):
            raise ConfigError(f"S3 endpoint {endpoint!r} is not an http:// or https:// URL of a host[:port] "
                              "(AWS_ENDPOINT_URL)")
        token = None
        if access_key is None and secret_key is None:
            access_key, secret_key = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
            token = env.get("AWS_SESSION_TOKEN") or None
        if bool(access_key) != bool(secret_key):
            raise ConfigError("S3 credentials need both an access key and a secret key (AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY)")
        if endpoint and not access_key:
            raise StorageError(f"no credentials for the S3 endpoint {endpoint}: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY (`lambdalake s3 up` prints them for the embedded server)")
        return cls(endpoint or None, region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
                   access_key or None, secret_key or None, token)

    @property
    def where(self) -> str:
        return self.endpoint or f"AWS S3 ({self.region})"


def _endpoint_ok(endpoint: str) -> bool:
    parts = urlsplit(endpoint)
    try:
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in 0-65535
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _server_time(page: dict) -> float:
    """The server's clock from an answer's ``Date`` header (an upload's age is measured on one clock), else
    this machine's."""
    from email.utils import parsedate_to_datetime

    date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return parsedate_to_datetime(date).timestamp() if date else time.time()
    except (TypeError, ValueError):
        return time.time()


def parse_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket[/prefix]``; ConfigError if it is not one."""
    parts = urlsplit(url)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if parts.scheme != "s3" or parts.query or parts.fragment or not _BUCKET.match(bucket) or ".." in bucket:
        raise ConfigError(f"{url!r} is not an S3 lake URL: s3://<bucket>/<prefix>, the bucket 3-63 lowercase "
                          "letters, digits, '.' or '-'")
    if prefix:
        check_key(prefix)
    return bucket, prefix


class S3Store:
    """A lake under ``s3://bucket/prefix`` (the :class:`lambdalake.storage.base.Store` protocol)."""

    def __init__(self, url: str, *, endpoint: str | None = None, region: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None):
        self.bucket, self.prefix = parse_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.settings = S3Settings.resolve(endpoint, region, access_key, secret_key)
        self._client = None
        self._bucket_seen = False  # a request answered for this bucket (so a 404 of HEAD means "no such key")

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.settings.where!r})"

    def __getstate__(self) -> dict:  # picklable for worker processes: the client is rebuilt there
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from obstore.store import S3Store as ObjectStoreS3

            s = self.settings
            config: dict = {"region": s.region, "conditional_put": "etag", "skip_signature": False}
            if s.endpoint:
                config.update(endpoint=s.endpoint, aws_endpoint_url_s3=s.endpoint,
                              virtual_hosted_style_request=False)
            credential = {"access_key_id": s.access_key, "secret_access_key": s.secret_key,
                          "token": s.session_token, "expires_at": None}
            self._client = ObjectStoreS3(
                self.bucket, prefix=self.prefix or None, config=config,
                # these credentials and nothing else (not a session token left in the environment)
                credential_provider=(lambda: credential) if s.access_key else None,
                client_options={"allow_http": bool(s.endpoint and s.endpoint.startswith("http://")),
                                "connect_timeout": timedelta(seconds=CONNECT_SECONDS),
                                "timeout": timedelta(seconds=REQUEST_SECONDS)},
                retry_config={"max_retries": RETRIES, "retry_timeout": timedelta(seconds=RETRY_SECONDS),
                              "backoff": {"init_backoff": timedelta(milliseconds=100),
                                          "max_backoff": timedelta(seconds=2), "base": 2}})
        return self._client

    # reads ------------------------------------------------------------------------------------------------
    def get(self, key: str) -> bytes:
        return self.get_versioned(key).data

    def get_versioned(self, key: str) -> Versioned:
        import obstore

        check_key(key)
        try:
            res = obstore.get(self.client, key)
            data = bytes(res.bytes())
        except Exception as exc:  # noqa: BLE001 - every obstore error becomes one of ours
            self._fail(exc, "read", key)
        self._bucket_seen = True
        return Versioned(data, res.meta["e_tag"] or "")

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
            return True
        except ObjectMissing:
            return False

    def size(self, key: str) -> int:
        return int(self._head(key)["size"])

    def modified(self, key: str) -> float:
        return self._head(key)["last_modified"].timestamp()

    def _head(self, key: str) -> dict:
        import obstore

        check_key(key)
        try:
            meta = obstore.head(self.client, key)
        except FileNotFoundError:  # HEAD answers carry no body: a missing bucket looks like a missing key
            self._check_bucket()
            raise ObjectMissing(f"no object {key} in {self.url}") from None
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, "read", key)
        self._bucket_seen = True
        return meta

    def list(self, prefix: str = "") -> list[str]:
        import obstore

        base = check_key(prefix.rstrip("/")) if prefix.strip("/") else None
        try:
            keys = [m["path"] for batch in obstore.list(self.client, base, chunk_size=1000) for m in batch]
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, "list", prefix or "(the whole lake)")
        self._bucket_seen = True
        return sorted(keys)

    def children(self, prefix: str) -> list[str]:
        import obstore

        base = check_key(prefix.rstrip("/"))
        try:
            got = obstore.list_with_delimiter(self.client, base)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, "list", prefix)
        self._bucket_seen = True
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in got["common_prefixes"]]
        names += [m["path"].rsplit("/", 1)[-1] for m in got["objects"]]
        return sorted(names)

    # writes -----------------------------------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> str:
        return self._put(key, data, "overwrite")  # type: ignore[return-value]

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        return self._put(key, data, "create")

    def swap(self, key: str, data: bytes, expected: str | None) -> str | None:
        return self._put(key, data, "create" if expected is None else {"e_tag": expected})

    def _put(self, key: str, data: bytes, mode) -> str | None:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        check_key(key)
        try:
            res = obstore.put(self.client, key, data, mode=mode, use_multipart=False)
        except (AlreadyExistsError, PreconditionError):
            return None  # another writer's object is there (or it is no longer the expected version)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, "write", key)
        self._bucket_seen = True
        if res["e_tag"]:
            return res["e_tag"]
        return self._head(key)["e_tag"] or ""  # a server that answers a PUT without its ETag

    def delete(self, key: str) -> None:
        import obstore

        check_key(key)
        try:
            obstore.delete(self.client, key)
        except FileNotFoundError as exc:
            if "NoSuchBucket" in str(exc):
                self._fail(exc, "delete", key)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, "delete", key)

    def abort_stale_uploads(self, prefix: str, older_than: float) -> list[str]:
        """ListMultipartUploads under the lake's prefix (+ ``prefix``), then AbortMultipartUpload for each started
        more than ``older_than`` seconds ago by the server's clock — through boto3, since obstore (object_store)
        cannot list uploads."""
        from botocore.exceptions import BotoCoreError, ClientError

        base = "/".join(p for p in (self.prefix, prefix.strip("/")) if p)
        base = base + "/" if base else ""
        client, aborted, now = self._uploads_client(), [], None
        try:
            pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=base)
            for page in pages:
                now = now or _server_time(page)
                for up in page.get("Uploads", []):
                    if (now - up["Initiated"].timestamp()) >= older_than and self._abort(client, up):
                        aborted.append(up["Key"][len(self.prefix) + 1:] if self.prefix else up["Key"])
        except ClientError as exc:
            self._fail(exc, "list the multipart uploads under", prefix or "(the whole lake)",
                       code=exc.response.get("Error", {}).get("Code", ""))
        except BotoCoreError as exc:
            self._fail(exc, "list the multipart uploads under", prefix or "(the whole lake)")
        return aborted

    def _abort(self, client, upload: dict) -> bool:
        from botocore.exceptions import ClientError

        try:
            client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                return False  # completed or aborted meanwhile by its writer
            raise
        return True

    def _uploads_client(self):
        import boto3
        from botocore.config import Config

        s = self.settings
        config = Config(region_name=s.region, connect_timeout=CONNECT_SECONDS, read_timeout=REQUEST_SECONDS,
                        retries={"max_attempts": RETRIES + 1, "mode": "standard"},
                        s3={"addressing_style": "path" if s.endpoint else "auto"})
        return boto3.session.Session().client(
            "s3", endpoint_url=s.endpoint, aws_access_key_id=s.access_key, aws_secret_access_key=s.secret_key,
            aws_session_token=s.session_token, config=config)

    # pyarrow ----------------------------------------------------------------------------------------------
    def arrow_filesystem(self) -> tuple[pyarrow.fs.S3FileSystem, str]:
        """A pyarrow S3 file system with the same endpoint, region and credentials, and the lake's base path in
        it (``bucket/prefix``): for the Parquet data files."""
        from pyarrow.fs import S3FileSystem

        s = self.settings
        options: dict = {"region": s.region, "connect_timeout": CONNECT_SECONDS,
                         "request_timeout": REQUEST_SECONDS}
        if s.access_key:
            options.update(access_key=s.access_key, secret_key=s.secret_key, session_token=s.session_token)
        if s.endpoint:
            parts = urlsplit(s.endpoint)
            options.update(scheme=parts.scheme, endpoint_override=parts.netloc + parts.path.rstrip("/"),
                           force_virtual_addressing=False)
        return S3FileSystem(**options), f"{self.bucket}/{self.prefix}".rstrip("/")

    # errors -----------------------------------------------------------------------------------------------
    def _check_bucket(self) -> None:
        """After a bodiless 404: one LIST (once per store) tells a missing bucket from a missing key."""
        if not self._bucket_seen:
            self.list("")  # raises StorageError naming the bucket if it does not exist

    def _fail(self, exc: Exception, op: str, key: str, code: str = "") -> NoReturn:
        """Raise the protocol's error for an obstore error (or a botocore one, its S3 error ``code`` given):
        ObjectMissing, or a one-line StorageError."""
        from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

        text = str(exc)
        code = code or (_CODE.search(text) or [None, ""])[1]
        where, bucket = self.settings.where, self.bucket
        if "169.254.169.254" in text and not self.settings.access_key:  # no key given: the instance-profile lookup
            raise StorageError(f"no S3 credentials for {self.url} at {where}: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a server other than AWS; `eval "
                               "\"$(lambdalake s3 up)\"` for the embedded one), or run where an instance profile "
                               "gives them") from None
        if code == "NoSuchBucket":
            raise StorageError(f"no bucket {bucket!r} at {where}: create it, or fix the bucket in the lake URL "
                               f"{self.url} (LAMBDALAKE_HOME) or the endpoint (AWS_ENDPOINT_URL)") from None
        if isinstance(exc, FileNotFoundError):
            raise ObjectMissing(f"no object {key} in {self.url}") from None
        if isinstance(exc, PermissionDeniedError | UnauthenticatedError) or code in (
                "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
            raise StorageError(f"S3 at {where} refused the credentials for bucket {bucket!r} ({code or 'denied'}): "
                               "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that they may use this "
                               "bucket") from None
        if "error sending request" in text or "Connect" in text or "timed out" in text.lower() or (
                not code and "connect" in text.lower()):
            raise StorageError(f"cannot reach the S3 endpoint {where} to {op} {key} in bucket {bucket!r}: is the "
                               "server up? check AWS_ENDPOINT_URL (`lambdalake s3 status` for the embedded one)"
                               ) from None
        first = text.split("\n", 1)[0][:300]
        raise StorageError(f"S3 {op} of {key} in {self.url} at {where} failed: {code or type(exc).__name__}: "
                           f"{first}") from None
