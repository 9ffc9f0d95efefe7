"""Rebuilding views whose definition changed, by replaying the log (docs/design.md, "Definitions change").

A view's identity is its definition (:meth:`lambdalake.pipeline.Pipeline.fingerprint`); the checkpoint and every
snapshot record, per view, the fingerprint of the definition that made its rows. When the speed layer starts — or
notices that the pipeline file changed while running — with views whose rows were made by another definition, or
by none (a view added to the pipeline, a checkpoint written by lambdalake 0.1), it rebuilds exactly those views
while the unchanged ones keep running; views no longer declared are dropped. A :class:`Rebuild`:

- owns its own Kafka consumer (no consumer group), positions ``R[p]``, dedup windows and state — the changed views
  only, interpreted with their new definitions (and the source's current validation rules);
- replays partition ``p`` from ``min(S[p], max(0, pruned_to[p] - dedup_span))``: offsets below ``pruned_to[p]``
  (what the published batch version counts) only fill the dedup window, as on a first start, so an id first seen
  below ``pruned_to`` still shadows its later copies; the block split ``(partition, block_start)`` is the live one;
- never reads past the live position ``S[p]``: the live consumer keeps moving ``S`` for the unchanged views, the
  rebuild chases it and pauses a partition that reached it (:meth:`Rebuild.step`).

When ``R == S`` everywhere the speed layer swaps the rebuilt views in (in memory, at once, between two polls of the
live consumer) and forces a checkpoint. Until then every published snapshot keeps a changed view's *old* rows under
their old fingerprint, with ``target`` = the declared fingerprint and ``progress`` = the fraction of offsets
replayed (an added view has fingerprint ``""`` and no rows file): serving refuses it, or serves it as stale when
asked. Nothing of a rebuild in progress is checkpointed, so a ``kill -9`` mid-rebuild leaves the old rows and
fingerprint in force and the restart simply begins the rebuild again.
"""

from __future__ import annotations

import logging

from lambdalake.config import Settings
from lambdalake.dedup import DedupWindow
from lambdalake.erasure import erased_subjects
from lambdalake.layout import Layout
from lambdalake.pipeline import Pipeline, View
from lambdalake.session import LogSession, connect
from lambdalake.validation import Validator
from speed.checkpoint import TP, fault
from speed.state import SourceState, apply_records, build_states

log = logging.getLogger(__name__)


def replay_start(pruned_to: int, dedup_span: int) -> int:
    """Where a partition is re-read from to rebuild state above ``pruned_to`` exactly: ``dedup_span`` offsets below
    it, for the dedup context (the first start without a checkpoint uses the same rule)."""
    return max(0, pruned_to - dedup_span)


class Rebuild:
    """Replays the log for ``views`` (declared definitions) up to the live positions; see the module docstring."""

    def __init__(self, settings: Settings, pipeline: Pipeline, views: list[View], block: int, dedup_span: int,
                 max_records: int = 20_000):
        self.settings = settings
        self.pipeline = pipeline
        self.views = list(views)
        self.targets = {v.name: pipeline.fingerprint(v) for v in self.views}
        self.dedup_span = dedup_span
        self.max_records = max_records
        self.states: dict[str, SourceState] = {t: st for t, st in build_states(pipeline, block, self.targets).items()
                                               if st.views}
        self.sources = {t: pipeline.source_for_topic(t) for t in self.states}
        self.validators = {t: Validator(s) for t, s in self.sources.items()}
        layout = Layout.of(settings.home, settings.lake)  # forgotten subjects are never replayed (lambdalake.erasure)
        self.erased = {t: erased_subjects(layout, s.name) for t, s in self.sources.items()}
        self.start: dict[TP, int] = {}
        self.positions: dict[TP, int] = {}
        self.windows: dict[TP, DedupWindow] = {}
        self.counters = {t: {"valid": 0, "invalid": 0, "duplicates": 0} for t in self.states}
        self.messages = 0
        self._session: LogSession | None = None
        self._paused: set[TP] = set()

    # lifecycle ----------------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def _connect(self) -> LogSession:
        consumer = connect(self.settings, group_id=None, fetch_max_wait_ms=100, max_poll_records=self.max_records,
                           check_crcs=False, client_id="lambdalake-speed-rebuild")
        # Offsets deleted by retention: the live side (or the replay's caller) already said so.
        return LogSession(consumer, self.states, bootstrap=self.settings.bootstrap, reader="the rebuild",
                          lost_means="", notify=None)

    def _track(self, live: dict[TP, int], pruned_to: dict[TP, int]) -> None:
        """Start replaying every live partition of the rebuilt views' topics not tracked yet."""
        new = [tp for tp in live if tp[0] in self.states and tp not in self.positions]
        if not new:
            return
        if self._session is None:
            self._session = self._connect()
        for key in new:
            r0 = min(live[key], replay_start(pruned_to.get(key, 0), self.dedup_span))
            self.start[key] = self.positions[key] = r0
            self.windows[key] = DedupWindow(self.dedup_span)
        starts = self._session.assign(self.positions, partitions=list(self.positions))
        for key in new:
            if starts[key] > self.positions[key]:  # deleted by retention
                self.start[key] = self.positions[key] = min(starts[key], live[key])
        if self._paused:
            self._session.consumer.pause(*(self._session.tps[k] for k in self._paused))

    # the replay ---------------------------------------------------------------------------------------------------
    def step(self, live: dict[TP, int], pruned_to: dict[TP, int], timeout_ms: int) -> int:
        """One poll of the replay: apply what it returns below the live positions ``live``; pause a partition that
        reached its live position, resume it once the live consumer moved on. Returns the records applied."""
        self._track(live, pruned_to)
        if not self.positions:
            return 0
        c = self._session.consumer
        tps = self._session.tps
        resume = [k for k in self._paused if live.get(k, 0) > self.positions[k]]
        if resume:
            c.resume(*(tps[k] for k in resume))
            self._paused.difference_update(resume)
        if len(self._paused) == len(self.positions):
            return 0
        applied = 0
        for tp, records in c.poll(timeout_ms=timeout_ms, max_records=self.max_records).items():
            key = (tp.topic, tp.partition)
            limit = live.get(key, 0)
            if records and records[-1].offset >= limit:
                records = [r for r in records if r.offset < limit]
            if not records or records[-1].offset < self.positions[key]:
                continue
            fault("rebuild")
            got = apply_records(records, partition=tp.partition, position=self.positions[key],
                                floor=pruned_to.get(key, 0), state=self.states[tp.topic],
                                validate=self.validators[tp.topic], window=self.windows[key],
                                pending=_ignore, event_id=self.sources[tp.topic].event_id,
                                erased=self.erased[tp.topic])
            self.positions[key] = records[-1].offset + 1
            got.add_to(self.counters[tp.topic])
            applied += len(records)
        self.messages += applied
        # Partitions at their live position (also across offsets without records, e.g. transaction markers):
        # drop whatever was fetched beyond it and pause until the live consumer moves on.
        for key, tp in tps.items():
            if key in self._paused:
                continue
            limit = live.get(key, 0)
            if self.positions[key] >= limit or c.position(tp) >= limit:
                self.positions[key] = max(self.positions[key], limit)
                c.seek(tp, self.positions[key])
                c.pause(tp)
                self._paused.add(key)
        return applied

    def backlog(self, live: dict[TP, int]) -> int:
        """Offsets still to replay (untracked partitions count from 0: they start below their live position)."""
        return sum(max(0, s - self.positions.get(k, 0)) for k, s in live.items() if k[0] in self.states)

    def done(self, live: dict[TP, int]) -> bool:
        return all(k in self.positions and self.positions[k] >= s for k, s in live.items() if k[0] in self.states)

    def progress(self, live: dict[TP, int]) -> float:
        """Fraction of the offsets to replay that are replayed (0..1)."""
        total = done = 0
        for k, s in live.items():
            if k[0] not in self.states:
                continue
            r0 = self.start.get(k, 0)
            total += max(0, s - r0)
            done += max(0, min(s, self.positions.get(k, r0)) - r0)
        if total == 0:
            return 1.0 if self.done(live) else 0.0
        return min(1.0, done / total)

    def prune(self, key: TP, watermark: int) -> None:
        """A batch version was handed off during the rebuild: drop the blocks it covers here too."""
        st = self.states.get(key[0])
        if st is not None:
            st.prune(key[1], watermark)


def _ignore(_item: tuple[int, str]) -> None:
    """The replay's first occurrences are not checkpointed (its windows are, whole, once it is swapped in)."""
