"""Configuration: one place that resolves where the lake lives, which Kafka to talk to, and the knobs.

Precedence, highest first: explicit arguments (CLI options) > environment variables (``LAMBDALAKE_*``) >
the embedded broker's state file (for the bootstrap address) > defaults.

=========================  ====================================  =====================================
environment variable       meaning                               default
=========================  ====================================  =====================================
LAMBDALAKE_HOME            the lake directory                    ``./data``
LAMBDALAKE_BOOTSTRAP       Kafka bootstrap servers (host:port,…)  the embedded broker, else 127.0.0.1:9092
LAMBDALAKE_PIPELINE        pipeline file or module path          the shipped ``clickstream`` demo
LAMBDALAKE_PARTITIONS      partitions per created topic          4
LAMBDALAKE_HANDOFF_BLOCK   offsets per handoff block (see        1000, or what ``<home>/lake.json``
                           :mod:`lambdalake.handoff`)            fixed for the lake
LAMBDALAKE_SPARK_MASTER    Spark master URL                      ``local[*]``
LAMBDALAKE_POSTGRES        the CDC source's PostgreSQL           the embedded server
                           (``postgresql://`` URL,
                           :mod:`lambdalake.postgres`)
LAMBDALAKE_CONNECT         Kafka Connect REST URL                the embedded worker
                           (:mod:`lambdalake.connect`)
=========================  ====================================  =====================================
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from lambdalake.exceptions import ConfigError

DEFAULT_PIPELINE = "lambdalake.pipelines.clickstream"
DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_HANDOFF_BLOCK = 1000


def parse_number(name: str, raw: str, kind: type[int] | type[float] = int, minimum: float | None = None,
                 why: str = "", where: str = "") -> int | float:
    """The one rule for a number given as text (environment variable, Airflow Variable): ``name`` and ``where``
    (e.g. `` (or Airflow Variable x)``) word the actionable error."""
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer; set it to a whole number" if kind is int else "a number"
        raise ConfigError(f"{name}={raw!r}{where} is not {what}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value}{where} must be >= {minimum}{why}")
    return value


def env_int(name: str, default: int, minimum: int = 1, why: str = "") -> int:
    """An integer environment variable (``default`` if unset or empty), with an actionable error if it is not one."""
    raw = os.environ.get(name)
    return default if not raw else parse_number(name, raw, int, minimum, why)


def env_float(name: str, default: float, minimum: float | None = None, why: str = "") -> float:
    """A number environment variable (``default`` if unset or empty)."""
    raw = os.environ.get(name)
    return default if not raw else parse_number(name, raw, float, minimum, why)


@dataclass(frozen=True)
class KafkaConnection:
    """Where the Kafka log is: only commands that talk to Kafka resolve it (:attr:`Settings.kafka`)."""

    bootstrap: str
    embedded: bool  # the embedded broker of this lake (``lambdalake kafka up``), not a user's cluster


def kafka_connection(home: Path, bootstrap: str | None = None) -> KafkaConnection:
    """Resolve the bootstrap servers: argument > ``LAMBDALAKE_BOOTSTRAP`` > the embedded broker's state file >
    the embedded default. Raises ConfigError on a malformed address."""
    boot = bootstrap or os.environ.get("LAMBDALAKE_BOOTSTRAP")
    embedded = False
    if not boot:
        state = embedded_broker_state(home)
        boot = state["bootstrap"] if state and state.get("bootstrap") else DEFAULT_BOOTSTRAP
        embedded = True
    _check_bootstrap(boot)
    return KafkaConnection(boot, embedded)


@dataclass(frozen=True)
class Settings:
    """Resolved configuration shared by every layer. Immutable; derive variants with :meth:`with_`.

    The lake (``home``, the pipeline, the handoff block, Spark) is resolved eagerly; the Kafka connection lazily,
    on first use of :attr:`kafka` — so ``batch``, ``sql``, ``catalog`` and friends never need a broker address, and
    a malformed ``LAMBDALAKE_BOOTSTRAP`` only stops the commands that read the log.
    """

    home: Path
    pipeline: str
    partitions: int = 4
    handoff_block: int = 1000
    spark_master: str = "local[*]"
    bootstrap_arg: str | None = None  # --bootstrap as given (None: environment, state file or default)
    extra: dict = field(default_factory=dict)
    lake: str = ""  # s3://bucket/prefix of a lake on object storage ("": the local directory ``home``)

    def with_(self, **changes) -> Settings:
        return replace(self, **changes)

    @cached_property
    def kafka(self) -> KafkaConnection:
        return kafka_connection(self.home, self.bootstrap_arg)

    @property
    def bootstrap(self) -> str:
        return self.kafka.bootstrap

    @property
    def bootstrap_is_embedded(self) -> bool:
        return self.kafka.embedded

    def group_id(self, layer: str, pipeline: str) -> str:
        """The consumer group of a streaming layer's workers: ``lambdalake-<layer>.<pipeline>.<lake tag>``. The tag
        (8 hex digits of the lake's location: its URL, or its resolved directory) keeps two lakes fed by the same
        topics — staging and production, or two test lakes on one broker — from splitting the partitions between
        them; every machine that names the same lake joins the same group."""
        import hashlib

        where = self.lake or str(Path(self.home).resolve())
        return f"lambdalake-{layer}.{pipeline}.{hashlib.sha256(where.encode()).hexdigest()[:8]}"


def embedded_broker_state(home: Path) -> dict | None:
    """The embedded broker's state file (written by ``lambdalake kafka up``), or None."""
    state_file = home / "kafka" / "broker.json"
    try:
        return json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None


def load_settings(
    home: str | Path | None = None,
    bootstrap: str | None = None,
    pipeline: str | None = None,
    partitions: int | None = None,
    spark_master: str | None = None,
    *,
    object_storage: bool = False,
) -> Settings:
    """Resolve settings from arguments and environment. The Kafka address is checked when first used.
    ``object_storage``: the command runs on a lake on object storage too (:func:`resolve_home`)."""
    home_path = resolve_home(home, object_storage=object_storage)
    if home_path.exists() and not home_path.is_dir():
        raise ConfigError(f"lake directory {home_path} exists but is not a directory; point LAMBDALAKE_HOME elsewhere")
    block = _handoff_block(home_path, lake_url(home))
    parts = partitions if partitions is not None else env_int("LAMBDALAKE_PARTITIONS", 4)
    if parts < 1:
        raise ConfigError(f"--partitions {parts} must be >= 1")
    return Settings(
        home=home_path,
        pipeline=pipeline or os.environ.get("LAMBDALAKE_PIPELINE") or DEFAULT_PIPELINE,
        partitions=parts,
        handoff_block=block,
        spark_master=spark_master or os.environ.get("LAMBDALAKE_SPARK_MASTER") or "local[*]",
        bootstrap_arg=bootstrap,
        lake=lake_url(home) or "",
    )


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")  # also "s3:/b": a Path option collapses the "//"


def lake_url(home: str | Path | None = None) -> str | None:
    """``s3://bucket/prefix`` when the lake (``home`` > ``LAMBDALAKE_HOME``) is on object storage, else None (a local
    directory, also given as ``file://``). Another scheme is a ConfigError: a directory named ``gs:`` made silently
    in the working directory would look like a lake elsewhere while being none."""
    raw = str(home or os.environ.get("LAMBDALAKE_HOME") or "data")
    m = _URL.match(raw)
    if m is None or m.group(1).lower() == "file":
        return None
    if m.group(1).lower() != "s3":
        raise ConfigError(f"lake {raw!r}: no storage for {m.group(1)}:// lakes; a lake is a local directory or "
                          "s3://bucket/prefix")
    rest = raw[m.end():].lstrip("/")  # a Path option collapses s3://b into s3:/b
    if not rest.split("/")[0]:
        raise ConfigError(f"lake {raw!r}: expected s3://bucket/prefix")
    return "s3://" + rest.rstrip("/")


def work_dir(url: str) -> Path:
    """The local directory of a machine working on the object-storage lake ``url``: its own locks and temporary
    files, never lake data (``LAMBDALAKE_WORK_DIR``; default ``~/.cache/lambdalake/lakes/<bucket>/<prefix>``)."""
    given = os.environ.get("LAMBDALAKE_WORK_DIR")
    if given:
        return Path(given).expanduser().resolve()
    return (Path.home() / ".cache" / "lambdalake" / "lakes" / url.removeprefix("s3://")).resolve()


def resolve_home(home: str | Path | None = None, *, object_storage: bool = False) -> Path:
    """The lake directory: ``home`` > ``LAMBDALAKE_HOME`` > ``./data``, absolute. For a lake on object storage
    (``s3://bucket/prefix``): the machine's :func:`work_dir` when the command can run there (``object_storage``),
    else a ConfigError saying which commands can."""
    raw = str(home or os.environ.get("LAMBDALAKE_HOME") or "data")
    url = lake_url(raw)
    if url is not None:
        if not object_storage:
            raise ConfigError(f"lake {url}: this command needs a local directory (a path in --home or "
                              "LAMBDALAKE_HOME); every command that reads or writes the lake runs on object storage, "
                              "but `kafka`, `cdc` and `demo` keep their servers' files in a local directory (run them "
                              "before exporting LAMBDALAKE_HOME=s3://..., and `demo --s3` for the demo on a bucket)")
        return work_dir(url)
    if _URL.match(raw):  # file://
        raw = raw[len("file:"):].lstrip("/")
        raw = "/" + raw
    return Path(raw).expanduser().resolve()


def require_existing_lake(home: str | Path | None = None) -> Path:
    """The lake directory (as :func:`resolve_home`) of a command that only reads a lake (``sql``, ``catalog``,
    ``status``): ConfigError if it does not exist, so a mistyped ``--home`` is an error rather than an empty lake.
    Commands that create a lake (``ingest``, ``speed``, ``batch``, ``demo``, ``kafka up`` ...) do not call this."""
    path = resolve_home(home)
    if not path.exists():
        raise ConfigError(f"lake directory {path} does not exist; pass --home (or set LAMBDALAKE_HOME to) the "
                          "directory the archiver, batch and speed layers write to")
    if not path.is_dir():
        raise ConfigError(f"lake directory {path} exists but is not a directory; point LAMBDALAKE_HOME elsewhere")
    return path


LAKE_FILE = "lake.json"


def lake_file(home: Path) -> Path:
    """``<home>/lake.json``: properties fixed for the life of a lake (today: the handoff block size)."""
    return home / LAKE_FILE


def _handoff_block(home: Path, lake: str | None = None) -> int:
    """The lake's handoff block: fixed in lake.json once set (batch and speed must agree on it), else env/default.
    A lake on object storage keeps lake.json in its bucket (every machine reads the same one)."""
    env_block = env_int("LAMBDALAKE_HANDOFF_BLOCK", DEFAULT_HANDOFF_BLOCK)
    where = f"{lake}/{LAKE_FILE}" if lake else str(lake_file(home))
    try:
        if lake:
            from lambdalake.storage import ObjectMissing, open_store

            try:
                text = open_store(lake).get(LAKE_FILE).decode()
            except ObjectMissing:
                return env_block
        else:
            text = lake_file(home).read_text()
        fixed = json.loads(text).get("handoff_block")
    except FileNotFoundError:
        return env_block
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where} is unreadable ({exc}); fix or delete it") from None
    if os.environ.get("LAMBDALAKE_HANDOFF_BLOCK") and env_block != fixed:
        raise ConfigError(f"the lake {home} uses handoff block {fixed} (lake.json) but LAMBDALAKE_HANDOFF_BLOCK="
                          f"{env_block}; unset the variable or use a new lake directory")
    return int(fixed)


def fix_handoff_block(home: Path, block: int, lake: str = "") -> None:
    """Record the handoff block of a new lake in lake.json (no-op if the lake already has one; on object storage
    the object ``lake.json``, created only if absent)."""
    from lambdalake.layout import atomic_write_bytes

    if lake:
        from lambdalake.storage import open_store

        open_store(lake).put_if_absent(LAKE_FILE, (json.dumps({"handoff_block": block}) + "\n").encode())
        return
    if not lake_file(home).exists():
        atomic_write_bytes(lake_file(home), (json.dumps({"handoff_block": block}) + "\n").encode())


def _check_bootstrap(boot: str) -> None:
    for server in boot.split(","):
        host, sep, port = server.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"bootstrap server {server!r} is not host:port; "
                "set LAMBDALAKE_BOOTSTRAP like 'broker1:9092,broker2:9092'"
            )
