"""Every error amstream raises on purpose; each also inherits the builtin it resembles."""
from __future__ import annotations

__all__ = [
    "AmstreamError",
    "ConfigError",
    "CheckpointError",
    "DatasetError",
    "OffsetError",
    "DecodeError",
]


class AmstreamError(Exception):
    """Base class of amstream's own errors."""


class ConfigError(AmstreamError, ValueError):
    """A configuration value is invalid; the message names the field and the value."""


class CheckpointError(AmstreamError, OSError):
    """A checkpoint file is missing, corrupt, truncated, or does not match the model."""


class DatasetError(AmstreamError, FileNotFoundError):
    """A dataset is not available here; the message says how to get it."""


class OffsetError(AmstreamError, ValueError):
    """A stream offset went backwards or is otherwise inconsistent."""


class DecodeError(AmstreamError, ValueError):
    """A message could not be decoded into a valid sample; the message says why."""
