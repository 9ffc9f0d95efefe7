"""Typed contracts of everything the layers publish to each other: one class, one encode, one decode each.

Every file one layer writes and another reads is described here, and nowhere else:

- :class:`Positions` — ``{(topic, partition): offset}`` in memory, ``{topic: {"<partition>": offset}}`` on disk.
  Used for batch watermarks ``W``, archived ends, speed positions ``S`` and ``pruned_to``.
- :class:`BatchManifest` — ``views/batch/<prefix>/manifest.json``: watermark, inputs with checksums (lineage),
  per-view definition fingerprints and row counts, engine, code version and timings.
- :class:`SpeedSnapshotMeta` — ``views/speed/<snapshot>/snapshot.json``: speed positions, ``pruned_to``, the handoff
  block, per-view definition fingerprints and, while a changed view is being rebuilt, its progress.
- :class:`BatchPointer` / :class:`SpeedPointer` — the ``CURRENT`` files (the commit points).
- :class:`ErasureRequest` — ``checkpoints/erasures/<source>/<id>.json`` (and the ``lambdalake.erasures`` record).
- :class:`CompactionRecord` / :class:`ErasureRecord` — ``master/_log/<utc>-<kind>-...json``: the journal of the
  master rewrites (:mod:`batch.rewrite`), read back by recovery and by the readers' rules.

Decoding is strict (msgspec): a wrong type is a :class:`lambdalake.exceptions.InvariantViolation` naming the file and
the field, never a ``KeyError`` somewhere downstream. Unknown keys are ignored, so a file written by a newer release
stays readable, and every field added since the first release has a default, so files written by an older release
decode too (``format`` tells them apart; see :func:`BatchManifest.definition_matches`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import msgspec

from lambdalake.exceptions import InvariantViolation

TP = tuple[str, int]
MANIFEST_FORMAT = 2  # 1: lambdalake 0.1 (no published_at, legacy fingerprints); 2: definition fingerprints
SNAPSHOT_FORMAT = 4  # 1: lambdalake 0.1 (no per-view fingerprints); 2: one file per view; 3: part files (hard
# links); 4: part files referenced across snapshots (``<snapshot>/<name>``), no hard links


class Positions(Mapping[TP, int]):
    """Offsets per ``(topic, partition)``: watermarks, archived ends, speed positions. Immutable, sorted.

    A partition that is not listed has position 0 (:meth:`at`).
    """

    __slots__ = ("_d",)

    def __init__(self, items: Mapping[TP, int] | Iterable[tuple[TP, int]] = ()):
        pairs = items.items() if isinstance(items, Mapping) else items
        self._d: dict[TP, int] = {(str(t), int(p)): int(n) for (t, p), n in sorted(pairs)}

    # Mapping ------------------------------------------------------------------------------------------------------
    def __getitem__(self, key: TP) -> int:
        return self._d[key]

    def __iter__(self) -> Iterator[TP]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return f"Positions({self._d!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Positions):
            return self._d == other._d
        if isinstance(other, Mapping):
            return self._d == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    # the domain ---------------------------------------------------------------------------------------------------
    def at(self, topic: str, partition: int) -> int:
        """The position of one partition; 0 when it is not listed (nothing of it covered yet)."""
        return self._d.get((topic, partition), 0)

    def of_topic(self, topic: str) -> dict[int, int]:
        """``{partition: offset}`` of one topic."""
        return {p: n for (t, p), n in self._d.items() if t == topic}

    @property
    def topics(self) -> list[str]:
        return sorted({t for t, _ in self._d})

    def total(self) -> int:
        return sum(self._d.values())

    # the wire form ------------------------------------------------------------------------------------------------
    def nested(self) -> dict[str, dict[str, int]]:
        """``{topic: {"<partition>": offset}}`` (JSON object keys are strings)."""
        out: dict[str, dict[str, int]] = {}
        for (t, p), n in self._d.items():
            out.setdefault(t, {})[str(p)] = n
        return out

    @classmethod
    def from_nested(cls, doc: Mapping[str, Mapping[Any, int]] | None) -> Positions:
        if not doc:
            return cls()
        try:
            return cls({(str(t), int(p)): int(n) for t, parts in doc.items() for p, n in parts.items()})
        except (AttributeError, TypeError, ValueError) as exc:
            raise InvariantViolation(f"positions {doc!r} are not {{topic: {{partition: offset}}}}: {exc}") from exc

    @classmethod
    def of_topics(cls, doc: Mapping[str, Mapping[int, int]]) -> Positions:
        """From ``{topic: {partition: offset}}`` with integer partitions (what per-topic code builds)."""
        return cls({(t, p): n for t, parts in doc.items() for p, n in parts.items()})


def utc_now_iso() -> str:
    """Now as RFC 3339 UTC with microseconds (``2026-11-26T20:00:00.123456Z``): the timestamps of every contract."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_utc(text: str | None) -> datetime | None:
    """An RFC 3339 timestamp of a contract as an aware UTC datetime (None stays None)."""
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


# --- batch -----------------------------------------------------------------------------------------------------------
class InputFile(msgspec.Struct, frozen=True):
    """One master file a batch version read (its lineage entry in the manifest)."""

    path: str  # relative to the lake home
    source: str
    partition: int
    start: int
    end: int
    bytes: int
    sha256: str
    rows: int


class BatchView(msgspec.Struct):
    """One view inside a batch version: the definition that computed it and its files."""

    fingerprint: str
    files: list[str] = msgspec.field(default_factory=list)
    computed_in: str | None = None  # the version that computed the files (a carried-over view keeps its origin)


class IdIndex(msgspec.Struct):
    """Per source of a batch version: the (partition, event id) of every event it counted, the set an incremental
    run checks new events against (``<version>/_ids/<source>/<segment>/*.parquet``, columns ``_partition`` and the
    event id; :mod:`batch.compute`). ``rows`` equals the version's ``events[source]``; ``erased`` is the digest of the
    forgotten subjects the version skipped (:func:`lambdalake.erasure.erased_subjects`)."""

    segments: list[str] = msgspec.field(default_factory=list)
    rows: int = 0
    erased: str = ""


class BatchManifest(msgspec.Struct, kw_only=True):
    """``views/batch/<prefix>/manifest.json``: one batch version = every view at one watermark ``W``."""

    version: str | None = None  # filled in by publish
    pipeline: str
    watermark: Positions
    block: int
    archived: Positions = msgspec.field(default_factory=Positions)
    inputs: list[InputFile] = msgspec.field(default_factory=list)
    # rejected files judged again under the declared rules (batch.rejected) and the messages now valid, per source
    rejected_inputs: list[InputFile] = msgspec.field(default_factory=list)
    revalidated: dict[str, int] = msgspec.field(default_factory=dict)
    row_counts: dict[str, int] = msgspec.field(default_factory=dict)
    events: dict[str, int] = msgspec.field(default_factory=dict)  # deduplicated events per source below W
    views: dict[str, BatchView] = msgspec.field(default_factory=dict)
    engine: str = ""
    spark_master: str | None = None
    code_version: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    published_at: str | None = None  # set by publish, right before the CURRENT switch
    duration_s: float = 0.0
    format: int = 1  # absent in files of the first release
    # Incremental runs (absent before them: "full", no index). ``mode``: "full" (every view from all master below W)
    # or "incremental" (the views of ``based_on`` merged with the events in [based_on's W, W)); ``mode_reason``:
    # why; ``full_at``: ``started_at`` of the full run the version's rows descend from; ``id_index`` per source.
    mode: str = "full"
    based_on: str | None = None
    mode_reason: str = ""
    full_at: str | None = None
    id_index: dict[str, IdIndex] = msgspec.field(default_factory=dict)

    def fingerprint_of(self, view: str) -> str | None:
        meta = self.views.get(view)
        return None if meta is None else meta.fingerprint

    def has_view(self, view: str) -> bool:
        return view in self.views or view in self.row_counts

    def definition_matches(self, view: str, declared: str, legacy: str | None = None) -> bool:
        """Whether this version's ``view`` was computed by the declared definition.

        ``legacy`` is the first release's fingerprint of the same declaration: a format-1 manifest recorded only
        that one, so an upgraded lake keeps serving its unchanged views without a recompute.
        """
        got = self.fingerprint_of(view)
        if got is None:
            return False
        return got == declared or (self.format < 2 and legacy is not None and got == legacy)

    @property
    def published_time(self) -> datetime | None:
        """When the version became visible (first release: when its computation finished)."""
        return parse_utc(self.published_at or self.finished_at)


class BatchVersionRef(msgspec.Struct, frozen=True):
    """One kept batch version in :class:`BatchPointer`: its id and the key prefix holding its files."""

    version: str
    prefix: str  # e.g. views/batch/run-4242-0a1b2c3d4e5f (views/batch/<version> for the first release's)


class BatchPointer(msgspec.Struct):
    """``views/batch/CURRENT``, replaced by one compare-and-swap per publish or rollback (docs/design.md "Publish
    protocol"). Format 1 (the first release): ``version`` alone, its files in ``views/batch/<version>/``. Format 2:
    ``prefix`` of the current version, every ``kept`` version newest first (the current one included), the ``last``
    version id ever given out, the prefixes ``retired`` lately (newest first, a few dozen), and the ``writer`` and
    ``seq`` (one more per swap) that make every body unique."""

    version: str
    prefix: str = ""
    kept: list[BatchVersionRef] = msgspec.field(default_factory=list)
    last: str = ""
    retired: list[BatchVersionRef] = msgspec.field(default_factory=list)
    writer: str = ""
    seq: int = 0
    format: int = 1


# --- speed -----------------------------------------------------------------------------------------------------------
class SpeedView(msgspec.Struct):
    """One view inside a speed snapshot.

    ``target`` is set while the speed layer replays the log for a changed definition: the snapshot then holds the
    *previous* definition's rows (``fingerprint``; ``""`` and no rows file for a view new to the pipeline) and the
    declared one (``target``) is ``progress`` (0..1) done.
    """

    fingerprint: str
    rows: int = 0
    target: str | None = None  # the declared definition being rebuilt, None when current
    progress: float | None = None  # 0..1 while rebuilding
    # While rebuilding: the positions (of the view's topic) the kept old rows cover — they are exact for the old
    # definition over [pruned_to, positions), not up to the snapshot's own positions. None when current.
    positions: Positions | None = None
    # The files holding the view's rows (format 3: ``<view>.parquet`` with the open blocks and part files of sealed
    # blocks, see speed.snapshot; format 4: a part file an earlier snapshot wrote is listed as ``<snapshot>/<name>``,
    # in that snapshot's prefix — Layout.speed_file_key); empty: ``<view>.parquet`` alone (format <= 2).
    files: list[str] = msgspec.field(default_factory=list)

    def file_names(self, view: str) -> list[str]:
        """The files holding the rows of ``view`` (this entry's name), as the snapshot lists them."""
        return list(self.files) if self.files else [f"{view}.parquet"]


class SpeedSnapshotMeta(msgspec.Struct, kw_only=True):
    """``views/speed/<snapshot>/snapshot.json``: the speed state at positions ``S`` (blocks from ``pruned_to``)."""

    snapshot: str = ""
    pipeline: str = ""
    positions: Positions
    pruned_to: Positions = msgspec.field(default_factory=Positions)
    block: int
    created_at: str | None = None
    created_at_unix: float | None = None
    batch_version: str | None = None  # the batch version the speed layer had handed off to
    counters: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    rows: dict[str, int] = msgspec.field(default_factory=dict)
    views: dict[str, SpeedView] = msgspec.field(default_factory=dict)
    format: int = 1
    # Speed workers (lambdalake.ownership): the worker that wrote it ("" = the one owning every partition) and its
    # ownership epoch per partition; serving takes each partition from the snapshot with the highest epoch
    # (absent: 0, e.g. every snapshot written before workers existed).
    worker: str = ""
    epochs: Positions = msgspec.field(default_factory=Positions)

    def files_of(self, view: str) -> list[str]:
        """The files holding ``view``'s rows in this snapshot's directory (:meth:`SpeedView.file_names`;
        ``<view>.parquet`` for a view without an entry)."""
        sv = self.views.get(view)
        return [f"{view}.parquet"] if sv is None else sv.file_names(view)

    def fingerprint_of(self, view: str) -> str | None:
        meta = self.views.get(view)
        return None if meta is None else meta.fingerprint

    def definition_matches(self, view: str, declared: str) -> bool:
        """Whether this snapshot's rows of ``view`` are complete rows of the ``declared`` definition (not being
        rebuilt). A format-1 snapshot records no definitions: never (the speed layer rebuilds its views once)."""
        meta = self.views.get(view)
        return meta is not None and meta.fingerprint == declared and meta.target is None

    @property
    def created_time(self) -> datetime | None:
        if self.created_at_unix is not None:
            return datetime.fromtimestamp(self.created_at_unix, UTC)
        return parse_utc(self.created_at)


class SpeedPointer(msgspec.Struct):
    """``views/speed/CURRENT``. ``writer`` and ``seq`` (the speed writer that switched it) make every body unique:
    its switch is a compare-and-swap on the ETag (speed.checkpoint), never fooled by an equal earlier body."""

    snapshot: str
    writer: str = ""
    seq: int = 0


# --- erasure (lambdalake forget, :mod:`lambdalake.erasure`) ---------------------------------------------------------
ERASURE_STAGES = ("received", "master rewritten", "batch corrected", "speed corrected", "complete")


class ErasureRequest(msgspec.Struct, kw_only=True):
    """``checkpoints/erasures/<source>/<id>.json``, and the value of the ``lambdalake.erasures`` record keyed
    ``<source>/<subject>`` (a compacted topic): one subject (a value of the source's key field) to forget.

    Written (stage ``received``) before anything is rewritten; ``master_rewritten_at`` once the master and rejected
    files held no event of the subject; ``speed_corrected_at`` once the speed layer checkpointed state rebuilt without
    it. "batch corrected" is derived (the published batch version read no master file the erasure rewrote).
    """

    id: str
    source: str
    subject: str
    requested_at: str
    requested_at_unix: float
    master_rewritten_at: str | None = None
    files_rewritten: list[str] = msgspec.field(default_factory=list)  # relative to the lake home
    messages_erased: int = 0  # master rows + rejected messages removed
    speed_corrected_at: str | None = None  # when every speed worker had (the last one to)
    speed_workers_corrected: dict[str, str] = msgspec.field(default_factory=dict)  # worker ("" = root) -> when
    stage: str = "received"  # as last recorded (lambdalake status derives the current one)


# --- master rewrites (master/_log/, the journal of :mod:`batch.rewrite`) -------------------------------------------
REWRITE_STARTED, REWRITE_DONE, REWRITE_ABORTED = "started", "done", "aborted"


class RewriteFile(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One file in a rewrite record, before (``replaced`` / ``old``) or after (``merged`` / ``new``) the rewrite.
    Only the keys a record names are written (``name`` and ``tmp`` where they apply; an early record may lack the
    sizes)."""

    name: str | None = None
    tmp: str | None = None  # the new file's temporary name, until the rename
    rows: int | None = None
    bytes: int | None = None
    sha256: str | None = None


class MasterRewriteRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What every master rewrite record holds: written ``started`` (the intent) before the swap, ``done`` after it;
    a recovery sets ``done`` (``recovered``) or ``aborted``. ``dataset`` is the directory the files are in
    (``master`` or ``rejected``), ``<dataset>/<source>/p=<partition>/``.

    Each kind (:data:`RewriteRecord`) says in the same words which file the rewrite puts in place (``new_name()``,
    with its ``new_sha256()``), its temporary name (``tmp_name()``), which other files it replaces
    (``replaced_names()``), and takes the new file as written (``wrote(new)``: tmp name, rows, bytes, sha256)."""

    KIND: ClassVar[str]  # the record's file name: <utc>-<KIND>-...json, and its "kind"
    WHAT: ClassVar[str]  # for people: "compaction", "erasure rewrite"

    status: str  # REWRITE_STARTED, REWRITE_DONE or REWRITE_ABORTED
    dataset: str = "master"
    source: str
    partition: int
    start: int | None = None
    end: int | None = None
    started_at: str | None = None
    pid: int | None = None
    finished_at: str | None = None
    recovered: bool = False
    recovered_at: str | None = None

    def log_name(self, stamp: str) -> str:
        return f"{stamp}-{self.KIND}-{self.source}-p{self.partition}-{self.start:020d}-{self.end:020d}.json"


class CompactionRecord(MasterRewriteRecord, kw_only=True, tag_field="kind", tag="compact"):
    """``master/_log/<utc>-compact-<source>-p<p>-<start>-<end>.json`` (:mod:`batch.compact`): the files ``replaced``
    (in offset order) and the ``merged`` file ``<first start>-<last end>.parquet`` that replaces them."""

    KIND: ClassVar[str] = "compact"
    WHAT: ClassVar[str] = "compaction"

    replaced: list[RewriteFile]
    merged: RewriteFile

    def new_name(self) -> str:
        return self.merged.name or ""

    def new_sha256(self) -> str | None:
        return self.merged.sha256

    def tmp_name(self) -> str | None:
        return self.merged.tmp

    def replaced_names(self) -> list[str]:
        return [r.name or "" for r in self.replaced]

    def wrote(self, new: RewriteFile) -> None:
        self.merged = msgspec.structs.replace(new, name=self.merged.name)


class ErasureRecord(MasterRewriteRecord, kw_only=True, tag_field="kind", tag="erase"):
    """``master/_log/<utc>-erase-<source>-<dataset>-p<p>-<start>-<end>.json`` (:mod:`batch.erase`): the file
    ``name`` rewritten in place without the messages at ``offsets``, for the erasure ``requests`` (ids), its
    ``old`` and ``new`` versions."""

    KIND: ClassVar[str] = "erase"
    WHAT: ClassVar[str] = "erasure rewrite"

    dataset: str
    name: str
    requests: list[str]
    offsets: list[int]
    old: RewriteFile
    new: RewriteFile

    def log_name(self, stamp: str) -> str:
        return (f"{stamp}-{self.KIND}-{self.source}-{self.dataset}-p{self.partition}-{self.start:020d}-"
                f"{self.end:020d}.json")

    def new_name(self) -> str:
        return self.new.name or self.name  # on object storage a name of its own, else the file's own name

    def new_sha256(self) -> str | None:
        return self.new.sha256

    def tmp_name(self) -> str | None:
        return self.new.tmp

    def replaced_names(self) -> list[str]:
        # locally the new version takes the file's own name; on object storage it replaces the file in the head
        return [self.name] if self.new.name and self.new.name != self.name else []

    def wrote(self, new: RewriteFile) -> None:
        self.new = msgspec.structs.replace(new, name=self.new.name)


RewriteRecord = CompactionRecord | ErasureRecord


# --- encode / decode -------------------------------------------------------------------------------------------------
def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Positions):
        return obj.nested()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is Positions:
        if not isinstance(obj, dict):
            raise msgspec.ValidationError(f"expected {{topic: {{partition: offset}}}}, got {type(obj).__name__}")
        return Positions.from_nested(obj)
    raise NotImplementedError(f"cannot decode {typ}")


_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook)
C = TypeVar("C")
_DECODERS: dict[type, msgspec.json.Decoder] = {}


def encode(contract: Any) -> bytes:
    """The JSON bytes of a contract, indented for people reading the lake (keys in declaration order)."""
    return msgspec.json.format(_ENCODER.encode(contract), indent=1) + b"\n"


def decode(data: bytes | str, cls: type[C], what: str = "") -> C:
    """Strictly decode ``data`` as ``cls``; a broken file is an InvariantViolation naming ``what`` and the field."""
    dec = _DECODERS.get(cls)
    if dec is None:
        dec = _DECODERS[cls] = msgspec.json.Decoder(cls, dec_hook=_dec_hook)
    try:
        return dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvariantViolation(f"{what or cls.__name__} is not a valid {cls.__name__}: {exc}") from exc


def read(path: Path, cls: type[C]) -> C:
    """Decode the contract file at ``path`` (FileNotFoundError propagates: callers decide what absent means)."""
    return decode(path.read_bytes(), cls, str(path))


def to_builtins(contract: Any) -> Any:
    """Plain dicts/lists (for JSON output of the CLI, Airflow XCom and Asset extras)."""
    return msgspec.to_builtins(contract, enc_hook=_enc_hook)
