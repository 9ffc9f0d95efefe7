"""Which definition each side holds of a view, and whether it is the declared one (docs/design.md,
"Definitions change").

A view's rows come from a batch part and a speed part. Each published piece records the fingerprint of the
definition that made it (:meth:`lambdalake.pipeline.Pipeline.fingerprint`). For the declared fingerprint ``D``:

- the batch part is of ``D`` iff there is no batch version at all (the speed side then covers from offset 0) or
  ``manifest.definition_matches(view, D, legacy)`` (a first-release manifest matches through the legacy
  fingerprint). A version that lacks the view means "batch pending".
- the speed part is of ``D`` iff there is no snapshot at all, or the snapshot's rows of the view are of ``D`` and the
  speed layer is not rebuilding them (``views[view].fingerprint == D and views[view].target is None``). A
  first-release snapshot (format 1) records no definition and counts as "speed pending" until this release's
  speed layer takes it over.

The one rule for serving (what a query may read), ``lambdalake status`` and the speed layer's reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from lambdalake.contracts import BatchManifest, SpeedSnapshotMeta
from lambdalake.pipeline import Pipeline, View

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
