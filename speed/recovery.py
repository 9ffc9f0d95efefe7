"""Where the speed layer starts: its state restored from the last checkpoint, or empty just below the published
batch version.

From the last checkpoint's positions (``seek``; Kafka's committed offsets are never read). Without a checkpoint
but with a published batch version of watermark ``W``, from ``max(0, W[p] - dedup_span)`` — offsets below ``W[p]``
only fill the dedup window, so ids the batch side already counted are still recognised. Otherwise from the
beginning of the log. A checkpoint of partitions another worker took over since is outdated: the worker starts
fresh from the batch version instead (:mod:`speed.partitions`). The views the checkpoint holds are taken over for
the declared pipeline by :func:`speed.changed_views.adopt`.

``layer`` is the :class:`speed.consumer.SpeedLayer` being started (its partitions already owned).
"""

from __future__ import annotations

from lambdalake.dedup import DedupWindow
from speed.batch_watch import BatchVersion, published_batch
from speed.changed_views import KeptRows, adopt, cancel_rebuild
from speed.rebuild import replay_start
from speed.state import build_states


def recover(layer) -> None:
    """Load the last checkpoint, or start fresh from the published batch version (module docstring). A checkpoint
    holding a partition that another worker took over since (a higher published epoch) is outdated: the worker
    starts fresh from the batch version instead, like a new worker."""
    restored = layer.store.load(layer.block)
    layer.batch = published_batch(layer.layout, layer.block)
    owned = layer.owned
    if restored is not None:
        cp = restored.checkpoint
        mine = owned.in_checkpoint(cp)
        moved = owned.taken_over(mine)
        if moved:
            layer.notify(f"partitions {moved} were taken over by another speed worker after checkpoint {cp.id}; "
                         "starting this worker from the published batch version instead")
            restored = None
    if restored is None:
        owned.claim_anew()
        start_from(layer, layer.batch)
        layer.seq = layer.store.next_seq()
        return
    owned.resume(mine)
    cp = restored.checkpoint
    layer.last = cp
    layer.positions = {tp: n for tp, n in cp.positions.items()
                       if tp[0] in layer.sources and layer.share.owns(tp[1])}
    layer.pruned_to = {tp: n for tp, n in cp.pruned_to.items()
                       if tp[0] in layer.sources and layer.share.owns(tp[1])}
    for t, c in cp.counters.items():
        if t in layer.counters:
            layer.counters[t].update(c)
    span = layer.options.dedup_span
    layer.windows = {tp: (w if w.span == span else DedupWindow.from_items(span, w.items()))
                     for tp, w in restored.windows.items() if tp[0] in layer.sources}
    if any(tp[0] not in layer.sources for tp in cp.positions):
        layer.full_dedup = True  # a source was removed: no dedup chunk of its topics may be carried on
    if cp.format < 2:
        layer.notify(f"speed checkpoint {cp.id} was written by lambdalake 0.1 (no view fingerprints): rebuilding "
                     "every view once from the log")
    adopt(layer, {name: KeptRows(sv.fingerprint, restored.tables[name],
                                 cp.positions if sv.positions is None else sv.positions)
                  for name, sv in cp.views.items() if sv.fingerprint})
    layer.seq = layer.store.next_seq()
    layer.dirty = layer.rebuild is not None or set(cp.views) != set(layer.fingerprints)


def start_from(layer, batch: BatchVersion) -> None:
    """Empty state positioned just below the batch watermark (dedup fill only below it): every declared view is
    built from there, so nothing is left to rebuild."""
    cancel_rebuild(layer)
    layer.frozen = {}
    layer.states = build_states(layer.pipeline, layer.block)
    layer.windows.clear()
    layer.new_ids.clear()
    layer.positions = {tp: replay_start(w, layer.options.dedup_span) for tp, w in batch.watermark.items()
                       if tp[0] in layer.sources and layer.share.owns(tp[1])}
    layer.pruned_to = {tp: w for tp, w in batch.watermark.items()
                       if tp[0] in layer.sources and layer.share.owns(tp[1])}
    for c in layer.counters.values():
        c.update(valid=0, invalid=0, duplicates=0)
    layer.full_dedup = True  # older dedup chunks hold ids above the new positions: never reuse them
    layer.dirty = True
