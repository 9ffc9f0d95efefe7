"""The work the Airflow DAGs schedule, as plain functions of :class:`~lambdalake.config.Settings` and a pipeline.

The ``lambdalake_batch`` DAG runs, per run:

1. :func:`archive` — make sure the master dataset has caught up to the end offsets the log had when the task
   started: run the archiver until caught up, or, if an archiver daemon already owns the lake, wait for it.
2. :func:`plan_batch` — decide what the run has to do: ``batch`` when the watermark the batch job would choose
   (archived ends aligned to the handoff block) is ahead of the published one, a view definition changed, or
   nothing is published yet; ``validate`` when the published version was never validated and announced by the DAG
   (published by hand, or an earlier run failed after publishing); else ``none``. Nothing new = no new version, so
   an idle hourly DAG does not churn versions (and the K kept versions stay useful for rollback).
3. The Spark batch job (``batch/job.py`` through ``spark-submit``; not in this module): computes every view into
   a staging directory, validates it and publishes it by an atomic pointer switch.
4. :func:`validate_published` — an independent check of the published version from outside Spark: files and row
   counts equal the manifest, no null keys, and every view's totals (count, sum, min, max over all rows) equal the
   same aggregates recomputed with DuckDB over the deduplicated master events below the watermark.
5. Publish: the DAG emits the ``lambdalake_batch_views`` Asset event (:func:`asset_event_extra`) and records the
   version as announced (:func:`mark_announced`, ``checkpoints/airflow/announced/<version>.json``), so each
   version is announced once even when runs are cleared and re-run.
6. :func:`speed_handoff` — make sure the speed layer drops what the version covers: wait for a running speed
   layer to hand off, or run it once until caught up (it prunes on start), or nothing if it never ran.

Every step is idempotent: re-running it (or the whole run) leaves the published result as it was.

Configuration (:func:`lake_config`): an Airflow Variable ``lambdalake_<key>`` wins over the environment variable
``LAMBDALAKE_<KEY>``; unset keys fall back to the project defaults (:func:`lambdalake.config.load_settings`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lambdalake.config import Settings, load_settings
from lambdalake.exceptions import ConfigError, InvariantViolation, LambdalakeError
from lambdalake.handoff import aligned_watermark
from lambdalake.layout import Layout, current_batch_manifest, current_speed_snapshot, watermark_of
from lambdalake.pipeline import WINDOW_START, Pipeline, View, load_pipeline

log = logging.getLogger(__name__)

# key -> environment variable; the Airflow Variable is ``lambdalake_<key>``.
CONFIG_KEYS: dict[str, str] = {
    "home": "LAMBDALAKE_HOME",
    "bootstrap": "LAMBDALAKE_BOOTSTRAP",
    "pipeline": "LAMBDALAKE_PIPELINE",
    "partitions": "LAMBDALAKE_PARTITIONS",
    "handoff_block": "LAMBDALAKE_HANDOFF_BLOCK",
    "batch_keep": "LAMBDALAKE_BATCH_KEEP",
}

ASSET_NAME = "lambdalake_batch_views"


class OrchestrationError(LambdalakeError):
    """A DAG step could not do its job (the message says why and what to do)."""

    exit_code = 8


class ValidationFailed(InvariantViolation):
    """The published batch version disagrees with its manifest or with the master dataset."""


# --- configuration ---------------------------------------------------------------------------------------------
def _airflow_variable(key: str) -> str | None:
    from airflow.sdk import Variable

    value = Variable.get(key, default=None)
    return None if value in (None, "") else str(value)


def lake_config(variables: Callable[[str], str | None] | None = _airflow_variable,
                environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The lake configuration as ``{LAMBDALAKE_*: value}`` for the keys that are set.

    ``variables`` looks up ``lambdalake_<key>`` (an Airflow Variable by default; None = environment only).
    The home directory is made absolute: Airflow workers do not share the launcher's working directory.
    """
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for key, env_name in CONFIG_KEYS.items():
        value = variables(f"lambdalake_{key}") if variables is not None else None
        if value is None and environ.get(env_name):
            value = environ[env_name]
        if value is not None:
            out[env_name] = value
    out["LAMBDALAKE_HOME"] = str(Path(out.get("LAMBDALAKE_HOME", "data")).expanduser().resolve())
    return out


def _int(cfg: Mapping[str, str], name: str) -> int | None:
    raw = cfg.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} (or Airflow Variable {_variable_name(name)}) is not an integer") from None
    if value < 1:
        raise ConfigError(f"{name}={value} (or Airflow Variable {_variable_name(name)}) must be >= 1")
    return value


def _variable_name(env_name: str) -> str:
    return env_name.lower()


def settings_from(cfg: Mapping[str, str]) -> Settings:
    """:class:`Settings` from a :func:`lake_config` dict (unset keys: the project defaults)."""
    pipeline = cfg.get("LAMBDALAKE_PIPELINE")
    if pipeline and pipeline.endswith(".py") and Path(pipeline).expanduser().is_file():
        pipeline = str(Path(pipeline).expanduser().resolve())  # workers and spark-submit run elsewhere
    settings = load_settings(home=cfg.get("LAMBDALAKE_HOME"), bootstrap=cfg.get("LAMBDALAKE_BOOTSTRAP"),
                             pipeline=pipeline, partitions=_int(cfg, "LAMBDALAKE_PARTITIONS"))
    block = _int(cfg, "LAMBDALAKE_HANDOFF_BLOCK")
    return settings.with_(handoff_block=block) if block is not None else settings


def batch_keep(cfg: Mapping[str, str]) -> int:
    """Batch versions to keep (``LAMBDALAKE_BATCH_KEEP``; the batch layer's default otherwise)."""
    from batch.publish import DEFAULT_KEEP

    keep = _int(cfg, "LAMBDALAKE_BATCH_KEEP")
    keep = DEFAULT_KEEP if keep is None else keep
    if keep < 2:
        raise ConfigError(f"LAMBDALAKE_BATCH_KEEP={keep} must be >= 2 (the current and the previous version)")
    return keep


def load(cfg: Mapping[str, str]) -> tuple[Settings, Pipeline]:
    """Settings and the loaded pipeline for a :func:`lake_config` dict."""
    settings = settings_from(cfg)
    return settings, load_pipeline(settings.pipeline)


# Passed through to the Spark job when set (the job reads them itself).
SPARK_PASSTHROUGH = ("LAMBDALAKE_SPARK_SHUFFLE_PARTITIONS", "LAMBDALAKE_LOG", "JAVA_HOME")


def spark_env(cfg: Mapping[str, str], settings: Settings) -> dict[str, str]:
    """Environment of the ``spark-submit`` running ``batch/job.py``: the resolved lake configuration (the job reads
    ``LAMBDALAKE_*`` itself) and the Python that runs the driver (``PYSPARK_PYTHON`` if set, else this one)."""
    env = {"LAMBDALAKE_HOME": str(settings.home), "LAMBDALAKE_PIPELINE": settings.pipeline,
           "LAMBDALAKE_HANDOFF_BLOCK": str(settings.handoff_block), "LAMBDALAKE_BATCH_KEEP": str(batch_keep(cfg))}
    env["PYSPARK_PYTHON"] = os.environ.get("PYSPARK_PYTHON") or sys.executable
    env["PYSPARK_DRIVER_PYTHON"] = os.environ.get("PYSPARK_DRIVER_PYTHON") or sys.executable
    env.update({k: os.environ[k] for k in SPARK_PASSTHROUGH if os.environ.get(k)})
    return env


# --- 1. archive ------------------------------------------------------------------------------------------------
@dataclass
class ArchiveResult:
    """What :func:`archive` did: ``ran`` (the archiver ran here) or ``waited`` (a daemon owns the lake)."""

    mode: str
    targets: dict[str, dict[str, int]]  # topic -> partition -> end offset it had to reach
    archived: dict[str, dict[str, int]]  # topic -> partition -> archived end afterwards
    messages: int = 0
    files: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def archive(settings: Settings, pipeline: Pipeline, *, wait_timeout: float = 900.0,
            poll_interval: float = 2.0) -> ArchiveResult:
    """Bring the master dataset up to the log's end offsets as of now (idempotent: a caught-up lake is a no-op).

    Runs the archiver until caught up. If another archiver (a daemon) holds the lake's archiver lock, waits until
    it has archived up to those end offsets instead, raising :class:`OrchestrationError` after ``wait_timeout``.
    """
    from batch.archiver import ingest
    from batch.exceptions import ArchiverLocked
    from lambdalake.kafka import end_offsets

    t0 = time.monotonic()
    topics = {s.topic: s for s in pipeline.sources}
    try:
        report = ingest(settings, pipeline, until_caught_up=True, handle_signals=False)
    except ArchiverLocked as exc:
        log.info("%s; waiting for it to catch up instead", exc)
        targets = end_offsets(settings, topics)
        deadline = time.monotonic() + wait_timeout
        while True:
            archived = _archived(settings, pipeline)
            behind = {tp: end for tp, end in targets.items() if archived.get(tp, 0) < end}
            if not behind:
                return ArchiveResult("waited", _nested(targets), _nested(archived),
                                     seconds=time.monotonic() - t0)
            if time.monotonic() >= deadline:
                (t, p), end = next(iter(behind.items()))
                raise OrchestrationError(
                    f"the running archiver did not reach the log's end offsets within {wait_timeout:.0f}s "
                    f"({len(behind)} partitions behind, e.g. {t}[{p}] archived {archived.get((t, p), 0)} < {end}); "
                    "is it stuck? see `lambdalake status`") from None
            time.sleep(poll_interval)
    targets = {(s.topic, p): end for name, parts in report.positions.items()
               for s in [pipeline.source(name)] for p, end in parts.items()}
    return ArchiveResult("ran", _nested(targets), _nested(_archived(settings, pipeline)), messages=report.messages,
                         files=report.files, seconds=time.monotonic() - t0)


def _archived(settings: Settings, pipeline: Pipeline) -> dict[tuple[str, int], int]:
    from batch.compact import master_readers_lock, snapshot_files

    layout = Layout(settings.home)
    out: dict[tuple[str, int], int] = {}
    with master_readers_lock(layout):
        for src in pipeline.sources:
            for f in snapshot_files(layout, src):  # sorted by (partition, start): the last one ends the range
                out[(src.topic, f.partition)] = f.end
    return out


def _nested(flat: Mapping[tuple[str, int], int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (t, p), v in sorted(flat.items()):
        out.setdefault(t, {})[str(p)] = int(v)
    return out


# --- 2. plan ---------------------------------------------------------------------------------------------------
@dataclass
class BatchPlan:
    """What the run has to do, and why: ``action`` is ``batch`` (compute and publish a new version), ``validate``
    (the published version was never validated and announced by the DAG, e.g. it was published by hand or a
    previous run failed after publishing) or ``none``."""

    action: str
    reason: str
    published_version: str | None
    published_watermark: dict[str, dict[str, int]]
    next_watermark: dict[str, dict[str, int]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_batch(settings: Settings, pipeline: Pipeline, *, force: bool = False) -> BatchPlan:
    """Compare what the batch job would compute now with what is published (see the module docstring, step 2)."""
    from batch.job import view_fingerprint

    layout = Layout(settings.home)
    block = settings.handoff_block
    manifest = current_batch_manifest(layout)
    published = watermark_of(manifest)
    version = None if manifest is None else str(manifest["version"])
    nxt = {tp: aligned_watermark(end, block) for tp, end in _archived(settings, pipeline).items()}

    def plan(action: str, reason: str) -> BatchPlan:
        if action == "none" and version is not None and not announced(settings, version):
            action, reason = "validate", f"{reason}, but version {version} was not validated and announced yet"
        return BatchPlan(action, reason, version, _nested(published), _nested(nxt))

    if not any(nxt.values()):
        return plan("none", f"the master dataset holds no complete block of {block} offsets yet")
    if force:
        return plan("batch", "forced")
    if manifest is None:
        return plan("batch", "nothing is published yet")
    if manifest.get("pipeline") != pipeline.name:
        return plan("batch", f"the published version is of pipeline {manifest.get('pipeline')!r}, "
                             f"not {pipeline.name!r}")
    if int(manifest.get("block", -1)) != block:
        return plan("batch", f"the published version was cut at handoff block {manifest.get('block')}, now {block}")
    ahead = sorted(tp for tp, w in nxt.items() if w > published.get(tp, 0))
    if ahead:
        return plan("batch", f"the watermark advances in {len(ahead)} partitions (e.g. {ahead[0][0]}[{ahead[0][1]}] "
                             f"{published.get(ahead[0], 0)} -> {nxt[ahead[0]]})")
    meta = manifest.get("views") or {}
    changed = [v.name for v in pipeline.views if (meta.get(v.name) or {}).get("fingerprint")
               != view_fingerprint(pipeline, v)]
    if changed:
        return plan("batch", f"view definitions changed or missing in the published version: {', '.join(changed)}")
    return plan("none", f"published version {version} already covers the archived data")


def _announcements(settings: Settings) -> Path:
    return Layout(settings.home).checkpoints("airflow") / "announced"


def announced(settings: Settings, version: str) -> bool:
    """Whether the DAG validated ``version`` and emitted its Asset event (:func:`mark_announced`)."""
    return (_announcements(settings) / f"{version}.json").is_file()


def mark_announced(settings: Settings, extra: Mapping[str, Any]) -> Path:
    """Record that the version in ``extra`` was validated and announced (atomic; re-announcing overwrites)."""
    import json

    from lambdalake.layout import atomic_write_bytes

    path = _announcements(settings) / f"{extra['version']}.json"
    atomic_write_bytes(path, (json.dumps(dict(extra), sort_keys=True, indent=1) + "\n").encode())
    return path


# --- 4. validate -----------------------------------------------------------------------------------------------
@dataclass
class ValidationReport:
    """What :func:`validate_published` checked, per view."""

    version: str
    watermark: dict[str, dict[str, int]]
    row_counts: dict[str, int]
    events: dict[str, int]
    totals: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_published(settings: Settings, pipeline: Pipeline) -> ValidationReport | None:
    """Check the published batch version against its manifest and the master dataset (None: nothing published).

    1. The manifest is of this pipeline and names every view; each view's files hold ``row_counts[view]`` rows.
    2. No null in a view's keys (those the source declares non-nullable) nor in ``window_start``.
    3. Totals: per view, count/sum/min/max over all its rows equal the same aggregate over the deduplicated master
       events below the watermark (first occurrence per partition and event id), recomputed here with DuckDB; the
       manifest's ``events`` per source equals that event count.

    Raises :class:`ValidationFailed` naming the first disagreement.
    """
    import duckdb
    import pyarrow.parquet as pq

    from batch.compact import master_readers_lock, snapshot_files

    layout = Layout(settings.home)
    manifest = current_batch_manifest(layout)
    if manifest is None:
        return None
    version = str(manifest["version"])
    vdir = layout.batch_version(version)

    def fail(msg: str) -> ValidationFailed:
        return ValidationFailed(f"batch version {version} ({vdir}): {msg}; roll back with "
                                "`lambdalake batch --rollback` if serving must not show it")

    # 1. manifest vs files
    if manifest.get("pipeline") != pipeline.name:
        raise fail(f"manifest is of pipeline {manifest.get('pipeline')!r}, expected {pipeline.name!r}")
    watermark = watermark_of(manifest)
    row_counts: dict[str, int] = {}
    files_of: dict[str, list[str]] = {}
    for view in pipeline.views:
        files = sorted(str(f) for f in (vdir / view.name).glob("*.parquet"))
        expected = (manifest.get("row_counts") or {}).get(view.name)
        if expected is None:
            raise fail(f"manifest has no row count for view {view.name!r}")
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        if rows != int(expected):
            raise fail(f"view {view.name!r} has {rows} rows in {len(files)} files, the manifest says {expected}")
        row_counts[view.name], files_of[view.name] = rows, files

    con = duckdb.connect()
    try:
        con.execute("SET threads = 2")
        report = ValidationReport(version, _nested(watermark), row_counts, {})
        with master_readers_lock(layout):  # compaction must not swap master files while we read them
            for src in pipeline.sources:
                wm = {p: w for (t, p), w in watermark.items() if t == src.topic}
                masters = [str(f.path) for f in snapshot_files(layout, src) if f.start < wm.get(f.partition, 0)]
                events = _master_events_sql(src.event_id, masters, wm)
                n_events = con.execute(f"SELECT count(*) FROM ({events})").fetchone()[0] if masters else 0
                if int((manifest.get("events") or {}).get(src.name, n_events)) != n_events:
                    raise fail(f"manifest says {manifest['events'][src.name]} deduplicated events of source "
                               f"{src.name!r}, the master dataset below the watermark holds {n_events}")
                report.events[src.name] = n_events
                for view in pipeline.views_of(src):
                    report.totals[view.name] = _check_view(con, pipeline, view, files_of[view.name],
                                                           events if masters else None, fail)
        return report
    finally:
        con.close()


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _master_events_sql(event_id: str, files: list[str], wm: dict[int, int]) -> str:
    """Deduplicated valid events below the watermark: the row with the lowest offset per (partition, event id)."""
    cases = " ".join(f"WHEN {p} THEN {w}" for p, w in sorted(wm.items()))
    below = f"_offset < (CASE _partition {cases} ELSE 0 END)" if wm else "FALSE"
    return (f"SELECT * FROM read_parquet({_sql_list(files)}) WHERE {below} "
            f"QUALIFY row_number() OVER (PARTITION BY _partition, {_ident(event_id)} ORDER BY _offset) = 1")


def _check_view(con: Any, pipeline: Pipeline, view: View, files: list[str], events_sql: str | None,
                fail: Callable[[str], ValidationFailed]) -> dict[str, Any]:
    """Steps 2 and 3 of :func:`validate_published` for one view; returns the totals it compared."""
    fields = pipeline.source_of(view).field_map
    strict = [k for k in view.keys if fields[k].required and not fields[k].nullable] + [WINDOW_START]
    stored = view.stored_aggregates
    if not files:
        if events_sql is not None and con.execute(f"SELECT count(*) FROM ({events_sql})").fetchone()[0]:
            raise fail(f"view {view.name!r} has no rows but the master dataset has events below the watermark")
        return {}
    rel = f"read_parquet({_sql_list(files)})"
    nulls = con.execute("SELECT " + ", ".join(f"count(*) FILTER (WHERE {_ident(k)} IS NULL)" for k in strict)
                        + f" FROM {rel}").fetchone()
    for k, n in zip(strict, nulls, strict=True):
        if n:
            raise fail(f"view {view.name!r} has {n} null values in key {k!r}")
    if not stored:
        return {}
    merge = {"count": "sum", "sum": "sum", "min": "min", "max": "max"}
    view_totals = con.execute("SELECT " + ", ".join(f"{merge[a.kind]}({_ident(a.name)})" for a in stored)
                              + f" FROM {rel}").fetchone()
    if events_sql is None:
        master_totals: tuple = tuple(0 if a.kind == "count" else None for a in stored)
    else:
        master_totals = con.execute("SELECT " + ", ".join(
            "count(*)" if a.kind == "count" else f"{a.kind}({_ident(a.column or '')})" for a in stored)
            + f" FROM ({events_sql})").fetchone()
    totals: dict[str, Any] = {}
    for a, got, want in zip(stored, view_totals, master_totals, strict=True):
        if a.kind == "count":  # SQL's sum over no rows is NULL; no rows counted is 0 events
            got, want = got or 0, want or 0
        if got != want:
            raise fail(f"view {view.name!r}: {merge[a.kind]} of {a.name!r} over the view is {got}, but {a.kind} "
                       f"over the deduplicated master events below the watermark is {want}")
        totals[a.name] = got if isinstance(got, int | float | str | None) else str(got)
    return totals


# --- 5. publish ------------------------------------------------------------------------------------------------
def asset_event_extra(settings: Settings, report: ValidationReport) -> dict[str, Any]:
    """The extra of the ``lambdalake_batch_views`` Asset event: which version, where, at which watermark."""
    return {"home": str(settings.home), "version": report.version, "watermark": report.watermark,
            "row_counts": report.row_counts, "events": report.events}


# --- 6. speed handoff ------------------------------------------------------------------------------------------
@dataclass
class HandoffResult:
    """What :func:`speed_handoff` did: ``none`` (no speed layer), ``done`` (already handed off), ``waited``
    (a running speed layer handed off) or ``ran`` (the speed layer was run once here)."""

    mode: str
    version: str | None
    pruned_to: dict[str, dict[str, int]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def speed_running(settings: Settings) -> int | None:
    """The pid of a running ``lambdalake speed`` on this lake (from its lock file), or None."""
    import psutil

    lock = Layout(settings.home).checkpoints("speed") / "LOCK"
    try:
        pid = int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid == os.getpid():
        return None
    try:
        proc = psutil.Process(pid)
        return pid if proc.status() != psutil.STATUS_ZOMBIE and proc.is_running() else None
    except psutil.Error:
        return None


def _handed_off(snapshot: dict | None, watermark: dict[tuple[str, int], int]) -> bool:
    pruned = {(t, int(p)): int(o) for t, parts in ((snapshot or {}).get("pruned_to") or {}).items()
              for p, o in parts.items()}
    return all(pruned.get(tp, 0) >= w for tp, w in watermark.items())


def speed_handoff(settings: Settings, pipeline: Pipeline, *, wait_timeout: float = 300.0,
                  poll_interval: float = 1.0) -> HandoffResult:
    """Make sure the speed layer has dropped what the published batch version covers (step 6).

    The speed layer prunes by itself when it notices a new published version; this step only makes that happen
    now: nothing to do if the speed layer never ran on this lake; wait for a running one; otherwise run it once
    until caught up (it hands off to the published version on start).
    """
    layout = Layout(settings.home)
    manifest = current_batch_manifest(layout)
    version = None if manifest is None else str(manifest["version"])
    watermark = {tp: w for tp, w in watermark_of(manifest).items()
                 if tp[0] in {s.topic for s in pipeline.sources}}
    snap = current_speed_snapshot(layout)

    def result(mode: str, s: dict | None) -> HandoffResult:
        return HandoffResult(mode, version, (s or {}).get("pruned_to") or {})

    if manifest is None or (snap is None and speed_running(settings) is None):
        return result("none", snap)
    if _handed_off(snap, watermark):
        return result("done", snap)
    pid = speed_running(settings)
    if pid is not None:
        deadline = time.monotonic() + wait_timeout
        while time.monotonic() < deadline:
            time.sleep(poll_interval)
            snap = current_speed_snapshot(layout)
            if _handed_off(snap, watermark):
                return result("waited", snap)
            if speed_running(settings) is None:
                break  # it stopped meanwhile: run it once below
        else:
            raise OrchestrationError(f"the running speed layer (pid {pid}) did not hand off to batch version "
                                     f"{version} within {wait_timeout:.0f}s; see `lambdalake status`")
    from speed.consumer import SpeedLayer

    SpeedLayer(settings, pipeline).run(until_caught_up=True)
    snap = current_speed_snapshot(layout)
    if not _handed_off(snap, watermark):
        raise OrchestrationError(f"the speed layer ran but its snapshot is not handed off to batch version {version} "
                                 f"(pruned_to {(snap or {}).get('pruned_to')}, watermark {_nested(watermark)})")
    return result("ran", snap)


# --- maintenance -----------------------------------------------------------------------------------------------
def compact_master(settings: Settings, pipeline: Pipeline) -> dict[str, Any]:
    """Compaction of small adjacent master files (:func:`batch.compact.compact`, atomic and recorded)."""
    from batch.compact import compact

    report = compact(settings.home, pipeline)
    return asdict(report)


def prune_batch_versions(settings: Settings, keep: int) -> list[str]:
    """Delete batch versions beyond the newest ``keep`` (never the current one nor the one before it)."""
    from batch.publish import prune_versions

    return prune_versions(settings.home, keep=keep)
