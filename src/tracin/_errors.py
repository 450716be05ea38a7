"""Typed errors. Every error tracin raises for bad input is a `TracInError`.

Messages name the offending value, what was expected, and how to fix it. The CLI turns any
`TracInError` into one line on stderr and exit status 2.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EngineError",
    "HookError",
    "MissingDependencyError",
    "StoreError",
    "TaskError",
    "TracInError",
    "TracInWarning",
]


class TracInError(Exception):
    """Base class of every error tracin raises on bad input or state."""


class ConfigError(TracInError, ValueError):
    """An argument or configuration value is invalid."""


class CheckpointError(TracInError):
    """A checkpoint cannot be read, lacks a learning rate, or does not fit the model."""


class TaskError(TracInError):
    """A `Task` broke its contract (wrong shape, mean-reduced loss, missing batch key)."""


class DataError(TracInError):
    """The training or query data is unusable (empty, shuffled, non-finite gradients)."""


class EngineError(ConfigError):
    """The chosen gradient engine cannot compute this model's per-example gradients exactly."""


class HookError(EngineError, TaskError):
    """A hooked layer cannot be computed by the factored engine on this model or batch.

    Attributes:
        params: the layer's parameter names; ``engine="auto"`` computes them another way.
        quiet: an attempt that was expected to fail on some models (a bare parameter used in a
            way the hooks cannot follow): the parameters move to torch.func without a warning.
    """

    def __init__(self, message: str, params: tuple[str, ...] = (), quiet: bool = False) -> None:
        super().__init__(message)
        self.params = params
        self.quiet = quiet


class StoreError(TracInError):
    """The store on disk is missing, corrupted, or was written with another configuration."""


class MissingDependencyError(TracInError, ImportError):
    """An optional package is not installed; the message names the extra to install."""


class TracInWarning(UserWarning):
    """A notice about a choice tracin made for you (e.g. a slower, exact engine)."""
