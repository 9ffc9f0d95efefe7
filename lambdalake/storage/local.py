"""The storage seam on a local directory: every operation of :class:`lambdalake.storage.base.Store` built from
what only a POSIX file system gives — a temporary file and an atomic rename for a whole-object put, a hard link for
put-if-absent, a lock file for compare-and-swap, and fsyncs so a crash keeps whatever was answered.

Steps of each operation (a crash between any two leaves at most a temporary file, ignored by readers and by
:meth:`LocalStore.list`, removed by the next writer of the same directory after :data:`TEMP_GRACE_S`):

- put: 1. write ``.tmp-<uuid>-<name>`` next to the object and fsync it; 2. rename it over the object (atomic);
  3. fsync the directory, so the new name survives a power loss.
- put-if-absent: 1. as put; 2. hard-link the temporary file to the object's name, which fails if the name exists
  (atomic, like ``O_EXCL`` but with the whole content already in place); 3. remove the temporary name, fsync the
  directory.
- swap: under an exclusive ``flock`` of ``.lock-<name>`` in the object's directory: read the object's ETag, compare
  with the expected one, then put (or put-if-absent when none is expected). Readers take no lock: a put is atomic.

ETags are the MD5 of the bytes (as S3 gives for a single-part put), so an ETag read by :meth:`get_versioned` always
describes exactly the bytes returned with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import time
import uuid
from pathlib import Path

from lambdalake.exceptions import ConfigError
from lambdalake.storage.base import ObjectMissing, StorageError, Versioned, check_key

TEMP_PREFIX = ".tmp-"
LOCK_PREFIX = ".lock-"
TEMP_GRACE_S = 3600.0  # a temporary file older than this was left by a crashed writer


def etag_of(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    """A lake in the local directory ``root`` (created on first write)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"lake directory {self.root} exists but is not a directory; point LAMBDALAKE_HOME "
                              "elsewhere")
        self.url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """The file of ``key`` (for the local backend's own callers: pyarrow and Spark read files by path)."""
        return self.root / check_key(key)

    # -- reads ---------------------------------------------------------------------------------------------------
    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectMissing(f"no object {key!r} in {self.url}") from None
        except IsADirectoryError:
            raise ObjectMissing(f"{key!r} in {self.url} is a prefix, not an object") from None

    def get_versioned(self, key: str) -> Versioned:
        data = self.get(key)
        return Versioned(data, etag_of(data))

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectMissing(f"no object {key!r} in {self.url}") from None

    def modified(self, key: str) -> float:
        path = self.path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectMissing(f"no object {key!r} in {self.url}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ObjectMissing(f"{key!r} in {self.url} is a prefix, not an object")
        return st.st_mtime

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / check_key(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith((TEMP_PREFIX, LOCK_PREFIX))]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if not name.startswith((TEMP_PREFIX, LOCK_PREFIX)):
                    out.append(name if rel == "." else f"{rel}/{name}")
        return sorted(out)

    def children(self, prefix: str) -> list[str]:
        base = self.root / check_key(prefix.rstrip("/"))
        try:
            return sorted(e.name for e in os.scandir(base) if not e.name.startswith((TEMP_PREFIX, LOCK_PREFIX)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    # -- writes --------------------------------------------------------------------------------------------------
    def _temp(self, target: Path, data: bytes) -> Path:
        """Step 1 of every write: the bytes in a fsync'd temporary file next to ``target``."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StorageError(f"cannot write {target}: a parent of it is an object, not a prefix") from None
        tmp = target.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}-{target.name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb", closefd=False) as fh:
                fh.write(data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def put(self, key: str, data: bytes) -> str:
        target = self.path(key)
        tmp = self._temp(target, data)
        try:
            os.replace(tmp, target)  # 2. atomic
        except IsADirectoryError:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {key!r} in {self.url}: it is a prefix of other objects") from None
        _fsync_dir(target.parent)  # 3.
        return etag_of(data)

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        target = self.path(key)
        tmp = self._temp(target, data)
        try:
            os.link(tmp, target)  # 2. fails if the name exists: exactly one creator wins
            created = True
        except FileExistsError:
            created = False
        finally:
            tmp.unlink(missing_ok=True)  # 3.
        if created:
            _fsync_dir(target.parent)
        return etag_of(data) if created else None

    def swap(self, key: str, data: bytes, expected: str | None) -> str | None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = target.parent / f"{LOCK_PREFIX}{target.name}"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if expected is None:
                return self.put_if_absent(key, data)
            try:
                current = etag_of(target.read_bytes())
            except FileNotFoundError:
                return None
            if current != expected:
                return None
            return self.put(key, data)
        finally:
            os.close(fd)  # releases the lock

    def delete(self, key: str) -> None:
        target = self.path(key)
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
            _fsync_dir(target.parent)

    def abort_stale_uploads(self, prefix: str, older_than: float) -> list[str]:
        """Nothing to abort: a file system has no multipart uploads (a crashed writer's temporary file is
        :meth:`remove_stale_temps`' business)."""
        return []

    def remove_stale_temps(self, prefix: str, older_than: float = TEMP_GRACE_S) -> int:
        """Remove temporary files crashed writers left under ``prefix``; the number removed."""
        base = self.root / check_key(prefix.rstrip("/")) if prefix else self.root
        removed, now = 0, time.time()
        for tmp in base.rglob(f"{TEMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                if now - tmp.stat().st_mtime > older_than:
                    tmp.unlink()
                    removed += 1
        return removed
