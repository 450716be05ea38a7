"""Learning-rate values: one lr per checkpoint, or one lr per parameter group of a checkpoint.

With parameter groups (layer-wise lr decay, a frozen encoder), TracInCP becomes

    TracInCP(z, z') = sum_c sum_g lr_{c,g} * < g_{c,g}(z), g_{c,g}(z') >

with ``g_{c,g}`` the gradient restricted to group g's parameters. A checkpoint then carries a
reference lr ``lr_c`` (the largest group lr) that scoring applies as for one lr, and every
parameter p's gradient is multiplied by ``sqrt(lr_{c,g(p)} / lr_c)`` before projection (see
`tracin.gradients._preconditioned`), so products and squared norms carry ``lr_{c,g}``.

What ``lr=`` accepts (`Checkpoints.from_paths`, `Checkpoints.from_state_dicts`):

- one number (Python, NumPy, 0-d array or tensor): the same lr for every checkpoint;
- one value per checkpoint: a list, tuple, 1-d NumPy array or tensor, or any iterable;
- a callable ``lr(step)`` returning a per-checkpoint value (a schedule);
- a string: the key (dotted for nesting) of the value inside each checkpoint file;
- a mapping ``{name or glob pattern: lr}``: the same group lrs for every checkpoint.

A per-checkpoint value is a number, a mapping ``{parameter name or fnmatch pattern: lr}`` (e.g.
``{"encoder.*": 1e-4, "head.*": 1e-3}``; an exact name wins, else the first pattern that
matches, in the order given), or the list of groups `CheckpointRecorder` saves,
``[{"params": [names], "lr": x}, ...]``. Every lr is finite and >= 0; a zero lr (a frozen
group, a schedule that decays to 0) contributes nothing, and is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from numbers import Real
from typing import Any, TypeAlias

import numpy as np
import torch

from tracin._errors import CheckpointError, ConfigError

__all__ = ["GroupLrs", "as_number", "is_number", "parameter_lrs", "parse_lr", "per_checkpoint"]

GroupLrs: TypeAlias = "tuple[tuple[str, float], ...]"
"""Ordered ``(name or pattern, lr)`` pairs; empty: one lr for every parameter."""

_FORMS = (
    "a number >= 0, a mapping {parameter name or pattern: lr}, or a list of groups "
    "[{'params': [names], 'lr': x}]"
)
_PREFIXES = ("module.", "_orig_mod.")


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number: Python, NumPy, or a one-element array/tensor."""
    if isinstance(value, np.ndarray):
        return value.size == 1 and value.dtype.kind in "iuf"
    if isinstance(value, torch.Tensor):
        kind = value.dtype
        return value.numel() == 1 and not kind.is_complex and kind != torch.bool
    return isinstance(value, Real | np.integer | np.floating) and not isinstance(value, bool)


def as_number(value: Any) -> float:
    """``value`` (see `is_number`) as a float."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().cpu().reshape(()).item())
    if isinstance(value, np.ndarray):
        return float(value.reshape(()))
    return float(value)


def _check(value: Any, where: str) -> float:
    if not is_number(value):
        raise CheckpointError(
            f"learning rate of checkpoint {where} is {value!r}; expected {_FORMS}"
        )
    lr = as_number(value)
    if not math.isfinite(lr) or lr < 0:
        raise CheckpointError(
            f"learning rate of checkpoint {where} is {lr}; it must be finite and >= 0 "
            "(TracInCP weights each checkpoint by the lr in force after it)"
        )
    return lr


def _bad(value: Any, where: str) -> CheckpointError:
    return CheckpointError(f"learning rate of checkpoint {where} is {value!r}; expected {_FORMS}")


def per_checkpoint(lr: Any, n: int) -> list[Any] | Callable[[int], Any] | str:
    """``lr`` as one value per checkpoint, a schedule, or a key to read from each file.

    Raises:
        CheckpointError: ``lr`` is ``None``.
        ConfigError: a sequence whose length is not ``n``, or a value of no accepted form.
    """
    if lr is None:
        raise CheckpointError(
            "no learning rate given: pass lr=0.01 (one for all checkpoints), lr=[...] (one per "
            "checkpoint), lr=callable(step) (a schedule), or lr='<key>' to read it from each "
            "checkpoint file"
        )
    if isinstance(lr, str) or (callable(lr) and not isinstance(lr, torch.Tensor)):
        return lr
    if is_number(lr) or isinstance(lr, Mapping):
        return [lr] * n
    if isinstance(lr, np.ndarray | torch.Tensor):
        if lr.ndim != 1:
            raise ConfigError(
                f"lr is an array of shape {tuple(lr.shape)}; give one number, or a 1-d array "
                f"of {n} (one per checkpoint)"
            )
        values: list[Any] = [float(v) for v in lr.tolist()]
    elif isinstance(lr, Iterable) and not isinstance(lr, bytes):
        values = list(lr)
    else:
        raise ConfigError(
            f"lr={lr!r} ({type(lr).__name__}); give one number, a list of {n} (one per "
            "checkpoint), a callable lr(step), or a key to read from each file"
        )
    if len(values) != n:
        raise ConfigError(
            f"lr has {len(values)} entries for {n} checkpoints; give one each, or one number "
            "for all of them (lr=0.01)"
        )
    return values


def parse_lr(value: Any, where: str) -> tuple[float, GroupLrs]:
    """A per-checkpoint value as ``(reference lr, group lrs)``; the reference is the largest.

    Raises:
        CheckpointError: a value of no accepted form, or an lr that is negative or not finite.
    """
    if is_number(value):
        return _check(value, where), ()
    if isinstance(value, Mapping) and {"params", "lr"} <= set(value):
        value = [value]  # one recorded group
    if isinstance(value, Mapping):
        pairs = tuple(
            (_name(k, where), _check(v, f"{where} (group {k!r})")) for k, v in value.items()
        )
    elif isinstance(value, Sequence) and not isinstance(value, str) and value:
        pairs = tuple(p for group in value for p in _group(group, where))
    else:
        raise CheckpointError(
            f"learning rate of checkpoint {where} is {value!r}; expected {_FORMS}"
        )
    if not pairs:
        raise CheckpointError(f"learning rate of checkpoint {where} names no parameters")
    return max(lr for _, lr in pairs), pairs


def _name(key: Any, where: str) -> str:
    if not isinstance(key, str) or not key:
        raise CheckpointError(
            f"learning rate of checkpoint {where}: group key {key!r} must be a parameter name "
            "or a glob pattern such as 'encoder.*' (one lr per checkpoint or step: lr=[...] or "
            "lr=lambda step: ...)"
        )
    return key


def _group(group: Any, where: str) -> list[tuple[str, float]]:
    if not isinstance(group, Mapping) or "params" not in group or "lr" not in group:
        raise CheckpointError(
            f"learning rate of checkpoint {where}: group {group!r} is not "
            "{'params': [names], 'lr': x}"
        )
    names = group["params"]
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(
            f"learning rate of checkpoint {where}: a group's params must be parameter names, "
            f"got {names!r}; record with tracin.CheckpointRecorder (it saves the names) or pass "
            "lr=[{'encoder.*': 1e-4, 'head.*': 1e-3}, ...] explicitly"
        )
    lr = _check(group["lr"], f"{where} (group {list(names)[:3]})")
    return [(n, lr) for n in names if n]  # "": a parameter not in the model


def parameter_lrs(groups: GroupLrs, names: Sequence[str], where: str) -> dict[str, float]:
    """The group lr of each parameter in ``names`` (exact name first, then the first pattern).

    Names saved with a ``module.``/``_orig_mod.`` prefix (DDP, torch.compile) match without it.

    Raises:
        CheckpointError: a parameter that no name or pattern matches, naming it and the fix.
    """
    exact: dict[str, float] = {}
    for key, lr in groups:
        exact.setdefault(key, lr)
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                exact.setdefault(key[len(prefix) :], lr)
    out = {}
    for name in names:
        if name in exact:
            out[name] = exact[name]
            continue
        hit = next((lr for key, lr in groups if fnmatchcase(name, key)), None)
        if hit is None:
            shown = [k for k, _ in groups][:6]
            raise CheckpointError(
                f"checkpoint {where}: parameter {name!r} is in no learning-rate group "
                f"{shown}{' ...' if len(groups) > 6 else ''}; add a pattern for it (e.g. "
                "'*': lr as the last entry) or leave it out with layers=[...]"
            )
        out[name] = hit
    return out
