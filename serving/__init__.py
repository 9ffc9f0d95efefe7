"""Serving layer: DuckDB merges the published batch version and speed snapshot on every query.

- :func:`serving.connection.connect` (also :func:`serving.connect`) — a locked-down DuckDB connection where every
  view of the pipeline is a table named after the view (batch ⊕ speed, merged per query), ``master.<source>`` is
  the raw master dataset and ``lambdalake.*`` describes what was read (versions, watermarks, freshness).
- :func:`serving.connection.refresh` — move a long-lived connection to the newest published pair.
- :mod:`serving.plans` — a view is served only from pieces made by its declared definition; while a changed
  view is rebuilt, queries on it fail with one line, or (``allow_stale=True``, ``--allow-stale``) read the newest
  kept pair of one earlier definition (:mod:`serving.published` chooses the pairs).
- :func:`serving.catalog.write_catalog` — a DuckDB database file the stock DuckDB CLI can open.
- ``lambdalake sql`` / ``lambdalake catalog`` — the command-line entry points (:mod:`serving.cli`).
"""

from typing import Any

__all__ = ["connect", "refresh", "write_catalog"]


def __getattr__(name: str) -> Any:
    # Lazy: `lambdalake <any command>` imports serving.cli; DuckDB/pyarrow load only when serving is used.
    if name in ("connect", "refresh"):
        from serving import connection

        return getattr(connection, name)
    if name == "write_catalog":
        from serving.catalog import write_catalog

        return write_catalog
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
