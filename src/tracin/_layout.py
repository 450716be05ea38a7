"""Where a task finds the model inputs and the labels in a batch, and the task fields that say so.

The contract (`model_args`, `label_item`): a tensor batch is the input; a tuple/list of one or two
items is ``(inputs,)`` or ``(inputs, labels)``; a longer one needs ``inputs=``/``labels=`` on the
task (a `TaskError` names the batch's items and the fix; nothing is guessed); a dict batch passes
every key but the labels (``"labels"``) to the model as keyword arguments. ``inputs`` may name
several items: passed positionally in that order (tuple batches) or as keyword arguments (dict
batches). Prediction queries never read the labels.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any, TypeAlias

import numpy as np
import torch

from tracin._batch import Batch, Key, describe, select
from tracin._errors import ConfigError, TaskError

__all__ = [
    "Inputs",
    "as_class_index",
    "as_inputs",
    "as_key",
    "label_item",
    "layout_fix",
    "model_args",
]


Inputs: TypeAlias = Key | tuple[Key, ...]
"""Where the model inputs sit: one index/key (passed as one argument), or several (passed
positionally in that order for tuple batches, as keyword arguments for dict batches)."""


def _positions(batch: tuple[Any, ...] | list[Any], inputs: Inputs | None, labels: Key | None,
               owner: str, need_labels: bool = True) -> tuple[list[int], int | None]:  # fmt: skip
    """Input indices and the label index (``None``: no labels) of a tuple/list batch.

    With ``need_labels=False`` (finding the inputs only), ``labels`` is not read when
    ``inputs`` is given, and a ``labels`` index past the batch's end means an unlabelled batch.
    """
    n = len(batch)

    def index(key: Key, role: str) -> int:
        if isinstance(key, str) or not -n <= key < n:
            raise TaskError(
                f"{role}={key!r} does not fit a tuple batch of {n} items {describe(batch)}; "
                f"tuple batches take indices 0..{n - 1}, e.g. {_example(owner, n)}"
            )
        return key % n

    keys = inputs if isinstance(inputs, tuple) else () if inputs is None else (inputs,)
    if not need_labels and inputs is not None:
        return [index(k, "inputs") for k in keys], None
    if not need_labels and isinstance(labels, int) and not -n <= labels < n:
        return list(range(n)), None  # no item at the labels' index: an unlabelled batch
    label = None if labels is None else index(labels, "labels")
    if inputs is not None:
        found = [index(k, "inputs") for k in keys]
        if label in found:
            raise TaskError(f"labels={labels!r} is also one of inputs={inputs!r}; {owner} "
                            "needs them apart")  # fmt: skip
        rest = [i for i in range(n) if i not in found]
        return found, label if labels is not None or len(rest) != 1 else rest[0]
    if label is not None:
        return [i for i in range(n) if i != label], label
    if n <= 2:
        return [0], 1 if n == 2 else None
    raise TaskError(
        f"a batch of {n} items {describe(batch)} does not say which items are the model's "
        f"inputs and which the labels; tell the task, e.g. {_example(owner, n)} (inputs passed "
        "positionally in that order), or with query='prediction' and no labels "
        f"{owner}(inputs={tuple(range(n))}, query='prediction')"
    )


def layout_fix(batch: Batch, owner: str) -> str:
    """The task settings that name ``batch``'s inputs, for an error message's fix."""
    if isinstance(batch, Mapping):
        keys = tuple(str(k) for k in batch if k != "labels")
        return (
            f"{owner}(inputs={keys[:1]!r}) to pass only the keys named (as keyword arguments), "
            "or labels=<key> for the key holding the labels"
        )
    if isinstance(batch, tuple | list) and len(batch) > 1:
        n = len(batch)
        other = _example(owner, n) if n > 2 else _example(owner, 3) + " for (x1, x2, labels)"
        return (
            f"{owner}(inputs={tuple(range(n))}, query='prediction') if all {n} items are inputs, "
            f"or {other}"
        )
    return f"{_example(owner, 3)} with (x1, x2, labels) batches"


def _example(owner: str, n: int) -> str:
    if n <= 2:
        return f"{owner}(inputs=0, labels=1)"
    return f"{owner}(inputs={tuple(range(n - 1))}, labels={n - 1})"


def model_args(
    batch: Batch, inputs: Inputs | None, labels: Key | None, owner: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments a task passes to the model for ``batch``.

    Defaults: a tensor batch is the input; a tuple/list of one or two items is
    ``(inputs,)`` or ``(inputs, labels)``; a longer one needs ``inputs``/``labels`` (a
    `TaskError` says so); a dict batch passes every key but the labels (``"labels"``) as
    keyword arguments. With ``labels`` alone, every other item is an input.

    Args:
        batch: a tensor, tuple/list or dict batch.
        inputs: where the inputs sit (see `Inputs`), or ``None`` for the defaults.
        labels: the labels' index or key, or ``None`` for the defaults.
        owner: the task's class name, for the fix in error messages.

    Raises:
        TaskError: the batch does not have the items named, or its layout is ambiguous.
    """
    if isinstance(batch, torch.Tensor):
        if isinstance(inputs, tuple) and len(inputs) > 1:
            raise TaskError(
                f"inputs={inputs!r} names several items, but the batch is one tensor "
                f"{describe(batch)}; pass a tuple or dict batch holding them"
            )
        return (batch,), {}
    if isinstance(batch, Mapping):
        if inputs is None:
            key = "labels" if labels is None else labels
            kwargs = {str(k): v for k, v in batch.items() if k != key}
            if not kwargs:
                raise TaskError(f"the dict batch {describe(batch)} holds no inputs besides {key!r}")
            return (), kwargs
        if isinstance(inputs, tuple):
            return (), {str(k): select(batch, k, "inputs") for k in inputs}
        return (select(batch, inputs, "inputs"),), {}
    if isinstance(batch, tuple | list):
        found, _ = _positions(batch, inputs, labels, owner, need_labels=False)
        return tuple(batch[i] for i in found), {}
    raise TaskError(
        f"batch of type {type(batch).__name__} is not a tensor, tuple/list or dict of tensors"
    )


def label_item(batch: Batch, inputs: Inputs | None, labels: Key | None, owner: str) -> Any:
    """The labels of ``batch`` under the layout of `model_args`.

    Raises:
        TaskError: the batch holds no labels where the task looks, naming the fix.
    """
    no_labels = (
        "; pass (inputs, labels) batches, or use query='prediction' (--query-score prediction "
        "on the command line) for unlabelled queries"
    )
    if isinstance(batch, torch.Tensor):
        raise TaskError(f"the batch is one tensor {describe(batch)}, the inputs only{no_labels}")
    if isinstance(batch, Mapping):
        return select(batch, "labels" if labels is None else labels, "labels")
    if isinstance(batch, tuple | list):
        found, label = _positions(batch, inputs, labels, owner)
        if label is None and len(batch) == 1:
            raise TaskError(f"the batch {describe(batch)} holds one item, no labels{no_labels}")
        if label is None:
            rest = [i for i in range(len(batch)) if i not in found]
            raise TaskError(
                f"inputs={inputs!r} leaves items {rest} of the batch {describe(batch)}; say which "
                f"holds the labels, e.g. {owner}(inputs={inputs!r}, labels={rest[-1]})"
                if rest
                else f"inputs={inputs!r} uses every item of the batch {describe(batch)}{no_labels}"
            )
        return batch[label]
    raise TaskError(f"cannot take labels from a batch of type {type(batch).__name__}")


def as_key(value: Any, name: str) -> Key | None:
    """``value`` as an index (int, NumPy ints included) or a key (str); ``None`` stays."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ConfigError(
        f"{name}={value!r} must be an index (int) into a tuple batch or a key (str) of a dict "
        f"batch, e.g. {name}=1 or {name}='labels'"
    )


def as_inputs(value: Any) -> Inputs | None:
    """``inputs`` as one key, or a tuple of distinct keys of one kind."""
    if not isinstance(value, tuple | list | np.ndarray):
        return as_key(value, "inputs")
    keys = tuple(as_key(v, "inputs") for v in value)
    if not keys or None in keys:
        raise ConfigError(
            f"inputs={value!r} names no input; pass indices or keys, e.g. inputs=(0, 1)"
        )
    if len(set(keys)) != len(keys):
        raise ConfigError(f"inputs={value!r} names an item twice; name each input once")
    if len({type(k) for k in keys}) > 1:
        raise ConfigError(
            f"inputs={value!r} mixes indices and keys; use indices for tuple batches, e.g. "
            "inputs=(0, 1), and keys for dict batches, e.g. inputs=('input_ids', 'mask')"
        )
    return keys  # type: ignore[return-value]


def as_class_index(value: Any) -> int | None:
    """``query_class`` as an int (NumPy ints included); ``None`` stays."""
    if value is None:
        return None
    if not isinstance(value, bool | str):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ConfigError(
        f"query_class={value!r} must be a class index (int), e.g. query_class=3; map class names "
        "to their indices first"
    )
