"""Thin wiring the Airflow DAGs in ``dags/`` share: run-time lake configuration, announcements, the speed handoff.

The work itself belongs to the layers, which the DAG files call directly:

=====================  ==============================================================================
DAG task               code
=====================  ==============================================================================
``archive``            :func:`batch.catch_up.archive` (archiver until caught up, or wait for the daemon)
``plan``               :func:`batch.plan.plan_batch` + :func:`next_action` (announcement bookkeeping)
``spark_batch``        ``batch/job.py`` through ``spark-submit`` (:func:`spark_env` is its environment)
``verify``             :func:`batch.verify.verify_published` (independent re-check of the published version)
``announce``           :func:`announce` (the ``lambdalake_batch_views`` Asset event + the announcement record)
``speed_handoff``      :func:`speed_handoff` (calls the speed layer; see its note)
``compact``            :func:`batch.compact.compact`
``retire_versions``     :func:`lambdalake.versions.retire_versions`
=====================  ==============================================================================

Configuration (:func:`lake_config`): an Airflow Variable ``lambdalake_<key>`` wins over the environment variable
``LAMBDALAKE_<KEY>``; unset keys fall back to the project defaults (:func:`lambdalake.config.load_settings`).

Apart from :func:`speed_handoff`, nothing here imports a layer (``batch``, ``speed``, ``serving``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lambdalake.config import Settings, lake_url, load_settings, parse_number
from lambdalake.exceptions import LambdalakeError
from lambdalake.layout import Layout
from lambdalake.pipeline import Pipeline, load_pipeline

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


# --- configuration -----------------------------------------------------------------------------------------------
def _airflow_variable(key: str) -> str | None:
    from airflow.sdk import Variable

    value = Variable.get(key, default=None)
    return None if value in (None, "") else str(value)


def lake_config(variables: Callable[[str], str | None] | None = _airflow_variable,
                environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The lake configuration as ``{LAMBDALAKE_*: value}`` for the keys that are set.

    ``variables`` looks up ``lambdalake_<key>`` (an Airflow Variable by default; None = environment only).
    The home directory is made absolute: Airflow workers do not share the launcher's working directory (a lake on
    object storage, ``s3://...``, stays a URL).
    """
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for key, env_name in CONFIG_KEYS.items():
        value = variables(f"lambdalake_{key}") if variables is not None else None
        if value is None and environ.get(env_name):
            value = environ[env_name]
        if value is not None:
            out[env_name] = value
    home = out.get("LAMBDALAKE_HOME", "data")
    out["LAMBDALAKE_HOME"] = lake_url(home) or str(Path(home).expanduser().resolve())
    return out


def _int(cfg: Mapping[str, str], name: str, minimum: int = 1, why: str = "") -> int | None:
    raw = cfg.get(name)
    return None if raw is None else parse_number(name, raw, int, minimum, why,
                                                 where=f" (or Airflow Variable {name.lower()})")


def settings_from(cfg: Mapping[str, str]) -> Settings:
    """:class:`Settings` from a :func:`lake_config` dict (unset keys: the project defaults)."""
    pipeline = cfg.get("LAMBDALAKE_PIPELINE")
    if pipeline and pipeline.endswith(".py") and Path(pipeline).expanduser().is_file():
        pipeline = str(Path(pipeline).expanduser().resolve())  # workers and spark-submit run elsewhere
    settings = load_settings(home=cfg.get("LAMBDALAKE_HOME"), bootstrap=cfg.get("LAMBDALAKE_BOOTSTRAP"),
                             pipeline=pipeline, partitions=_int(cfg, "LAMBDALAKE_PARTITIONS"), object_storage=True)
    block = _int(cfg, "LAMBDALAKE_HANDOFF_BLOCK")
    return settings.with_(handoff_block=block) if block is not None else settings


def batch_keep(cfg: Mapping[str, str]) -> int | None:
    """Batch versions to keep (``LAMBDALAKE_BATCH_KEEP``); None: the batch layer's default."""
    return _int(cfg, "LAMBDALAKE_BATCH_KEEP", minimum=2, why=" (the current and the previous version)")


def load(cfg: Mapping[str, str]) -> tuple[Settings, Pipeline]:
    """Settings and the loaded pipeline for a :func:`lake_config` dict."""
    settings = settings_from(cfg)
    return settings, load_pipeline(settings.pipeline)


# Passed through to the Spark job when set (the job reads them itself; the AWS settings: a lake on object storage).
SPARK_PASSTHROUGH = ("LAMBDALAKE_SPARK_SHUFFLE_PARTITIONS", "LAMBDALAKE_LOG", "JAVA_HOME", "LAMBDALAKE_WORK_DIR",
                     "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                     "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def spark_env(cfg: Mapping[str, str], settings: Settings) -> dict[str, str]:
    """Environment of the ``spark-submit`` running ``batch/job.py``: the resolved lake configuration (the job reads
    ``LAMBDALAKE_*`` itself) and the Python that runs the driver (``PYSPARK_PYTHON`` if set, else this one)."""
    env = {"LAMBDALAKE_HOME": settings.lake or str(settings.home), "LAMBDALAKE_PIPELINE": settings.pipeline,
           "LAMBDALAKE_HANDOFF_BLOCK": str(settings.handoff_block)}
    keep = batch_keep(cfg)
    if keep is not None:
        env["LAMBDALAKE_BATCH_KEEP"] = str(keep)
    env["PYSPARK_PYTHON"] = os.environ.get("PYSPARK_PYTHON") or sys.executable
    env["PYSPARK_DRIVER_PYTHON"] = os.environ.get("PYSPARK_DRIVER_PYTHON") or sys.executable
    env.update({k: os.environ[k] for k in SPARK_PASSTHROUGH if os.environ.get(k)})
    return env


# --- plan: the announcement bookkeeping on top of the batch layer's plan ------------------------------------------
def next_action(settings: Settings, action: str, reason: str, version: str | None) -> tuple[str, str]:
    """The DAG's branch for a batch plan (``batch`` / ``none``): ``none`` becomes ``verify`` when the published
    version was never verified and announced by the DAG (published by hand, or an earlier run failed after
    publishing)."""
    if action == "none" and version is not None and not announced(settings, version):
        return "verify", f"{reason}, but version {version} was not verified and announced yet"
    return action, reason


# --- announce ----------------------------------------------------------------------------------------------------
def _announcement_key(version: str) -> str:
    return f"checkpoints/airflow/announced/{version}.json"


def announced(settings: Settings, version: str) -> bool:
    """Whether the DAG verified ``version`` and emitted its Asset event (:func:`announce`)."""
    return Layout.of(settings.home, settings.lake).store.exists(_announcement_key(version))


def asset_event_extra(settings: Settings, report: Any) -> dict[str, Any]:
    """The extra of the ``lambdalake_batch_views`` Asset event for a verification report: which version, where, at
    which watermark."""
    done = report.to_dict()
    return {"home": settings.lake or str(settings.home), "version": done["version"], "watermark": done["watermark"],
            "row_counts": done["row_counts"], "events": done["events"]}


def announce(settings: Settings, extra: Mapping[str, Any]) -> Path:
    """Record that the version in ``extra`` was verified and its Asset event emitted (one object put through the
    storage seam: atomic; idempotent). Returns its path (on object storage: its key under the work directory)."""
    import json

    key = _announcement_key(extra["version"])
    layout = Layout.of(settings.home, settings.lake)
    layout.store.put(key, (json.dumps(dict(extra), sort_keys=True, indent=1) + "\n").encode())
    return layout.home / key
