"""Record checkpoints where training happens: state, step and the optimiser's lr, atomically.

Call `CheckpointRecorder.step` after ``optimizer.step()`` (and after ``scheduler.step()``), so
the saved lr is the one in force for the updates that follow the checkpoint, as TracInCP needs.
`CheckpointRecorder.checkpoints` then gives `Checkpoints` with the right learning rates and no
hand-written list.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tracin._checkpoints import Checkpoints
from tracin._errors import ConfigError
from tracin._store import atomic_write

__all__ = ["CheckpointRecorder", "log_spaced_steps"]


def log_spaced_steps(total_steps: int, count: int, first: int = 1) -> list[int]:
    """About ``count`` distinct steps from ``first`` to ``total_steps``, spaced logarithmically.

    Dense early in training (before the model fits mislabelled examples), sparse later.
    """
    if total_steps < 1 or count < 1 or first < 1:
        raise ConfigError(
            f"log_spaced_steps({total_steps}, {count}, first={first}): all must be >= 1"
        )
    raw = np.geomspace(first, total_steps, num=count)
    return sorted({round(float(s)) for s in raw})


class CheckpointRecorder:
    """Save checkpoints of a training loop into ``directory``.

    Args:
        directory: where ``step_<n>.pt`` files go.
        steps: the steps to save at (e.g. `log_spaced_steps`); ``None`` with ``every``.
        every: save every ``every`` steps instead.
        save_optimizer: also store the optimiser's state (Adam moments, for preconditioning).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        steps: Iterable[int] | None = None,
        every: int | None = None,
        save_optimizer: bool = False,
    ) -> None:
        if (steps is None) == (every is None):
            raise ConfigError("give exactly one of steps=[...] or every=N to CheckpointRecorder")
        if every is not None and (isinstance(every, bool) or every < 1):
            raise ConfigError(f"every={every!r} must be a positive integer")
        self.directory = Path(directory)
        self.steps = None if steps is None else frozenset(int(s) for s in steps)
        self.every = every
        self.save_optimizer = save_optimizer

    def wants(self, step: int) -> bool:
        """Whether ``step`` is a step to save at."""
        if self.steps is not None:
            return step in self.steps
        assert self.every is not None
        return step % self.every == 0

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> Path | None:
        """Save if ``step`` is one to save at; returns the file written, if any."""
        return self.save(model, optimizer, step) if self.wants(step) else None

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> Path:
        """Save ``model``'s state with ``step`` and the optimiser's current lr, atomically."""
        lrs = sorted({float(g["lr"]) for g in optimizer.param_groups})
        if len(lrs) != 1:
            raise ConfigError(
                f"the optimiser's parameter groups have different learning rates {lrs}; "
                "TracInCP weights each checkpoint by one lr: record them yourself and pass lr=[...]"
            )
        payload: dict[str, Any] = {
            "model_state_dict": {
                k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            },
            "step": int(step),
            "lr": lrs[0],
        }
        if self.save_optimizer:
            payload["optimizer_state_dict"] = optimizer.state_dict()
        buf = io.BytesIO()
        torch.save(payload, buf)
        path = self.directory / f"step_{int(step):09d}.pt"
        atomic_write(path, buf.getvalue())
        return path

    def paths(self) -> list[Path]:
        """The checkpoint files recorded so far, by step."""
        return sorted(self.directory.glob("step_*.pt"))

    def checkpoints(self) -> Checkpoints:
        """`Checkpoints` of the recorded files, steps and learning rates read from each."""
        paths = self.paths()
        if not paths:
            raise ConfigError(f"no checkpoints recorded in {self.directory} yet")
        return Checkpoints.from_paths(paths, lr="lr", steps="step")
