"""Batch versions: the publish protocol the Spark job and Kappa replay share (staging, pointer switch), rollback,
retention.

A batch version is a directory ``views/batch/<version>/`` (``v000001``, ``v000002``, ... strictly increasing)
holding ``manifest.json`` and ``<view>/*.parquet`` for every view of the pipeline, all at one watermark. What is
served is whatever ``views/batch/CURRENT`` names; nothing else about the directory tree matters to readers.

Publish protocol (:func:`publish`), mirrored by numbered comments in the code:

1. Take the publish lock (``views/batch/.publish.lock``), so versions are numbered and switched one at a time.
2. Paranoid check: the new watermark is not below the published one in any partition (the speed layer may already
   have pruned what the published version covers; going back would lose those events from serving).
3. Choose the next version id; stamp it, ``published_at`` and each newly computed view's ``computed_in`` into the
   :class:`~lambdalake.contracts.BatchManifest` and write it as ``manifest.json`` into the staging directory.
4. fsync every staged file and rename the staging directory to ``views/batch/<version>`` (atomic).
5. Switch ``CURRENT`` to the new version (atomic rename of a small JSON file) — the commit point: from here on
   new queries read the new version.
6. Retire old versions (:func:`retire_versions`), keeping the newest ``keep``, the current and the previous one.

A run killed before step 5 changes nothing that is served: its staging directory (``.staging-<pid>-...``) is
ignored by readers and removed by the next run once its process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec
import psutil

from lambdalake import contracts
from lambdalake.config import env_int
from lambdalake.contracts import BatchManifest, BatchPointer
from lambdalake.exceptions import ConfigError, InvariantViolation, PublishError
from lambdalake.layout import (
    Layout,
    atomic_publish_dir,
    batch_pointer,
    read_batch_manifest,
    write_pointer,
)
from lambdalake.locks import flock
from lambdalake.speedset import current_speed_snapshot

STAGING = re.compile(r"^\.staging-(\d+)-[0-9a-f]+$")
TRASH_PREFIX = ".trash-"
DEFAULT_KEEP = 5


def default_keep() -> int:
    """Versions to keep: ``LAMBDALAKE_BATCH_KEEP`` or 5 (at least 2: the current and the previous one)."""
    return env_int("LAMBDALAKE_BATCH_KEEP", DEFAULT_KEEP, minimum=2, why=" (the current and the previous version)")


def version_id(n: int) -> str:
    return f"v{n:06d}"


def _next_version(layout: Layout) -> str:
    """Never reuses a number, even of a version whose manifest is missing (an interrupted removal)."""
    names = layout.batch_versions(complete=False)
    return version_id(int(names[-1][1:]) + 1 if names else 1)


@contextmanager
def publish_lock(layout: Layout) -> Iterator[None]:
    """Exclusive lock serialising version numbering, pointer switches, rollback and pruning."""
    with flock(layout.batch_views / ".publish.lock", what="the batch publish lock"):
        yield


def new_staging_dir(layout: Layout) -> Path:
    """A fresh staging directory for one run; removes those left by runs whose process is gone."""
    base = layout.batch_views
    base.mkdir(parents=True, exist_ok=True)
    for d in base.iterdir():
        m = STAGING.match(d.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
        elif d.name.startswith(TRASH_PREFIX):
            shutil.rmtree(d, ignore_errors=True)
    staging = base / f".staging-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    return staging


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def publish(layout: Layout, staging: Path, manifest: BatchManifest, keep: int = DEFAULT_KEEP) -> BatchManifest:
    """Publish a fully written and validated staging directory (see the module docstring). Returns the manifest
    as published: ``version``, ``published_at`` and every view's ``computed_in`` filled in."""
    # 1. one publisher at a time
    with publish_lock(layout):
        # 2. never move the watermark backwards
        current = batch_pointer(layout)
        if current is not None:
            old = _read_manifest(layout, current).watermark
            new = manifest.watermark
            behind = {k: (w, new.at(*k)) for k, w in old.items() if new.at(*k) < w}
            if behind:
                (t, p), (w_old, w_new) = next(iter(behind.items()))
                raise InvariantViolation(
                    f"new batch watermark is below the published one for {t}[{p}] ({w_new} < {w_old}, "
                    f"{len(behind)} partitions behind); the master dataset lost data? nothing was published")
        # 3. version id + manifest
        version = _next_version(layout)
        views = {name: meta if meta.computed_in is not None else msgspec.structs.replace(meta, computed_in=version)
                 for name, meta in manifest.views.items()}
        manifest = msgspec.structs.replace(manifest, version=version, views=views,
                                           published_at=contracts.utc_now_iso())
        (staging / "manifest.json").write_bytes(contracts.encode(manifest))
        # 4. staging -> views/batch/<version>, atomically
        atomic_publish_dir(staging, layout.batch_version(version))
        # 5. the commit point: CURRENT -> version
        write_pointer(layout.batch_pointer, BatchPointer(version))
        # 6. prune
        _retire_locked(layout, keep)
    return manifest


def _read_manifest(layout: Layout, version: str) -> BatchManifest:
    try:
        return read_batch_manifest(layout, version)
    except OSError as exc:
        raise InvariantViolation(f"batch version {version} has no readable manifest "
                                 f"{layout.batch_version(version) / 'manifest.json'}: {exc}") from exc


def rollback(home: Path, *, force: bool = False) -> tuple[str, str]:
    """Re-point ``CURRENT`` to the newest version older than the current one. Returns (from, to).

    The previous version has a lower watermark. That is only exact while the speed layer still holds the
    positions between the two watermarks; if the published speed snapshot says it pruned beyond the previous
    watermark (:attr:`lambdalake.contracts.SpeedSnapshotMeta.pruned_to`), rollback refuses unless ``force``.
    """
    layout = Layout(home)
    with publish_lock(layout):
        current = batch_pointer(layout)
        if current is None:
            raise PublishError("nothing is published yet, so there is nothing to roll back; run `lambdalake batch`")
        older = [v for v in layout.batch_versions() if int(v[1:]) < int(current[1:])]
        if not older:
            raise PublishError(f"batch version {current} has no older version left to roll back to "
                               f"(kept: {layout.batch_versions()})")
        target = older[-1]
        if not force:
            _check_speed_covers(layout, _read_manifest(layout, target))
        write_pointer(layout.batch_pointer, BatchPointer(target))
    return current, target


def _check_speed_covers(layout: Layout, manifest: BatchManifest) -> None:
    try:
        snap = current_speed_snapshot(layout)
    except InvariantViolation:
        snap = None
    if snap is None:
        return
    wm = manifest.watermark
    for (topic, p), off in snap.pruned_to.items():
        if off > wm.at(topic, p):
            raise PublishError(
                f"the speed layer already pruned {topic}[{p}] below offset {off}, but version "
                f"{manifest.version} covers only < {wm.at(topic, p)}; rolling back would drop "
                "those events from serving. Re-run `lambdalake batch` instead, or pass --force")


def retire_versions(home: Path, keep: int = DEFAULT_KEEP) -> list[str]:
    """Delete all but the newest ``keep`` versions; never the current one nor the one before it."""
    layout = Layout(home)
    with publish_lock(layout):
        return _retire_locked(layout, keep)


def _retire_locked(layout: Layout, keep: int) -> list[str]:
    if keep < 2:
        raise ConfigError(f"keep={keep} must be >= 2 (the current and the previous version)")
    versions = layout.batch_versions()
    current = batch_pointer(layout)
    protected = set(versions[-keep:])
    if current is not None:
        protected.add(current)
        older = [v for v in versions if int(v[1:]) < int(current[1:])]
        if older:
            protected.add(older[-1])
    removed = []
    for v in versions:
        if v in protected:
            continue
        # rename first: a half-deleted directory must never look like a version
        trash = layout.batch_views / f"{TRASH_PREFIX}{v}-{uuid.uuid4().hex[:8]}"
        os.rename(layout.batch_version(v), trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(v)
    return removed
