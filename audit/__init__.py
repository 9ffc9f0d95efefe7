"""The audit layer (``lambdalake audit``): checks the whole lake end to end against independent recomputations.

It stands above the layers (it reads the log, master, the batch and speed pieces, and serving's answers) and
interprets views with :mod:`lambdalake.viewsql`'s DuckDB interpreter, never with the code paths that produced them.
See :mod:`audit.check`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from audit.check import audit
    from audit.report import AuditReport, Difference

__all__ = ["audit", "AuditReport", "Difference"]


def __getattr__(name: str):
    """The public names, imported on first use: every ``lambdalake`` command imports this package to register
    ``lambdalake audit``, and :mod:`audit.check` (DuckDB, pyarrow, Kafka) costs ~0.4 s to import."""
    if name == "audit":
        from audit.check import audit

        return audit
    if name in __all__:
        import audit.report

        return getattr(audit.report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
