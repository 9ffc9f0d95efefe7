"""Views whose rows are not of their declared definition, on the live side (docs/design.md, "Definitions change").

Given the rows at hand (:class:`KeptRows`, from a checkpoint or the running state), :func:`adopt` decides per view:
views of the declared definition continue, changed and added ones are rebuilt by replaying the log
(:class:`speed.rebuild.Rebuild`; their old rows are kept, frozen, until then), views no longer declared are dropped.
:func:`rebuild_step` advances the rebuild between two polls of the live consumer; :func:`finish_rebuild` swaps the
rebuilt views in, at once, at the live positions.

``layer`` is the running :class:`speed.consumer.SpeedLayer` throughout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from lambdalake.contracts import Positions
from speed.rebuild import Rebuild
from speed.state import SourceState, build_states


@dataclass
class KeptRows:
    """A view's rows made by some definition (``fingerprint``; ``""`` and no table for none), exact for the offsets
    ``[pruned_to, covers)``: what a checkpoint restores, and what a view being rebuilt keeps meanwhile."""

    fingerprint: str
    table: pa.Table | None
    covers: Positions | None


def adopt(layer, have: dict[str, KeptRows], force: Iterable[str] = ()) -> None:
    """Take over the rows ``have`` ({view: (fingerprint, rows)}, at the current positions) for the declared
    pipeline: views of the declared definition continue, changed and added ones are rebuilt from the log
    (the old rows are kept, frozen, until then), views no longer declared are dropped."""
    fps = layer.fingerprints
    current = [n for n, fp in fps.items() if n in have and have[n].fingerprint == fp and n not in force]
    changed = [v for v in layer.pipeline.views if v.name not in current]
    layer.states = build_states(layer.pipeline, layer.block, current)
    for topic, st in layer.states.items():
        st.restore({vs.view.name: have[vs.view.name].table for vs in st.views},
                   {p: n for (t, p), n in layer.positions.items() if t == topic})
    layer.frozen = {v.name: have.get(v.name, KeptRows("", None, None)) for v in changed}
    cancel_rebuild(layer)
    if changed:
        layer.rebuild = Rebuild(layer.settings, layer.pipeline, changed, layer.block, layer.options.dedup_span,
                                layer.options.max_records)
        layer.notify("rebuilding " + ", ".join(
            f"{v.name} ({'new view' if not have.get(v.name) else 'definition changed'})" for v in changed)
            + " from the log; the other views continue")
    dropped = sorted(set(have) - set(fps))
    if dropped:
        layer.notify(f"dropped views no longer declared: {', '.join(dropped)}")


def cancel_rebuild(layer) -> None:
    if layer.rebuild is not None:
        layer.rebuild.close()
        layer.rebuild = None


def rebuild_step(layer, stop: threading.Event) -> None:
    """Advance the rebuild; when it is close, finish it while the live positions hold still (the live consumer
    is not polled meanwhile, at most a few seconds, or until ``stop``), then swap the rebuilt views in."""
    rb = layer.rebuild
    if rb.backlog(layer.positions) <= layer.options.max_records:
        deadline = time.monotonic() + 5.0
        while not rb.done(layer.positions) and time.monotonic() < deadline and not stop.is_set():
            rb.step(layer.positions, layer.pruned_to, timeout_ms=layer.options.poll_timeout_ms)
    else:
        rb.step(layer.positions, layer.pruned_to, timeout_ms=layer.options.poll_timeout_ms)
    if rb.done(layer.positions):
        finish_rebuild(layer)


def finish_rebuild(layer) -> None:
    """Swap the rebuilt views in, at once, at the live positions (``R == S``), and checkpoint right away."""
    rb = layer.rebuild
    for topic, rebuilt in rb.states.items():
        live = layer.states[topic]
        tables = {**live.view_tables(), **rebuilt.view_tables()}
        src = layer.sources[topic]
        merged = SourceState(src, [v for v in layer.pipeline.views_of(src) if v.name in tables], layer.block)
        merged.restore(tables, {p: n for (t, p), n in layer.positions.items() if t == topic})
        layer.states[topic] = merged
        if not live.views:
            # Every view of the source was rebuilt (always so when its fields or validation rules changed):
            # the replay's dedup windows and counters are those of the declared validation.
            for key, window in rb.windows.items():
                if key[0] == topic:
                    layer.windows[key] = window
                    layer.new_ids[key] = []
            layer.counters[topic] = dict(rb.counters[topic])
            layer.full_dedup = True
    for name in rb.targets:
        layer.frozen.pop(name, None)
    layer.notify(f"rebuilt {', '.join(rb.targets)} for the declared definition ({rb.messages:,} messages "
                 "replayed)")
    cancel_rebuild(layer)
    layer.dirty = True
    layer.checkpoint(force=True)
