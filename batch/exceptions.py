"""Errors of the batch layer a user can act on (all :class:`lambdalake.exceptions.LambdalakeError`)."""

from lambdalake.exceptions import BrokerError, InvariantViolation, LambdalakeError


class ArchiverLocked(LambdalakeError):
    """Another archiver already writes this lake's master dataset (exactly one writer is allowed)."""

    exit_code = 5


class DeadLetterError(BrokerError):
    """The dead-letter topic is missing, mis-partitioned, or did not acknowledge a record."""


class NothingToCompute(LambdalakeError):
    """The master dataset holds no complete handoff block yet, so there is no batch version to compute."""

    exit_code = 6


class StagedCheckFailed(InvariantViolation):
    """A computed batch view failed a check of its staged output (row counts, null keys, schema); nothing was
    published."""


class MasterBehindPublished(InvariantViolation):
    """The master dataset does not reach the watermark of the published batch version (e.g. a Kappa replay
    published from the log ahead of the archiver), so a batch run now would move the watermark backwards."""


class ArchiverBehind(LambdalakeError):
    """A running archiver did not archive up to the log's end offsets in time."""

    exit_code = 8
