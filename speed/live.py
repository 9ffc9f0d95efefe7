"""Changing the pipeline under the running speed layer, without a restart: the pipeline file watched, and a new
pipeline (or the same one without forgotten subjects, :mod:`lambdalake.erasure`) run from here on.

The pipeline file is re-read when it changes (every ``pipeline_check_interval`` seconds). :func:`apply_pipeline`
does what a restart with the new pipeline would: unchanged views continue, changed and added ones are rebuilt from
the log, removed ones are dropped (:mod:`speed.changed_views`).

``layer`` is the running :class:`speed.consumer.SpeedLayer` throughout.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from lambdalake.contracts import Positions
from lambdalake.exceptions import LambdalakeError
from lambdalake.pipeline import Pipeline, load_pipeline
from lambdalake.validation import Validator
from speed.changed_views import KeptRows, adopt


class PipelineWatch:
    """Notices when the pipeline file ``spec`` changes (a cheap ``stat`` per check; a module path is not watched)."""

    def __init__(self, spec: str):
        self.spec = spec
        self._pipeline_stamp = self._pipeline_file_stamp()

    def _pipeline_file_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.spec)
        except (OSError, TypeError, ValueError):
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def poll(self, layer) -> None:
        """Apply an edited pipeline file while running (a module path is not watched). A pipeline that fails to
        load or validate, renames the pipeline or reads a topic that does not exist is reported and ignored: the
        running one continues."""
        stamp = self._pipeline_file_stamp()
        if stamp is None or stamp == self._pipeline_stamp:
            return
        self._pipeline_stamp = stamp
        spec = self.spec
        try:
            new = load_pipeline(spec, fresh=True)
        except LambdalakeError as exc:
            layer.notify(f"the pipeline file {spec} changed but cannot be used ({exc}); still running the previous "
                         "definition")
            return
        if new == layer.pipeline:
            return
        if new.name != layer.pipeline.name:
            layer.notify(f"the pipeline file {spec} now declares pipeline {new.name!r}, not "
                         f"{layer.pipeline.name!r}; ignored (a different pipeline needs its own --home)")
            return
        for s in new.sources:
            if s.topic not in layer.sources and not layer.session.consumer.partitions_for_topic(s.topic):
                layer.notify(f"the pipeline file {spec} changed but topic {s.topic!r} of source {s.name!r} does not "
                             "exist; ignored (create it with `lambdalake topics`)")
                return
        layer.notify(f"the pipeline file {spec} changed; applying it")
        apply_pipeline(layer, new)


def apply_pipeline(layer, new: Pipeline, rebuild: Iterable[str] = ()) -> None:
    """Run ``new`` from here on: unchanged views continue, changed and added ones (and those in ``rebuild``) are
    rebuilt from the log, removed ones are dropped (as on a restart with ``new``, without stopping)."""
    have: dict[str, KeptRows] = {}
    now = Positions(layer.positions)
    for st in layer.states.values():
        for name, table in st.view_tables().items():
            have[name] = KeptRows(layer.fingerprints[name], table, now)
    for name, kept in layer.frozen.items():
        if kept.table is not None:
            have[name] = kept
    topics_before = set(layer.sources)
    layer.pipeline = layer.store.pipeline = new
    layer.fingerprints = new.fingerprints
    layer.sources = {s.topic: s for s in new.sources}
    layer.validators = {s.topic: Validator(s) for s in new.sources}
    for t in layer.sources:
        layer.counters.setdefault(t, {"valid": 0, "invalid": 0, "duplicates": 0})
    for d in (layer.positions, layer.pruned_to, layer.windows, layer.new_ids):
        for tp in [tp for tp in d if tp[0] not in layer.sources]:
            del d[tp]
    for t in [t for t in layer.counters if t not in layer.sources]:
        del layer.counters[t]
    adopt(layer, have, force=rebuild)
    if set(layer.sources) != topics_before and layer.session is not None:
        layer.assign()
    layer.full_dedup = True
    layer.dirty = True
    layer.checkpoint(force=True)
