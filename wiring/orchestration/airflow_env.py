"""The environment Airflow runs with for this project (``lambdalake airflow``, the tests, ``airflow dags test``).

Everything is passed as environment variables (``AIRFLOW__SECTION__KEY``, ``AIRFLOW_CONN_*``), so nothing is
written into ``airflow.cfg`` and a user's own settings (already in the environment) win where noted:

- ``AIRFLOW_HOME``: project-local, ``<repo>/.airflow`` by default (git-ignored); SQLite metadata database.
- the repo's ``dags/`` folder, no example DAGs, low parallelism (a laptop shares its cores with Spark).
- the API server on ``127.0.0.1:<port>`` (``--host 0.0.0.0`` to expose it), its base URL (the task workers
  reach the execution API through it).
- the ``spark_default`` connection built from ``LAMBDALAKE_SPARK_MASTER`` (``local[*]`` by default) — unless
  ``AIRFLOW_CONN_SPARK_DEFAULT`` is already set or a connection of that name exists in the metadata database
  (environment connections shadow database ones, so a UI-edited connection needs ``--no-spark-conn``).
- the lake configuration (``LAMBDALAKE_HOME`` made absolute, bootstrap, pipeline, handoff block) for the tasks.
- the virtualenv's ``bin/`` first on ``PATH``: the SparkSubmitOperator runs ``spark-submit`` from there.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from lambdalake.config import Settings
from lambdalake.exceptions import ConfigError

PACKAGE_REPO = Path(__file__).resolve().parents[2]
PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"
ADMIN_USER = "admin"


def require_airflow() -> None:
    """Airflow is an optional extra (``pip install 'lambdalake[airflow]'``; ``make install`` adds it): say so in one
    line when it is missing instead of a traceback."""
    try:
        import airflow  # noqa: F401
    except ImportError as exc:
        raise ConfigError("Airflow is not installed in this environment: it is the optional extra `airflow` of "
                          "lambdalake (pip install 'lambdalake[airflow]'; `make install` adds it)") from exc


def dags_folder() -> Path:
    """The repo's ``dags/`` (``LAMBDALAKE_DAGS_FOLDER`` overrides)."""
    override = os.environ.get("LAMBDALAKE_DAGS_FOLDER")
    return Path(override).resolve() if override else PACKAGE_REPO / "dags"


def default_airflow_home() -> Path:
    """``<repo>/.airflow`` (git-ignored) when running from a checkout, else ``./.airflow``."""
    if (PACKAGE_REPO / "dags").is_dir() and os.access(PACKAGE_REPO, os.W_OK):
        return PACKAGE_REPO / ".airflow"
    return Path(".airflow").resolve()


def spark_connection(master: str) -> str:
    """``AIRFLOW_CONN_SPARK_DEFAULT`` value for a Spark master URL (``local[*]``, ``spark://h:7077``, ``yarn``...)."""
    return json.dumps({"conn_type": "spark", "host": master, "description": "lambdalake: LAMBDALAKE_SPARK_MASTER"})


def airflow_environment(airflow_home: Path, settings: Settings, *, port: int = 8080, host: str = "127.0.0.1",
                        spark_conn: bool = True, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The full environment for Airflow processes of this project (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    env["AIRFLOW_HOME"] = str(Path(airflow_home).resolve())
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(dags_folder()))
    env["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    env.setdefault("AIRFLOW__CORE__PARALLELISM", "4")
    env.setdefault("AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG", "2")
    env.setdefault("AIRFLOW__API__WORKERS", "1")
    env["AIRFLOW__API__HOST"] = host
    env["AIRFLOW__API__PORT"] = str(port)
    env["AIRFLOW__API__BASE_URL"] = f"http://{'localhost' if host in ('0.0.0.0', '127.0.0.1') else host}:{port}"
    env.setdefault("AIRFLOW__CORE__DAG_FILE_PROCESSOR_TIMEOUT", "120")
    env.setdefault("AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL", "30")
    if spark_conn:
        env.setdefault("AIRFLOW_CONN_SPARK_DEFAULT", spark_connection(settings.spark_master))
    env["LAMBDALAKE_HOME"] = settings.lake or str(settings.home)
    env["LAMBDALAKE_PIPELINE"] = settings.pipeline
    env["LAMBDALAKE_HANDOFF_BLOCK"] = str(settings.handoff_block)
    env["LAMBDALAKE_PARTITIONS"] = str(settings.partitions)
    env["LAMBDALAKE_SPARK_MASTER"] = settings.spark_master
    if not settings.bootstrap_is_embedded:  # else the tasks find the embedded broker's state file in the lake
        env["LAMBDALAKE_BOOTSTRAP"] = settings.bootstrap
    venv_bin = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if venv_bin not in path.split(os.pathsep):
        env["PATH"] = os.pathsep.join([venv_bin, path]) if path else venv_bin
    return env


def admin_password(airflow_home: Path) -> str | None:
    """The admin password ``airflow standalone`` generated (``$AIRFLOW_HOME/`` + :data:`PASSWORDS_FILE`)."""
    try:
        return json.loads((Path(airflow_home) / PASSWORDS_FILE).read_text()).get(ADMIN_USER)
    except (OSError, ValueError):
        return None
