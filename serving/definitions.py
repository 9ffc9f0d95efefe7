"""Serving never mixes definitions: per view, which pieces may answer for it (DESIGN.md, "Definitions change").

A view's rows come from a batch part and a speed part. Each published piece records the fingerprint of the
definition that made it (:meth:`lambdalake.pipeline.Pipeline.fingerprint`). For the declared fingerprint ``D``:

- the batch part is usable iff there is no batch version at all (the speed side then covers from offset 0) or
  ``manifest.definition_matches(view, D, legacy)`` (a first-release manifest matches through the legacy
  fingerprint). A version that lacks the view means "batch pending".
- the speed part is usable iff there is no snapshot at all, or the snapshot's rows of the view are of ``D`` and it
  is not rebuilding them (``views[view].fingerprint == D and views[view].target is None``).

  A first-release snapshot (format 1, no ``views``) records no definition. The previous release served it whenever
  its parquet schema fit and the batch side matched, but a bucket change keeps the schema, so its rows may be of
  another (or of a mix of) definitions. Safe choice: it counts as "speed pending" until this release's speed layer
  takes it over (which it does by itself, rebuilding every view once), and it is never paired for stale serving.

A view whose parts are not both usable is ``rebuilding``: queries on it fail with one line
(:func:`rebuilding_message`). With ``allow_stale`` it is served instead from the newest kept pair made by one
earlier definition (:func:`serving.published.stale_pair`) and is ``stale``; without such a pair it is refused too.
"""

from __future__ import annotations

from dataclasses import dataclass

from lambdalake.contracts import BatchManifest, SpeedSnapshotMeta
from lambdalake.pipeline import Pipeline, View
from serving.published import PublishedPair, stale_pair

CURRENT, REBUILDING, STALE = "current", "rebuilding", "stale"
REBUILDING_PHRASE = "is being rebuilt for its new definition"  # what the CLI recognises in DuckDB's error text
NO_STALE_PAIR = "(no complete pair of the previous definition is kept)"


@dataclass(frozen=True)
class Definitions:
    """Where one declared view stands on each side of a published pair."""

    view: str
    declared: str  # fingerprint of the declared definition
    batch: str | None  # fingerprint of the view in the batch version (None: no version, or not in it)
    speed: str | None  # fingerprint of the view's rows in the snapshot (None: no snapshot or not recorded)
    batch_ok: bool
    speed_ok: bool
    speed_progress: float | None  # 0..1 while the speed layer rebuilds the view for the declared definition

    @property
    def current(self) -> bool:
        return self.batch_ok and self.speed_ok

    @property
    def pending(self) -> str:
        """What is missing, e.g. ``batch pending, speed 63%`` (empty when current)."""
        parts = []
        if not self.batch_ok:
            parts.append("batch pending")
        if not self.speed_ok:
            parts.append("speed pending" if self.speed_progress is None else f"speed {self.speed_progress:.0%}")
        return ", ".join(parts)


def definitions(pipeline: Pipeline, view: View, manifest: BatchManifest | None,
                snapshot: SpeedSnapshotMeta | None) -> Definitions:
    """Which parts of ``view`` in (manifest, snapshot) are of the declared definition (module docstring)."""
    declared = pipeline.fingerprint(view)
    batch_ok = manifest is None or manifest.definition_matches(view.name, declared, pipeline.legacy_fingerprint(view))
    sv = None if snapshot is None else snapshot.views.get(view.name)
    speed_ok = snapshot is None or snapshot.definition_matches(view.name, declared)
    progress = None
    if not speed_ok and sv is not None and sv.target == declared and sv.progress is not None:
        progress = sv.progress
    return Definitions(view=view.name, declared=declared,
                       batch=None if manifest is None else manifest.fingerprint_of(view.name),
                       speed=None if sv is None else (sv.fingerprint or None),
                       batch_ok=batch_ok, speed_ok=speed_ok, speed_progress=progress)


def rebuilding_message(d: Definitions, no_stale_pair: bool = False) -> str:
    """The one line a query on a rebuilding view fails with."""
    msg = f"view {d.view} {REBUILDING_PHRASE}: {d.pending}"
    return f"{msg} {NO_STALE_PAIR}" if no_stale_pair else msg


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
