"""The batch/speed handoff rule: offset blocks both sides agree on (docs/design.md, "The handoff rule").

Offsets of every (topic, partition) are cut into blocks of ``block`` offsets: block ``b`` holds offsets
``[b*block, (b+1)*block)``. The rule:

1. A batch version's watermark ``W[p]`` is always a multiple of ``block`` (:func:`aligned_watermark`): it covers
   whole blocks only.
2. The speed layer keeps its aggregates split by ``(partition, block_start)``; a speed row never mixes blocks.
3. Serving keeps exactly the speed rows with ``block_start >= W[p]`` (:func:`speed_row_visible`): together with
   the batch rows (offsets ``< W[p]``) every position is counted on exactly one side.
4. The speed layer may drop a block only when a *published* batch version covers it (``block_start + block <=
   W[p]``, :func:`speed_block_prunable`).

Event time plays no part here: a late event is just a newer offset with an older bucket, so the boundary is exact.
"""

from __future__ import annotations


def block_start(offset: int, block: int) -> int:
    """First offset of the block holding ``offset``."""
    return offset - offset % block


def aligned_watermark(archived_end: int, block: int) -> int:
    """Largest batch watermark allowed when the master dataset holds offsets ``[0, archived_end)``."""
    return archived_end - archived_end % block


def speed_row_visible(row_block_start: int, watermark: int) -> bool:
    """Whether serving counts a speed row of this block given the batch watermark of its partition."""
    return row_block_start >= watermark


def speed_block_prunable(row_block_start: int, block: int, published_watermark: int) -> bool:
    """Whether the speed layer may drop a block: a published batch version covers all of it."""
    return row_block_start + block <= published_watermark
