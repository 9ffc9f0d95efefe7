"""What a speed checkpoint captures of the running layer: step 1 of the commit protocol, on the consumer thread
(:meth:`speed.checkpoint.CheckpointStore.commit` does steps 2-8 in the writer thread).

A :class:`speed.checkpoint.Capture` holds only immutable Arrow tables and copies, so the live state may change right
after: the snapshot's tables (what changed since the last committed snapshot, see :mod:`speed.snapshot`; a view being
rebuilt keeps its old definition's rows, labelled as such), positions, counters, fingerprints, ownership epochs and
the dedup rows (the delta since the previous checkpoint, or the whole windows).
"""

from __future__ import annotations

import time

from lambdalake.contracts import SNAPSHOT_FORMAT, Positions, SpeedSnapshotMeta, SpeedView, utc_now_iso
from speed import snapshot as snapshots
from speed.checkpoint import FORMAT as CHECKPOINT_FORMAT
from speed.checkpoint import Capture, Checkpoint


def capture(layer) -> Capture:
    """Step 1: the snapshot's tables (immutable Arrow), positions, counters, fingerprints, dedup rows of ``layer``
    (a :class:`speed.consumer.SpeedLayer`); the next checkpoint's sequence number is taken and the state counts as
    clean from here."""
    now = time.time()
    cid = snapshots.snapshot_id(layer.seq)
    tables, views = view_files(layer, cid)
    counters = {t: dict(c) for t, c in layer.counters.items()}
    cp = Checkpoint(checkpoint=cid, snapshot=cid, pipeline=layer.pipeline.name, positions=Positions(layer.positions),
                    pruned_to=Positions(layer.pruned_to), counters=counters, dedup_span=layer.options.dedup_span,
                    block=layer.block, batch_version=layer.batch.version, created_at=now, views=views,
                    format=CHECKPOINT_FORMAT,
                    epochs=Positions({tp: e for tp, e in layer.owned.epochs.items() if tp in layer.positions}))
    meta = SpeedSnapshotMeta(pipeline=layer.pipeline.name, positions=cp.positions, pruned_to=cp.pruned_to,
                             block=layer.block, created_at=utc_now_iso(), created_at_unix=now,
                             batch_version=layer.batch.version, counters=counters,
                             rows={name: vf.rows for name, vf in tables.items()}, views=views,
                             format=SNAPSHOT_FORMAT, worker=layer.worker, epochs=cp.epochs)
    full = layer.full_dedup or layer.store.needs_full_dedup(layer.last, cp.positions, cp.dedup_span)
    delta, layer.new_ids = layer.new_ids, {k: [] for k in layer.new_ids}
    dedup_rows = {tp: w.items() for tp, w in layer.windows.items()} if full else delta
    layer.full_dedup = False
    layer.seq += 1
    layer.dirty = False
    return Capture(cp, tables, meta, dedup_rows, full, layer.last)


def view_files(layer, snap: str) -> tuple[dict[str, snapshots.ViewFiles], dict[str, SpeedView]]:
    """Every view's files in snapshot ``snap`` (what changed since the last committed one, see
    :mod:`speed.snapshot`) and the definition that made its rows."""
    previous = None if layer.last is None else layer.last.snapshot
    tables: dict[str, snapshots.ViewFiles] = {}
    for st in layer.states.values():
        tables.update(st.view_files(snap, previous))
    views: dict[str, SpeedView] = {}
    progress = None if layer.rebuild is None else round(layer.rebuild.progress(layer.positions), 4)
    for name, fp in layer.fingerprints.items():
        if name in tables:
            views[name] = SpeedView(fp, rows=tables[name].rows)
            continue
        kept = layer.frozen[name]  # being rebuilt: the old definition's rows, labelled as such, written whole
        if kept.table is not None:
            tables[name] = snapshots.ViewFiles(kept.table, rows=kept.table.num_rows)
        topic = layer.pipeline.source_of(layer.pipeline.view(name)).topic
        views[name] = SpeedView(kept.fingerprint, rows=0 if kept.table is None else kept.table.num_rows,
                                target=fp, progress=progress,
                                positions=None if kept.covers is None else Positions(
                                    {tp: n for tp, n in kept.covers.items() if tp[0] == topic}))
    return tables, views
