"""Handing the running speed state off to a newly published batch version: dropping exactly the blocks its
watermark covers (docs/design.md, "Speed handoff", steps 3-4; :mod:`speed.batch_watch` notices the version).

Per partition whose new watermark is above ``pruned_to``, the covered blocks are dropped from the live state, from a
rebuild in progress and from the frozen rows of views being rebuilt; ``pruned_to`` becomes the watermark and a
checkpoint is committed at once. A version with a *lower* watermark than the one handed off to (a forced rollback)
makes the speed layer start again from just below the new watermark, as on a first start.
"""

from __future__ import annotations

from speed.batch_watch import BatchVersion
from speed.recovery import start_from
from speed.state import prune_table


def hand_off_to(layer, batch: BatchVersion) -> None:
    """A new batch version is published: ``layer`` (the running :class:`speed.consumer.SpeedLayer`) drops exactly
    the blocks it covers, then publishes at once."""
    rollback = [tp for tp, w in layer.pruned_to.items() if batch.watermark.get(tp, 0) < w]
    if rollback:
        # The speed state no longer holds what an older batch version leaves uncovered: rebuild from just below
        # the new (lower) watermark. Never exact-by-luck: the lost blocks are recomputed from Kafka.
        layer.notify(f"batch version {batch.version} has a lower watermark than the one already handed off "
                     f"for {rollback}; rebuilding the speed state from there")
        start_from(layer, batch)
        layer.batch = batch
        layer.assign()
        layer.checkpoint(force=True)
        return
    dropped = 0
    for tp, w in batch.watermark.items():
        if tp[0] not in layer.states or w <= layer.pruned_to.get(tp, 0) or tp not in layer.positions:
            continue
        dropped += layer.states[tp[0]].prune(tp[1], w)
        if layer.rebuild is not None:
            layer.rebuild.prune(tp, w)
        for name, kept in layer.frozen.items():
            if kept.table is not None and layer.pipeline.source_of(layer.pipeline.view(name)).topic == tp[0]:
                kept.table = prune_table(kept.table, tp[1], w, layer.block)
        layer.pruned_to[tp] = w
    layer.stats.pruned_rows += dropped
    layer.batch = batch
    layer.checkpoint(force=True)
