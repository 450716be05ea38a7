"""Checkpoints as explicit values: where the weights are, the training step, and the lr.

TracInCP weights checkpoint c by eta_c, the learning rate in force after it was saved. Every
`Checkpoint` carries its lr explicitly; a missing lr is an error, never a silent 1.0. Loading the
weights (`Checkpoint.state_dict`) is separate from the lr lookup, and always uses
``torch.load(weights_only=True)`` unless the caller opts in to arbitrary unpickling.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias, overload

import torch

from tracin._errors import CheckpointError, ConfigError

__all__ = ["Checkpoint", "Checkpoints", "LrSpec", "StepSpec"]

LrSpec: TypeAlias = "Sequence[float] | Callable[[int], float] | str"
StepSpec: TypeAlias = "Sequence[int] | str | None"
StateDict: TypeAlias = "dict[str, torch.Tensor]"
_STATE_KEYS = ("model_state_dict", "state_dict", "model")


def _load_file(path: Path, allow_pickle: bool) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
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
        lr: the learning rate in force after this checkpoint, eta_c; finite and > 0.
        path: the file, or ``None`` for an in-memory state dict.
        state_key: where the state dict sits inside the file (``None``: detect the common layouts).
        allow_pickle: load with ``weights_only=False`` (only for files you trust).
    """

    id: str
    step: int
    lr: float
    path: Path | None = None
    state_key: str | None = None
    allow_pickle: bool = False
    state: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.state is None):
            raise ConfigError(f"checkpoint {self.id!r} needs exactly one of path or state")
        _check_lr(self.lr, self.id)

    def payload(self) -> Any:
        """The raw object saved in the checkpoint (loaded from disk for a path)."""
        if self.path is not None:
            return _load_file(self.path, self.allow_pickle)
        return self.state

    def sha256(self) -> str:
        """sha256 of the checkpoint file's bytes, or of the in-memory tensors."""
        digest = hashlib.sha256()
        if self.path is not None:
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


def _check_lr(lr: Any, where: str) -> None:
    if isinstance(lr, bool) or not isinstance(lr, int | float):
        raise CheckpointError(
            f"learning rate of checkpoint {where} is {lr!r}; it must be a number > 0"
        )
    if not math.isfinite(lr) or lr <= 0:
        raise CheckpointError(
            f"learning rate of checkpoint {where} is {lr}; it must be finite and > 0 "
            "(TracInCP weights each checkpoint by the lr in force after it)"
        )


def _resolve(
    spec: LrSpec | StepSpec, i: int, step: int | None, payload: Any, where: str, what: str
) -> Any:
    if isinstance(spec, str):
        try:
            value = _lookup(payload, spec)
        except (KeyError, IndexError):
            raise CheckpointError(
                f"checkpoint {where} has no {what} under key {spec!r}; give {what}=[...] "
                f"explicitly{' or as a function of the step' if what == 'lr' else ''}"
            ) from None
        return value.item() if isinstance(value, torch.Tensor) else value
    if callable(spec):
        assert step is not None
        return spec(step)
    assert spec is not None
    return spec[i]


def _build(
    sources: Sequence[Path | Mapping[str, Any]],
    lr: LrSpec | None,
    steps: StepSpec,
    ids: Sequence[str],
    state_key: str | None,
    allow_pickle: bool,
) -> list[Checkpoint]:
    if lr is None:
        raise CheckpointError(
            "no learning rate given: pass lr=[...] (one per checkpoint), lr=callable(step) "
            "(a schedule), or lr='<key>' to read it from each checkpoint file"
        )
    for spec, what in ((lr, "lr"), (steps, "steps")):
        if isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) != len(sources):
            raise ConfigError(
                f"{what} has {len(spec)} entries for {len(sources)} checkpoints; give one each"
            )
    out = []
    for i, src in enumerate(sources):
        path = src if isinstance(src, Path) else None
        state = None if isinstance(src, Path) else src
        needs_file = isinstance(lr, str) or isinstance(steps, str) or steps is None
        payload = _load_file(src, allow_pickle) if isinstance(src, Path) and needs_file else src
        where = repr(str(path) if path is not None else ids[i])
        if steps is None:
            has = isinstance(payload, Mapping) and isinstance(payload.get("step"), int)
            step = _resolve("step", i, None, payload, where, "steps") if has else i
        else:
            step = _resolve(steps, i, None, payload, where, "steps")
        if not isinstance(step, int) or isinstance(step, bool):
            raise CheckpointError(f"step of checkpoint {where} is {step!r}; it must be an int")
        rate = _resolve(lr, i, step, payload, where, "lr")
        _check_lr(rate, where)
        out.append(
            Checkpoint(
                id=ids[i],
                step=step,
                lr=float(rate),
                path=path,
                state_key=state_key,
                allow_pickle=allow_pickle,
                state=state,
            )
        )
    return out


class Checkpoints(Sequence[Checkpoint]):
    """An ordered collection of checkpoints (by step), each with its learning rate.

    Build with `from_paths` or `from_state_dicts`, or from `Checkpoint` values directly.
    """

    def __init__(self, items: Iterable[Checkpoint]) -> None:
        items = sorted(items, key=lambda c: c.step)
        if not items:
            raise ConfigError("no checkpoints given; TracInCP needs at least one")
        ids = [c.id for c in items]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"checkpoint ids must be unique, got {ids}")
        steps = [c.step for c in items]
        if len(set(steps)) != len(steps):
            raise ConfigError(f"checkpoint steps must be unique, got {steps}; pass steps=[...]")
        self._items = tuple(items)

    @classmethod
    def from_paths(
        cls,
        paths: Sequence[str | Path],
        lr: LrSpec | None = None,
        *,
        steps: StepSpec = None,
        state_key: str | None = None,
        allow_pickle: bool = False,
    ) -> Checkpoints:
        """Checkpoints saved as files.

        Args:
            paths: checkpoint files; each a bare state dict or a dict holding it under
                ``model_state_dict``, ``state_dict`` or ``model`` (or ``state_key``).
            lr: one lr per path, a function of the step (a schedule), or a key (dotted for
                nesting, e.g. ``"optimizer.param_groups.0.lr"``) to read from each file. Required.
            steps: one step per path, a key to read, or ``None``: the file's ``"step"`` entry when
                it has one, else the position in ``paths``.
            state_key: where the state dict sits, when not in a common layout.
            allow_pickle: permit arbitrary objects (``weights_only=False``); only for trusted files.
        """
        if isinstance(paths, str | Path):
            raise ConfigError("paths must be a list of files, not a single path")
        resolved = [Path(p) for p in paths]
        ids = [p.stem for p in resolved]
        if len(set(ids)) != len(ids):
            ids = [f"ckpt_{i}" for i in range(len(resolved))]
        return cls(_build(resolved, lr, steps, ids, state_key, allow_pickle))

    @classmethod
    def from_state_dicts(
        cls,
        states: Sequence[Mapping[str, Any]],
        lr: LrSpec | None = None,
        *,
        steps: StepSpec = None,
        state_key: str | None = None,
    ) -> Checkpoints:
        """Checkpoints held in memory (state dicts, or dicts holding one), as `from_paths`."""
        ids = [f"ckpt_{i}" for i in range(len(states))]
        return cls(_build(list(states), lr, steps, ids, state_key, False))

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
        body = ", ".join(f"{c.id}(step={c.step}, lr={c.lr:g})" for c in self._items)
        return f"Checkpoints([{body}])"
