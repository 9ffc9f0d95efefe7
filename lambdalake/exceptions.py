"""Errors a user can act on. The CLI prints their message on one line and exits non-zero, no traceback.

Every layer raises a subclass of :class:`LambdalakeError` for conditions caused by input, configuration or the
environment; anything else is a bug and keeps its traceback.
"""


class LambdalakeError(Exception):
    """Base class: the message says what was wrong, with the offending value, and what to do."""

    exit_code = 1


class ConfigError(LambdalakeError):
    """Bad configuration value (environment variable, option, config file)."""

    exit_code = 2


class PipelineError(LambdalakeError):
    """A pipeline file/module cannot be loaded or its declaration is inconsistent."""

    exit_code = 2


class BrokerError(LambdalakeError):
    """Kafka is unreachable, or the embedded broker failed to start/stop."""

    exit_code = 3


class InvariantViolation(LambdalakeError):
    """A paranoid check found a broken invariant (e.g. overlapping master files). Never silently continue."""

    exit_code = 4


class PublishError(LambdalakeError):
    """A batch version cannot be published, rolled back or retired as asked."""

    exit_code = 7
