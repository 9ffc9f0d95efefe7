"""Carrying a published version's files into a staged one (hard links or copies locally, server-side copies on
object storage): an unchanged view's files and the event-id index segments of a source."""

from __future__ import annotations

from batch.incremental import IDS_DIR
from lambdalake.contracts import IdIndex
from lambdalake.layout import Layout
from lambdalake.storage.files import DataFiles, data_files


def copy_dir(lake: DataFiles, src: str, dst: str) -> None:
    """Carry the parquet files directly under the prefix ``src`` to the prefix ``dst`` (:meth:`DataFiles.copy`)."""
    for name in lake.names(src):
        lake.copy(f"{src}/{name}", f"{dst}/{name}")


def _version_key(layout: Layout, version: str) -> str:
    return layout.key(layout.batch_version(version))


def _carry_over(layout: Layout, version: str, view: str, staging: str) -> None:
    """Carry an unchanged view's files from the published version into the staging prefix."""
    copy_dir(data_files(layout.store), f"{_version_key(layout, version)}/{view}", f"{staging}/{view}")


def _carry_index(layout: Layout, version: str, source: str, index: IdIndex, staging: str) -> None:
    base = _version_key(layout, version)
    for s in index.segments:
        copy_dir(data_files(layout.store), f"{base}/{IDS_DIR}/{source}/{s}", f"{staging}/{IDS_DIR}/{source}/{s}")
