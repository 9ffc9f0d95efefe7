"""The storage seam: the few operations every lake protocol may use, the same on a local directory and on S3.

A lake is a set of objects under one root, each named by a *key* (``master/clickstream.pageviews/...``): a relative,
``/``-separated path without ``.``, ``..`` or empty segments. The protocols assume only what every object store
gives (docs/design.md, "Storage"):

- :meth:`Store.put` writes a whole object atomically: a reader sees the old bytes or the new ones, never a part;
- :meth:`Store.put_if_absent` creates an object only if none exists under its key (exactly one of N racing
  writers wins);
- :meth:`Store.swap` replaces a small object only if it is still the version the writer read (compare-and-swap on
  its ETag); ``expected=None`` means "only if it does not exist yet". Exactly one of N racing swaps from the same
  version wins; the others learn they lost and must read again;
- :meth:`Store.get` / :meth:`Store.get_versioned` read a whole object (with its ETag), :meth:`Store.list` lists
  the keys under a prefix (for garbage collection and migration only: what is *valid* is never decided by
  listing), :meth:`Store.modified` tells an object's age (for garbage collection's grace period only),
  :meth:`Store.delete` removes one (idempotent).

Rename, hard links, ``flock`` and directory fsyncs exist only inside the local backend, where they implement these
operations. ETags are opaque strings; two bodies with the same bytes may have the same ETag, so a protocol that
must tell "my write" from "an equal write" puts a writer id and a sequence into the body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from lambdalake.exceptions import ConfigError, LambdalakeError


class StorageError(LambdalakeError):
    """The store refused or failed an operation (unreachable endpoint, missing bucket, bad credentials)."""

    exit_code = 2


class ObjectMissing(LambdalakeError):
    """No object under the key (or it was deleted between a listing and a read)."""

    exit_code = 4


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the ETag of exactly those bytes (what :meth:`Store.swap` compares against)."""

    data: bytes
    etag: str


_SEGMENT = re.compile(r"^[A-Za-z0-9._=+@,:~-]+$")


def check_key(key: str) -> str:
    """``key`` if it is a valid lake key, else a ConfigError naming what is wrong with it."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") or not _SEGMENT.match(p) for p in parts):
        raise ConfigError(f"{key!r} is not a lake key (relative, '/'-separated, no empty, '.' or '..' segments, "
                          "letters, digits and ._=+@,:~- only)")
    return key


def join(*parts: str) -> str:
    """The key of ``parts`` joined with ``/`` (each part may itself hold ``/``)."""
    return check_key("/".join(p.strip("/") for p in parts if p))


class Store(Protocol):
    """What a lake is stored in (:class:`lambdalake.storage.local.LocalStore`,
    :class:`lambdalake.storage.s3.S3Store`); :func:`lambdalake.storage.open_store` picks one from the lake's URL."""

    url: str  # where the lake is: ``file:///abs/path`` or ``s3://bucket/prefix``

    def get(self, key: str) -> bytes:
        """The object's bytes. Raises :class:`ObjectMissing`."""
        ...

    def get_versioned(self, key: str) -> Versioned:
        """The object's bytes and ETag, read in one request. Raises :class:`ObjectMissing`."""
        ...

    def put(self, key: str, data: bytes) -> str:
        """Write the whole object atomically (replacing any); returns its ETag."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create the object if no object has this key; its ETag, or None when one already existed (untouched)."""
        ...

    def swap(self, key: str, data: bytes, expected: str | None) -> str | None:
        """Replace the object only if its ETag is still ``expected`` (``None``: only if it does not exist); the new
        ETag, or None when another writer got there first (nothing written)."""
        ...

    def exists(self, key: str) -> bool:
        ...

    def size(self, key: str) -> int:
        """The object's size in bytes. Raises :class:`ObjectMissing`."""
        ...

    def modified(self, key: str) -> float:
        """When the object was last written, in seconds since the epoch (the file's mtime; S3's Last-Modified).
        For garbage collection's grace period only. Raises :class:`ObjectMissing`."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (a key prefix ending at a ``/`` boundary, or ``""`` for the whole lake),
        sorted. For garbage collection and migration: never the way a protocol decides what is valid."""
        ...

    def children(self, prefix: str) -> list[str]:
        """The names one level below ``prefix`` (a key prefix at a ``/`` boundary): objects and sub-prefixes
        alike, sorted (``master/<source>/`` -> ``["p=0", "p=1"]``). For discovery only, like :meth:`list`."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; no error if it is already gone."""
        ...

    def abort_stale_uploads(self, prefix: str, older_than: float) -> list[str]:
        """Abort the incomplete multipart uploads under ``prefix`` (``""``: the whole lake) started more than
        ``older_than`` seconds ago — the parts a crashed writer (Spark's s3a, pyarrow) left, invisible to
        :meth:`list` but stored and billed; returns their keys. The lake's own writes never upload in parts
        (:meth:`put`); nothing outside the lake's prefix is touched. For garbage collection only."""
        ...
