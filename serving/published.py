"""Which published data a serving connection reads: ONE consistent (batch version, speed snapshot) pair.

Resolution protocol (:func:`resolve_pair`), mirroring the publishers' order (batch publishes version ``v+1`` and
only afterwards the speed layer prunes to ``W_{v+1}`` and publishes a snapshot with ``pruned_to = W_{v+1}``):

1. Read ``views/speed/CURRENT`` and that snapshot's ``snapshot.json`` (positions ``S``, ``pruned_to``, ``block``).
2. Read ``views/batch/CURRENT`` and that version's ``manifest.json`` (watermark ``W``). Reading speed first means
   any batch version we see is at least as new as the one the speed layer had pruned to.
3. Paranoid checks, each a named exception instead of a silent wrong answer:
   - ``pruned_to[p] <= W[p]`` for every partition, else the speed layer dropped blocks this batch version does not
     cover (a rollback or a publish racing us): retry from 1 a few times, then raise.
   - every ``W[p]`` is a multiple of the snapshot's ``block`` (the handoff rule, :mod:`lambdalake.handoff`);
     a misaligned watermark would split a speed block between both sides and double count.
   - the batch manifest's ``block`` (if it records one) equals the snapshot's.

Either side may be absent (nothing published yet): that is a valid state and yields an empty side.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from lambdalake.layout import Layout, read_pointer, watermark_of
from lambdalake.pipeline import View
from serving.exceptions import InconsistentPublishedState

RESOLVE_ATTEMPTS = 5


@dataclass(frozen=True)
class PublishedPair:
    """The batch version and speed snapshot one connection reads, with everything needed to merge them."""

    home: Path
    batch_version: str | None = None
    manifest: dict | None = None
    speed_snapshot: str | None = None
    snapshot: dict | None = None
    resolved_at: float = field(default_factory=time.time)

    @property
    def layout(self) -> Layout:
        return Layout(self.home)

    @property
    def watermark(self) -> dict[tuple[str, int], int]:
        """{(topic, partition): W} of the batch version (empty without one: every speed row is visible)."""
        return watermark_of(self.manifest)

    @property
    def positions(self) -> dict[tuple[str, int], int]:
        """{(topic, partition): S} the speed snapshot covers up to (exclusive)."""
        return _flat(self.snapshot.get("positions") if self.snapshot else None)

    @property
    def pruned_to(self) -> dict[tuple[str, int], int]:
        """{(topic, partition): first offset the speed snapshot still holds}."""
        return _flat(self.snapshot.get("pruned_to") if self.snapshot else None)

    @property
    def block(self) -> int | None:
        """Offsets per handoff block, as the speed snapshot records it."""
        return int(self.snapshot["block"]) if self.snapshot and self.snapshot.get("block") else None

    @property
    def nothing_published(self) -> bool:
        return self.batch_version is None and self.speed_snapshot is None

    def topic_watermark(self, topic: str) -> dict[int, int]:
        """{partition: W} of one topic; partitions not listed have W = 0."""
        return {p: w for (t, p), w in self.watermark.items() if t == topic}

    def batch_files(self, view: View) -> list[Path]:
        """The batch version's parquet files of ``view`` (Spark's ``_SUCCESS``/``.crc`` and hidden files skipped)."""
        if self.batch_version is None:
            return []
        d = self.layout.batch_version(self.batch_version) / view.name
        if not d.is_dir():
            return []
        return sorted(f for f in d.glob("*.parquet") if f.is_file() and not f.name.startswith((".", "_")))

    def batch_has_view(self, view: View) -> bool:
        """Whether the batch version computed ``view`` (a view declared after the last batch run is missing)."""
        if self.batch_version is None:
            return False
        counts = (self.manifest or {}).get("row_counts")
        if isinstance(counts, dict) and counts:
            return view.name in counts
        return (self.layout.batch_version(self.batch_version) / view.name).is_dir()

    def batch_row_count(self, view: View) -> int | None:
        """Rows the manifest says the batch version wrote for ``view`` (None if it does not say)."""
        counts = (self.manifest or {}).get("row_counts")
        value = counts.get(view.name) if isinstance(counts, dict) else None
        return int(value) if isinstance(value, int) else None

    def speed_file(self, view: View) -> Path | None:
        """The speed snapshot's parquet file of ``view``, or None (no snapshot, or no file for this view)."""
        if self.speed_snapshot is None:
            return None
        f = self.layout.speed_snapshot(self.speed_snapshot) / f"{view.name}.parquet"
        return f if f.is_file() else None


def _flat(nested: dict | None) -> dict[tuple[str, int], int]:
    if not nested:
        return {}
    return {(t, int(p)): int(n) for t, parts in nested.items() for p, n in parts.items()}


def _load_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise InconsistentPublishedState(f"{what} {path} is not valid JSON: {exc}") from exc


def _read_once(layout: Layout) -> PublishedPair:
    """Steps 1-2 of the protocol; FileNotFoundError if a pointed-to file vanished meanwhile (retry)."""
    sptr = read_pointer(layout.speed_pointer)
    snap_id = snapshot = None
    if sptr is not None:
        snap_id = str(sptr["snapshot"])
        snapshot = _load_json(layout.speed_snapshot(snap_id) / "snapshot.json", "speed snapshot")
    bptr = read_pointer(layout.batch_pointer)
    version = manifest = None
    if bptr is not None:
        version = str(bptr["version"])
        manifest = _load_json(layout.batch_version(version) / "manifest.json", "batch manifest")
    return PublishedPair(layout.home, version, manifest, snap_id, snapshot)


def _pruned_past_watermark(pair: PublishedPair) -> list[str]:
    w = pair.watermark
    return [f"{t}[{p}]: speed pruned to {n} > batch watermark {w.get((t, p), 0)}"
            for (t, p), n in sorted(pair.pruned_to.items()) if n > w.get((t, p), 0)]


def check_alignment(pair: PublishedPair) -> None:
    """Raise if the pair breaks the handoff rule (watermarks not on block boundaries, block sizes differ)."""
    block = pair.block
    if block is None:
        return
    mblock = (pair.manifest or {}).get("block")
    if mblock is not None and int(mblock) != block:
        raise InconsistentPublishedState(
            f"batch version {pair.batch_version} was cut with handoff block {mblock} but speed snapshot "
            f"{pair.speed_snapshot} uses block {block}; both sides must use the same LAMBDALAKE_HANDOFF_BLOCK")
    bad = {f"{t}[{p}]": w for (t, p), w in sorted(pair.watermark.items()) if w % block}
    if bad:
        raise InconsistentPublishedState(
            f"batch version {pair.batch_version} has watermarks {bad} that are not multiples of the speed "
            f"snapshot's block {block}; merging would count part of a block twice. Republish the batch version "
            "with an aligned watermark (lambdalake.handoff.aligned_watermark)")


def resolve_pair(home: Path, attempts: int = RESOLVE_ATTEMPTS) -> PublishedPair:
    """Read the published pointers once and return a consistent pair (see the module docstring)."""
    layout = Layout(home)
    problems: list[str] = []
    for attempt in range(attempts):
        try:
            pair = _read_once(layout)
        except FileNotFoundError as exc:  # pruned between reading the pointer and the file: read again
            problems = [f"{exc.filename} vanished while reading"]
        else:
            problems = _pruned_past_watermark(pair)
            if not problems:
                check_alignment(pair)
                return pair
        time.sleep(0.05 * (attempt + 1))
    raise InconsistentPublishedState(
        f"no consistent batch/speed pair in {home} after {attempts} attempts: {'; '.join(problems)}. "
        "Is a batch rollback or publish in progress? Retry, or check `views/batch/CURRENT`")
