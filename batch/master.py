"""The master dataset in Arrow terms: the schema of a master file and the atomic way to write one.

:mod:`lambdalake.layout` owns *where* master files live and how they are named; this module owns *what* is in one
(the column contract below) and how a file comes into existence (never half-written under its final name).

Columns of ``master/<source>/p=<partition>/<start>-<end>.parquet``: :func:`lambdalake.schema.master_columns` in
Arrow types (:data:`lambdalake.schema.ARROW_TYPES`) — every declared field of the source (required non-nullable
fields are non-nullable columns), then ``_partition``, ``_offset`` (the event's position) and ``_ingest_time`` (when
the archiver consumed it).

Rows are in offset order. A file holds the *valid* messages of ``[start, end)``; invalid offsets of the range are in
the dead-letter topic, so a range may legitimately hold zero rows.

The invalid messages of a range are also kept in the lake, as the log holds them: a *rejected file*
``rejected/<source>/p=<partition>/<start>-<end>.parquet`` (:func:`lambdalake.schema.rejected_columns`; written only
when the range has some), whose Parquet key-value metadata ``lambdalake.rules`` is the
:func:`lambdalake.validation.rules_fingerprint` they were judged by. The master dataset is thus every message of the
log, valid or not, and a definition whose rules are looser can count messages rejected under older rules (the batch
job re-validates them; :mod:`batch.job`). Which rejected files count is :func:`lambdalake.heads.rejected_files`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lambdalake.exceptions import InvariantViolation
from lambdalake.fields import Source
from lambdalake.layout import Layout, MasterFile, fsync_dir, tmp_name
from lambdalake.schema import (
    ARROW_TYPES,
    INGEST_COL,
    OFFSET_COL,
    PARTITION_COL,
    arrow_schema,
    master_columns,
    rejected_columns,
)
from lambdalake.validation import rules_fingerprint

COMPRESSION = "zstd"
RULES_KEY = b"lambdalake.rules"  # rejected files: the rules fingerprint their messages were judged by


def master_schema(source: Source) -> pa.Schema:
    """Schema of every master file of ``source``."""
    return arrow_schema(master_columns(source))


def master_table(source: Source, columns: dict[str, list], partition: int, offsets: list[int],
                 ingest_us: list[int]) -> pa.Table:
    """Build a master table from per-field value lists (timestamps as UTC µs ints) and positions."""
    values = {**columns, PARTITION_COL: [partition] * len(offsets), OFFSET_COL: offsets, INGEST_COL: ingest_us}
    cols = master_columns(source)
    return pa.Table.from_arrays([pa.array(values[c.name], type=ARROW_TYPES[c.type]) for c in cols],
                                schema=master_schema(source))


def rejected_table(source: Source, partition: int, offsets: list[int], values: list[bytes | None],
                   reasons: list[str], ingest_us: int) -> pa.Table:
    """The rejected file of one range: its invalid messages, tagged with the rules they were judged by."""
    cols = rejected_columns()
    arrays = [pa.array([partition] * len(offsets), pa.int32()), pa.array(offsets, pa.int64()),
              pa.array([ingest_us] * len(offsets), ARROW_TYPES["timestamp"]), pa.array(values, pa.binary()),
              pa.array(reasons, pa.string())]
    schema = arrow_schema(cols).with_metadata({RULES_KEY: rules_fingerprint(source).encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


def rejected_rules(file: Path | pa.Schema) -> str | None:
    """The rules fingerprint a rejected file's messages were judged by (footer only; the file or its schema)."""
    meta = (file if isinstance(file, pa.Schema) else pq.read_schema(file)).metadata or {}
    raw = meta.get(RULES_KEY)
    return None if raw is None else raw.decode()


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of one Parquet file (what the archiver puts through the storage seam)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=COMPRESSION)
    return sink.getvalue().to_pybytes()


def write_parquet_atomic(table: pa.Table, final: Path, *, overwrite: bool = False) -> int:
    """Write ``table`` so that ``final`` is either absent or complete; returns the file size in bytes.

    1. Write to a temporary sibling name (readers ignore dot-files), flush and fsync the file.
    2. Rename it to ``final`` (atomic on POSIX) and fsync the directory so the rename is durable.

    Refuses to replace an existing file unless ``overwrite`` (master files are immutable).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and final.exists():
        raise InvariantViolation(f"refusing to overwrite immutable master file {final}")
    tmp = tmp_name(final)
    try:
        # 1. temporary file, durable
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression=COMPRESSION)
            fh.flush()
            os.fsync(fh.fileno())
        size = tmp.stat().st_size
        # 2. atomic rename + durable directory entry
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def remove_temp_files(layout: Layout, sources: Iterable[Source],
                      partitions: Iterable[tuple[str, int]] | None = None) -> list[Path]:
    """Delete temporary files a killed writer left in the master partitions (never visible to readers); only in
    ``partitions`` ((topic, p); default all)."""
    removed: list[Path] = []
    only = None if partitions is None else set(partitions)
    for s in sources:
        for base in (layout.master_source(s.name), layout.rejected / s.name):
            if not base.is_dir():
                continue
            for tmp in base.glob("p=*/.*.tmp"):
                if only is not None and (s.topic, _partition_of(tmp.parent)) not in only:
                    continue
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def _partition_of(pdir: Path) -> int | None:
    """``p=3`` -> 3 (None for a directory that is not a partition)."""
    try:
        return int(pdir.name.removeprefix("p="))
    except ValueError:
        return None


def sha256_file(path: Path, chunk: int = 4 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_rows(path: Path) -> int:
    """Row count from the Parquet footer (no data read)."""
    return pq.ParquetFile(path).metadata.num_rows


def check_master_file(source: Source, mf: MasterFile, table: pa.Table | None = None) -> pa.Table:
    """Read a master file (or take its ``table``, read through the storage seam) and check it against its name:
    schema, partition, offsets inside [start, end), ordered.

    Used by compaction and the tests; raises InvariantViolation naming the file on any mismatch.
    """
    table = pq.read_table(mf.path) if table is None else table
    want = master_schema(source)
    if not table.schema.remove_metadata().equals(want, check_metadata=False):
        raise InvariantViolation(f"master file {mf.path} has schema {table.schema}, expected {want}")
    offsets = table.column(OFFSET_COL).to_pylist()
    if any(o < mf.start or o >= mf.end for o in offsets):
        raise InvariantViolation(f"master file {mf.path} holds offsets outside its range [{mf.start}, {mf.end})")
    if any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)):
        raise InvariantViolation(f"master file {mf.path} offsets are not strictly increasing")
    if table.num_rows and set(table.column(PARTITION_COL).to_pylist()) != {mf.partition}:
        raise InvariantViolation(f"master file {mf.path} holds rows of another partition")
    return table
