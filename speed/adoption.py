"""A partition a group member is assigned, taken over with its previous owner's state (docs/design.md, "Ownership is
per partition").

Without it, a member that gets a partition it holds no state for starts just below the published batch watermark
and reads again everything since — after a long stretch without a batch run, much more than the dedup window. With
it, the member reads the **last committed checkpoint of the worker whose published snapshot serves the partition**
(the highest epoch for it, :mod:`lambdalake.speedset`), read only (:meth:`speed.checkpoint.CheckpointStore.peek`),
and loads the partition's rows, position, covered offsets and dedup window from it: it continues at that worker's
position ``S[p]``. Exact: that checkpoint is exact for the partition at ``S[p]`` (speed invariant, per partition),
whatever its worker does afterwards — a previous owner still running has frozen the partition (no longer reads it),
and a paused one that wakes up publishes only the epoch the new owner's claim outranks.

Taken only when it is the same computation: the checkpoint holds the partition with the epoch that is published for
it, every view of the partition's source has the declared definition on both sides with no rebuild under way, and
that worker's state reflects every erasure of the source (``lambdalake forget``); else the member starts from the
batch watermark, as before. ``LAMBDALAKE_SPEED_ADOPT=0`` turns it off (the
benchmark compares both).
"""

from __future__ import annotations

import logging
import os
import time

import pyarrow as pa

from lambdalake.dedup import DedupWindow
from lambdalake.erasure import read_requests
from lambdalake.exceptions import LambdalakeError
from lambdalake.layout import Layout
from lambdalake.speedset import epoch_of
from speed.checkpoint import TP, CheckpointStore, Restored
from speed.rebuild import replay_start

log = logging.getLogger(__name__)

PEEK_ATTEMPTS = 5


def enabled() -> bool:
    return os.environ.get("LAMBDALAKE_SPEED_ADOPT", "1").strip() not in ("0", "false", "no")


def serving_owner(snapshots: list, key: TP) -> str | None:
    """The worker whose published snapshot serves ``key`` (highest epoch, then newest), or None."""
    best = None
    for worker, _, meta in snapshots:
        if key in meta.positions:
            rank = (epoch_of(meta, key), meta.created_at_unix or 0.0)
            if best is None or rank > best[0]:
                best = (rank, worker)
    return None if best is None else best[1]


def adopt_partition(layer, key: TP, snapshots: list, cache: dict[str, Restored | None]) -> str | None:
    """Load ``key`` from the checkpoint of the worker serving it (module docstring) into ``layer``; that worker's
    name, or None when it cannot be taken (then nothing changed). ``cache``: checkpoints read in this assignment."""
    worker = serving_owner(snapshots, key)
    if worker is None or worker == layer.worker or layer.rebuild is not None or layer.frozen:
        return None
    state = layer.states.get(key[0])
    if state is None:
        return None
    if worker not in cache:
        store = CheckpointStore(layer.layout.root().for_speed_worker(worker), layer.pipeline)
        cache[worker] = None
        for attempt in range(PEEK_ATTEMPTS):  # a worker still running commits and prunes while it is read
            try:
                cache[worker] = store.peek(layer.block)
                break
            except (OSError, LambdalakeError, pa.ArrowException) as exc:  # pruned meanwhile, or not readable
                if attempt == PEEK_ATTEMPTS - 1:
                    log.info("cannot take %s over from %s's checkpoint (%s): starting from the batch watermark",
                             key, worker, exc)
                else:
                    time.sleep(0.05)
    restored = cache[worker]
    if restored is None or not _erasures_applied(layer, key, worker):
        return None
    cp = restored.checkpoint
    published = max((epoch_of(m, key) for w, _, m in snapshots if w == worker and key in m.positions), default=-1)
    if key not in cp.positions or cp.epochs.get(key, 0) != published or key not in restored.windows:
        return None
    names = [vs.view.name for vs in state.views]
    for name in names:
        sv = cp.views.get(name)
        if sv is None or sv.fingerprint != layer.fingerprints.get(name) or sv.positions is not None \
                or name not in restored.tables:
            return None
    position = cp.positions[key]
    if position < replay_start(layer.batch.watermark.get(key, 0), layer.options.dedup_span):
        return None  # the batch side is further on: starting below its watermark reads less
    state.load_partition(key[1], {n: restored.tables[n] for n in names}, position)
    layer.positions[key] = position
    layer.pruned_to[key] = cp.pruned_to.get(key, 0)
    span = layer.options.dedup_span
    window = restored.windows[key]
    layer.windows[key] = window if window.span == span else DedupWindow.from_items(span, window.items())
    layer.new_ids[key] = []
    layer.full_dedup = True
    return worker


def _erasures_applied(layer, key: TP, worker: str) -> bool:
    """Whether ``worker``'s committed state reflects every erasure request of ``key``'s source (it is among the
    request's ``speed_workers_corrected``): rows it held before a subject was forgotten must not come back."""
    source = layer.sources[key[0]].name
    root = Layout.of(layer.settings.home, layer.settings.lake)
    return all(worker in req.speed_workers_corrected for req in read_requests(root, source))
