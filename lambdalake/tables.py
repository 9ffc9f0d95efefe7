"""Table sources: a database table's change stream (Debezium change events in one Kafka topic) and its rows by key.

A :class:`Table` declares the topic Debezium writes a table's changes to, the table's primary key and the columns a
pipeline reads (the same :class:`lambdalake.fields.Field` types and rules as an event source's fields). Where an
event source *appends* facts, a table's views aggregate its *current rows*: an update moves a row's contribution, a
delete removes it. Two pieces every layer shares live here:

- :func:`decode_change` — the one verdict on a message of a table's topic, a pure function of its bytes (like
  :func:`lambdalake.validation.validate`): a :class:`Change` (``op`` c/u/r/d, the primary key, the row image the
  rules accepted, the log position), :data:`TOMBSTONE` for Debezium's null-value message after a delete (skipped:
  it says nothing the delete did not), or a :class:`lambdalake.validation.Invalid` with a reason for the DLQ.
- :class:`TableRows` — the table's rows by primary key as of a log position, built by applying changes. **A change
  applies only if its log position (``source.lsn``) is newer than the key's last one**; a delete leaves a
  tombstone (its position), so nothing older can bring the row back. That makes the result independent of
  duplicates (a change Kafka Connect sends again after a crash is older than, or equal to, what the key holds) and
  exactly splittable: the rows of the changes below a watermark ``W`` :meth:`merged <TableRows.merged>` with the
  rows of the changes from ``W`` on equal the rows of all of them — what lets a batch side and a speed side each keep
  their part and serving combine them by key.

Log positions: Debezium's PostgreSQL connector gives every streamed change the LSN of its WAL record, increasing
along a key's history (a row is locked from a change until its transaction ends, so a later change of the same row
comes from a later or the same transaction: a larger LSN). A snapshot read (``op = r``) carries the LSN ``L`` at
which the snapshot was taken; it holds what committed before ``L``, so a streamed change at ``L`` or later is newer
(:attr:`Change.position`: the LSN, then streamed after read). One WAL record can yield two events — a primary-key
change is a delete of the old key and a create of the new one at one LSN — but never two of one key. Equal
positions of one key are the same change sent twice: the first one applied stays. A completed snapshot (its last
read) makes every key older than it history: a key it did not read was deleted meanwhile, even if that delete was
never sent (Kafka Connect killed before storing its position snapshots the table again and streams from there).
Known limit: a re-snapshot taken while a transaction that changed a row is still open (its change's LSN below the
snapshot's, its commit after) leaves that row as the snapshot read it until its next change.

Column encodings read (Debezium's JSON converter without schemas, ``decimal.handling.mode=string``): integers as
JSON integers, text as strings, booleans, ``float8`` as numbers, ``numeric`` as decimal strings (``"10.25"``),
``timestamptz`` as RFC 3339 strings, ``timestamp`` (without time zone) as microseconds since the epoch (read as
UTC). docs/cdc.md, "Table sources", states the semantics.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import pyarrow as pa

from lambdalake.exceptions import PipelineError
from lambdalake.fields import Field, check_names, decimal_units
from lambdalake.instants import FIRST_INSTANT_US, LAST_INSTANT_US, SUPPORTED_RANGE, parse_rfc3339_us
from lambdalake.schema import INGEST_COL, OFFSET_COL, PARTITION_COL, Column, arrow_schema
from lambdalake.validation import MAX_MESSAGE_BYTES, Invalid, decimal_reason, field_checker, json_type

OPS = ("c", "u", "d", "r")  # create, update, delete, snapshot read
SNAPSHOT_ENDS = ("last", "last_in_data_collection")  # source.snapshot of a snapshot's last read of a table
KEY_TYPES = ("string", "integer")  # primary-key columns: exact values that compare and hash the same everywhere


@dataclass(frozen=True)
class Table:
    """A database table captured into ``topic`` by Debezium (``lambdalake cdc up --table schema.table``: topic
    ``cdc.<schema>.<table>``). ``columns`` are the columns a pipeline reads, primary key included; a change's row
    image must satisfy their rules (other columns are ignored). ``time`` names the timestamp column views bucket
    by (a row's own time, e.g. when an order was placed — never when it changed)."""

    name: str
    topic: str
    primary_key: Sequence[str]
    columns: Sequence[Field]
    time: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "primary_key", tuple(self.primary_key))
        object.__setattr__(self, "columns", tuple(self.columns))
        names = [c.name for c in self.columns]
        check_names("table source", self.name, self.topic, names, "column")
        if not self.primary_key or len(set(self.primary_key)) != len(self.primary_key):
            raise PipelineError(f"table source {self.name!r}: declare its primary key, each column once")
        by_name = self.column_map
        for k in self.primary_key:
            c = by_name.get(k)
            if c is None:
                raise PipelineError(f"table source {self.name!r}: primary-key column {k!r} is not among its "
                                    f"columns {names}")
            if c.type not in KEY_TYPES or not c.required or c.nullable:
                raise PipelineError(f"table source {self.name!r}: primary-key column {k!r} must be a required, "
                                    f"non-nullable {' or '.join(KEY_TYPES)}")
        t = by_name.get(self.time)
        if t is None or t.type != "timestamp" or not t.required or t.nullable:
            raise PipelineError(f"table source {self.name!r}: time column {self.time!r} must be one of its columns, "
                                "a required, non-nullable timestamp")

    @property
    def column_map(self) -> dict[str, Field]:
        return {c.name: c for c in self.columns}

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic}.dlq"


class Change(msgspec.Struct, frozen=True, gc=False):
    """One valid change of a table: ``row`` is the image the rules accepted (``after`` for c/u/r, ``before`` for d),
    each declared column's value as an event field's (timestamps as UTC µs, decimals as scaled integers)."""

    op: Literal["c", "u", "d", "r"]
    key: tuple
    row: dict[str, Any]
    lsn: int
    tx: int | None  # the database transaction (``source.txId``; None for snapshot reads on some versions)
    ends_snapshot: bool = False  # the last read of a snapshot of the table (``source.snapshot`` last...)

    @property
    def deletes(self) -> bool:
        return self.op == "d"

    @property
    def position(self) -> tuple[int, int]:
        """Where the change stands in the table's history: its LSN, then a streamed change after a snapshot read
        of the same LSN (a snapshot taken at LSN ``L`` holds what committed before ``L``; a change whose WAL record
        is at ``L`` committed after it)."""
        return (self.lsn, 0 if self.op == "r" else 1)


class _Tombstone:
    def __repr__(self) -> str:
        return "TOMBSTONE"


TOMBSTONE = _Tombstone()  # Debezium's null-value message after a delete: skipped, never dead-lettered


class Position(msgspec.Struct):
    """The fields of a Debezium change event's ``source`` block that lambdalake reads (others are ignored)."""

    lsn: int
    txId: int | None = None  # noqa: N815 - Debezium's name
    snapshot: str | None = None  # "first", "true", "last", "first_in_data_collection", ..., "false", "incremental"


class Envelope(msgspec.Struct):
    """A Debezium change event's value as lambdalake reads it (JSON without the schema envelope; other fields —
    ``ts_ms``, ``transaction``, the rest of ``source`` — are ignored)."""

    op: str
    source: Position
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


_DECODER = msgspec.json.Decoder(Envelope)


def decode_change(table: Table, value: bytes | None) -> Change | Invalid | _Tombstone:
    """The verdict on one message of ``table``'s topic; never raises."""
    return ChangeDecoder.of(table)(value)


class ChangeDecoder:
    """:func:`decode_change` for one table, its column rules compiled once."""

    _cache: dict[Table, ChangeDecoder] = {}

    @classmethod
    def of(cls, table: Table) -> ChangeDecoder:
        if (dec := cls._cache.get(table)) is None:
            dec = cls._cache[table] = cls(table)
        return dec

    def __init__(self, table: Table):
        self.table = table
        self._columns = [(c, field_checker(c) if c.type not in ("decimal", "timestamp") else None)
                         for c in table.columns]

    def __call__(self, value: bytes | None) -> Change | Invalid | _Tombstone:
        try:
            return self._decode(value)
        except Exception as exc:  # noqa: BLE001 - the contract is "never raises": a bug must not stop a consumer
            return Invalid(f"validator error: {type(exc).__name__}: {exc}")

    def _decode(self, value: bytes | None) -> Change | Invalid | _Tombstone:
        if value is None:
            return TOMBSTONE
        if len(value) > MAX_MESSAGE_BYTES:
            return Invalid(f"message is {len(value)} bytes, above the limit of {MAX_MESSAGE_BYTES}")
        try:
            env = _DECODER.decode(value)
        except msgspec.ValidationError as exc:
            return Invalid(f"not a Debezium change event: {exc}")
        except msgspec.DecodeError as exc:
            return Invalid(f"not JSON: {str(exc)[:200]}")
        if env.op not in OPS:
            what = {"t": "a TRUNCATE (not applied per key: re-snapshot the table instead)",
                    "m": "a logical decoding message"}.get(env.op, f"op {env.op[:10]!r}")
            return Invalid(f"not a row change: {what}")
        image_name = "before" if env.op == "d" else "after"
        image = env.before if env.op == "d" else env.after
        if image is None:
            return Invalid(f"op {env.op!r} without its {image_name} image (REPLICA IDENTITY FULL not set?)")
        if env.source.lsn < 0:
            return Invalid(f"source.lsn {env.source.lsn} is negative")
        row: dict[str, Any] = {}
        for c, check in self._columns:
            if c.name not in image:
                return Invalid(f"column {c.name!r} missing from the {image_name} image")
            v = image[c.name]
            if v is None:
                if c.required and not c.nullable:
                    return Invalid(f"column {c.name!r}: null is not allowed")
                row[c.name] = None
                continue
            v, err = _column_value(c, check, v)
            if err is not None:
                return Invalid(err)
            row[c.name] = v
        return Change(env.op, tuple(row[k] for k in self.table.primary_key), row,  # type: ignore[arg-type]
                      env.source.lsn, env.source.txId, env.op == "r" and env.source.snapshot in SNAPSHOT_ENDS)


def _column_value(c: Field, check, v: Any) -> tuple[Any, str | None]:
    """A present, non-null column value as stored, or the reason it breaks the column's rules."""
    if c.type == "decimal":
        if type(v) is not str:
            return None, (f"column {c.name!r}: expected a decimal string (decimal.handling.mode=string), got "
                          f"{json_type(v)}")
        units = decimal_units(v, c.scale)  # type: ignore[arg-type]
        if units is None:
            return None, "column" + decimal_reason(c.name, v, c.scale)[len("field"):]  # type: ignore[arg-type]
        return units, None
    if c.type == "timestamp":
        if type(v) is int:  # timestamp without time zone: MicroTimestamp
            us = v
        elif type(v) is str:  # timestamptz: ZonedTimestamp
            us = parse_rfc3339_us(v)
            if us is None:
                return None, f"column {c.name!r}: {v[:60]!r} is not an RFC 3339 timestamp with timezone"
        else:
            return None, f"column {c.name!r}: expected a timestamp, got {json_type(v)}"
        if not FIRST_INSTANT_US <= us <= LAST_INSTANT_US:
            return None, f"column {c.name!r}: {v!r} is outside the supported range {SUPPORTED_RANGE} (UTC)"
        return us, None
    err = check(v)
    if err is not None:
        return None, "column" + err[len("field"):]
    return (float(v) if c.type == "number" else v), None


class Kept(msgspec.Struct, frozen=True, gc=False):
    """What a key holds: its newest change's position and row (``row`` None: deleted, a tombstone), and the log
    offset that change was read at (-1: not known; for :meth:`TableRows.pruned` only)."""

    position: tuple[int, int]
    row: dict[str, Any] | None
    offset: int = -1


class TableRows:
    """A table's rows by primary key, as of the changes applied (see the module docstring for the rules).

    ``snapshot`` is the LSN of the newest completed snapshot: it read every row the table had, so a key whose
    position is older than it was not in the table then (its delete may never have been sent: Kafka Connect killed
    before it stored its position takes a new snapshot and streams from there) — completing a snapshot forgets such
    keys, and a change older than it is ignored."""

    def __init__(self, kept: Mapping[tuple, Kept] | None = None, snapshot: int = -1):
        self.kept: dict[tuple, Kept] = dict(kept or {})
        self.snapshot = snapshot

    def apply(self, change: Change, offset: int = -1) -> bool:
        """Apply ``change`` (read at log ``offset``) if it is newer than what its key holds and than the last
        completed snapshot; True if it changed anything."""
        pos, changed = change.position, False
        held = self.kept.get(change.key)
        if change.lsn >= self.snapshot and (held is None or pos > held.position):
            self.kept[change.key] = Kept(pos, None if change.deletes else change.row, offset)
            changed = True
        if change.ends_snapshot and change.lsn > self.snapshot:
            self.snapshot = change.lsn
            changed = self._complete() or changed
        return changed

    def _complete(self) -> bool:
        """Forget every key older than the last completed snapshot: a row it did not read was not in the table, and
        a tombstone is no longer needed (a change older than the snapshot is ignored anyway)."""
        gone = [key for key, k in self.kept.items() if k.position[0] < self.snapshot]
        for key in gone:
            del self.kept[key]
        return any(True for _ in gone)

    def pruned(self, watermark: int) -> TableRows:
        """These rows (a speed side's, of one partition) without the keys whose newest change was read below
        ``watermark``: a batch version covering the offsets below it holds them at that change or newer, so
        merging it with the pruned rows still gives the rows of all changes. The newest completed snapshot stays."""
        return TableRows({key: k for key, k in self.kept.items() if k.offset < 0 or k.offset >= watermark},
                         self.snapshot)

    def apply_all(self, changes: Iterable[Change]) -> TableRows:
        for ch in changes:
            self.apply(ch)
        return self

    def merged(self, newer: TableRows) -> TableRows:
        """These rows (e.g. a batch side's, of the changes below ``W``) combined with ``newer`` (a speed side's, of
        the changes from ``W`` on): per key the newer position wins, then the newest completed snapshot of either
        deletes the keys older than it — equal to applying both sides' changes in order."""
        out = TableRows(self.kept, max(self.snapshot, newer.snapshot))
        for key, k in newer.kept.items():
            held = out.kept.get(key)
            if held is None or k.position > held.position:
                out.kept[key] = k
        out._complete()
        return out

    def rows(self) -> Iterator[dict[str, Any]]:
        """The current rows (deleted keys left out), in key order."""
        for key in sorted(self.kept):
            row = self.kept[key].row
            if row is not None:
                yield row

    def __len__(self) -> int:
        return sum(1 for k in self.kept.values() if k.row is not None)

    def __eq__(self, other: object) -> bool:
        """The same rows, tombstones and positions, and the same newest completed snapshot (where each change was
        read does not count)."""
        return (isinstance(other, TableRows) and self.snapshot == other.snapshot
                and {k: (v.position, v.row) for k, v in self.kept.items()}
                == {k: (v.position, v.row) for k, v in other.kept.items()})

    __hash__ = None  # type: ignore[assignment]


# -- stored forms, and the rule in SQL --------------------------------------------------------------------------------
OP_COL, LSN_COL, RANK_COL = "_op", "_lsn", "_rank"
SNAPSHOT_END_COL, DELETED_COL = "_snapshot_end", "_deleted"


def change_columns(table: Table) -> tuple[Column, ...]:
    """A table's changes as stored (the archive of its topic): the declared columns of the change's image, ``_op``,
    ``_lsn``, ``_snapshot_end``, then the master's position columns."""
    cols = [Column(c.name, c.type, not c.required or c.nullable, c.scale) for c in table.columns]
    return (*cols, Column(OP_COL, "string", nullable=False), Column(LSN_COL, "integer", nullable=False),
            Column(SNAPSHOT_END_COL, "boolean", nullable=False), Column(PARTITION_COL, "int32", nullable=False),
            Column(OFFSET_COL, "integer", nullable=False), Column(INGEST_COL, "timestamp", nullable=False))


def row_columns(table: Table) -> tuple[Column, ...]:
    """A table's rows by key as stored (one row per key, tombstones included): the declared columns (null but the
    key in a tombstone), ``_lsn`` and ``_rank`` (the position), ``_deleted``."""
    keys = set(table.primary_key)
    cols = [Column(c.name, c.type, c.name not in keys, c.scale) for c in table.columns]
    return (*cols, Column(LSN_COL, "integer", nullable=False), Column(RANK_COL, "int32", nullable=False),
            Column(DELETED_COL, "boolean", nullable=False))


def changes_to_arrow(table: Table, changes: Iterable[tuple[int, Change]], partition: int,
                     ingest_us: int) -> pa.Table:
    """``(offset, change)`` pairs of one partition in the stored form :func:`change_columns`."""
    names = [c.name for c in table.columns]
    out: dict[str, list] = {n: [] for n in (*names, OP_COL, LSN_COL, SNAPSHOT_END_COL, OFFSET_COL)}
    for offset, ch in changes:
        for n in names:
            out[n].append(ch.row[n])
        out[OP_COL].append(ch.op)
        out[LSN_COL].append(ch.lsn)
        out[SNAPSHOT_END_COL].append(ch.ends_snapshot)
        out[OFFSET_COL].append(offset)
    n = len(out[OFFSET_COL])
    out[PARTITION_COL], out[INGEST_COL] = [partition] * n, [ingest_us] * n
    return pa.table({c.name: out[c.name] for c in change_columns(table)}, schema=arrow_schema(change_columns(table)))


def rows_to_arrow(table: Table, rows: TableRows) -> pa.Table:
    """``rows`` (every key, tombstones included) in the stored form :func:`row_columns`."""
    names = [c.name for c in table.columns]
    out: dict[str, list] = {n: [] for n in (*names, LSN_COL, RANK_COL, DELETED_COL)}
    for key, kept in rows.kept.items():
        values = kept.row if kept.row is not None else dict(zip(table.primary_key, key, strict=True))
        for n in names:
            out[n].append(values.get(n))
        out[LSN_COL].append(kept.position[0])
        out[RANK_COL].append(kept.position[1])
        out[DELETED_COL].append(kept.row is None)
    return pa.table(out, schema=arrow_schema(row_columns(table)))


def rows_from_arrow(table: Table, stored: pa.Table, snapshot: int) -> TableRows:
    """The inverse of :func:`rows_to_arrow` (``snapshot``: the side's newest completed snapshot); timestamps back
    to UTC microseconds."""
    names = [c.name for c in table.columns]
    kept: dict[tuple, Kept] = {}
    for c in table.columns:
        if c.type == "timestamp":
            i = stored.schema.get_field_index(c.name)
            stored = stored.set_column(i, c.name, stored[c.name].cast(pa.int64()))
    for r in stored.to_pylist():
        key = tuple(r[k] for k in table.primary_key)
        kept[key] = Kept((r[LSN_COL], r[RANK_COL]), None if r[DELETED_COL] else {n: r[n] for n in names})
    return TableRows(kept, snapshot)


def merged_rows_sql(table: Table, sides: Sequence[tuple[str, int]]) -> str:
    """DuckDB SQL of :meth:`TableRows.merged` over stored sides: ``(relation, its newest completed snapshot)`` each
    (a relation in the form :func:`row_columns`). The current rows, the declared columns: per key the newest position
    of any side, then nothing older than the newest completed snapshot of any side, tombstones left out."""
    keys = ", ".join(_q(k) for k in table.primary_key)
    cols = ", ".join(_q(c.name) for c in table.columns)
    union = " UNION ALL ".join(f"SELECT {cols}, {LSN_COL}, {RANK_COL}, {DELETED_COL} FROM {rel}" for rel, _ in sides)
    snapshot = max((s for _, s in sides), default=-1)
    return (f"SELECT {cols} FROM ({union}) QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {LSN_COL} DESC, "
            f"{RANK_COL} DESC) = 1 AND {LSN_COL} >= {int(snapshot)} AND NOT {DELETED_COL}")


def _q(name: str) -> str:
    return f'"{name}"'  # declared names match NAME (lowercase letters, digits, _): quoting is for reserved words
