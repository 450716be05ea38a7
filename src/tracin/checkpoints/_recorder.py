"""Record checkpoints where training happens: state, step and the optimiser's lr, atomically.

Call `CheckpointRecorder.step` after ``optimizer.step()`` (and after ``scheduler.step()``), so
the saved lr is the one in force for the updates that follow the checkpoint, as TracInCP needs.
`CheckpointRecorder.checkpoints` then gives `Checkpoints` with the right learning rates and no
hand-written list.

An optimiser whose parameter groups have different lrs (layer-wise lr decay) is recorded group by
group: ``"lr"`` then holds ``[{"params": [parameter names], "lr": x}, ...]`` instead of one
number, and reading it back (``lr="lr"``) weights each group by its own lr (see
`tracin.checkpoints._lrs`).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tracin._errors import ConfigError
from tracin._io import atomic_write
from tracin._validate import integer
from tracin.checkpoints._checkpoints import Checkpoints

__all__ = [
    "CheckpointRecorder",
    "check_schedule",
    "current_lr",
    "log_spaced_steps",
    "optimizer_parameter_names",
    "recorded_lr",
    "save_checkpoint",
    "wants_step",
]


def log_spaced_steps(total_steps: int, count: int, first: int = 1) -> list[int]:
    """About ``count`` distinct steps from ``first`` to ``total_steps``, spaced logarithmically.

    Dense early in training (before the model fits mislabelled examples), sparse later.

    Args:
        total_steps: the last step (optimiser steps, counted from 1).
        count: how many steps to aim for; rounding can merge early ones, so fewer may come back.
        first: the first step.

    Returns:
        The distinct steps, ascending.

    Raises:
        ConfigError: an argument below 1.
    """
    if total_steps < 1 or count < 1 or first < 1:
        raise ConfigError(
            f"log_spaced_steps({total_steps}, {count}, first={first}): all must be >= 1"
        )
    raw = np.geomspace(first, total_steps, num=count)
    return sorted({round(float(s)) for s in raw})


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The one learning rate of ``optimizer``'s parameter groups (an error if they differ)."""
    lrs = sorted({float(g["lr"]) for g in optimizer.param_groups})
    if len(lrs) != 1:
        raise ConfigError(
            f"the optimiser's parameter groups have different learning rates {lrs}; use "
            "recorded_lr(model, optimizer), which gives each group's lr with its parameter names "
            "(what CheckpointRecorder saves)"
        )
    return lrs[0]


def recorded_lr(model: nn.Module, optimizer: torch.optim.Optimizer) -> float | list[dict[str, Any]]:
    """The optimiser's lr as saved in a checkpoint's ``"lr"`` entry.

    One number when every parameter group has the same lr; otherwise one entry per group,
    ``{"params": [parameter names], "lr": x}`` (parameters not in ``model`` are left out), which
    `Checkpoints.from_paths` (``lr="lr"``) reads as per-group learning rates.
    """
    if len({float(g["lr"]) for g in optimizer.param_groups}) <= 1:
        return current_lr(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        {"params": [names[id(p)] for p in g["params"] if id(p) in names], "lr": float(g["lr"])}
        for g in optimizer.param_groups
    ]


def optimizer_parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimiser's parameters in its state's index order (groups, then params).

    Frameworks group parameters (Hugging Face's Trainer puts biases and norms in a no-decay
    group), so this order is not ``model.parameters()``'s; preconditioning reads it.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), "") for g in optimizer.param_groups for p in g["params"]]


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    *,
    save_optimizer: bool = False,
) -> Path:
    """Write ``directory/step_<n>.pt`` atomically: the format every recorder and callback uses.

    The payload is ``{"model_state_dict", "step", "lr"}`` with the optimiser's current lr (call
    this after ``optimizer.step()`` and the scheduler's step, so it is the lr in force for the
    updates after the checkpoint; each group's lr with its parameter names when the groups'
    lrs differ, see `recorded_lr`), plus ``"optimizer_state_dict"`` and
    ``"optimizer_param_names"`` (its parameters' names in state order) with ``save_optimizer``.
    """
    payload: dict[str, Any] = {
        "model_state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "step": int(step),
        "lr": recorded_lr(model, optimizer),
    }
    if save_optimizer:
        payload["optimizer_state_dict"] = optimizer.state_dict()
        payload["optimizer_param_names"] = optimizer_parameter_names(model, optimizer)
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = Path(directory) / f"step_{int(step):09d}.pt"
    atomic_write(path, buf.getvalue())
    return path


def wants_step(step: int, steps: frozenset[int] | None, every: int | None) -> bool:
    """Whether ``step`` is in ``steps``, or a multiple of ``every``."""
    if steps is not None:
        return step in steps
    return every is not None and step % every == 0


def check_schedule(steps: Iterable[int] | None, every: int | None) -> frozenset[int] | None:
    """Validate a ``steps=``/``every=`` pair; returns ``steps`` as a set."""
    if (steps is None) == (every is None):
        raise ConfigError("give exactly one of steps=[...] or every=N")
    if every is not None:
        integer("every", every, example=100)
    return None if steps is None else frozenset(int(s) for s in steps)


class CheckpointRecorder:
    """Save checkpoints of a training loop into ``directory``.

    Args:
        directory: where ``step_<n>.pt`` files go.
        steps: the steps to save at (e.g. `log_spaced_steps`); ``None`` with ``every``.
        every: save every ``every`` steps instead.
        save_optimizer: also store the optimiser's state (Adam moments, for preconditioning).

    Raises:
        ConfigError: not exactly one of ``steps`` and ``every``, or ``every`` not a positive
            integer.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        steps: Iterable[int] | None = None,
        every: int | None = None,
        save_optimizer: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.steps = check_schedule(steps, every)
        self.every = every
        self.save_optimizer = save_optimizer

    def wants(self, step: int) -> bool:
        """Whether ``step`` is a step to save at."""
        return wants_step(step, self.steps, self.every)

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> Path | None:
        """Save if ``step`` is one to save at; returns the file written, if any."""
        return self.save(model, optimizer, step) if self.wants(step) else None

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> Path:
        """Save ``model``'s state with ``step`` and the optimiser's current lr(s), atomically."""
        return save_checkpoint(self.directory, model, optimizer, step,
                               save_optimizer=self.save_optimizer)  # fmt: skip

    def paths(self) -> list[Path]:
        """The checkpoint files recorded so far, by step."""
        return sorted(self.directory.glob("step_*.pt"))

    def checkpoints(self) -> Checkpoints:
        """`Checkpoints` of the recorded files, with the steps and (group) lrs read from each.

        Raises:
            ConfigError: no checkpoint recorded yet.
            CheckpointError: a recorded file cannot be read.
        """
        paths = self.paths()
        if not paths:
            raise ConfigError(f"no checkpoints recorded in {self.directory} yet")
        return Checkpoints.from_paths(paths, lr="lr", steps="step")
