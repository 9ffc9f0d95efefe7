"""The lake's data files as engines read and write them: the storage seam's "open for pyarrow/Spark".

Small objects (pointers, heads, manifests) go through :class:`lambdalake.storage.base.Store`. Parquet data files
are read and written by pyarrow and Spark themselves, so :class:`DataFiles` gives, for a key of the lake, the
pyarrow file system and path to open it with and the URI Spark reads or writes it at — the same calls on both
stores: a local directory (``pyarrow.fs.LocalFileSystem``, plain paths) and S3 (``pyarrow.fs.S3FileSystem`` with the
seam's endpoint, region and credentials; ``s3a://bucket/prefix/key`` for Spark, set up by
:func:`batch.spark_session.s3a_conf` from the same settings).

Listing here (:meth:`DataFiles.names`) is for a writer reading back what it wrote itself under a prefix only it
writes (a batch run's staging prefix): what is *valid* is never decided by listing (manifests and heads decide).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lambdalake.storage.base import Store, check_key
from lambdalake.storage.local import LocalStore

CHUNK = 4 * 1024 * 1024
_OPEN: dict[str, DataFiles] = {}  # one per lake and process (an S3 file system holds a connection pool)


def data_files(store: Store) -> DataFiles:
    """The :class:`DataFiles` of the lake in ``store``."""
    files = _OPEN.get(store.url)
    if files is None or files.store is not store:
        files = _OPEN[store.url] = DataFiles(store)
    return files


class DataFiles:
    """Data files of the lake stored in ``store`` (see the module docstring)."""

    def __init__(self, store: Store):
        self.store = store
        self.local = isinstance(store, LocalStore)
        if self.local:
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self.root = str(store.root)  # type: ignore[attr-defined]
        else:
            self.fs, self.root = store.arrow_filesystem()  # type: ignore[attr-defined]

    def path(self, key: str) -> str:
        """The path of ``key`` in :attr:`fs`."""
        return f"{self.root}/{check_key(key)}" if key else self.root

    def uri(self, key: str) -> str:
        """Where Spark reads or writes ``key``: a local path, or ``s3a://bucket/prefix/key``."""
        return self.path(key) if self.local else f"s3a://{self.path(key)}"

    # reads ----------------------------------------------------------------------------------------------------
    def parquet(self, key: str) -> pq.ParquetFile:
        """The Parquet file of ``key`` (footer read; row groups on demand)."""
        return pq.ParquetFile(self.fs.open_input_file(self.path(key)))

    def read_table(self, key: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(key), columns=columns, filesystem=self.fs)

    def info(self, key: str) -> pafs.FileInfo:
        """Size and modification time (``mtime_ns``) of ``key``'s file."""
        return self.fs.get_file_info(self.path(key))

    def sha256(self, key: str) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.path(key)) as fh:
            while block := fh.read(CHUNK):
                h.update(block)
        return h.hexdigest()

    def names(self, prefix: str, suffix: str = ".parquet") -> list[str]:
        """The names of the files directly under ``prefix`` ending in ``suffix``, sorted; hidden (``.``) and
        ``_`` files skipped. Only for reading back a prefix the caller wrote itself (module docstring)."""
        sel = pafs.FileSelector(self.path(prefix), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
                      and not i.base_name.startswith((".", "_")))

    def duckdb_relation(self, con, name: str, keys: list[str], local_files: list[Path] = ()) -> str:
        """A relation (SQL) over the lake's Parquet files ``keys`` and the local files ``local_files`` (scratch
        files outside the lake) that the DuckDB connection ``con`` can query: ``read_parquet([...])`` of the files
        on a local lake; on S3 — DuckDB has no S3 reader offline — their rows read through pyarrow and registered
        as ``name`` (the caller unregisters it when done)."""
        if self.local:
            paths = [self.path(k) for k in keys] + [str(p) for p in local_files]
            return "read_parquet([" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "])"
        con.register(name, pa.concat_tables([*(self.read_table(k) for k in keys),
                                             *(pq.read_table(p) for p in local_files)], promote_options="permissive"))
        return '"' + name.replace('"', '""') + '"'

    # writes ---------------------------------------------------------------------------------------------------
    def write_table(self, table: pa.Table, key: str) -> None:
        """Write ``table`` as one Parquet object ``key`` (S3: one whole object, visible complete or not at all)."""
        if self.local:
            Path(self.path(key)).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, self.path(key), filesystem=self.fs)

    def copy(self, src: str, dst: str) -> None:
        """Copy the object ``src`` to ``dst``: a hard link (or a copy) locally, a server-side copy on S3."""
        if not self.local:
            self.fs.copy_file(self.path(src), self.path(dst))
            return
        target = Path(self.path(dst))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(self.path(src), target)
        except OSError:
            shutil.copy2(self.path(src), target)

    def remove_junk(self, prefix: str) -> None:
        """Delete what Spark writes next to a dataset's files that is no part of it: ``_SUCCESS`` and, locally,
        Hadoop's ``.<name>.crc`` checksum files."""
        sel = pafs.FileSelector(self.path(prefix), allow_not_found=True)
        for i in self.fs.get_file_info(sel):
            if i.type == pafs.FileType.File and (i.base_name == "_SUCCESS" or i.base_name.endswith(".crc")):
                self.fs.delete_file(i.path)

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix`` (no error if there is none) — on S3 also the zero-byte directory
        markers Spark's s3a connector leaves (``<dir>/``), which a plain delete of the listed keys misses."""
        if self.local:
            shutil.rmtree(self.path(prefix), ignore_errors=True)
            return
        if self.fs.get_file_info(self.path(prefix)).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.path(prefix))
