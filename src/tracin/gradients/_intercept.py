"""Recording the ``F.linear`` calls a module makes on its own weights (see `Projection`).

While such a module runs (and only then), `intercepted` routes ``torch.nn.functional.linear``
through a recorder that runs the very same ``F.linear`` on a batch-first view of the input and
records input and output, as the module hooks do for a Linear. A recurrent module runs an
unrolled forward made of ``F.linear`` calls instead of its fused kernel
(`tracin.gradients._recurrent`). A call the recorder cannot place (a weight slice it does not
know, an unbatched input) raises `HookError`, and the engine self-check moves the layer to
torch.func.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from tracin._errors import HookError
from tracin.gradients import _attention, _recurrent
from tracin.gradients._projections import Projection

__all__ = ["intercepted", "pad_rows", "projections"]

_LINEAR = F.linear


def projections(module: nn.Module) -> list[Projection]:
    """The module's weights that are Linear layers called through ``F.linear`` (or none)."""
    return _attention.attention_projections(module) or _recurrent.recurrent_projections(module)


class _Recorded(Protocol):
    """What `intercepted` needs of a hooked layer (`tracin.gradients._layers._Layer`)."""

    name: str
    module: nn.Module
    weight: str
    bias: str | None
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    versions: list[tuple[int, int]]
    offsets: list[int]
    parent: nn.Module | None
    bias_start: int

    def params(self) -> tuple[str, ...]: ...


@contextmanager
def intercepted(layers: Sequence[_Recorded], batch: int | None) -> Iterator[None]:
    """Record the ``F.linear`` calls of the layers that have a ``parent`` module.

    ``torch.nn.functional.linear`` is replaced only between the parent's forward pre-hook and
    forward hook, and a recurrent parent's ``forward`` by `tracin.gradients._recurrent.unrolled`
    (both restored on exit whatever happens). Records per call the batch-first input
    ``(B, T, in)``, output ``(B, T, n)``, their versions and the call's first weight row.

    Raises:
        HookError: a call on a weight slice that is not a row block, a bias that does not match
            the weight's rows, or an input whose rows are not ``batch`` examples.
    """
    parents: dict[int, tuple[nn.Module, list[_Recorded]]] = {}
    for layer in layers:
        if layer.parent is not None:
            parents.setdefault(id(layer.parent), (layer.parent, []))[1].append(layer)
    handles = []
    swapped = []
    for parent, group in parents.values():

        def pre(mod: nn.Module, args: Any, kwargs: Any, group: list[_Recorded] = group) -> None:
            first = args[0] if args else next(iter(kwargs.values()), None)
            rows = _examples(mod, first, batch, group)
            F.linear = _recorder(mod, group, rows)

        def post(mod: nn.Module, args: Any, out: Any) -> None:
            F.linear = _LINEAR

        forward = _recurrent.unrolled(parent)
        if forward is not None:  # read by Module.__call__ before any pre-hook runs
            parent.forward = forward
            swapped.append(parent)
        handles.append(parent.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        handles.append(parent.register_forward_hook(post))
    try:
        yield
    finally:
        F.linear = _LINEAR
        for handle in handles:
            handle.remove()
        for parent in swapped:
            del parent.forward


def _examples(mod: nn.Module, query: Any, batch: int | None, group: list[_Recorded]) -> int:
    """The number of examples in a call of the module (its input's batch dimension).

    Raises:
        HookError: naming every parameter of the module's hooked layers (none is hooked alone).
    """
    params = tuple(n for layer in group for n in layer.params())
    name = group[0].name.rsplit(".", 1)[0] if "." in group[0].name else type(mod).__name__
    if not isinstance(query, torch.Tensor) or query.dim() != 3:
        raise HookError(
            f"module {name!r} got an input that is not (B, T, E) or (T, B, E) (a packed "
            "sequence or an unbatched input); engine='auto' computes it another way",
            params,
        )
    if mod.training and float(getattr(mod, "dropout", 0.0) or 0.0) > 0:
        raise HookError(
            f"module {name!r} is in training mode with dropout; engine='auto' computes it "
            "another way",
            params,
        )
    rows = int(query.shape[0] if getattr(mod, "batch_first", False) else query.shape[1])
    if batch is not None and rows != batch:
        raise HookError(
            f"module {name!r} got {rows} examples for a batch of {batch}; engine='auto' "
            "computes it another way",
            params,
        )
    return rows


def _recorder(mod: nn.Module, group: list[_Recorded], rows: int) -> Any:
    """An ``F.linear`` that records the calls on the group's weights (see `intercepted`)."""
    owned = {}
    for layer in group:
        w = _attr(mod, layer, layer.weight)
        b = _attr(mod, layer, layer.bias) if layer.bias else None
        owned[id(w)] = (layer, w, b)

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        hit = owned.get(id(w))
        if hit is None and w._base is not None:
            hit = owned.get(id(w._base))
        if hit is None:
            return _LINEAR(x, w, b)
        layer, full, bias = hit
        start = _row_block(layer, w, full)
        _check_bias(layer, b, bias, start + layer.bias_start, int(w.shape[0]))
        if x.numel() % (rows * x.shape[-1]):
            raise HookError(
                f"layer {layer.name!r}: a projection input of shape {tuple(x.shape)} is not "
                f"{rows} examples; use engine='auto'",
                layer.params(),
            )
        xb = x.reshape(-1, rows, x.shape[-1]).transpose(0, 1)  # (B, T, in): a view
        own_b = None if b is None else b.detach().requires_grad_(b.requires_grad)
        y = _LINEAR(xb, w.detach().requires_grad_(w.requires_grad), own_b)
        recorded = xb.detach()
        layer.inputs.append(recorded)
        layer.outputs.append(y)
        layer.versions.append((recorded._version, y._version))
        layer.offsets.append(start)
        return y.transpose(0, 1).reshape(*x.shape[:-1], y.shape[-1]).contiguous()

    return linear


def _attr(mod: nn.Module, layer: _Recorded, name: str) -> torch.Tensor:
    """The tensor the attention module ``mod`` holds as parameter ``name`` (a model name)."""
    parent = layer.name.rsplit(".", 1)[0] if "." in layer.name else ""
    obj: Any = mod
    for part in name[len(parent) + 1 if parent else 0 :].split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, torch.Tensor)
    return obj


def _row_block(layer: _Recorded, w: torch.Tensor, full: torch.Tensor) -> int:
    """The first row of ``w`` within ``full`` (0 for the weight itself)."""
    if w is full:
        return 0
    offset = w.storage_offset() - full.storage_offset()
    if (
        w.dim() != 2
        or w.stride() != full.stride()
        or w.shape[1] != full.shape[1]
        or (offset % full.stride(0))
    ):
        raise HookError(
            f"layer {layer.name!r} used a slice of its weight that is not a block of rows; "
            "use engine='auto'",
            layer.params(),
        )
    return offset // full.stride(0)


def _check_bias(
    layer: _Recorded, b: torch.Tensor | None, bias: torch.Tensor | None, start: int, n: int
) -> None:
    if bias is None and b is None:
        return
    ok = (
        b is not None
        and bias is not None
        and (b is bias or b._base is bias)
        and b.dim() == 1
        and b.shape[0] == n
        and b.storage_offset() - bias.storage_offset() == start
    )
    if not ok:
        raise HookError(
            f"layer {layer.name!r} used a bias that is not its weight rows' own; use engine='auto'",
            layer.params(),
        )


def pad_rows(d: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """A call's output gradient ``(..., n)`` placed at rows ``[start, start + n)`` of ``rows``.

    Zeros elsewhere (``(..., rows)``), so the calls on row blocks of a packed weight add up to
    its gradient (and a third of a packed bias is placed in it); ``d`` itself when the call
    covered every row.
    """
    if d.shape[-1] == rows:
        return d
    out = d.new_zeros(*d.shape[:-1], rows)
    out[..., start : start + d.shape[-1]] = d
    return out
