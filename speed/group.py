"""Speed workers as members of a consumer group (``lambdalake speed --group``; docs/design.md, "Ownership is per
partition").

Kafka's group protocol (cooperative-sticky: a rebalance moves only the partitions that must move) assigns the
partitions; this module keeps the speed invariant across every move:

- **Claim** (:func:`take`): a partition the group assigns gets a new *ownership epoch*, claimed by compare-and-swap
  of its owner record ``checkpoints/speed/owners/<topic>-p<p>.json`` (:func:`claim_epoch`): one more than the
  record and than any published snapshot holds, so no two claims ever get the same epoch, whoever races. A
  partition this worker still holds state for (its own checkpoint, or a partition it gave up and gets back) resumes
  from that state — exact for its positions whatever happened meanwhile; any other is taken over with the state of
  the worker serving it, from that worker's last checkpoint (:mod:`speed.adoption`), or, where that is not the
  same computation, starts just below the published batch watermark, like a new worker.
- **Hand over** (:func:`release`): a revoked or lost partition is *frozen*, not dropped: this worker stops reading
  it but keeps publishing its rows and positions with its old epoch, so serving (which takes each partition from
  the snapshot with the highest epoch, :mod:`lambdalake.speedset`) keeps an exact answer for it until the new
  owner publishes. :func:`drop_superseded` then drops it once a higher epoch is published for it.
- **Fencing**: a worker paused past its session (GC, SIGSTOP, a network partition) that wakes up and publishes
  still carries its old epoch for the partitions it lost: readers take the new owner's higher one. Nothing it
  writes for them is served.

A rebalance while changed views are being rebuilt from the log (:mod:`speed.rebuild`) cancels the rebuild and
starts every assigned partition from the batch watermark (every view of its declared definition); the partitions
frozen then are dropped at once (until their new owners publish, serving does not cover them above the watermark —
the one case a rebalance costs freshness, never exactness of what is covered).
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import uuid

import msgspec

from lambdalake import contracts
from lambdalake.dedup import DedupWindow
from lambdalake.layout import Layout
from lambdalake.locks import group_presence
from lambdalake.speedset import best_epochs, worker_snapshots
from lambdalake.storage.base import ObjectMissing, StorageError
from lambdalake.storage.local import LocalStore
from speed import adoption
from speed.changed_views import cancel_rebuild
from speed.checkpoint import TP, CheckpointStore
from speed.exceptions import SpeedAlreadyRunning
from speed.rebuild import replay_start
from speed.recovery import recover, start_from

log = logging.getLogger(__name__)

OWNERS = "checkpoints/speed/owners"
MAX_SWAPS = 200
MAX_MEMBERS = 64  # member names per machine
DROPPED = 2 ** 62  # a "watermark" above every offset: pruning to it drops every block of a partition


def group_config() -> dict:
    """The kafka-python settings of a member (the session short enough that a dead member's partitions move
    within seconds; the broker's minimum is 6 s by default)."""
    from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor

    return {"partition_assignment_strategy": (CooperativeStickyAssignor,), "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1500, "max_poll_interval_ms": 300_000}


class OwnerRecord(msgspec.Struct, kw_only=True):
    """``checkpoints/speed/owners/<topic>-p<p>.json``: the last epoch claimed for a partition, by whom."""

    topic: str
    partition: int
    epoch: int
    owner: str
    writer: str
    seq: int


def owner_key(key: TP) -> str:
    return f"{OWNERS}/{key[0]}-p{key[1]}.json"


def member_name(index: int, machine: str = "") -> str:
    """A member's name (its directory under ``views/speed/workers/``): ``g-<host>[-<machine>]-<index>``.
    ``machine`` tells apart work directories of one host on a lake on object storage, whose member locks are each
    work directory's own (two of them must never pick the same name: they would fence each other)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:60] or "host"
    return f"g-{host}{'-' + machine if machine else ''}-{index}"


def member(root: Layout, pipeline, options) -> tuple[str, Layout, CheckpointStore]:
    """The first member name of this machine whose checkpoint lock is free, taken (``options.worker_name``: that
    one): (name, its layout, its checkpoint store, locked). A member restarted on the same machine usually gets its
    old name back, so it resumes from its own checkpoint."""
    machine = "" if isinstance(root.store, LocalStore) else hashlib.sha256(str(root.home).encode()).hexdigest()[:6]
    names = [options.worker_name] if options.worker_name else [member_name(i, machine) for i in range(MAX_MEMBERS)]
    for i, name in enumerate(names):
        layout = root.for_speed_worker(name)
        store = CheckpointStore(layout, pipeline, keep_snapshots=options.keep_snapshots,
                                keep_snapshot_seconds=options.keep_snapshot_seconds)
        try:
            store.lock()
        except SpeedAlreadyRunning:
            if i == len(names) - 1:
                raise
            continue
        return name, layout, store
    raise SpeedAlreadyRunning(f"no free member name among {names[0]}..{names[-1]}")


def presence(home, member: bool, group_id: str):
    """Members hold ``checkpoints/speed/group.lock`` shared while they run; a pinned worker (``--until-caught-up``,
    ``--share``, ``--partitions``, ``--no-group``) refuses to start next to them with :class:`SpeedAlreadyRunning`:
    both would read the same partitions and claim epochs over each other (:func:`lambdalake.locks.group_presence`)."""
    return group_presence(Layout(home).checkpoints("speed") / "group.lock", member, "the speed group lock",
                          lambda: SpeedAlreadyRunning(f"speed workers (members of the group {group_id}) run on {home}; "
                                                      "a pinned speed worker would read their partitions too: stop "
                                                      "them first, or let them serve"))


def claim_epoch(root: Layout, key: TP, owner: str, floor: int = -1) -> int:
    """Claim the next epoch of ``key`` by compare-and-swap of its owner record: one more than the record's and
    than ``floor`` (the highest published). A swap whose answer was lost is recognised by its writer and seq."""
    store, k, writer = root.store, owner_key(key), uuid.uuid4().hex
    for _ in range(MAX_SWAPS):
        try:
            got = store.get_versioned(k)
            rec, etag = contracts.decode(got.data, OwnerRecord, k), got.etag
        except ObjectMissing:
            rec, etag = None, None
        epoch = max(rec.epoch if rec else -1, floor) + 1
        body = OwnerRecord(topic=key[0], partition=key[1], epoch=epoch, owner=owner, writer=writer,
                           seq=(rec.seq if rec else 0) + 1)
        try:
            if store.swap(k, contracts.encode(body), etag) is not None:
                return epoch
        except (StorageError, OSError):
            pass
        try:
            now = contracts.decode(store.get(k), OwnerRecord, k)
            if (now.writer, now.seq) == (writer, body.seq):
                return epoch
        except ObjectMissing:
            pass
    raise StorageError(f"could not claim {k}: it changed under {MAX_SWAPS} attempts")


def recover_group(layer) -> None:
    """Start-up of a member: its own last checkpoint with every partition it held (frozen until the group assigns
    them again) and their epochs, or no partition at all."""
    recover(layer)
    if layer.last is None:
        layer.positions.clear()
        layer.pruned_to.clear()
        layer.owned.epochs = {}
        return
    layer.owned.epochs = {tp: layer.last.epochs.get(tp, 0) for tp in layer.positions}


def take(layer, keys: list[TP]) -> dict[TP, int]:
    """The group assigned ``keys``: claim each, resume or start it (module docstring); where each reads from."""
    span = layer.options.dedup_span
    if layer.rebuild is not None:
        assigned = {k for k in layer.session.tps if k not in keys} | set(keys)
        layer.notify(f"rebalance while views are rebuilt: cancelling the rebuild; partitions {sorted(assigned)} "
                     "start from the batch watermark with every view as declared")
        cancel_rebuild(layer)
        start_from(layer, layer.batch)
        layer.positions = {k: n for k, n in layer.positions.items() if k in assigned}
        layer.pruned_to = {k: n for k, n in layer.pruned_to.items() if k in assigned}
        layer.owned.epochs = {k: e for k, e in layer.owned.epochs.items() if k in assigned}
        kept = sorted(assigned - set(keys))  # read on from where start_from put them, not where the consumer is
        for key, start in layer.session.starts(kept, layer.positions, covered=layer.pruned_to).items():
            layer.positions[key] = start
            layer.session.consumer.seek(layer.session.tps[key], start)
    snapshots = _snapshots(layer)
    published = best_epochs(snapshots)
    read: dict = {}
    adopted: dict[TP, str] = {}
    for key in keys:
        if key not in layer.positions and adoption.enabled():
            source = adoption.adopt_partition(layer, key, snapshots, read)
            if source is not None:
                adopted[key] = source
        if key not in layer.positions:
            w = layer.batch.watermark.get(key, 0)
            layer.positions[key] = replay_start(w, span)
            layer.pruned_to[key] = w
            layer.windows[key] = DedupWindow(span)
            layer.new_ids[key] = []
            layer.full_dedup = True
        layer.windows.setdefault(key, DedupWindow(span))
        layer.new_ids.setdefault(key, [])
        floor = max(published.get(key, -1), layer.owned.epochs.get(key, -1))
        layer.owned.epochs[key] = claim_epoch(layer.layout.root(), key, layer.worker, floor)
    starts = layer.session.starts(keys, {k: layer.positions[k] for k in keys}, covered=layer.pruned_to)
    layer.positions.update(starts)
    layer.dirty = True
    log.info("speed worker %s assigned %s", layer.worker, ", ".join(
        f"{t}[{p}]@{starts[(t, p)]} epoch {layer.owned.epochs[(t, p)]}"
        + (f" (state of {adopted[(t, p)]})" if (t, p) in adopted else "") for t, p in keys))
    return starts


def release(layer, keys: list[TP]) -> None:
    """``keys`` were revoked or lost: frozen, still published until a higher epoch is (module docstring)."""
    layer.dirty = True
    log.info("speed worker %s gave up %s (kept until their new owner publishes)", layer.worker, keys)


def drop_superseded(layer) -> list[TP]:
    """Drop the frozen partitions for which another worker published a higher epoch; returns them."""
    frozen = [k for k in layer.positions if k not in layer.session.tps]
    if not frozen:
        return []
    published = best_epochs(_snapshots(layer))
    gone = [k for k in frozen if published.get(k, -1) > layer.owned.epochs.get(k, -1)]
    for key in gone:
        layer.positions.pop(key, None)
        layer.pruned_to.pop(key, None)
        layer.windows.pop(key, None)
        layer.new_ids.pop(key, None)
        layer.owned.epochs.pop(key, None)
        state = layer.states.get(key[0])
        if state is not None:
            state.prune(key[1], DROPPED)
    if gone:
        layer.full_dedup = True
        layer.dirty = True
        log.info("speed worker %s dropped %s: their new owners published", layer.worker, gone)
    return gone


def _snapshots(layer) -> list:
    for attempt in range(5):
        try:
            return worker_snapshots(layer.layout)
        except FileNotFoundError:  # a worker pruned a snapshot meanwhile: read again
            if attempt == 4:
                raise
    return []
