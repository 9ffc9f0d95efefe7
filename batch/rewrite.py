"""The journaled rewrite of master files: the only way the immutable master dataset (and its rejected files) is ever
rewritten. Its two users say what to rewrite and how — :mod:`batch.compact` (runs of small adjacent files into one)
and :mod:`batch.erase` (a file without the messages of forgotten subjects); this module owns the protocol.

Protocol for one rewrite in one partition directory (:func:`rewrite`), mirrored by numbered comments in the code:

1. Write the new file to a temporary name in the directory and fsync it (invisible to readers).
2. Record the intent: ``master/_log/<utc>-<kind>-...json``, status ``started``
   (:class:`~lambdalake.contracts.CompactionRecord`, :class:`~lambdalake.contracts.ErasureRecord`): the files
   replaced and the new file with its temporary name and sha256.
3. Under the exclusive *master readers lock* (a batch run, verify and the audit hold it shared while they read):
   rename the temporary file to its final name (erasure: over the file itself), fsync the directory, and swap the
   partition's head to list the new file in place of the replaced ones (:func:`lambdalake.heads.replace_files`;
   same epoch, next generation; a partition without a head yet is read from its files on disk).
4. Still under it, delete the files the new one replaces (compaction), fsync the directory.
5. Rewrite the record with status ``done``.

A crash leaves either the old files (before the rename in 3) or the new file plus, for a compaction, some old ones
(during 4). :func:`recover` finishes every ``started`` record whose new file is in place with its recorded sha256
(lists it in the head, deletes what it replaced, ``done``) and aborts the others (deletes the temporary file,
``aborted``). Until then the readers' rules leave such a record's effect out or in consistently: a head lists the
replaced files until its swap (they are deleted only after it), :func:`lambdalake.heads.master_files` of a partition
without a head ignores files a renamed compaction replaced, :func:`lambdalake.erasure.erased_offsets` counts an
erasure from its rename on.

Locks (``checkpoints/master/``): :func:`compaction_lock` (``compact.lock``: one master maintenance — compaction,
its recovery, ``forget`` — at a time) and :func:`master_readers_lock` (``readers.lock``).

On object storage (:func:`_rewrite_remote`) there is no lock, rename or delete: 1. the intent record is put
(``started``: from now on garbage collection leaves the new file and the replaced ones alone), 2. the new file is
put whole under a name no other writer uses (``<start>-<end>-e<epoch>-<random>.parquet``), 3. the head swap is the
commit point — a rewrite that finds the replaced files no longer listed (another compaction got there first) is
``aborted`` and its file is garbage —, 4. the record says ``done``. The replaced files stay until garbage
collection deletes them, a grace period after the record's ``finished_at`` (a reader that listed them before the
swap may still be reading them: :func:`lambdalake.heads.collect_master_garbage`). :func:`recover` settles a
``started`` record there only once it is older than the grace period (a pid says nothing about another machine).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch.master import COMPRESSION, parquet_bytes, sha256_file
from lambdalake import contracts
from lambdalake.contracts import (
    REWRITE_ABORTED,
    REWRITE_DONE,
    REWRITE_STARTED,
    RewriteFile,
    RewriteRecord,
    parse_utc,
    utc_now_iso,
)
from lambdalake.exceptions import InvariantViolation, LambdalakeError
from lambdalake.heads import HeadFile, replace_files
from lambdalake.layout import MASTER_FILE, Layout, atomic_write_bytes, fsync_dir, rewrite_dir, rewrite_records, tmp_name
from lambdalake.locks import flock
from lambdalake.storage.files import data_files
from lambdalake.storage.local import LocalStore

log = logging.getLogger(__name__)


class CompactionBusy(LambdalakeError):
    """Another compaction (or master rewrite) runs on this lake, or the master readers lock could not be taken in
    time."""

    exit_code = 5


# locks ------------------------------------------------------------------------------------------------------------
def _lock_path(layout: Layout, name: str) -> Path:
    d = layout.checkpoints("master")
    d.mkdir(parents=True, exist_ok=True)
    return d / name


@contextmanager
def master_readers_lock(layout: Layout, timeout: float | None = None) -> Iterator[None]:
    """Held (shared) by a batch run while it snapshots and reads master files; a rewrite takes it exclusively.

    A lake on object storage has no such lock: a rewrite there leaves the files it replaced in place, and garbage
    collection deletes them only a grace period (:func:`lambdalake.heads.gc_grace`) after the rewrite — longer than
    a run reading them (module docstring, last paragraph)."""
    if not isinstance(layout.store, LocalStore):
        yield
        return
    with flock(_lock_path(layout, "readers.lock"), shared=True, timeout=timeout, what="the master readers lock",
               on_busy=CompactionBusy):
        yield


def compaction_lock(layout: Layout) -> AbstractContextManager[None]:
    """Exclusive, not waited for: one compaction (or recovery, or ``forget``) at a time per lake. None on object
    storage: there each rewrite's head swap decides (module docstring)."""
    if not isinstance(layout.store, LocalStore):
        return nullcontext()
    return flock(_lock_path(layout, "compact.lock"), timeout=0, what="the compaction lock", on_busy=CompactionBusy)


# one rewrite ------------------------------------------------------------------------------------------------------
def rewrite(layout: Layout, record: RewriteRecord, table: pa.Table, final: Path, *, replaced: Sequence[Path] = (),
            check_rows: bool = False, lock_timeout: float, before_swap: Callable[[], None] | None = None) -> Path:
    """Put ``table`` in place as ``final`` and delete the files ``replaced`` (module docstring, steps 1-5), journaled
    by ``record`` (the kind's own fields; the new file's, ``started_at``, ``pid`` and the status are filled in here).

    ``check_rows``: read the written file's row count back before recording (aborts on a mismatch).
    ``before_swap``: called between the intent record and the rename (the crash tests' seam). Returns the path of
    the record (on object storage its local name under the work directory: the key is its path in the lake)."""
    if not isinstance(layout.store, LocalStore):
        return _rewrite_remote(layout, record, table, final, replaced, check_rows, before_swap)
    # 1. the new file under a temporary name, fsync'd: invisible to readers
    tmp = tmp_name(final)
    with open(tmp, "wb") as fh:
        pq.write_table(table, fh, compression=COMPRESSION)
        fh.flush()
        os.fsync(fh.fileno())
    if check_rows and pq.ParquetFile(tmp).metadata.num_rows != table.num_rows:
        tmp.unlink()
        raise InvariantViolation(f"{record.WHAT} of {final.name}: row count changed; aborted")
    # 2. the intent record
    record.wrote(RewriteFile(tmp=tmp.name, rows=table.num_rows, bytes=tmp.stat().st_size, sha256=sha256_file(tmp)))
    record.status, record.started_at, record.pid = REWRITE_STARTED, utc_now_iso(), os.getpid()
    rec_path = layout.master_log() / record.log_name(datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ"))
    atomic_write_bytes(rec_path, contracts.encode(record))
    if before_swap is not None:
        before_swap()
    # 3. the swap, under the exclusive readers lock
    with flock(_lock_path(layout, "readers.lock"), timeout=lock_timeout,
               what="the master readers lock (a batch run is reading)", on_busy=CompactionBusy):
        os.replace(tmp, final)
        fsync_dir(final.parent)
        _list_in_head(layout, record, table.num_rows, final.stat().st_size)
        # 4. the files it replaces
        if replaced:
            for path in replaced:
                path.unlink()
            fsync_dir(final.parent)
    # 5. done
    record.status = REWRITE_DONE
    record.finished_at = utc_now_iso()
    atomic_write_bytes(rec_path, contracts.encode(record))
    return rec_path


def _rewrite_remote(layout: Layout, record: RewriteRecord, table: pa.Table, final: Path, replaced: Sequence[Path],
                    check_rows: bool, before_swap: Callable[[], None] | None) -> Path:
    """:func:`rewrite` on object storage (module docstring, last paragraph)."""
    data = parquet_bytes(table)
    if check_rows and pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows != table.num_rows:
        raise InvariantViolation(f"{record.WHAT} of {final.name}: row count changed; aborted")
    record.wrote(RewriteFile(rows=table.num_rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    record.status, record.started_at, record.pid = REWRITE_STARTED, utc_now_iso(), os.getpid()
    rec_key = f"master/_log/{record.log_name(datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ'))}"
    # 1. the intent: garbage collection leaves the new file and the replaced ones alone from here on
    layout.store.put(rec_key, contracts.encode(record))
    # 2. the new file, whole, under a name no other writer uses
    layout.store.put(layout.key(final), data)
    if before_swap is not None:
        before_swap()
    # 3. the commit point: the head swap
    try:
        _list_in_head(layout, record, table.num_rows, len(data))
    except InvariantViolation:
        record.status, record.finished_at = REWRITE_ABORTED, utc_now_iso()
        layout.store.put(rec_key, contracts.encode(record))
        raise
    # 4. done (the replaced files go with garbage collection, a grace period after finished_at)
    record.status, record.finished_at = REWRITE_DONE, utc_now_iso()
    layout.store.put(rec_key, contracts.encode(record))
    return layout.home / rec_key


def _list_in_head(layout: Layout, rec: RewriteRecord, rows: int | None, size: int) -> None:
    """The head swap of step 3: the new file in place of what it replaces (erasure: of its own old version)."""
    name = rec.new_name()
    m = MASTER_FILE.match(name)
    if m is None:
        raise InvariantViolation(f"{rec.WHAT} record names {name!r}, not a master file name")
    replace_files(layout, rec.dataset, rec.source, int(rec.partition), rec.replaced_names() or [name],
                  HeadFile(name=name, start=int(m.group(1)), end=int(m.group(2)), rows=rows, bytes=size))


# recovery ---------------------------------------------------------------------------------------------------------
def recover(layout: Layout, kind: type[RewriteRecord]) -> list[str]:
    """Finish (new file in place) or abort (not renamed) every rewrite of ``kind`` left ``started`` by a crash;
    returns ``"<record name>: <status>"`` of each. The caller holds :func:`compaction_lock`. On object storage
    only records started longer ago than the grace period (module docstring)."""
    from lambdalake.heads import gc_grace

    remote = not isinstance(layout.store, LocalStore)
    done: list[str] = []
    for path, rec in rewrite_records(layout, kind):
        if rec.status != REWRITE_STARTED:
            continue
        started = parse_utc(rec.started_at)
        if remote and (started is None or time.time() - started.timestamp() < gc_grace()):
            continue  # maybe in flight on another machine
        pdir = rewrite_dir(layout, rec)
        new = pdir / rec.new_name()
        new_key = layout.key(new)
        if layout.store.exists(new_key) and data_files(layout.store).sha256(new_key) == rec.new_sha256():
            try:
                _list_in_head(layout, rec, None, layout.store.size(new_key))
                rec.status = REWRITE_DONE
            except InvariantViolation:  # on object storage: another rewrite replaced those files first
                if not remote:
                    raise
                rec.status = REWRITE_ABORTED
            if (replaced := rec.replaced_names()) and not remote:
                for name in replaced:
                    (pdir / name).unlink(missing_ok=True)
                fsync_dir(pdir)
            rec.recovered = rec.status == REWRITE_DONE
            if remote:  # garbage collection keeps the replaced files a grace period after this
                rec.finished_at = rec.finished_at or utc_now_iso()
        else:
            if (tmp := rec.tmp_name()) and not remote:
                (pdir / tmp).unlink(missing_ok=True)
            rec.status = REWRITE_ABORTED
        rec.recovered_at = utc_now_iso()
        if remote:
            layout.store.put(layout.key(path), contracts.encode(rec))
        else:
            atomic_write_bytes(path, contracts.encode(rec))
        log.warning("recovered interrupted %s %s: %s", kind.WHAT, path.name, rec.status)
        done.append(f"{path.name}: {rec.status}")
    return done
