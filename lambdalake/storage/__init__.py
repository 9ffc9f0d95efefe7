"""The storage seam (:mod:`lambdalake.storage.base`): one small interface every lake read and write goes through,
with two backends — a local directory (:mod:`lambdalake.storage.local`) and S3-compatible object storage
(:mod:`lambdalake.storage.s3`). :func:`open_store` picks the backend from where the lake is.
"""

from __future__ import annotations

import re
from pathlib import Path

from lambdalake.exceptions import ConfigError
from lambdalake.storage.base import ObjectMissing, StorageError, Store, Versioned, check_key, join

__all__ = ["ObjectMissing", "StorageError", "Store", "Versioned", "check_key", "join", "open_store"]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")


def open_store(where: str | Path, **s3_options: object) -> Store:
    """The store of a lake: ``s3://bucket/prefix`` (S3 settings from ``s3_options`` or the standard AWS
    variables), ``file:///abs/path`` or a plain path (the local backend)."""
    text = str(where)
    m = _URL.match(text)
    if m is None:
        from lambdalake.storage.local import LocalStore

        return LocalStore(text)
    scheme = m.group(1).lower()
    if scheme == "file":
        from lambdalake.storage.local import LocalStore

        return LocalStore(text[len("file://"):])
    if scheme == "s3":
        from lambdalake.storage.s3 import S3Store

        return S3Store(text, **s3_options)  # type: ignore[arg-type]
    raise ConfigError(f"lake {text!r}: no storage backend for {scheme}:// (a local path, file:// or s3://)")
