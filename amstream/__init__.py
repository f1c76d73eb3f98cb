"""amstream: streaming and continual learning by online alternating minimization.

Importing this package imports torch and numpy only: Kafka, River and Avalanche are
imported by their own adapters (`amstream.connectors`, `amstream.river`,
`amstream.avalanche`) when those are used.
"""
from __future__ import annotations

__version__ = "0.1.0"

from amstream.config import AMConfig
from amstream.exceptions import AmstreamError, CheckpointError, ConfigError, DatasetError
from amstream.learner import Learner, make_learner

__all__ = [
    "AMConfig",
    "AmstreamError",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "Learner",
    "make_learner",
    "__version__",
]
