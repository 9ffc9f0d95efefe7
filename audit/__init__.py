"""The audit layer (``lambdalake audit``): checks the whole lake end to end against independent recomputations.

It stands above the layers (it reads the log, master, the batch and speed pieces, and serving's answers) and
interprets views with :mod:`batch.verify`'s DuckDB interpreter, never with the code paths that produced them.
See :mod:`audit.check`.
"""

from audit.check import AuditReport, Difference, audit

__all__ = ["audit", "AuditReport", "Difference"]
