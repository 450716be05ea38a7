"""Bare parameters broadcast over the batch, on the hooks.

A parameter that a model's own code adds to (or multiplies with) its activations — learned
positions ``h + self.pos``, a class token ``self.cls.expand(B, -1, -1)``, a layer scale
``h * self.gamma`` — belongs to no layer the hooks know. Its per-example gradient is still one
backward away: if each example gets its own copy of the parameter (the parameter expanded along
the batch), the gradient to that copy is the example's gradient. While the hooks record, such a
parameter is handed to the model as a `_Tracked` tensor: an elementwise ``add``/``sub``/``mul``/
``div`` with a batch-first activation that it broadcasts over, or an ``expand`` to the batch,
runs on the expanded copy (same values, same result) and the copy is recorded as the layer's
output. Any other use (indexing, a matmul, a dtype cast) raises a quiet `HookError`: the
parameter is computed by torch.func, as before, without a warning.

Only parameters of user-defined modules (not ``torch.nn``'s layers nor their subclasses) are
candidates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tracin._errors import HookError

__all__ = ["BareParameter", "bare_candidates", "tracked"]

_BINARY = frozenset(
    ["add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "mul", "__mul__", "__rmul__",
     "div", "__truediv__", "__rtruediv__", "true_divide"]
)  # fmt: skip


class BareParameter(nn.Module):
    """Stand-in module for a bare parameter: its ``weight`` is the parameter (never called)."""

    def __init__(self, param: nn.Parameter) -> None:
        super().__init__()
        self.weight = param


def bare_candidates(
    model: nn.Module, names: Sequence[str], shared: set[int]
) -> list[tuple[str, BareParameter]]:
    """Selected parameters owned directly by a user-defined module, unshared, floating point."""
    out = []
    for mod_name, module in model.named_modules():
        if not _user_defined(module):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        for attr, param in module._parameters.items():
            name = prefix + attr
            if param is None or name not in names or id(param) in shared:
                continue
            if param.is_floating_point():
                out.append((name, BareParameter(param)))
    return out


def _user_defined(module: nn.Module) -> bool:
    """Whether no class of ``module`` but ``nn.Module`` itself comes from torch.

    A layer's own parameters, even in a subclass, are the layer's business.
    """
    bases = [c for c in type(module).__mro__ if c not in (nn.Module, object)]
    return not any(c.__module__.startswith("torch.") for c in bases)


class _Tracked(torch.Tensor):
    """A bare parameter handed to the model while the hooks record (see the module docstring)."""

    _layer: Any
    _batch: int

    @classmethod
    def __torch_function__(
        cls,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        mine = [a for a in args if isinstance(a, _Tracked)]
        name = getattr(func, "__name__", "")
        if len(mine) == 1 and not any(isinstance(v, _Tracked) for v in kwargs.values()):
            tracked = mine[0]
            if name in _BINARY and len(args) == 2:
                return _binary(func, tracked, args, kwargs)
            if name == "expand" and args[0] is tracked:
                return _expand(tracked, args[1:], kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        if _has_tensor(result) or not mine:  # a tensor from it would carry no gradient
            layer = (mine or [a for a in kwargs.values() if isinstance(a, _Tracked)])[0]._layer
            raise _refuse(layer, f"{name or func}")
        return result


def _has_tensor(result: Any) -> bool:
    if isinstance(result, torch.Tensor):
        return True
    return isinstance(result, tuple | list) and any(_has_tensor(r) for r in result)


def _refuse(layer: Any, what: str) -> HookError:
    return HookError(
        f"parameter {layer.weight!r} is used by {what}, not broadcast over the batch; "
        "torch.func computes it",
        (layer.weight,),
        quiet=True,
    )


def _copy(tracked: _Tracked) -> torch.Tensor:
    """A fresh leaf with the parameter's values (its gradient never reaches the parameter)."""
    with torch._C.DisableTorchFunctionSubclass():
        plain = torch.Tensor.as_subclass(tracked, torch.Tensor)
    return plain.detach().requires_grad_(True)


def _record(tracked: _Tracked, expanded: torch.Tensor) -> None:
    layer = tracked._layer
    layer.inputs.append(expanded.new_empty(0))
    layer.outputs.append(expanded)
    layer.versions.append((0, expanded._version))


def _binary(func: Any, tracked: _Tracked, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    other = args[1] if args[0] is tracked else args[0]
    b = tracked._batch
    shape = tuple(tracked.shape)
    if (
        not isinstance(other, torch.Tensor)
        or other.dim() < max(len(shape), 1)
        or (other.shape[0] != b)
    ):
        raise _refuse(tracked._layer, f"{func.__name__} with a tensor that is not batch-first")
    aligned = (1,) * (other.dim() - len(shape)) + shape
    fits = all(a in (1, o) for a, o in zip(aligned, other.shape, strict=True))  # no widening
    if aligned[0] != 1 or not fits:
        raise _refuse(tracked._layer, f"{func.__name__} that broadcasts the batch over it")
    expanded = _copy(tracked).reshape(aligned).expand(b, *aligned[1:])
    _record(tracked, expanded)
    new = (expanded, other) if args[0] is tracked else (other, expanded)
    return func(*new, **kwargs)


def _expand(tracked: _Tracked, sizes: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    dims = tuple(sizes[0]) if len(sizes) == 1 and not isinstance(sizes[0], int) else tuple(sizes)
    shape = tuple(tracked.shape)
    same = len(dims) == len(shape) and all(d in (-1, s) for d, s in zip(dims[1:], shape[1:],
                                                                         strict=True))  # fmt: skip
    if kwargs or not same or shape[0] != 1 or dims[0] != tracked._batch:
        raise _refuse(tracked._layer, "an expand that is not one copy per example")
    expanded = _copy(tracked).expand(tracked._batch, *shape[1:])
    _record(tracked, expanded)
    return expanded


def tracked(
    params: Mapping[str, torch.Tensor], layers: Sequence[Any], batch: int
) -> dict[str, torch.Tensor]:
    """``params`` with each bare layer's parameter replaced by a `_Tracked` view of it."""
    out = dict(params)
    for layer in layers:
        with torch._C.DisableTorchFunctionSubclass():
            view = params[layer.weight].detach().as_subclass(_Tracked)
        assert isinstance(view, _Tracked)
        view._layer = layer
        view._batch = batch
        out[layer.weight] = view
    return out
