"""Incremental speed state: every view's stored aggregates, split by ``(partition, block_start)``.

The state is interpreted from the pipeline declaration only (:class:`lambdalake.pipeline.View`): there is no
per-view code. For each source an *updater* is compiled once from the declaration of its views (the technique
``collections.namedtuple`` uses: generated source text, so the hot loop runs without per-aggregate dispatch).

Layout, per view and partition ``p``:

- the *open block* — the block holding the partition's newest offset — is a ``dict`` ``(keys..., window_start_us)
  -> [stored aggregate values]`` that the updater changes in place;
- *sealed blocks* — every older block — never change again (offsets only grow within a partition), so they are
  converted once to Arrow tables (:class:`Segment`) and then only concatenated into snapshots or dropped by pruning.

So memory grows with the distinct ``keys x buckets x blocks`` of the speed window, not with the number of events,
and a snapshot re-encodes sealed blocks from columnar memory instead of rebuilding them from Python objects.

Aggregate semantics (the same as SQL, which the batch and oracle engines use): ``count`` counts events; ``sum``,
``min`` and ``max`` ignore nulls and stay null while every value seen is null. Window start is the event time floored
to the view's bucket (floor also for times before 1970). A view's filter (``View.where``) is compiled into the
same generated code: an event it does not hold for changes nothing of that view. Decimals are added as their scaled
integers (exact); numbers as Python floats (float64, in offset order). An ``approx_distinct`` value is a DataSketches
HLL sketch object in the open block, updated with each non-null value, and its compact bytes once sealed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from lambdalake import sketches
from lambdalake.exceptions import InvariantViolation
from lambdalake.fields import Source
from lambdalake.handoff import speed_block_prunable
from lambdalake.pipeline import Pipeline, View
from lambdalake.predicates import Predicate, resolve_predicate
from lambdalake.schema import BLOCK_COL, PARTITION_COL, TS_TYPE, arrow_schema, speed_view_columns
from speed.snapshot import ViewFiles, part_name

# Segments of one partition are concatenated into one table once there are this many (bounds per-snapshot work).
MAX_SEGMENTS_PER_PARTITION = 32
# Part files of one view in a snapshot (speed.snapshot): past this many, new rows merge with the newest anyway.
MAX_PART_FILES = 16

Rows = dict[tuple, list]
Updater = Callable[[dict, list[Rows]], None]


def view_schema(view: View, source: Source) -> pa.Schema:
    """Arrow schema of a speed view's stored columns (:func:`lambdalake.schema.speed_view_columns`)."""
    return arrow_schema(speed_view_columns(source, view))


def predicate_code(pred: Predicate, var: dict[str, str]) -> str:
    """A Python expression of a resolved filter (:meth:`lambdalake.pipeline.Pipeline.where`) over the local
    variables ``var[field]``: a comparison or ``in`` on a null field is False, ``and``/``or`` are two-valued.
    Constants are stored values (ints, floats, bools, strings) written with ``repr``."""
    if pred.op in ("and", "or"):
        return "(" + f" {pred.op} ".join(predicate_code(a, var) for a in pred.args) + ")"
    x = var[pred.field]  # type: ignore[index]
    if pred.op == "is_null":
        return f"({x} is None)"
    if pred.op == "not_null":
        return f"({x} is not None)"
    for c in pred.values:
        if type(c) not in (int, float, bool, str):
            raise InvariantViolation(f"filter constant {c!r} of field {pred.field!r} is not a stored value")
    if pred.op == "in":  # a tuple, not a set: True == 1 and 1.0 == 1 would merge in a set of mixed constants
        return f"({x} is not None and {x} in {tuple(pred.values)!r})"
    op = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}[pred.op]
    return f"({x} is not None and {x} {op} {pred.values[0]!r})"


def compile_updater(source: Source, views: Iterable[View]) -> Updater:
    """Build ``update(record, rows_per_view)`` for all views of ``source`` from their declarations.

    ``record`` is a validated event (:class:`lambdalake.validation.Valid` ``.record``); ``rows_per_view[i]`` is the
    open-block dict of view ``i``. Field names are inserted with ``repr`` (and match a strict identifier pattern
    already, see :mod:`lambdalake.fields`), so the generated code cannot be injected into. A view with a filter
    (``View.where``, its constants resolved to stored values against ``source``) only sees the events it holds for.
    """
    views = list(views)
    fields = source.field_map
    needed: list[str] = []
    for v in views:
        for name in v.input_fields:
            if name not in needed:
                needed.append(name)
    var = {name: f"f{i}" for i, name in enumerate(needed)}
    maybe_null = {name: not (fields[name].required and not fields[name].nullable) for name in needed}

    lines = ["def update(rec, rows):", f"    t = rec[{source.event_time!r}]"]
    lines += [f"    {var[n]} = rec[{n!r}]" for n in needed]
    for vi, v in enumerate(views):
        key = "(" + "".join(f"{var[k]}, " for k in v.keys) + f"t - t % {v.bucket_us},)"  # floor, also for t < 0
        init: list[str] = []
        merge: list[str] = []  # statements at the indentation of the else branch
        for j, a in enumerate(v.stored_aggregates):
            if a.kind == "count":
                init.append("1")
                merge.append(f"a[{j}] += 1")
                continue
            x = var[a.column]
            if a.kind == "approx_distinct":  # a DataSketches HLL sketch object, serialized when sealed
                init.append(f"_hll({int(a.lg_k)}, {x})")
                merge += ([f"if {x} is not None:", f"    a[{j}].update({x})"] if maybe_null[a.column]
                          else [f"a[{j}].update({x})"])
                continue
            init.append(x)  # the first value, None if null (SQL: an aggregate of only nulls is null)
            if a.kind == "sum":
                if maybe_null[a.column]:
                    merge += [f"if {x} is not None:", f"    a[{j}] = {x} if a[{j}] is None else a[{j}] + {x}"]
                else:
                    merge.append(f"a[{j}] += {x}")
            else:
                op = "<" if a.kind == "min" else ">"
                cond = (f"{x} is not None and (a[{j}] is None or {x} {op} a[{j}])" if maybe_null[a.column]
                        else f"{x} {op} a[{j}]")
                merge += [f"if {cond}:", f"    a[{j}] = {x}"]
        body = [f"d = rows[{vi}]", f"k = {key}", "a = d.get(k)", "if a is None:",
                f"    d[k] = [{', '.join(init)}]", "else:"]
        body += ["    " + m for m in merge]
        indent = "    "
        if v.where is not None:
            where = resolve_predicate(v.where, source, f"view {v.name!r}")
            lines.append(f"    if {predicate_code(where, var)}:")
            indent = "        "
        lines += [indent + b for b in body]
    code = "\n".join(lines) + "\n"
    namespace: dict = {"_hll": _new_sketch}
    exec(compile(code, f"<speed updater for source {source.name}>", "exec"), namespace)  # noqa: S102
    update = namespace["update"]
    update.__source_code__ = code  # for debugging: print(update.__source_code__)
    return update


def _new_sketch(lg_k: int, value: object):
    s = sketches.new(lg_k)
    if value is not None:
        s.update(value)
    return s


@dataclass
class Segment:
    """Sealed (immutable) blocks ``[first_block, last_block]`` of one partition of one view, as an Arrow table."""

    partition: int
    first_block: int
    last_block: int
    table: pa.Table


class ViewState:
    """The speed state of one view: open-block dicts plus sealed segments, per partition."""

    def __init__(self, view: View, source: Source, block: int):
        self.view = view
        self.block = block
        self.schema = view_schema(view, source)
        self.n_keys = len(view.keys)
        self.n_aggs = len(view.stored_aggregates)
        self.sketch_aggs = [j for j, a in enumerate(view.stored_aggregates) if a.kind == "approx_distinct"]
        self.sealed: dict[int, list[Segment]] = {}
        # What the last committed snapshot holds of the sealed blocks (speed.snapshot.ViewFiles): its part files
        # (name, rows), newest last, and per partition the last block in them. ``rewrite``: the next snapshot
        # writes every sealed row anew (nothing written yet, restored, or pruned: parts may hold dropped rows).
        self.files: list[tuple[str, int]] = []
        self.persisted: dict[int, int] = {}
        self.rewrite = True

    # conversion --------------------------------------------------------------------------------------------------
    def rows_to_table(self, partition: int, block: int, rows: Rows) -> pa.Table:
        """Arrow table of one block's rows (raises InvariantViolation if a sum no longer fits int64)."""
        n = len(rows)
        schema = self.schema
        if n == 0:
            return schema.empty_table()
        # Columns as lists: pyarrow converts a tuple of ints ~40x slower than a list.
        keys = [list(c) for c in zip(*rows.keys(), strict=True)]
        aggs = [list(c) for c in zip(*rows.values(), strict=True)]
        for j in self.sketch_aggs:
            aggs[j] = [sketches.to_bytes(x) for x in aggs[j]]
        data = [pa.array([partition] * n, pa.int32()), pa.array([block] * n, pa.int64())]
        try:
            data += [pa.array(keys[i], schema.field(2 + i).type) for i in range(self.n_keys)]
            data.append(pa.array(keys[self.n_keys], TS_TYPE))
            base = 3 + self.n_keys
            data += [pa.array(aggs[j], schema.field(base + j).type) for j in range(self.n_aggs)]
        except (OverflowError, pa.ArrowInvalid) as exc:
            raise InvariantViolation(f"view {self.view.name!r}: an aggregate of partition {partition}, block "
                                     f"{block} does not fit its column type ({exc}); a sum beyond int64?") from exc
        return pa.Table.from_arrays(data, schema=schema)

    def table_to_rows(self, table: pa.Table) -> Rows:
        """Inverse of :meth:`rows_to_table` for one block (used when a checkpoint is restored)."""
        cols = [table.column(i) for i in range(2, table.num_columns)]
        ws = self.n_keys  # index of window_start within cols
        pycols = [c.cast(pa.int64()).to_pylist() if i == ws else c.to_pylist() for i, c in enumerate(cols)]
        for j in self.sketch_aggs:
            pycols[ws + 1 + j] = [sketches.from_bytes(b) for b in pycols[ws + 1 + j]]
        nk = self.n_keys + 1
        return {tuple(r[:nk]): list(r[nk:]) for r in zip(*pycols, strict=True)} if pycols else {}

    # sealed segments ---------------------------------------------------------------------------------------------
    def add_sealed(self, segment: Segment) -> None:
        segs = self.sealed.setdefault(segment.partition, [])
        if segs and segment.first_block <= segs[-1].last_block:
            raise InvariantViolation(f"view {self.view.name!r}: sealing block {segment.first_block} of partition "
                                     f"{segment.partition} again (last sealed {segs[-1].last_block})")
        segs.append(segment)
        if len(segs) > MAX_SEGMENTS_PER_PARTITION:
            merged = pa.concat_tables([s.table for s in segs]).combine_chunks()
            self.sealed[segment.partition] = [Segment(segment.partition, segs[0].first_block, segs[-1].last_block,
                                                      merged)]

    def prune_sealed(self, partition: int, watermark: int) -> int:
        """Drop sealed blocks of ``partition`` that a published watermark covers; returns rows dropped."""
        segs = self.sealed.get(partition)
        if not segs:
            return 0
        kept: list[Segment] = []
        dropped = 0
        for s in segs:
            if speed_block_prunable(s.last_block, self.block, watermark):
                dropped += s.table.num_rows
            elif speed_block_prunable(s.first_block, self.block, watermark):
                # Split inside the segment: keep exactly the blocks the watermark does not cover.
                keep = pc.greater(pc.add(s.table.column(BLOCK_COL), self.block), watermark)
                t = s.table.filter(keep)
                dropped += s.table.num_rows - t.num_rows
                if t.num_rows:
                    kept.append(Segment(partition, pc.min(t.column(BLOCK_COL)).as_py(), s.last_block, t))
            else:
                kept.append(s)
        self.sealed[partition] = kept
        if dropped:
            self.rewrite = True
        return dropped

    def snapshot_files(self, snap: str, previous: str | None, base: pa.Table) -> ViewFiles:
        """This view's files in snapshot ``snap`` (the one after ``previous``, whose parts :attr:`files` are), with
        ``base`` the open blocks' rows; records them as committed (a failed commit ends the speed layer, whose
        restart restores and rewrites). New sealed rows join the newest parts not larger than them (at most
        :data:`MAX_PART_FILES` parts)."""
        name = self.view.name
        if self.rewrite or previous is None:
            kept: list[tuple[str, int]] = []
            new_parts = [s.table for segs in self.sealed.values() for s in segs]
        else:
            kept = list(self.files)
            new_parts = []
            for p, segs in self.sealed.items():
                upto = self.persisted.get(p, -1)
                for seg in segs:
                    if seg.first_block > upto:
                        new_parts.append(seg.table)
                    elif seg.last_block > upto:  # merged segments: part of it is in the files already
                        new_parts.append(seg.table.filter(pc.greater(seg.table.column(BLOCK_COL), upto)))
        new = pa.concat_tables(new_parts) if new_parts else None
        if new is not None and not new.num_rows:
            new = None
        rows = 0 if new is None else new.num_rows
        merge: list[tuple[str, int]] = []
        if rows:
            while kept and (kept[-1][1] <= rows or len(kept) >= MAX_PART_FILES):
                merge.insert(0, kept.pop())
                rows += merge[0][1]
        self.files = kept + ([(part_name(name, snap), rows)] if rows else [])
        self.persisted = {p: segs[-1].last_block for p, segs in self.sealed.items() if segs}
        self.rewrite = False
        return ViewFiles(base, keep=tuple(f for f, _ in kept), merge=tuple(f for f, _ in merge),
                         new=new, previous=previous,
                         rows=sum(n for _, n in self.files) + base.num_rows)

    def sealed_rows(self) -> int:
        return sum(s.table.num_rows for segs in self.sealed.values() for s in segs)


class SourceState:
    """State of every view of one source, with the open block per partition shared by those views."""

    def __init__(self, source: Source, views: Iterable[View], block: int):
        self.source = source
        self.block = block
        self.views = [ViewState(v, source, block) for v in views]
        self.update = compile_updater(source, [vs.view for vs in self.views])
        self.open_block: dict[int, int] = {}  # partition -> block_start of its open block
        self.open_rows: dict[int, list[Rows]] = {}  # partition -> one dict per view

    def rows_for(self, partition: int, offset: int) -> list[Rows]:
        """The open-block dicts for ``offset``; seals the partition's previous block when a new one begins."""
        bs = offset - offset % self.block
        cur = self.open_block.get(partition)
        if cur == bs:
            return self.open_rows[partition]
        if cur is not None:
            if bs < cur:
                raise InvariantViolation(f"source {self.source.name!r} partition {partition}: offset {offset} is "
                                         f"behind the open block {cur}; offsets must only grow")
            self.seal(partition)
        self.open_block[partition] = bs
        rows = self.open_rows[partition] = [{} for _ in self.views]
        return rows

    def seal(self, partition: int) -> None:
        """Convert the partition's open block to sealed Arrow segments."""
        bs = self.open_block.pop(partition, None)
        rows = self.open_rows.pop(partition, None)
        if bs is None or rows is None:
            return
        for vs, r in zip(self.views, rows, strict=True):
            if r:
                vs.add_sealed(Segment(partition, bs, bs, vs.rows_to_table(partition, bs, r)))

    def prune(self, partition: int, watermark: int) -> int:
        """Drop every block of ``partition`` that ``watermark`` covers (and nothing else). Returns rows dropped."""
        dropped = sum(vs.prune_sealed(partition, watermark) for vs in self.views)
        bs = self.open_block.get(partition)
        if bs is not None and speed_block_prunable(bs, self.block, watermark):
            dropped += sum(len(r) for r in self.open_rows[partition])
            del self.open_block[partition], self.open_rows[partition]
        return dropped

    def clear(self) -> None:
        self.open_block.clear()
        self.open_rows.clear()
        for vs in self.views:
            vs.sealed.clear()
            vs.files, vs.persisted, vs.rewrite = [], {}, True

    def _open_tables(self, i: int) -> list[pa.Table]:
        """The open blocks' rows of view ``i``, one table per partition that has some."""
        vs = self.views[i]
        return [vs.rows_to_table(p, bs, self.open_rows[p][i]) for p, bs in self.open_block.items()
                if self.open_rows[p][i]]

    def view_tables(self) -> dict[str, pa.Table]:
        """Every view's full state as one Arrow table (sealed segments + open blocks)."""
        out = {}
        for i, vs in enumerate(self.views):
            parts = [s.table for segs in vs.sealed.values() for s in segs] + self._open_tables(i)
            out[vs.view.name] = pa.concat_tables(parts) if parts else vs.schema.empty_table()
        return out

    def view_files(self, snap: str, previous: str | None) -> dict[str, ViewFiles]:
        """Every view's files in snapshot ``snap`` (:meth:`ViewState.snapshot_files`; the open blocks as its base)."""
        out = {}
        for i, vs in enumerate(self.views):
            parts = self._open_tables(i)
            base = pa.concat_tables(parts) if parts else vs.schema.empty_table()
            out[vs.view.name] = vs.snapshot_files(snap, previous, base)
        return out

    def restore(self, tables: dict[str, pa.Table], next_offsets: dict[int, int]) -> None:
        """Load the state from snapshot tables; ``next_offsets`` = positions S[p] of the snapshot's source."""
        self.clear()
        self._check(tables)
        for p, nxt in next_offsets.items():
            self.open_block[p] = nxt - nxt % self.block
            self.open_rows[p] = [{} for _ in self.views]
        for i, vs in enumerate(self.views):
            table = tables[vs.view.name]
            if table.num_rows:
                self._load(i, vs, table, sorted(pc.unique(table.column(PARTITION_COL)).to_pylist()), next_offsets)

    def load_partition(self, partition: int, tables: dict[str, pa.Table], next_offset: int) -> None:
        """Replace what this state holds of ``partition`` by its rows in snapshot ``tables`` (another worker's, at
        its position ``next_offset``): a partition taken over with its previous owner's state
        (:mod:`speed.adoption`). The next snapshot writes every view's sealed rows anew."""
        self._check(tables)
        for vs in self.views:
            vs.sealed.pop(partition, None)
            vs.rewrite = True
        self.open_block[partition] = next_offset - next_offset % self.block
        self.open_rows[partition] = [{} for _ in self.views]
        for i, vs in enumerate(self.views):
            table = tables[vs.view.name]
            if table.num_rows:
                self._load(i, vs, table.filter(pc.equal(table.column(PARTITION_COL), partition)), [partition],
                           {partition: next_offset})

    def _check(self, tables: dict[str, pa.Table]) -> None:
        for vs in self.views:
            table = tables.get(vs.view.name)
            if table is None:
                raise InvariantViolation(f"snapshot has no table for view {vs.view.name!r}")
            if not table.schema.equals(vs.schema):
                raise InvariantViolation(f"view {vs.view.name!r}: snapshot columns {table.schema.names} differ from "
                                         f"the declaration's {vs.schema.names}; did the pipeline change? Remove "
                                         "the speed checkpoint to rebuild it")

    def _load(self, i: int, vs: ViewState, table: pa.Table, parts: list[int], next_offsets: dict[int, int]) -> None:
        """Rows of ``parts`` in ``table`` into view ``i``: the open block's as dicts, older blocks sealed."""
        for p in parts:
            tp = table.filter(pc.equal(table.column(PARTITION_COL), p))
            if not tp.num_rows:
                continue
            open_bs = self.open_block.get(p)
            blocks = tp.column(BLOCK_COL)
            if open_bs is not None:
                if pc.max(blocks).as_py() > open_bs:
                    raise InvariantViolation(f"view {vs.view.name!r}: snapshot has block "
                                             f"{pc.max(blocks).as_py()} of partition {p} beyond its position "
                                             f"{next_offsets[p]}")
                is_open = pc.equal(blocks, open_bs)
                self.open_rows[p][i] = vs.table_to_rows(tp.filter(is_open))
                tp = tp.filter(pc.invert(is_open))
            elif tp.num_rows:
                raise InvariantViolation(f"view {vs.view.name!r}: snapshot has rows of partition {p} but no "
                                         "position for it")
            if tp.num_rows:
                tp = tp.sort_by(BLOCK_COL).combine_chunks()
                b = tp.column(BLOCK_COL)
                vs.sealed[p] = [Segment(p, pc.min(b).as_py(), pc.max(b).as_py(), tp)]

    def rows(self) -> int:
        return sum(vs.sealed_rows() for vs in self.views) + sum(
            len(r) for rows in self.open_rows.values() for r in rows)


def build_states(pipeline: Pipeline, block: int, views: Iterable[str] | None = None) -> dict[str, SourceState]:
    """One :class:`SourceState` per source topic, over the declared views named in ``views`` (default: all of them;
    a source without views only advances positions)."""
    names = None if views is None else set(views)
    return {s.topic: SourceState(s, [v for v in pipeline.views_of(s) if names is None or v.name in names], block)
            for s in pipeline.sources}


@dataclass
class Applied:
    """Counts of one batch of records (only offsets at or above the handed-off floor are counted)."""

    valid: int = 0
    invalid: int = 0
    duplicates: int = 0

    def add_to(self, counters: dict[str, int]) -> None:
        """Add to a source's counters (the ``counters`` of the snapshot contract)."""
        counters["valid"] += self.valid
        counters["invalid"] += self.invalid
        counters["duplicates"] += self.duplicates


def apply_records(records: list, *, partition: int, position: int, floor: int, state: SourceState,
                  validate: Callable, window, pending: Callable[[tuple[int, str]], None], event_id: str,
                  erased: frozenset[str] = frozenset()) -> Applied:
    """The hot loop, shared by the live consumer and a rebuild: validate, dedup, aggregate one partition's records
    (in offset order). Offsets below ``position`` are skipped (never applied twice); offsets below ``floor`` (the
    handed-off batch watermark) only fill the dedup window ``window`` (first occurrences go to ``pending`` too).
    Events of the subjects ``erased`` (forgotten, :mod:`lambdalake.erasure`) are skipped before dedup, as the batch
    side (whose master no longer holds them) skips them."""
    subject = state.source.key
    seen = window.seen
    update = state.update
    block = state.block
    rows = None
    cur_bs = -1
    valid = invalid = dups = 0
    for r in records:
        o = r.offset
        if o < position:  # paranoid: a record already applied must never be applied twice
            continue
        v = validate(r.value)
        if not v.ok:
            if o >= floor:
                invalid += 1
            continue
        rec = v.record
        if erased and rec[subject] in erased:
            continue
        eid = rec[event_id]
        if seen(eid, o):
            if o >= floor:
                dups += 1
            continue
        pending((o, eid))
        if o < floor:
            continue  # the published batch version counts it; only the dedup window needed it
        valid += 1
        bs = o - o % block
        if bs != cur_bs:
            rows = state.rows_for(partition, o)
            cur_bs = bs
        update(rec, rows)
    return Applied(valid, invalid, dups)


def prune_table(table: pa.Table, partition: int, watermark: int, block: int) -> pa.Table:
    """Rows of ``table`` (any speed view schema) that a published watermark of ``partition`` does not cover."""
    covered = pc.and_(pc.equal(table.column(PARTITION_COL), partition),
                      pc.less_equal(pc.add(table.column(BLOCK_COL), block), watermark))
    return table.filter(pc.invert(covered))
