"""What the audit recomputes from: the log's valid events and the master rows, erased subjects left out, the dedup rule
and a deterministic sample of positions — written apart from the engine code under test."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from audit.logread import PartitionLog
from lambdalake.fields import Field, Source
from lambdalake.layout import Layout, MasterFile
from lambdalake.schema import (
    OFFSET_COL,
    PARTITION_COL,
    arrow_schema,
    master_columns,
)
from lambdalake.storage.files import data_files
from lambdalake.validation import Validator
from lambdalake.viewsql import ident


# --- the erasure hook ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Erased:
    """What erasure removed from one source: offsets per partition (accounted as *erased*) and subjects (skipped by
    every recomputation)."""

    offsets: dict[int, frozenset[int]] = field(default_factory=dict)
    subjects: frozenset[str] = frozenset()


def erased(layout: Layout, source: Source) -> Erased:
    """The erasures recorded for ``source`` (``lambdalake forget``, :mod:`lambdalake.erasure`): the offsets whose
    message a master rewrite removed (accounted as erased), and the subjects every recomputation skips."""
    from lambdalake.erasure import erased_offsets, erased_subjects

    return Erased(offsets=erased_offsets(layout, source.name), subjects=erased_subjects(layout, source.name))


def not_erased_sql(source: Source, gone: Erased) -> str:
    if not gone.subjects:
        return "TRUE"
    values = ", ".join("'" + s.replace("'", "''") + "'" for s in sorted(gone.subjects))
    return f"{ident(source.key)} NOT IN ({values})"



# --- positions ---------------------------------------------------------------------------------------------------
def sampled(partition: int, offset: int, fraction: float) -> bool:
    """Deterministic sample of positions (the same ``--sample`` audits the same offsets on every run)."""
    if fraction >= 1.0:
        return True
    h = ((offset + 1) * 0x9E3779B97F4A7C15 + (partition + 1) * 0xC2B2AE3D27D4EB4F) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 29
    h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 32
    return h / 2**64 < fraction


def below_sql(bounds: dict[int, int], lower: dict[int, int] | None = None) -> str:
    """``_offset < bounds[_partition]`` (and ``>= lower[_partition]``); a partition not in ``bounds``: none."""
    if not bounds:
        return "FALSE"
    hi = " ".join(f"WHEN {int(p)} THEN {int(n)}" for p, n in sorted(bounds.items()))
    cond = f"{OFFSET_COL} < (CASE {PARTITION_COL} {hi} ELSE 0 END)"
    if lower:
        lo = " ".join(f"WHEN {int(p)} THEN {int(n)}" for p, n in sorted(lower.items()))
        cond += f" AND {OFFSET_COL} >= (CASE {PARTITION_COL} {lo} ELSE 0 END)"
    return cond



# --- reading --------------------------------------------------------------------------------------------------------
def loosened(source: Source) -> Source:
    """The source with its value rules (lengths, ranges, patterns) dropped: types and presence only. Reads a log
    message as the event it carries even when a tightened rule now rejects it (master still holds it, and the
    batch job drops it), so the fields can still be compared."""
    def loosen(f: Field) -> Field:
        return dataclasses.replace(f, min_length=None, max_length=None, minimum=None, maximum=None, pattern=None)

    return dataclasses.replace(source, fields=[loosen(f) for f in source.fields])


def read_lake_file(layout: Layout | None, f: MasterFile, columns: list[str]) -> tuple[pa.Table, int]:
    """``columns`` of a master or rejected file and its size in bytes: through the lake's store (a bucket too), or,
    without ``layout``, the local file ``f.path``."""
    if layout is None:
        return pq.read_table(f.path, columns=columns), f.path.stat().st_size
    lake, key = data_files(layout.store), layout.key(f.path)
    return lake.read_table(key, columns=columns), lake.info(key).size


def read_master(files: list[MasterFile], source: Source, layout: Layout | None = None) -> tuple[pa.Table, int]:
    """The master rows of ``files`` (declared fields, ``_partition``, ``_offset``; timestamps as int64 µs) sorted by
    (partition, offset), and the bytes of the files (read as :func:`read_lake_file`)."""
    names = [f.name for f in source.fields] + [PARTITION_COL, OFFSET_COL]
    schema = arrow_schema(master_columns(source), nullability=False)
    tables, nbytes = [], 0
    for f in files:
        t, size = read_lake_file(layout, f, names)
        nbytes += size
        tables.append(t.select(names))
    if not tables:
        return pa.schema([schema.field(n) for n in names]).empty_table(), 0
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.sort_by([(PARTITION_COL, "ascending"), (OFFSET_COL, "ascending")]), nbytes


def epoch_us_columns(table: pa.Table, source: Source) -> dict[str, list]:
    cols = {}
    for f in source.fields:
        col = table.column(f.name)
        if f.type == "timestamp":
            col = pc.cast(col, pa.int64())
        cols[f.name] = col.to_pylist()
    return cols


def events_table(source: Source, logs: dict[int, PartitionLog], gone: Erased) -> tuple[pa.Table, int]:
    """The valid events of the log read (the master schema: declared fields, ``_partition``, ``_offset``), not
    deduplicated; subjects erased are left out. Returns the table and the number of invalid messages."""
    validate = Validator(source)
    names = [f.name for f in source.fields]
    cols: dict[str, list] = {n: [] for n in names}
    parts: list[int] = []
    offsets: list[int] = []
    invalid = 0
    for p, log in sorted(logs.items()):
        for o, v in zip(log.offsets, log.values, strict=True):
            verdict = validate(v)
            if not verdict.ok:
                invalid += 1
                continue
            rec = verdict.record
            if gone.subjects and rec[source.key] in gone.subjects:
                continue
            for n in names:
                cols[n].append(rec[n])
            parts.append(p)
            offsets.append(o)
    schema = arrow_schema(master_columns(source), nullability=False)
    arrays = [pa.array(cols[f.name], pa.int64()).cast(schema.field(f.name).type) if f.type == "timestamp"
              else pa.array(cols[f.name], schema.field(f.name).type) for f in source.fields]
    arrays += [pa.array(parts, pa.int32()), pa.array(offsets, pa.int64())]
    return pa.Table.from_arrays(arrays, names=[*names, PARTITION_COL, OFFSET_COL]), invalid


def dedup_sql(source: Source, relation: str) -> str:
    """First occurrence per (partition, event id), by offset (the documented dedup rule)."""
    return (f"SELECT * FROM {relation} QUALIFY row_number() OVER (PARTITION BY {PARTITION_COL}, "
            f"{ident(source.event_id)} ORDER BY {OFFSET_COL}) = 1")
