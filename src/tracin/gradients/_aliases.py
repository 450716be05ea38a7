"""``functional_call`` that leaves a model with aliased modules or tied tensors as it was.

``torch.func.functional_call(model, weights, ...)`` (``tie_weights=True``) swaps every alias of a
tied tensor; for a module registered under two names (T5's ``shared`` is also
``encoder.embed_tokens``) it swaps the same attribute twice and restores the wrong tensor: the
model keeps a plain tensor that does not require grad. `call` names each (module, attribute)
owner once instead, mapped to the weight of its canonical name (the one ``named_parameters()``
and ``named_buffers()`` give), with ``tie_weights=False``; a model without aliases takes the
plain path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["call", "owner_names"]

_CACHE: WeakKeyDictionary[nn.Module, dict[str, str] | None] = WeakKeyDictionary()


def owner_names(model: nn.Module) -> dict[str, str] | None:
    """``{owner name: canonical name}`` over every (module, attribute) owner of a tensor.

    Returns None when each parameter and buffer has one owner and each module one name.
    """
    canonical = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    owners: dict[str, str] = {}
    for mod_name, module in model.named_modules():  # each module once, under its first name
        prefix = f"{mod_name}." if mod_name else ""
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and id(tensor) in canonical:
                owners[prefix + attr] = canonical[id(tensor)]
    tied = len(owners) != len(canonical)
    modules = sum(1 for _ in model.named_modules(remove_duplicate=False))
    if not tied and modules == sum(1 for _ in model.named_modules()):
        return None
    return owners


def _owners(model: nn.Module) -> dict[str, str] | None:
    if model not in _CACHE:
        _CACHE[model] = owner_names(model)
    return _CACHE[model]


def call(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """``model(*args, **kwargs)`` with ``weights`` (keyed by canonical names) in place."""
    owners = _owners(model)
    if owners is None:
        return functional_call(model, dict(weights), args, kwargs)
    expanded = {owner: weights[name] for owner, name in owners.items() if name in weights}
    return functional_call(model, expanded, args, kwargs, tie_weights=False)
