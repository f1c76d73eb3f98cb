"""Every error amstream raises on purpose; each also inherits the builtin it resembles."""
from __future__ import annotations

__all__ = [
    "AmstreamError",
    "ConfigError",
    "CheckpointError",
    "CheckpointsLostError",
    "DatasetError",
    "OffsetError",
    "OffsetRewindError",
    "DecodeError",
    "DistributedError",
    "StreamError",
]


class AmstreamError(Exception):
    """Base class of amstream's own errors."""


class ConfigError(AmstreamError, ValueError):
    """A configuration value is invalid; the message names the field and the value."""


class CheckpointError(AmstreamError, OSError):
    """A checkpoint file is missing, corrupt, truncated, or does not match the model."""


class CheckpointsLostError(CheckpointError):
    """A checkpoint directory holds checkpoints, and none of them can be read."""


class DatasetError(AmstreamError, FileNotFoundError):
    """A dataset is not available here; the message says how to get it."""


class OffsetError(AmstreamError, ValueError):
    """A stream offset went backwards or is otherwise inconsistent."""


class OffsetRewindError(OffsetError):
    """A partition restarted below the next offset already handed out, without a seek.

    Raised by `KafkaSource.next_batch` when the consumer reset a partition (for instance
    after ``OffsetOutOfRange`` because the broker lost its data). Attributes: ``partition``
    (``(topic, partition)``), ``offset`` (where it restarted), ``expected`` (the next offset
    that was due).
    """

    def __init__(self, partition: tuple, offset: int, expected: int) -> None:
        super().__init__(
            f"offset of `{partition[0]}:{partition[1]}` went backwards: got `{offset}`, "
            f"expected at least `{expected}`"
        )
        self.partition = partition
        self.offset = offset
        self.expected = expected

    def __reduce__(self):  # picklable despite the custom signature
        return (type(self), (self.partition, self.offset, self.expected))


class DistributedError(AmstreamError, RuntimeError):
    """A rank of a distributed run lost its peers: one died (its connections closed) or did not
    answer in time; the message says which collective and what to do."""


class DecodeError(AmstreamError, ValueError):
    """A message could not be decoded into a valid sample; the message says why."""


class StreamError(AmstreamError):
    """A source or sink failed to read or write.

    ``transient`` says whether trying again later can help: True for a broker that cannot be
    reached (serve keeps retrying with backoff), False for an error no retry fixes (records in a
    compression codec this machine cannot decode, a corrupt record batch, a refused
    authorization, a topic that does not exist while auto-create is off): serve checkpoints
    what it learned and exits with this message.
    """

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = bool(transient)

    def __reduce__(self):
        return (_stream_error, (str(self), self.transient))


def _stream_error(message: str, transient: bool) -> StreamError:
    return StreamError(message, transient=transient)
