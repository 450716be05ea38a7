"""Checkpoint inputs as users give them: paths, state dicts, steps, normalised or refused.

``paths`` may be a list or any iterable of ``str``/``Path``, one file, a directory (its
checkpoint files) or a glob pattern; directories and patterns list files in natural order
(``step_9`` before ``step_10``). ``states`` may be a list or iterable of state dicts, or one bare
state dict. Steps are ints (NumPy integers and integral floats are converted). Anything else is
one tracin error naming the value and the fix.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tracin._errors import CheckpointError, ConfigError
from tracin.checkpoints._lrs import as_number, is_number

__all__ = [
    "as_states",
    "as_step",
    "check_file",
    "check_state",
    "expand_paths",
    "is_int",
    "steps_per_checkpoint",
]

_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def check_state(state: Any, where: str) -> None:
    """Refuse an in-memory checkpoint that is not a dict (a module, a path, a tensor)."""
    if isinstance(state, torch.nn.Module):
        raise ConfigError(
            f"checkpoint {where} is a {type(state).__name__} module; pass its state dict, "
            "model.state_dict() (a copy: {k: v.clone() for k, v in model.state_dict().items()})"
        )
    if isinstance(state, str | os.PathLike):
        raise ConfigError(
            f"checkpoint {where} is a path {str(state)!r}; use Checkpoints.from_paths for files"
        )
    if not isinstance(state, Mapping):
        raise ConfigError(
            f"checkpoint {where} is a {type(state).__name__}; expected a state dict "
            "(model.state_dict()) or a dict holding one"
        )


def as_step(step: Any, where: str) -> int:
    """``step`` as an int (NumPy integers, one-element arrays, integral floats converted)."""
    if isinstance(step, torch.Tensor | np.ndarray) and is_number(step):
        step = as_number(step)
    if isinstance(step, np.integer):
        step = int(step)
    if isinstance(step, float | np.floating) and float(step).is_integer():
        step = int(step)
    if not isinstance(step, int) or isinstance(step, bool):
        raise CheckpointError(
            f"step of checkpoint {where} is {step!r}; it must be an int (the training step "
            "or epoch); pass steps=[...] with one int per checkpoint"
        )
    return step


def check_file(path: Path) -> None:
    """Refuse a directory or a missing file, naming it and what to pass instead."""
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.is_file())[:8]
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a directory, not a file (it holds {inside}); pass the "
            "weight file inside it (e.g. pytorch_model.bin). Safetensors files: load them with "
            "safetensors.torch.load_file and use Checkpoints.from_state_dicts"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")


def steps_per_checkpoint(steps: Any, n: int) -> Any:
    """``steps`` as ``None``, a key, or a list of ``n`` values (checked later by `as_step`)."""
    if steps is None or isinstance(steps, str):
        return steps
    if isinstance(steps, np.ndarray | torch.Tensor):
        steps = steps.tolist() if steps.ndim == 1 else steps
    if callable(steps) or is_number(steps) or not isinstance(steps, Iterable):
        raise ConfigError(
            f"steps={steps!r}; give one int per checkpoint (steps=[100, 200, ...]), a key to "
            "read from each file, or None"
        )
    steps = list(steps)
    if len(steps) != n:
        raise ConfigError(f"steps has {len(steps)} entries for {n} checkpoints; give one each")
    return steps


def is_int(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy integer (not a bool)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _natural(path: Path) -> list[Any]:
    """Sort key: digit runs compare as numbers (step_9 before step_10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def expand_paths(paths: Any) -> list[Path]:
    """``paths`` as a list of files: a list/iterable, one file, a directory, or a glob pattern."""
    if isinstance(paths, str | os.PathLike):
        one = Path(paths)
        if one.is_dir():
            found = [p for p in one.iterdir() if p.is_file() and p.suffix in _SUFFIXES]
            if not found:
                raise CheckpointError(
                    f"directory {str(one)!r} holds no checkpoint files ({', '.join(_SUFFIXES)}); "
                    "pass a list of the checkpoint files"
                )
            return sorted(found, key=_natural)
        if not one.exists() and glob.has_magic(str(paths)):
            matches = [Path(p) for p in glob.glob(str(paths)) if Path(p).is_file()]
            if not matches:
                raise CheckpointError(f"the pattern {str(paths)!r} matches no checkpoint files")
            return sorted(matches, key=_natural)
        return [one]
    if isinstance(paths, Mapping) or not isinstance(paths, Iterable) or isinstance(paths, bytes):
        raise ConfigError(
            f"paths is a {type(paths).__name__}; pass a list of checkpoint files, a directory "
            "or a glob pattern (in-memory state dicts go to Checkpoints.from_state_dicts)"
        )
    out = []
    for p in paths:
        if not isinstance(p, str | os.PathLike):
            hint = (" (in-memory state dicts go to Checkpoints.from_state_dicts)"
                    if isinstance(p, Mapping) else "")  # fmt: skip
            raise ConfigError(
                f"paths holds a {type(p).__name__} ({p!r:.60}); each entry must be a file path "
                f"(str or pathlib.Path){hint}"
            )
        out.append(Path(p))
    missing = [str(p) for p in out if not p.exists()]
    if missing:
        raise CheckpointError(
            f"checkpoint file {missing[0]!r} does not exist"
            f"{f' ({len(missing)} of {len(out)} are missing)' if len(missing) > 1 else ''}"
        )
    for p in out:
        check_file(p)
    return out


def as_states(states: Any) -> list[Mapping[str, Any]]:
    """``states`` as a list of dicts: a list, any iterable, or one bare state dict."""
    if isinstance(states, Mapping):
        if states and all(isinstance(v, torch.Tensor) for v in states.values()):
            return [states]  # one bare state dict
        raise ConfigError(
            "states is a dict; pass a list of state dicts (one per checkpoint), e.g. "
            "from_state_dicts([sd_1, sd_2], lr=...), or [states] for a single checkpoint"
        )
    if isinstance(states, torch.nn.Module | str | os.PathLike) or not isinstance(states, Iterable):
        raise ConfigError(
            f"states is a {type(states).__name__}; pass a list of state dicts "
            "(model.state_dict() copies); files go to Checkpoints.from_paths"
        )
    out = list(states)
    for i, state in enumerate(out):
        check_state(state, f"ckpt_{i}")
    return out
