"""Serving never mixes definitions: per view, which pieces answer for it (docs/design.md, "Definitions change").

The rule — which side holds which definition of a view, and whether it is the declared one — is the core's
(:mod:`lambdalake.definitions`); this module decides what one connection serves from it.

A view whose parts are not both usable is ``rebuilding``: queries on it fail with one line
(:func:`rebuilding_message`). With ``allow_stale`` it is served instead from the newest kept pair made by one
earlier definition (:func:`serving.published.stale_pair`) and is ``stale``; without such a pair it is refused too.
"""

from __future__ import annotations

from dataclasses import dataclass

from lambdalake.definitions import (
    CURRENT,
    NO_STALE_PAIR,
    REBUILDING,
    REBUILDING_PHRASE,
    STALE,
    Definitions,
    definitions,
    rebuilding_message,
)
from lambdalake.pipeline import Pipeline, View
from serving.published import PublishedPair, stale_pair

__all__ = ["CURRENT", "NO_STALE_PAIR", "REBUILDING", "REBUILDING_PHRASE", "STALE", "Definitions", "ViewPlan",
           "definitions", "plan_views", "rebuilding_message"]


@dataclass(frozen=True)
class ViewPlan:
    """What one connection serves for a declared view: its state and the pair of pieces it reads (None: refused)."""

    view: View
    defs: Definitions
    state: str  # CURRENT, REBUILDING or STALE
    pair: PublishedPair | None  # the connection's pair (current), an older kept pair (stale), None (rebuilding)
    served: str | None  # fingerprint of the definition whose rows are served
    message: str | None = None  # the refusal (rebuilding) or what stale means here

    @property
    def served_pieces(self) -> tuple[str | None, str | None]:
        return (None, None) if self.pair is None else (self.pair.batch_version, self.pair.speed_snapshot)


def plan_views(pipeline: Pipeline, pair: PublishedPair, allow_stale: bool = False) -> dict[str, ViewPlan]:
    """Per declared view: serve it from ``pair`` (current), from an older kept pair of one definition (stale, only
    with ``allow_stale``), or refuse it (rebuilding)."""
    plans: dict[str, ViewPlan] = {}
    for view in pipeline.views:
        d = definitions(pipeline, view, pair.manifest, pair.snapshot)
        if d.current:
            plans[view.name] = ViewPlan(view, d, CURRENT, pair, d.declared)
            continue
        old = stale_pair(pair.home, view, pipeline.source_of(view).topic) if allow_stale else None
        if old is None:
            plans[view.name] = ViewPlan(view, d, REBUILDING, None, None, rebuilding_message(d, allow_stale))
            continue
        stale, fingerprint = old
        plans[view.name] = ViewPlan(
            view, d, STALE, stale, fingerprint,
            f"stale: served from batch version {stale.batch_version or '-'} and speed snapshot "
            f"{stale.speed_snapshot or '-'} of definition {fingerprint}; the declared definition {d.declared} is "
            f"being rebuilt ({d.pending})")
    return plans
