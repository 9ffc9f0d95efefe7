"""Errors of the serving layer a user can act on (all :class:`lambdalake.exceptions.LambdalakeError`)."""

from lambdalake.exceptions import InvariantViolation, LambdalakeError


class ServingError(LambdalakeError):
    """Base class of serving-layer errors."""


class QueryError(ServingError):
    """DuckDB rejected a query (syntax, binding, permission); the message is DuckDB's own, on one line."""


class InconsistentPublishedState(InvariantViolation):
    """The published batch version and speed snapshot cannot be paired without double counting or losing events
    (unaligned watermark, speed pruned past the batch watermark, unexpected columns); refusing to guess."""


class ViewRebuilding(ServingError):
    """A query read a view whose declared definition both layers have not rebuilt yet (and no stale answer was
    asked for, or none is kept): ``view V is being rebuilt for its new definition: batch pending, speed 63%``."""


class QueryTimeout(QueryError):
    """A statement ran longer than the connection's statement timeout and was stopped."""

    exit_code = 124
