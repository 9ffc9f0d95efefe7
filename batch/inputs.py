"""The inputs of a batch run (step 1 of the run protocol, :mod:`batch.job`): per source the master files below the
watermark ``W`` and the rejected files to judge again, recorded as lineage with size, rows and sha256 — a sha256 the
published version recorded for the same, unchanged file reused instead of hashing it again (:class:`KnownChecksums`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pyarrow.fs import FileInfo

from batch.exceptions import MasterBehindPublished
from batch.rejected import rejudged_files
from lambdalake.contracts import BatchManifest, InputFile, Positions
from lambdalake.exceptions import PipelineError
from lambdalake.fields import Source
from lambdalake.handoff import aligned_watermark
from lambdalake.heads import master_files
from lambdalake.layout import Layout, MasterFile
from lambdalake.pipeline import Pipeline
from lambdalake.storage.files import data_files


@dataclass(frozen=True)
class Inputs:
    """The master files a run reads (its lineage) and the watermark ``W`` it covers."""

    watermark: Positions
    archived: Positions  # archived end per partition (W trails it by < block)
    files: list[InputFile]
    rejudged: dict[str, list[MasterFile]]  # per source: rejected files to judge again (batch.rejected)
    rejected_files: list[InputFile]  # the same, as lineage

    def files_of(self, source: Source) -> list[InputFile]:
        return [f for f in self.files if f.source == source.name]


def select_inputs(layout: Layout, pipeline: Pipeline, block: int, fixed_watermark: Positions | None = None,
                  known: KnownChecksums | None = None) -> Inputs:
    """Step 1 of the run protocol. ``fixed_watermark`` reuses a published one (``--view``); ``known``: the
    checksums the published version recorded (:class:`KnownChecksums`), reused for files unchanged since."""
    if block < 1:
        raise PipelineError(f"handoff block {block} must be >= 1 (LAMBDALAKE_HANDOFF_BLOCK)")
    watermark: dict[tuple[str, int], int] = {}
    archived: dict[tuple[str, int], int] = {}
    inputs: list[InputFile] = []
    rejudged: dict[str, list[MasterFile]] = {}
    rejected: list[InputFile] = []
    for src in pipeline.sources:
        files = master_files(layout, src.name)
        ends: dict[int, int] = {}
        for f in files:  # sorted by (partition, start): the last file of a partition ends its range
            ends[f.partition] = f.end
        archived.update({(src.topic, p): e for p, e in ends.items()})
        if fixed_watermark is None:
            wm = {p: aligned_watermark(end, block) for p, end in ends.items()}
        else:
            wm = fixed_watermark.of_topic(src.topic)
            short = {p: w for p, w in wm.items() if ends.get(p, 0) < w}
            if short:
                raise MasterBehindPublished(f"master dataset of {src.name!r} no longer reaches the published "
                                            f"watermark {short} (archived ends {ends}); run a full batch")
        watermark.update({(src.topic, p): w for p, w in wm.items()})
        for f in files:
            if f.start >= wm.get(f.partition, 0):
                continue
            inputs.append(_input_file(layout, f, src, known))
        rejudged[src.name] = rejudged_files(layout, src, wm)
        rejected += [_input_file(layout, f, known=known) for f in rejudged[src.name]]
    return Inputs(Positions(watermark), Positions(archived), inputs, rejudged, rejected)


def check_not_behind(inputs: Inputs, published: BatchManifest | None) -> None:
    """Refuse, before any work, a run whose watermark would be below the published version's in some partition:
    publishing it would move the watermark backwards (the speed layer may already have dropped those blocks). It
    happens when the master dataset is behind what is published — a Kappa replay publishes from the log itself —
    and the cure is to let the archiver catch up."""
    if published is None:
        return
    behind = {k: (w, inputs.watermark.at(*k)) for k, w in published.watermark.items() if inputs.watermark.at(*k) < w}
    if not behind:
        return
    (t, p), (w_pub, w_new) = next(iter(sorted(behind.items())))
    engine = f" ({published.engine})" if published.engine else ""
    raise MasterBehindPublished(
        f"the published batch version {published.version}{engine} covers {t}[{p}] up to offset {w_pub}, but the "
        f"master dataset only allows {w_new} ({len(behind)} partitions behind): let the archiver catch up first "
        "(`lambdalake ingest --until-caught-up`); nothing was computed")


# A file modified less than this before a run started is hashed again by the next run (mtime granularity, clocks).
CHECKSUM_REUSE_MARGIN_S = 2.0


@dataclass(frozen=True)
class KnownChecksums:
    """The input checksums a published version recorded, reusable by the next run (master and rejected files are
    immutable: written once under a name of their offset range, replaced only by files of other names).

    A recorded sha256 is reused for a file at the same path with the same offset range and size whose mtime is
    older than that run's start (minus :data:`CHECKSUM_REUSE_MARGIN_S`): the run that recorded it hashed those very
    bytes. Any other file is hashed. The audit (``audit.check``) still re-hashes every input independently, so a
    file changed in place behind an unchanged mtime is reported there, never hidden."""

    files: dict[str, InputFile]
    before_ns: int  # files last modified before this instant (ns since the epoch) are unchanged since hashed

    @classmethod
    def of(cls, manifest: BatchManifest | None) -> KnownChecksums | None:
        if manifest is None or not manifest.started_at:
            return None
        try:
            started = datetime.fromisoformat(manifest.started_at.replace("Z", "+00:00"))
        except ValueError:
            return None
        before_ns = int((started.timestamp() - CHECKSUM_REUSE_MARGIN_S) * 1e9)
        return cls({f.path: f for f in [*manifest.inputs, *manifest.rejected_inputs]}, before_ns)

    def sha256(self, rel: str, f: MasterFile, st: FileInfo) -> str | None:
        rec = self.files.get(rel)
        if (rec is None or rec.bytes != st.size or st.mtime_ns is None or st.mtime_ns >= self.before_ns
                or (rec.partition, rec.start, rec.end) != (f.partition, f.start, f.end)):
            return None
        return rec.sha256


def _input_file(layout: Layout, f: MasterFile, source: Source | None = None,
                known: KnownChecksums | None = None) -> InputFile:
    """The lineage entry of ``f`` (one footer read; the sha256 reused from ``known`` when the file is unchanged
    since a published run hashed it); with ``source``, a master file, checked to hold every declared
    field: a field declared after the file was archived is not in it (the archiver stores declared fields only),
    so its values, and which events it makes valid, cannot be recomputed from master. Refused, never read as
    null."""
    files, rel = data_files(layout.store), layout.key(f.path)
    meta = files.parquet(rel).metadata
    missing = [] if source is None else [x.name for x in source.fields if x.name not in set(meta.schema.names)]
    if missing:
        raise PipelineError(
            f"source {source.name!r}: field(s) {', '.join(map(repr, missing))} are not in master file "
            f"{f.path.name} of partition {f.partition} (archived before they were declared), so the batch job cannot "
            "recompute views with them; rebuild from the log with `lambdalake replay` (Kappa) instead")
    st = files.info(rel)
    digest = known.sha256(rel, f, st) if known is not None else None
    return InputFile(rel, f.source, f.partition, f.start, f.end, st.size, digest or files.sha256(rel),
                     meta.num_rows)
