"""Checkpoints as explicit values: where the weights are, the training step, and the lr.

TracInCP weights checkpoint c by eta_c, the learning rate in force after it was saved. Every
`Checkpoint` carries its lr explicitly; a missing lr is an error, never a silent 1.0. With several
parameter groups it also carries each group's lr (see `tracin.checkpoints._lrs` for the maths and
every form
``lr=`` accepts). Loading the
weights (`Checkpoint.state_dict`) is separate from the lr lookup, and always uses
``torch.load(weights_only=True)`` unless the caller opts in to arbitrary unpickling.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias, overload

import torch

from tracin._errors import CheckpointError, ConfigError
from tracin.checkpoints._inputs import (
    as_states,
    as_step,
    check_file,
    check_state,
    expand_paths,
    is_int,
    steps_per_checkpoint,
)
from tracin.checkpoints._lrs import GroupLrs, is_number, parameter_lrs, parse_lr, per_checkpoint

__all__ = ["Checkpoint", "Checkpoints", "LrSpec", "StepSpec"]

LrSpec: TypeAlias = "float | Sequence[Any] | Mapping[str, float] | Callable[[int], Any] | str"
StepSpec: TypeAlias = "Sequence[int] | str | None"
StateDict: TypeAlias = "dict[str, torch.Tensor]"
_STATE_KEYS = ("model_state_dict", "state_dict", "model")


def _load_file(path: Path, allow_pickle: bool) -> Any:
    check_file(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain containers, "
            "which tracin refuses to unpickle (torch.load weights_only=True); if you trust the "
            f"file, pass allow_pickle=True. {_unpickle_detail(exc)}"
        ) from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc


def _unpickle_detail(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln]
    return f"Detail: {lines[0]}" if lines else ""


def _lookup(payload: Any, key: str) -> Any:
    """``payload[key]``; dotted keys walk nested dicts/lists ('optimizer.param_groups.0.lr')."""
    node = payload
    for part in key.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list | tuple) and part.lstrip("-").isdigit():
            node = node[int(part)]
        else:
            raise KeyError(key)
    return node


def _extract_state(payload: Any, state_key: str | None, where: str) -> StateDict:
    """The model state dict inside a checkpoint payload, in any of the common layouts."""
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"checkpoint {where} holds a {type(payload).__name__}, not a dict")
    if state_key is not None:
        try:
            node = _lookup(payload, state_key)
        except KeyError:
            raise CheckpointError(
                f"checkpoint {where} has no key {state_key!r}; its keys are {sorted(payload)[:10]}"
            ) from None
    elif all(isinstance(v, torch.Tensor) for v in payload.values()):
        node = payload
    else:
        found = [k for k in _STATE_KEYS if isinstance(payload.get(k), Mapping)]
        if not found:
            raise CheckpointError(
                f"checkpoint {where} is neither a bare state dict nor holds one under "
                f"{list(_STATE_KEYS)}; its keys are {sorted(map(str, payload))[:10]}; "
                "pass state_key=<key> to name where the model weights sit"
            )
        node = payload[found[0]]
    if not isinstance(node, Mapping) or not all(isinstance(v, torch.Tensor) for v in node.values()):
        raise CheckpointError(f"checkpoint {where}: the state dict holds non-tensor values")
    return dict(node)


@dataclass(frozen=True)
class Checkpoint:
    """One saved point of training.

    Attributes:
        id: a short unique name ("ckpt_0", or the file stem).
        step: the training step (or epoch) at which it was saved; checkpoints sort by it.
        lr: the learning rate in force after this checkpoint, eta_c; finite and >= 0 (a
            checkpoint with lr 0 contributes nothing). With ``group_lrs``, the reference lr
            that scoring applies; it must be > 0 unless every group lr is 0, and scores do not
            depend on it (`Checkpoints.from_paths` uses the largest group lr).
        path: the file (a ``str`` is converted), or ``None`` for an in-memory state dict.
        state_key: where the state dict sits inside the file (``None``: detect the common layouts).
        allow_pickle: load with ``weights_only=False`` (only for files you trust).
        state: the in-memory state dict (or a dict holding one), or ``None`` for a file.
        group_lrs: per parameter group lrs, ordered ``(name or glob pattern, lr)`` pairs (a
            mapping is converted); empty: ``lr`` for every parameter. Parameter p's gradient is
            scaled by ``sqrt(lr_{g(p)} / lr)`` (torch.func engine only; see
            `tracin.checkpoints._lrs`).

    Raises:
        ConfigError: neither or both of ``path`` and ``state``, or a value of the wrong type.
        CheckpointError: an lr that is negative or not finite.
    """

    id: str
    step: int
    lr: float
    path: Path | None = None
    state_key: str | None = None
    allow_pickle: bool = False
    state: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    group_lrs: GroupLrs = ()

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError(f"checkpoint id {self.id!r} must be a non-empty string")
        if isinstance(self.path, str | os.PathLike) and not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))
        if (self.path is None) == (self.state is None):
            raise ConfigError(f"checkpoint {self.id!r} needs exactly one of path or state")
        if self.path is not None and not isinstance(self.path, Path):
            raise ConfigError(
                f"checkpoint {self.id!r}: path={self.path!r} ({type(self.path).__name__}) must "
                "be a str or pathlib.Path; for an in-memory state dict pass state=..."
            )
        if self.state is not None:
            check_state(self.state, repr(self.id))
        object.__setattr__(self, "step", as_step(self.step, repr(self.id)))
        if not is_number(self.lr):
            raise CheckpointError(
                f"learning rate of checkpoint {self.id!r} is {self.lr!r}; it must be a number "
                ">= 0 (per-group lrs go in group_lrs={'encoder.*': 1e-4, ...})"
            )
        lr, _ = parse_lr(self.lr, repr(self.id))
        object.__setattr__(self, "lr", lr)
        if not self.group_lrs:
            return
        groups = self.group_lrs
        if not isinstance(groups, Mapping):
            groups = [{"params": [k], "lr": v} for k, v in groups]  # type: ignore[assignment]
        ref, pairs = parse_lr(groups, repr(self.id))
        object.__setattr__(self, "group_lrs", pairs)
        if lr == 0 and ref > 0:
            raise CheckpointError(
                f"checkpoint {self.id!r} has group lrs up to {ref} but lr=0; pass the largest "
                f"group lr, lr={ref}, as the reference"
            )

    def payload(self) -> Any:
        """The raw object saved in the checkpoint (loaded from disk for a path)."""
        if self.path is not None:
            return _load_file(self.path, self.allow_pickle)
        return self.state

    def sha256(self) -> str:
        """sha256 of the checkpoint file's bytes, or of the in-memory tensors."""
        digest = hashlib.sha256()
        if self.path is not None:
            check_file(self.path)
            with self.path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    digest.update(chunk)
        else:
            for key, value in sorted(self.state_dict().items()):
                digest.update(key.encode())
                raw = value.detach().cpu().contiguous().view(-1).view(torch.uint8)
                digest.update(raw.numpy().tobytes())
        return digest.hexdigest()

    def state_dict(self) -> StateDict:
        """The model's state dict (parameters and buffers) stored in this checkpoint."""
        return _extract_state(self.payload(), self.state_key, repr(self.id))

    def parameter_lrs(self, names: Sequence[str]) -> dict[str, float]:
        """The lr of each parameter in ``names``: its group's lr, or ``lr`` without groups.

        Raises:
            CheckpointError: a parameter in no group, naming it and the fix.
        """
        if not self.group_lrs:
            return dict.fromkeys(names, self.lr)
        return parameter_lrs(self.group_lrs, names, repr(self.id))

    def largest_lr(self) -> float:
        """The largest lr any parameter has at this checkpoint."""
        return max((lr for _, lr in self.group_lrs), default=self.lr)


def _resolve(spec: Any, i: int, step: int | None, payload: Any, where: str, what: str) -> Any:
    if isinstance(spec, str):
        try:
            value = _lookup(payload, spec)
        except (KeyError, IndexError):
            raise CheckpointError(
                f"checkpoint {where} has no {what} under key {spec!r}; give {what}=[...] "
                f"explicitly{' or as a function of the step' if what == 'lr' else ''}"
            ) from None
        return value
    if callable(spec):
        assert step is not None
        return spec(step)
    assert spec is not None
    return spec[i]


def _build(
    sources: Sequence[Path | Mapping[str, Any]],
    lr: Any,
    steps: Any,
    ids: Sequence[str],
    state_key: str | None,
    allow_pickle: bool,
) -> list[Checkpoint]:
    rates = per_checkpoint(lr, len(sources))
    steps = steps_per_checkpoint(steps, len(sources))
    out = []
    for i, src in enumerate(sources):
        path = src if isinstance(src, Path) else None
        state = None if isinstance(src, Path) else src
        needs_file = isinstance(rates, str) or isinstance(steps, str) or steps is None
        payload = _load_file(src, allow_pickle) if isinstance(src, Path) and needs_file else src
        where = repr(str(path) if path is not None else ids[i])
        if steps is None:
            has = isinstance(payload, Mapping) and is_int(payload.get("step"))
            step = _resolve("step", i, None, payload, where, "steps") if has else i
        else:
            step = _resolve(steps, i, None, payload, where, "steps")
        step = as_step(step, where)
        ref, groups = parse_lr(_resolve(rates, i, step, payload, where, "lr"), where)
        out.append(
            Checkpoint(
                id=ids[i],
                step=step,
                lr=ref,
                path=path,
                state_key=state_key,
                allow_pickle=allow_pickle,
                state=state,
                group_lrs=groups,
            )
        )
    return out


def _lr_text(c: Checkpoint) -> str:
    return f"{c.lr:g}, {len(c.group_lrs)} group lrs" if c.group_lrs else f"{c.lr:g}"


class Checkpoints(Sequence[Checkpoint]):
    """An ordered collection of checkpoints (by step), each with its learning rate.

    Build with `from_paths` or `from_state_dicts`, or from `Checkpoint` values directly.

    Args:
        items: the checkpoints, in any order; they are sorted by step.

    Raises:
        ConfigError: an item is not a `Checkpoint`; none given; repeated ids or steps; or every
            learning rate 0 (every score would be 0).
    """

    def __init__(self, items: Iterable[Checkpoint]) -> None:
        items = list(items)
        wrong = [type(c).__name__ for c in items if not isinstance(c, Checkpoint)]
        if wrong:
            raise ConfigError(
                f"Checkpoints(...) takes Checkpoint values, got a {wrong[0]}; build from files "
                "with Checkpoints.from_paths or from state dicts with Checkpoints.from_state_dicts"
            )
        items = sorted(items, key=lambda c: c.step)
        if not items:
            raise ConfigError("no checkpoints given; TracInCP needs at least one")
        ids = [c.id for c in items]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"checkpoint ids must be unique, got {ids}")
        steps = [c.step for c in items]
        if len(set(steps)) != len(steps):
            raise ConfigError(f"checkpoint steps must be unique, got {steps}; pass steps=[...]")
        if all(c.largest_lr() == 0 for c in items):
            raise ConfigError(
                f"every checkpoint has lr 0 ({ids}), so every score would be 0; give the "
                "learning rates in force after each checkpoint"
            )
        self._items = tuple(items)

    @classmethod
    def from_paths(
        cls,
        paths: Sequence[str | Path] | str | Path,
        lr: LrSpec | None = None,
        *,
        steps: StepSpec = None,
        state_key: str | None = None,
        allow_pickle: bool = False,
    ) -> Checkpoints:
        """Checkpoints saved as files.

        Args:
            paths: checkpoint files (a list, tuple or any iterable of ``str``/``Path``); or one
                file; or a directory (its ``.pt``/``.pth``/``.ckpt``/``.bin`` files); or a glob
                pattern (``"runs/step_*.pt"``). Directories and patterns list files in natural
                order (``step_9`` before ``step_10``). Each file is a bare state dict or a dict
                holding it under ``model_state_dict``, ``state_dict`` or ``model`` (or
                ``state_key``).
            lr: required. One number for every checkpoint (``lr=0.01``); one value per path (a
                list, tuple, 1-d array or tensor); a function of the step (a schedule); or a key
                (dotted for nesting, e.g. ``"optimizer.param_groups.0.lr"``) to read from each
                file: ``lr="lr"`` reads what `CheckpointRecorder` saved, including each
                parameter group's lr. A per-checkpoint value may give per-group lrs as a mapping
                ``{name or glob pattern: lr}`` (an exact name first, else the first matching
                pattern), e.g. ``lr=[{"encoder.*": 1e-4, "head.*": 1e-3}, ...]``, or one such
                mapping for every checkpoint; each checkpoint's ``lr`` is then its largest group
                lr, and gradients are scaled per group (torch.func engine only). Every lr is
                finite and >= 0; an lr of 0 contributes nothing.
            steps: one int per path, a key to read, or ``None``: the file's ``"step"`` entry when
                it has one, else the position in ``paths``.
            state_key: where the state dict sits, when not in a common layout.
            allow_pickle: permit arbitrary objects (``weights_only=False``); only for trusted files.

        Raises:
            ConfigError: ``paths``, ``lr`` or ``steps`` of the wrong type or length.
            CheckpointError: a missing or unreadable file, a directory in the list, no lr under
                the key, or an lr that is negative or not finite.
        """
        resolved = expand_paths(paths)
        ids = [p.stem for p in resolved]
        if len(set(ids)) != len(ids):
            ids = [f"ckpt_{i}" for i in range(len(resolved))]
        return cls(_build(resolved, lr, steps, ids, state_key, allow_pickle))

    @classmethod
    def from_state_dicts(
        cls,
        states: Sequence[Mapping[str, Any]] | Mapping[str, Any],
        lr: LrSpec | None = None,
        *,
        steps: StepSpec = None,
        state_key: str | None = None,
    ) -> Checkpoints:
        """Checkpoints held in memory, with ``lr`` and ``steps`` as in `from_paths`.

        Args:
            states: state dicts (or dicts holding one, as in `from_paths`), a list or any
                iterable; a single bare state dict is one checkpoint.
            lr: as in `from_paths`.
            steps: as in `from_paths`.
            state_key: as in `from_paths`.

        Raises:
            ConfigError: ``states`` is not a list of dicts (a module, a path, a dict of dicts).
        """
        items = as_states(states)
        ids = [f"ckpt_{i}" for i in range(len(items))]
        return cls(_build(items, lr, steps, ids, state_key, False))

    @property
    def lrs(self) -> tuple[float, ...]:
        """Learning rates in checkpoint order."""
        return tuple(c.lr for c in self._items)

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, i: int) -> Checkpoint: ...
    @overload
    def __getitem__(self, i: slice) -> Checkpoints: ...
    def __getitem__(self, i: int | slice) -> Checkpoint | Checkpoints:
        if isinstance(i, slice):
            return Checkpoints(self._items[i])
        return self._items[i]

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self._items)

    def __repr__(self) -> str:
        groups = [f", {len(c.group_lrs)} group lrs" if c.group_lrs else "" for c in self._items]
        body = ", ".join(
            f"{c.id}(step={c.step}, lr={c.lr:g}{g})"
            for c, g in zip(self._items, groups, strict=True)
        )
        return f"Checkpoints([{body}])"
