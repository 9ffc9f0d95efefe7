"""The pipeline declaration: one definition that every engine interprets.

A :class:`Pipeline` has *sources* (a Kafka topic with a JSON schema, an event-id field, an event-time field and a
subject/key field) and *views* (group-by keys, an event-time bucket, and aggregates from a closed set of mergeable
ones). The batch job (Spark), the speed layer (Python), the serving merge (DuckDB SQL) and the audit all read this
object; none of them hard-codes a view.

The pieces live by idea: sources and their fields in :mod:`lambdalake.fields`, the closed set of mergeable
aggregates in :mod:`lambdalake.aggregates`, view filters (``where=``) in :mod:`lambdalake.predicates`; this module
holds views, the pipeline that checks them against their sources, the definition fingerprints and the loader.

A view's *stored* columns are its mergeable aggregates plus hidden ones a mean needs (``__sum_<col>``,
``__count``) when the view does not declare them itself. Its *output* columns are the keys, ``window_start``
(UTC timestamp, start of the event-time bucket) and the declared aggregates in declaration order.

Example (a user's own pipeline file, loaded with ``--pipeline path/to/file.py``)::

    from datetime import timedelta
    from lambdalake import Field, Pipeline, Source, View, count, sum_, mean

    signups = Source(
        name="signups", topic="shop.signups", key="user_id", event_id="event_id", event_time="event_time",
        fields=[Field.string("event_id", max_length=128), Field.timestamp("event_time"),
                Field.string("user_id"), Field.string("country", pattern=r"^[A-Z]{2}$")],
    )
    pipeline = Pipeline("shop", sources=[signups],
                        views=[View("signups_daily", source="signups", keys=["country"],
                                    bucket=timedelta(days=1), aggregates=[count("signups")])])
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from lambdalake.aggregates import Aggregate, Mean
from lambdalake.exceptions import PipelineError
from lambdalake.fields import NAME, NUMERIC_TYPES, SKETCH_TYPES, Source, field_doc
from lambdalake.instants import MAX_BUCKET
from lambdalake.predicates import Predicate, resolve_predicate

WINDOW_START = "window_start"
US_PER_SECOND = 1_000_000


@dataclass(frozen=True)
class View:
    """An aggregate view over one source, bucketed by event time (never by arrival time)."""

    name: str
    source: str
    keys: Sequence[str]
    bucket: timedelta
    aggregates: Sequence[Aggregate | Mean]
    where: Predicate | None = None  # only events for which it holds count (see Predicate)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "aggregates", tuple(self.aggregates))
        if not NAME.match(self.name):
            raise PipelineError(f"view name {self.name!r} must match {NAME.pattern} (it becomes a table name)")
        bucket_us = self.bucket // timedelta(microseconds=1)
        if bucket_us <= 0 or self.bucket % timedelta(seconds=1):
            raise PipelineError(f"view {self.name!r}: bucket {self.bucket} must be a positive whole number of seconds")
        if self.bucket > MAX_BUCKET:
            raise PipelineError(f"view {self.name!r}: bucket {self.bucket} is longer than the maximum "
                                f"{MAX_BUCKET.days} days; declare a shorter bucket")
        if not self.aggregates:
            raise PipelineError(f"view {self.name!r}: declare at least one aggregate")
        outs = list(self.keys) + [WINDOW_START] + [a.name for a in self.aggregates]
        if len(set(outs)) != len(outs):
            raise PipelineError(f"view {self.name!r}: output column names collide: {outs}")

    @property
    def bucket_us(self) -> int:
        return self.bucket // timedelta(microseconds=1)

    @property
    def input_fields(self) -> tuple[str, ...]:
        """Fields the view reads besides the event time: keys, aggregated columns, filtered fields."""
        cols = [*self.keys, *(a.column for a in self.stored_aggregates if a.column)]
        return tuple(dict.fromkeys([*cols, *(self.where.fields if self.where is not None else ())]))

    @property
    def means(self) -> tuple[Mean, ...]:
        """Derived means with the stored columns they divide resolved."""
        return tuple(self._resolve()[1])

    @property
    def stored_aggregates(self) -> tuple[Aggregate, ...]:
        """Mergeable columns physically stored by batch and speed (declared + hidden helpers for means)."""
        return tuple(self._resolve()[0])

    @property
    def output_columns(self) -> tuple[str, ...]:
        return (*self.keys, WINDOW_START, *(a.name for a in self.aggregates))

    def _resolve(self) -> tuple[list[Aggregate], list[Mean]]:
        stored = [a for a in self.aggregates if isinstance(a, Aggregate)]
        means: list[Mean] = []
        for m in (a for a in self.aggregates if isinstance(a, Mean)):
            s = next((a for a in stored if a.kind == "sum" and a.column == m.column), None)
            if s is None:
                s = Aggregate(f"__sum_{m.column}", "sum", m.column)
                stored.append(s)
            c = next((a for a in stored if a.kind == "count"), None)
            if c is None:
                c = Aggregate("__count", "count")
                stored.append(c)
            means.append(Mean(m.name, m.column, s.name, c.name))
        return stored, means


@dataclass(frozen=True)
class Pipeline:
    """Sources and the views computed from them. Construct it in a Python file as ``pipeline = Pipeline(...)``."""

    name: str
    sources: Sequence[Source]
    views: Sequence[View] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "views", tuple(self.views))
        if not NAME.match(self.name):
            raise PipelineError(f"pipeline name {self.name!r} must match {NAME.pattern}")
        if not self.sources:
            raise PipelineError(f"pipeline {self.name!r} declares no sources")
        _unique("source", [s.name for s in self.sources])
        _unique("topic", [s.topic for s in self.sources])
        _unique("view/source", [v.name for v in self.views] + [s.name for s in self.sources])
        sources = self.source_map
        for v in self.views:
            src = sources.get(v.source)
            if src is None:
                raise PipelineError(f"view {v.name!r}: unknown source {v.source!r}; known: {sorted(sources)}")
            fields = src.field_map
            for k in v.keys:
                if k not in fields:
                    raise PipelineError(f"view {v.name!r}: key {k!r} is not a field of source {src.name!r}")
                if fields[k].type == "timestamp":
                    raise PipelineError(f"view {v.name!r}: key {k!r} is a timestamp; bucket by event time instead")
                if fields[k].type == "number":
                    raise PipelineError(f"view {v.name!r}: key {k!r} is a float number; group by a decimal, "
                                        "integer or string field instead")
            if v.where is not None:
                resolve_predicate(v.where, src, f"view {v.name!r}")
            for a in v.aggregates:
                col = a.column
                if col is None:
                    continue
                f = fields.get(col)
                if f is None:
                    raise PipelineError(f"view {v.name!r}: aggregate {a.name!r} reads unknown field {col!r}")
                if isinstance(a, Mean) and (not f.required or f.nullable):
                    # sum skips nulls but the count counts every event: the quotient would not be a mean
                    raise PipelineError(f"view {v.name!r}: mean {a.name!r} over optional field {col!r} is not "
                                        "supported; make the field required or declare sum_ and count instead")
                if isinstance(a, Aggregate) and a.kind == "approx_distinct":
                    if f.type not in SKETCH_TYPES:
                        raise PipelineError(f"view {v.name!r}: approx_distinct {a.name!r} needs a string, integer or "
                                            f"decimal field; {col!r} is {f.type}")
                    if not isinstance(a.lg_k, int) or not 4 <= a.lg_k <= 21:
                        raise PipelineError(f"view {v.name!r}: approx_distinct {a.name!r}: lg_k must be an integer "
                                            f"from 4 to 21, not {a.lg_k!r}")
                numeric_only = isinstance(a, Mean) or a.kind == "sum"
                if numeric_only and f.type not in NUMERIC_TYPES:
                    raise PipelineError(f"view {v.name!r}: aggregate {a.name!r} needs an integer, decimal or number "
                                        f"field; {col!r} is {f.type}")
                if f.type == "timestamp":
                    raise PipelineError(f"view {v.name!r}: aggregate {a.name!r} over timestamp {col!r} "
                                        "is not supported")

    @property
    def source_map(self) -> dict[str, Source]:
        return {s.name: s for s in self.sources}

    @property
    def view_map(self) -> dict[str, View]:
        return {v.name: v for v in self.views}

    def source(self, name: str) -> Source:
        try:
            return self.source_map[name]
        except KeyError:
            known = sorted(self.source_map)
            raise PipelineError(f"unknown source {name!r}; pipeline {self.name!r} has {known}") from None

    def view(self, name: str) -> View:
        try:
            return self.view_map[name]
        except KeyError:
            raise PipelineError(f"unknown view {name!r}; pipeline {self.name!r} has {sorted(self.view_map)}") from None

    def source_of(self, view: View) -> Source:
        return self.source_map[view.source]

    def source_for_topic(self, topic: str) -> Source:
        for s in self.sources:
            if s.topic == topic:
                return s
        raise PipelineError(f"topic {topic!r} belongs to no source of pipeline {self.name!r}")

    def views_of(self, source: Source) -> tuple[View, ...]:
        return tuple(v for v in self.views if v.source == source.name)

    def where(self, view: View | str) -> Predicate | None:
        """The view's filter with its constants as stored values (timestamps in UTC µs, decimals as scaled
        integers); None: every event counts. What the engines interpret."""
        view = self.view(view) if isinstance(view, str) else view
        if view.where is None:
            return None
        return resolve_predicate(view.where, self.source_of(view), f"view {view.name!r}")

    def fingerprint(self, view: View | str) -> str:
        """The identity of a view's *definition*: a hash of everything its rows depend on besides the data.

        It covers the view (name, keys, bucket, every aggregate with its kind and column, means included) and its
        source (topic, event id, event time, key, and every field with its type and validation rules: a changed
        ``maximum`` of any field changes which events are valid, hence the view), and the view's filter (with its
        constants as stored values). A view without a filter, over fields of the first three types, has the
        fingerprint it had before filters and the decimal/boolean/number types existed. Every stored piece of a view
        (batch version, speed state and snapshot) records the fingerprint that made it; serving pairs only pieces
        whose fingerprint equals the declared one (docs/design.md, "Definitions change").
        """
        view = self.view(view) if isinstance(view, str) else view
        src = self.source_of(view)
        doc = {
            "view": {"name": view.name, "source": view.source, "keys": list(view.keys), "bucket_us": view.bucket_us,
                     "aggregates": [[type(a).__name__, a.name, getattr(a, "kind", "mean"), a.column,
                                     *([a.lg_k] if getattr(a, "kind", "") == "approx_distinct" else [])]
                                    for a in view.aggregates]},
            "source": {"name": src.name, "topic": src.topic, "event_id": src.event_id, "event_time": src.event_time,
                       "key": src.key, "fields": [field_doc(f) for f in src.fields]},
        }
        where = self.where(view)
        if where is not None:
            doc["view"]["where"] = where.doc()
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def legacy_fingerprint(self, view: View | str) -> str:
        """The fingerprint lambdalake 0.1 recorded in batch manifests (format 1), for upgraded lakes only."""
        view = self.view(view) if isinstance(view, str) else view
        src = self.source_of(view)
        text = repr((view.name, view.keys, view.bucket_us, view.stored_aggregates, src.name, src.fields, src.event_id,
                     src.event_time))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def fingerprints(self) -> dict[str, str]:
        """``{view name: fingerprint}`` of every declared view."""
        return {v.name: self.fingerprint(v) for v in self.views}


def _unique(what: str, names: Iterable[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise PipelineError(f"duplicate {what} name {n!r}")
        seen.add(n)


def load_pipeline(spec: str, *, fresh: bool = False) -> Pipeline:
    """Load a pipeline from a Python file path (``my/pipeline.py``) or a module path (``pkg.mod``).

    The module must define a module-level ``pipeline`` of type :class:`Pipeline`. A file is imported once per
    process; ``fresh`` imports it again (a running process noticing that the user edited it).
    """
    path = Path(spec)
    if spec.endswith(".py") or path.exists():
        if not path.is_file():
            raise PipelineError(f"pipeline file {spec!r} not found; pass --pipeline path/to/pipeline.py "
                                "or a module path like lambdalake.pipelines.clickstream")
        mod_name = f"_lambdalake_pipeline_{abs(hash(str(path.resolve())))}"
        if fresh:
            sys.modules.pop(mod_name, None)
        if mod_name in sys.modules:
            module = sys.modules[mod_name]
        else:
            mspec = importlib.util.spec_from_file_location(mod_name, path)
            if mspec is None or mspec.loader is None:
                raise PipelineError(f"cannot import pipeline file {spec!r}")
            module = importlib.util.module_from_spec(mspec)
            sys.modules[mod_name] = module
            try:
                mspec.loader.exec_module(module)
            except PipelineError:
                del sys.modules[mod_name]
                raise
            except Exception as exc:  # user code: report it, do not crash with a traceback
                del sys.modules[mod_name]
                raise PipelineError(f"pipeline file {spec!r} failed to import: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError as exc:
            raise PipelineError(f"pipeline module {spec!r} not found ({exc}); pass a file path or an importable "
                                "module path") from exc
        except PipelineError:
            raise
        except Exception as exc:
            raise PipelineError(f"pipeline module {spec!r} failed to import: {type(exc).__name__}: {exc}") from exc
    pipe = getattr(module, "pipeline", None)
    if not isinstance(pipe, Pipeline):
        raise PipelineError(f"{spec!r} defines no module-level `pipeline = Pipeline(...)`")
    return pipe
