"""Per-partition master heads: THE record of which files hold a partition's archived messages, how far it is
archived, and which writer may extend it (docs/design.md, "Master heads").

``master/<source>/p=<partition>/HEAD`` (:class:`MasterHead`) lists the partition's master files and rejected files
(names inside ``master/<source>/p=<p>/`` and ``rejected/<source>/p=<p>/``, in offset order, tiling the archived
offsets), the owner's *epoch*, a *generation* (one more per compaction or erasure rewrite) and the ``writer`` and
``seq`` of the body. Every change of the partition's archived data is one compare-and-swap of this object through
the storage seam (:meth:`lambdalake.storage.base.Store.swap`):

- **claim** (:meth:`PartitionHead.claim`): a writer about to archive a partition swaps in ``epoch + 1`` and its own
  name; from then on any older writer of the partition (a zombie that slept through its ownership) loses every swap
  it tries, because the head's ETag changed, and on reading the head again finds a newer epoch (:class:`Fenced`);
- **roll** (:meth:`PartitionHead.commit`): the roll's files are written first, under names no other writer uses
  (``<start>-<end>-e<epoch>-<random>.parquet``), then one swap appends them and so advances the archived end. A
  roll whose swap loses is garbage, whatever range it chose: nothing reads a file the head does not list;
- **rewrite** (:func:`replace_files`): compaction and erasure put their new file in place of the old ones by a swap
  that keeps the epoch and owner;
- a swap without an answer (a timeout, a dropped connection) is decided by reading the head again: the writer's
  own file names, which no one else uses, tell its success from another writer's change.

What is valid is read from the head alone (:func:`master_files`, :func:`rejected_files`,
:func:`archived_positions`), never by listing files. A partition archived by a release without heads (no ``HEAD``
yet) is read by that release's rule — its files on disk, less those a logged compaction replaced, rejected files
within the archived end — until its next writer claims it and writes the head from exactly that rule.

Garbage: files no head lists. On claim the writer deletes, in its partition, the unlisted files of older epochs
(their writers can never list them: they are fenced) and unlisted files of the first release beyond the archived
end (a roll that crashed before its rename). What a claim cannot see — a fenced writer's roll put *after* the claim,
a partition nobody claims again — :func:`collect_master_garbage` deletes (``lambdalake compact``): unlisted files
older than a grace period longer than any pause a zombie may wake from (:data:`GC_GRACE_ENV`).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Iterator

import msgspec

from lambdalake import contracts
from lambdalake.config import parse_number
from lambdalake.contracts import REWRITE_DONE, REWRITE_STARTED, CompactionRecord, ErasureRecord
from lambdalake.exceptions import ConfigError, InvariantViolation, LambdalakeError
from lambdalake.layout import MASTER_FILE, PARTITION_DIR, Layout, MasterFile, rewrite_records
from lambdalake.storage.base import ObjectMissing, StorageError

log = logging.getLogger(__name__)

HEAD_NAME = "HEAD"
HEAD_FORMAT = 1
MAX_SWAPS = 200  # attempts of one change against concurrent rewrites before giving up
DATASETS = ("master", "rejected")


class Fenced(LambdalakeError):
    """Another writer claimed the partition since this one did: nothing this writer writes there counts any more."""

    exit_code = 6


class HeadFile(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One file of a head: its name in the partition's prefix and the offsets ``[start, end)`` it covers."""

    name: str
    start: int
    end: int
    rows: int | None = None
    bytes: int | None = None


class MasterHead(msgspec.Struct, kw_only=True):
    """``master/<source>/p=<partition>/HEAD`` (module docstring)."""

    source: str
    partition: int
    files: list[HeadFile] = msgspec.field(default_factory=list)
    rejected: list[HeadFile] = msgspec.field(default_factory=list)
    epoch: int = 0
    owner: str = ""
    generation: int = 0
    writer: str = ""
    seq: int = 0
    format: int = HEAD_FORMAT

    @property
    def end(self) -> int | None:
        """The archived end (None: nothing archived yet)."""
        return self.files[-1].end if self.files else None

    def listed(self, dataset: str) -> list[HeadFile]:
        return self.files if dataset == "master" else self.rejected


def writer_id() -> str:
    """A name no other writer uses: host, pid and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def head_key(source: str, partition: int) -> str:
    return f"master/{source}/p={partition}/{HEAD_NAME}"


def file_key(dataset: str, source: str, partition: int, name: str) -> str:
    return f"{dataset}/{source}/p={partition}/{name}"


def _decode(data: bytes, source: str, partition: int) -> MasterHead:
    head = contracts.decode(data, MasterHead, head_key(source, partition))
    if head.format > HEAD_FORMAT:
        raise InvariantViolation(f"{head_key(source, partition)} has format {head.format}, newer than this release "
                                 f"reads ({HEAD_FORMAT}); upgrade lambdalake")
    return head


def stored_head(layout: Layout, source: str, partition: int) -> tuple[MasterHead | None, str | None]:
    """The head object and its ETag; (None, None) when the partition has none (not archived, or a first-release
    partition not claimed since)."""
    try:
        got = layout.store.get_versioned(head_key(source, partition))
    except ObjectMissing:
        return None, None
    return _decode(got.data, source, partition), got.etag


def read_head(layout: Layout, source: str, partition: int) -> tuple[MasterHead | None, str | None]:
    """The partition's head and the ETag to swap from: the stored one, or one built by the first release's rule
    (ETag None: the first swap creates the object). None when nothing of the partition is archived."""
    head, etag = stored_head(layout, source, partition)
    if head is not None:
        return head, etag
    return _first_release_head(layout, source, partition), None


# readers --------------------------------------------------------------------------------------------------------
def partitions(layout: Layout, source: str) -> list[int]:
    """The partitions of ``source`` with anything archived (a head or first-release files), sorted. Discovery only:
    which files count is each partition's head."""
    return sorted(int(m.group(1)) for name in layout.store.children(f"master/{source}/")
                  if (m := PARTITION_DIR.match(name)))


def heads(layout: Layout, source: str) -> Iterator[MasterHead]:
    for p in partitions(layout, source):
        head, _ = read_head(layout, source, p)
        if head is not None:
            yield head


def _files(layout: Layout, head: MasterHead, dataset: str) -> list[MasterFile]:
    base = layout.home / dataset / head.source / f"p={head.partition}"
    return [MasterFile(base / f.name, head.source, head.partition, f.start, f.end) for f in head.listed(dataset)]


def master_files(layout: Layout, source: str) -> list[MasterFile]:
    """THE rule for which master files hold a source's events: the files each partition's head lists. Every reader
    (batch job, ``master.<source>`` in SQL, status, audit) uses it. Sorted by (partition, start), checked to tile
    without overlap and to lie inside the lake (:meth:`Layout.inside`: a symlink to a file outside the lake is
    never read as master data)."""
    files = [f for h in heads(layout, source) for f in _files(layout, h, "master")]
    list(contiguous_ranges(files))  # raises InvariantViolation on overlap or gap
    layout.inside_all(f.path for f in files)
    return files


def rejected_files(layout: Layout, source: str) -> list[MasterFile]:
    """THE rule for which rejected files count: those each partition's head lists."""
    files = [f for h in heads(layout, source) for f in _files(layout, h, "rejected")]
    layout.inside_all(f.path for f in files)
    return files


def archived_positions(layout: Layout, source: str) -> dict[int, int]:
    """{partition: end offset} the master dataset of ``source`` holds."""
    return dict(contiguous_ranges(master_files(layout, source)))


def contiguous_ranges(files: list[MasterFile]) -> Iterator[tuple[int, int]]:
    """Per partition, check the files tile [first start, last end) with no gap and no overlap; yield (p, end).

    Raises InvariantViolation on an overlap (two files claim the same offset) — never silently double count.
    A gap is allowed only before the first file (a topic whose early offsets were deleted by retention).
    """
    by_p: dict[int, list[MasterFile]] = {}
    for f in files:
        by_p.setdefault(f.partition, []).append(f)
    for p, fs in sorted(by_p.items()):
        fs.sort(key=lambda m: m.start)
        for a, b in zip(fs, fs[1:], strict=False):
            if b.start < a.end:
                raise InvariantViolation(f"master files overlap: {a.path.name} and {b.path.name} in partition {p}")
            if b.start > a.end:
                raise InvariantViolation(f"gap in master offsets [{a.end}, {b.start}) of partition {p} "
                                         f"between {a.path.name} and {b.path.name}")
        yield p, fs[-1].end


# the first release's rule ---------------------------------------------------------------------------------------
def range_files_on_disk(layout: Layout, dataset: str, source: str, partition: int) -> list[MasterFile]:
    """Every range-named file in one partition's prefix, sorted by start (garbage included). Discovery only."""
    base = layout.home / dataset / source / f"p={partition}"
    out = []
    for name in layout.store.children(f"{dataset}/{source}/p={partition}/"):
        if m := MASTER_FILE.match(name):
            out.append(MasterFile(base / name, source, partition, int(m.group(1)), int(m.group(2))))
    out.sort(key=lambda m: (m.start, m.end, m.path.name))
    return out


def _first_release_head(layout: Layout, source: str, partition: int) -> MasterHead | None:
    """The head the first release's rule gives a partition without one: its first-release files on disk less those a
    compaction renamed into place replaced; rejected files within the archived end."""
    pdir = layout.master_partition(source, partition)
    on_disk = [f for f in range_files_on_disk(layout, "master", source, partition)
               if MASTER_FILE.match(f.path.name).group(3) is None]
    if not on_disk:
        return None
    replaced: set[str] = set()
    for _, rec in rewrite_records(layout, CompactionRecord):
        if rec.status == REWRITE_STARTED and rec.source == source and int(rec.partition) == partition \
                and (pdir / rec.new_name()).exists():
            replaced |= set(rec.replaced_names())
    files = [HeadFile(name=f.path.name, start=f.start, end=f.end) for f in on_disk if f.path.name not in replaced]
    end = files[-1].end if files else -1
    rejected = [HeadFile(name=f.path.name, start=f.start, end=f.end)
                for f in range_files_on_disk(layout, "rejected", source, partition)
                if f.end <= end and MASTER_FILE.match(f.path.name).group(3) is None]
    return MasterHead(source=source, partition=partition, files=files, rejected=rejected)


# writers --------------------------------------------------------------------------------------------------------
def _swap(layout: Layout, body: MasterHead, etag: str | None) -> str | None:
    """One compare-and-swap of the head; its new ETag, or None when it lost or got no answer (decide by reading)."""
    try:
        return layout.store.swap(head_key(body.source, body.partition), contracts.encode(body), etag)
    except (StorageError, OSError) as exc:
        log.warning("swap of %s got no answer (%s); reading it again", head_key(body.source, body.partition), exc)
        return None


class PartitionHead:
    """One writer's hold on a partition: the head body it last wrote and that body's ETag (module docstring)."""

    def __init__(self, layout: Layout, head: MasterHead, etag: str):
        self.layout = layout
        self.head = head
        self.etag = etag

    @property
    def epoch(self) -> int:
        return self.head.epoch

    @property
    def end(self) -> int | None:
        return self.head.end

    @classmethod
    def claim(cls, layout: Layout, source: str, partition: int, owner: str) -> PartitionHead:
        """Become the partition's writer: swap in the next epoch (fencing every earlier writer), then delete the
        garbage of fenced writers (module docstring)."""
        for _ in range(MAX_SWAPS):
            head, etag = read_head(layout, source, partition)
            base = head or MasterHead(source=source, partition=partition)
            body = msgspec.structs.replace(base, epoch=base.epoch + 1, owner=owner, writer=owner, seq=base.seq + 1)
            new = _swap(layout, body, etag)
            if new is None:
                now, new = stored_head(layout, source, partition)
                if now is None or (now.writer, now.seq) != (owner, body.seq):
                    continue  # another claim or a rewrite got there first: read again
            held = cls(layout, body, new)
            held.collect_garbage()
            return held
        raise StorageError(f"could not claim {head_key(source, partition)}: it changed under {MAX_SWAPS} attempts")

    def check_epoch(self) -> None:
        """Raise :class:`Fenced` if another writer claimed the partition since this one did (one GET): before a
        step whose effect is outside the head (the archiver's dead letters), so that a fenced writer that already
        knows does not send them."""
        now, _ = stored_head(self.layout, self.head.source, self.head.partition)
        if now is None or now.epoch != self.head.epoch:
            raise Fenced(f"partition {self.head.partition} of {self.head.source!r} was claimed by "
                         f"{now.owner if now else 'nobody'} (epoch {now.epoch if now else '?'}) after this writer "
                         f"(epoch {self.head.epoch})")

    def new_name(self, start: int, end: int) -> str:
        """A file name for ``[start, end)`` that no other writer uses."""
        return f"{start:020d}-{end:020d}-e{self.head.epoch}-{uuid.uuid4().hex[:12]}.parquet"

    def commit(self, start: int, end: int, master: HeadFile, rejected: HeadFile | None = None) -> None:
        """List a roll's files (already written): the commit point of the roll. Raises :class:`Fenced` when
        another writer claimed the partition."""
        src, p = self.head.source, self.head.partition
        for _ in range(MAX_SWAPS):
            if (self.head.end if self.head.files else start) != start:
                raise InvariantViolation(f"{src}[{p}]: roll [{start}, {end}) does not continue the archived end "
                                         f"{self.head.end}")
            body = msgspec.structs.replace(
                self.head, files=[*self.head.files, master],
                rejected=[*self.head.rejected, rejected] if rejected is not None else self.head.rejected,
                writer=self.head.owner, seq=self.head.seq + 1)
            new = _swap(self.layout, body, self.etag)
            if new is not None:
                self.head, self.etag = body, new
                return
            now, etag = stored_head(self.layout, src, p)
            if now is None or now.epoch != self.head.epoch:
                raise Fenced(f"partition {p} of {src!r} was claimed by {now.owner if now else 'nobody'} (epoch "
                             f"{now.epoch if now else '?'}) after this writer (epoch {self.head.epoch}); its roll "
                             f"[{start}, {end}) does not count")
            if now.end is not None and now.end >= end:
                if now.end != end:
                    raise InvariantViolation(f"{src}[{p}]: head ends at {now.end} after roll [{start}, {end})")
                self.head, self.etag = now, etag  # our swap went through; its answer was lost
                return
            self.head, self.etag = now, etag  # a compaction or erasure changed the files: append again
        raise StorageError(f"could not commit {src}[{p}] [{start}, {end}): the head changed under {MAX_SWAPS} "
                           "attempts")

    def collect_garbage(self) -> list[str]:
        """Delete this partition's files no head can ever list: unlisted files of older epochs, and first-release
        files beyond the archived end (module docstring). Returns their keys."""
        h = self.head
        end = h.end if h.end is not None else -1
        removed = []
        protected = None
        for dataset in DATASETS:
            listed = {f.name for f in h.listed(dataset)}
            for f in range_files_on_disk(self.layout, dataset, h.source, h.partition):
                m = MASTER_FILE.match(f.path.name)
                if f.path.name in listed:
                    continue
                if protected is None:  # read only when something is unlisted
                    protected = _rewrites_protected(self.layout, h.source, gc_grace())
                if (dataset, h.partition, f.path.name) in protected:
                    continue
                epoch = m.group(3)
                if (epoch is not None and int(epoch) < h.epoch) or (epoch is None and f.end > end):
                    key = file_key(dataset, h.source, h.partition, f.path.name)
                    self.layout.store.delete(key)
                    removed.append(key)
        return removed


def rewrite_name(layout: Layout, source: str, partition: int, start: int, end: int) -> str:
    """A name for a rewrite's new file of ``[start, end)`` that no other writer uses (object storage, where a
    rewrite renames nothing): ``<start>-<end>-e<epoch>-<random>.parquet`` with the head's epoch, so a claim never
    takes it for a fenced writer's file (its garbage collection spares files a rewrite record names, too)."""
    head, _ = stored_head(layout, source, partition)
    return f"{start:020d}-{end:020d}-e{head.epoch if head else 0}-{uuid.uuid4().hex[:12]}.parquet"


def replace_files(layout: Layout, dataset: str, source: str, partition: int, replaced: list[str],
                  new: HeadFile) -> bool:
    """A compaction's or erasure's swap: ``new`` in place of the files ``replaced`` in the head (same epoch and
    owner, the next generation). Idempotent: nothing to do when it is already in place. False when the partition
    has no head (a first-release partition: its files on disk are the record). The new file must be written."""
    writer = writer_id()
    for _ in range(MAX_SWAPS):
        head, etag = stored_head(layout, source, partition)
        if head is None:
            return False
        listed = head.listed(dataset)
        names = {f.name for f in listed}
        if new.name in names and new.name not in replaced:
            if not set(replaced) & names:
                return True  # in place already (a retry, or recovery after our swap)
            raise InvariantViolation(f"{head_key(source, partition)} lists {new.name} next to files it replaces")
        missing = set(replaced) - names
        if missing:
            raise InvariantViolation(f"{head_key(source, partition)} no longer lists {sorted(missing)}; refusing "
                                     f"to put {new.name} in their place")
        kept = sorted([f for f in listed if f.name not in replaced] + [new], key=lambda f: f.start)
        changes = {"files" if dataset == "master" else "rejected": kept}
        body = msgspec.structs.replace(head, generation=head.generation + 1, writer=writer, seq=head.seq + 1,
                                       **changes)
        if _swap(layout, body, etag) is not None:
            return True
    raise StorageError(f"could not rewrite {head_key(source, partition)}: it changed under {MAX_SWAPS} attempts")



# garbage collection ---------------------------------------------------------------------------------------------
GC_GRACE_ENV = "LAMBDALAKE_MASTER_GC_GRACE"
GC_GRACE_S = 6 * 3600.0  # longer than any pause (GC, VM freeze, partitioned network) a fenced writer wakes from


def gc_grace(given: str | float | None = None, name: str = GC_GRACE_ENV) -> float:
    """The grace period in seconds: ``given`` (a CLI option, named ``name`` in the error), else
    ``LAMBDALAKE_MASTER_GC_GRACE``, else 6 hours. A ConfigError of one line if it is not a number >= 0."""
    if given is None:
        given, name = os.environ.get(GC_GRACE_ENV) or GC_GRACE_S, GC_GRACE_ENV
    value = parse_number(name, str(given), float, minimum=0,
                         why=" (seconds an unlisted master file is kept before garbage collection deletes it)")
    if math.isnan(value):
        raise ConfigError(f"{name}={given!r} is not a number of seconds")
    return value


def _rewrites_protected(layout: Layout, source: str, grace_s: float) -> set[tuple[str, int, str]]:
    """(dataset, partition, name) of the files rewrites protect from garbage collection: every file a ``started``
    compaction or erasure record names (its new file and those it replaces: a rewrite in flight, or one its recovery
    finishes), and the files a ``done`` record replaced if it finished less than ``grace_s`` ago — on object storage a
    rewrite leaves the files it replaced in place (no readers lock there: a batch run or audit that listed them before
    the swap may still read them), and only garbage collection deletes them, after the grace period."""
    out: set[tuple[str, int, str]] = set()
    now = time.time()
    for kind in (CompactionRecord, ErasureRecord):
        for _, rec in rewrite_records(layout, kind):
            if rec.source != source:
                continue
            if rec.status == REWRITE_STARTED:
                names = (rec.new_name(), *rec.replaced_names())
            elif rec.status == REWRITE_DONE and (done := contracts.parse_utc(rec.finished_at)) is not None \
                    and now - done.timestamp() < grace_s:
                names = tuple(rec.replaced_names())
            else:
                continue
            out.update((rec.dataset, int(rec.partition), name) for name in names)
    return out


def collect_master_garbage(layout: Layout, source: str, grace_s: float | None = None, *,
                           partition: int | None = None) -> list[str]:
    """Delete the range-named files in ``master/<source>/p=<p>/`` and ``rejected/<source>/p=<p>/`` that the
    partition's head does not list and that were last written more than ``grace_s`` seconds ago (None:
    :func:`gc_grace`); returns their keys. The files are listed first, the rewrite records and the head read after,
    so a file listed meanwhile is never deleted. Never touched: a partition without a stored head (its files on
    disk are its record, :func:`read_head`), a file a ``started`` compaction or erasure record names, a file
    younger than the grace period (a live writer's roll between its put and its swap). The age is the store's
    (:meth:`lambdalake.storage.base.Store.modified`) against this machine's clock."""
    grace = gc_grace() if grace_s is None else grace_s
    parts = [p for p in partitions(layout, source) if partition is None or p == partition]
    on_disk = {(p, d): range_files_on_disk(layout, d, source, p) for p in parts for d in DATASETS}
    in_flight = _rewrites_protected(layout, source, grace)
    removed: list[str] = []
    for p in parts:
        head, _ = stored_head(layout, source, p)
        if head is None:
            continue
        for dataset in DATASETS:
            listed = {f.name for f in head.listed(dataset)}
            for f in on_disk[p, dataset]:
                name = f.path.name
                if name in listed or (dataset, p, name) in in_flight:
                    continue
                key = file_key(dataset, source, p, name)
                try:
                    age = time.time() - layout.store.modified(key)
                except ObjectMissing:
                    continue  # deleted meanwhile (a claim's own garbage collection)
                if age >= grace:
                    layout.store.delete(key)
                    removed.append(key)
                    log.info("deleted %s: no head lists it, last written %.0f s ago", key, age)
    return removed
