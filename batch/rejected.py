"""Rejected messages judged again under the declared rules: how a *loosened* field rule reaches the batch side.

The archiver keeps every range's invalid messages in the lake (rejected files, :mod:`batch.master`), tagged with the
:func:`lambdalake.validation.rules_fingerprint` they were judged by. When a source's declared rules differ from a
file's (a raised ``maximum``, a field made optional, a wider ``pattern``, ...), :func:`revalidated_rows` validates its
messages again with the product's own validator (the one the archiver and the speed layer run) and returns those
now valid as master rows. The batch job (and its independent check, :mod:`batch.verify`) read them together with
the master files, before dedup — so a message rejected at offset 5 and now valid is the first occurrence of its
event id, exactly as the speed layer, which re-reads the log, sees it.

Files judged by the declared rules are skipped from their footer alone: in a lake whose rules never changed this
reads nothing. Messages archived by a release without rejected files (before format 2 of the manifest) are only in
the dead-letter topic: a loosened rule cannot bring those back on the batch side (docs/pipelines.md, "Changing a view").
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch.master import master_schema, master_table, rejected_rules
from lambdalake.erasure import erased_subjects
from lambdalake.fields import Source
from lambdalake.heads import rejected_files
from lambdalake.layout import Layout, MasterFile
from lambdalake.schema import INGEST_COL, OFFSET_COL, VALUE_COL
from lambdalake.storage.files import data_files
from lambdalake.validation import Validator, rules_fingerprint


def rejudged_files(layout: Layout, source: Source, watermark: Mapping[int, int]) -> list[MasterFile]:
    """The rejected files of ``source`` below ``watermark`` ({partition: W}) judged by other rules than declared."""
    declared = rules_fingerprint(source)
    files = data_files(layout.store)
    return [f for f in rejected_files(layout, source.name)
            if f.start < watermark.get(f.partition, 0)
            and rejected_rules(files.parquet(layout.key(f.path)).schema_arrow) != declared]


def revalidated_rows(layout: Layout, source: Source, files: list[MasterFile], watermark: Mapping[int, int],
                     skip: frozenset[str] = frozenset()) -> pa.Table:
    """Master rows (:func:`batch.master.master_schema`) of the messages in ``files`` below ``watermark`` that are
    valid under ``source``'s declared rules, in (partition, offset) order; events of the subjects ``skip`` (erased:
    :mod:`lambdalake.erasure`) left out."""
    validate = Validator(source)
    names = [f.name for f in source.fields]
    tables = [master_schema(source).empty_table()]
    lake = data_files(layout.store)
    for f in files:
        w = watermark.get(f.partition, 0)
        t = lake.read_table(layout.key(f.path), columns=[OFFSET_COL, INGEST_COL, VALUE_COL])
        cols: dict[str, list] = {n: [] for n in names}
        offsets: list[int] = []
        ingest: list[int] = []
        for off, ing, value in zip(t.column(OFFSET_COL).to_pylist(), t.column(INGEST_COL).cast(pa.int64()).to_pylist(),
                                   t.column(VALUE_COL).to_pylist(), strict=True):
            if off >= w:
                break
            verdict = validate(value)
            if verdict.ok and verdict.record[source.key] not in skip:
                for n in names:
                    cols[n].append(verdict.record[n])
                offsets.append(off)
                ingest.append(ing)
        if offsets:
            tables.append(master_table(source, cols, f.partition, offsets, ingest))
    return pa.concat_tables(tables)


def write_revalidated(layout: Layout, source: Source, files: list[MasterFile], watermark: Mapping[int, int],
                      prefix: str, skip: frozenset[str] = frozenset()) -> tuple[str | None, int]:
    """:func:`revalidated_rows` of ``files`` written into the lake as ``<prefix>/<source>.parquet`` (master schema,
    readable with the master files by Spark's executors, wherever they run): (that key or None when no message is
    valid now, how many are)."""
    rows = revalidated_rows(layout, source, files, watermark, skip) if files else None
    if rows is None or not rows.num_rows:
        return None, 0
    key = f"{prefix}/{source.name}.parquet"
    data_files(layout.store).write_table(rows, key)
    return key, rows.num_rows


def revalidated_file(layout: Layout, source: Source, watermark: Mapping[int, int], directory: Path) -> Path | None:
    """:func:`revalidated_rows` of every rejected file of ``source`` to judge again below ``watermark``, written to
    the local file ``directory/<source>.parquet`` (None when no message is valid now)."""
    files = rejudged_files(layout, source, watermark)
    rows = revalidated_rows(layout, source, files, watermark, erased_subjects(layout, source.name)) if files else None
    if rows is None or not rows.num_rows:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{source.name}.parquet"
    pq.write_table(rows, path)
    return path
