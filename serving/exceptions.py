"""Errors of the serving layer a user can act on (all :class:`lambdalake.exceptions.LambdalakeError`)."""

from lambdalake.exceptions import InvariantViolation, LambdalakeError


class ServingError(LambdalakeError):
    """Base class of serving-layer errors."""


class QueryError(ServingError):
    """DuckDB rejected a query (syntax, binding, permission); the message is DuckDB's own, on one line."""


class InconsistentPublishedState(InvariantViolation):
    """The published batch version and speed snapshot cannot be paired without double counting or losing events
    (unaligned watermark, speed pruned past the batch watermark, unexpected columns); refusing to guess."""
