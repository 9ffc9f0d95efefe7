"""Carrying a published version's files into a staged one (hard links, or copies): an unchanged view's files and
the event-id index segments of a source."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from batch.incremental import IDS_DIR
from lambdalake.contracts import IdIndex
from lambdalake.layout import Layout


def _link_dir(src_dir: Path, dst: Path) -> None:
    """Hard-link (or copy) the parquet files of ``src_dir`` into a new directory ``dst``."""
    dst.mkdir(parents=True)
    for f in src_dir.glob("*.parquet"):
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def _carry_over(layout: Layout, version: str, view: str, staging: Path) -> None:
    """Hard-link (or copy) an unchanged view's files from the published version into the staging directory."""
    _link_dir(layout.batch_version(version) / view, staging / view)


def _carry_index(layout: Layout, version: str, source: str, index: IdIndex, staging: Path) -> None:
    for s in index.segments:
        _link_dir(layout.batch_version(version) / IDS_DIR / source / s, staging / IDS_DIR / source / s)
