"""amstream: streaming and continual learning by online alternating minimization.

Importing this package imports neither torch nor Kafka, River or Avalanche: the learner
names below are loaded on first use (so ``amstream --version`` stays instant), and each
integration is imported only by its own adapter (`amstream.connectors`, `amstream.river`,
`amstream.avalanche`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from amstream.config import AMConfig
from amstream.exceptions import AmstreamError, CheckpointError, ConfigError, DatasetError

if TYPE_CHECKING:  # pragma: no cover
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


def __getattr__(name: str) -> Any:
    if name in ("Learner", "make_learner"):
        from amstream import learner

        return getattr(learner, name)
    raise AttributeError(f"module 'amstream' has no attribute {name!r}")
