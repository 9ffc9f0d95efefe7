"""Errors of the speed layer. All are :class:`lambdalake.exceptions.LambdalakeError` subclasses, so the CLI prints
one actionable line instead of a traceback."""

from lambdalake.exceptions import ConfigError, InvariantViolation, LambdalakeError


class SpeedError(LambdalakeError):
    """Base class of speed-layer errors."""


class CheckpointFailed(SpeedError):
    """Writing a checkpoint failed (disk full, permissions, ...); the previous checkpoint stays in force."""


class SpeedAlreadyRunning(SpeedError):
    """Another ``lambdalake speed`` process holds the lake's speed lock; two writers would corrupt the state."""

    exit_code = 5


class SpeedFenced(SpeedError):
    """Another process claimed this speed worker's checkpoint since this one did (a restart elsewhere while this one
    was paused, or the same worker started twice on two machines): nothing this one writes is published any more."""

    exit_code = 6


class SpeedConfigError(ConfigError):
    """A speed-layer option is out of range (checkpoint interval, dedup span, ...)."""


class CheckpointCorrupt(InvariantViolation):
    """The checkpoint on disk is unreadable or inconsistent with its snapshot; refusing to guess."""


class HandoffContractError(InvariantViolation):
    """A published batch version breaks the handoff contract (block size mismatch, unaligned watermark)."""


class HandoffTimeout(SpeedError):
    """The speed layer did not hand off to the published batch version in time (the Airflow handoff step)."""

    exit_code = 8


class PositionsLost(InvariantViolation):
    """Offsets the speed layer still needs were deleted from Kafka (retention) before it read them."""
