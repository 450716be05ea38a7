"""Layer types the factored engine hooks, and the per-example gradient maths of each.

A hooked layer records, per call in a forward pass, its input (for a norm layer the normalised
input ``xhat``) and, after one ``autograd.grad`` to its outputs, the output gradient ``d``.
Linear, Embedding and convolution gradients are ``sum_t d_t a_t^T`` over positions ``t``;
LayerNorm and BatchNorm (eval) gradients are ``sum_t d_t * xhat_t`` and ``sum_t d_t``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from tracin import _conv
from tracin._errors import TaskError


@dataclass
class _Layer:
    """One hooked module and what is captured from it during a pass."""

    name: str
    module: nn.Module
    index: int
    weight: str
    bias: str | None
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)


def _layer_shape(layer: _Layer) -> tuple[int, int]:
    """``(out, in)`` of the layer's gradient matrix ``G`` (bias column included in ``in``)."""
    weight = layer.module.weight
    assert isinstance(weight, torch.Tensor)
    if isinstance(layer.module, nn.Embedding):
        return int(weight.shape[1]), int(weight.shape[0])  # G^T: (dim, rows) as d a^T
    n_in = int(weight[0].numel()) + (1 if layer.bias is not None else 0)
    return int(weight.shape[0]), n_in


def _conv_ok(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv1d | nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


_NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def _norm_ok(module: nn.Module) -> bool:
    if isinstance(module, nn.LayerNorm):
        return module.elementwise_affine
    return (
        isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d)
        and module.affine
        and module.track_running_stats
    )


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Embedding):
        return module.max_norm is None and not module.scale_grad_by_freq
    return isinstance(module, nn.Linear) or _conv_ok(module) or _norm_ok(module)


def supported_layers(model: nn.Module, names: Sequence[str]) -> tuple[list[_Layer], list[str]]:
    """Split selected parameter names into hookable layers and the rest (for torch.func).

    A layer is hooked when its weight is selected and its bias is selected or absent (an
    Embedding has no bias); anything else falls back to the functional engine.
    """
    chosen = set(names)
    layers: list[_Layer] = []
    covered: set[str] = set()
    # MultiheadAttention uses out_proj's weight without calling the module: no hook would fire
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    inside_mha = {f"{n}.out_proj" if n else "out_proj" for n in attention}
    for mod_name, module in model.named_modules():
        if not _supported(module) or mod_name in inside_mha:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        weight = f"{prefix}weight"
        bias = f"{prefix}bias" if getattr(module, "bias", None) is not None else None
        if weight in chosen and (bias is None or bias in chosen):
            layers.append(_Layer(mod_name, module, len(layers), weight, bias))
            covered |= {weight} | ({bias} if bias else set())
    return layers, [n for n in names if n not in covered]


def _positions(
    layer: _Layer, x: torch.Tensor, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer input per position and output (gradient) per position.

    Returns ``a`` as ``(B, T, in)`` (for an Embedding: indices ``(B, T)``) and ``out`` as
    ``(B, T, out)``; a convolution's positions are its unfolded patches.
    """
    module = layer.module
    b = x.shape[0]
    if isinstance(module, nn.LayerNorm):
        width = int(np.prod(module.normalized_shape))
        return x.reshape(b, -1, width), out.reshape(b, -1, width)
    if isinstance(module, _NORMS):  # BatchNorm: channels second
        c = x.shape[1]
        return x.reshape(b, c, -1).transpose(1, 2), out.reshape(b, c, -1).transpose(1, 2)
    if isinstance(module, nn.Embedding):
        return x.reshape(b, -1), out.reshape(b, -1, out.shape[-1])
    if isinstance(module, nn.Linear):
        return x.reshape(b, -1, x.shape[-1]), out.reshape(b, -1, out.shape[-1])
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    return _conv.patches(module, x), _conv.output_positions(module, out)


@contextmanager
def _capture(layers: Sequence[_Layer], batch: int | None = None) -> Iterator[None]:
    """Record every call's input and output of each layer; hooks removed on exit.

    With ``batch``, a call whose input has batch size 1 is broadcast to ``batch`` rows, input and
    output alike (BERT's position embeddings take ``(1, T)`` ids and are added to every example:
    each example needs its own copy for its own gradient); any other size is an error.
    """
    handles = []
    for layer in layers:
        layer.inputs.clear()
        layer.outputs.clear()

        def hook(
            mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor, lay: _Layer = layer
        ) -> torch.Tensor:
            x = args[0].detach()
            if batch is not None and x.shape[0] != batch:
                if x.shape[0] != 1 or out.shape[0] != 1:
                    raise TaskError(
                        f"layer {lay.name!r} got input of shape {tuple(x.shape)} for a batch of "
                        f"{batch}: the factored engine needs batch-first inputs; use "
                        "engine='functional' or leave the layer out of layers=[...]"
                    )
                x = x.expand(batch, *x.shape[1:])
                out = out.expand(batch, *out.shape[1:]).contiguous()
            lay.inputs.append(_recorded_input(mod, x))
            lay.outputs.append(out)
            return out

        handles.append(layer.module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _recorded_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a layer's gradient needs of its input: ``x``, or for a norm layer ``xhat``.

    Computed inside the forward pass, so a BatchNorm's running statistics are the checkpoint's.
    """
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        if module.training:
            raise TaskError(
                f"{type(module).__name__} is in training mode and mixes the examples of a batch; "
                "tracin runs the model in eval mode: do not switch it back inside forward()"
            )
        assert module.running_mean is not None and module.running_var is not None
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, var = module.running_mean.view(shape), module.running_var.view(shape)
        return (x - mean) / torch.sqrt(var + module.eps)
    return x


def _embedding_grad(idx: torch.Tensor, d: torch.Tensor, rows: int) -> torch.Tensor:
    """``(B, rows, dim)`` per-example embedding gradients: ``d`` summed into its index rows."""
    g = torch.zeros(idx.shape[0], rows, d.shape[-1], dtype=d.dtype, device=d.device)
    return g.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, d.shape[-1]), d)


def _sqnorm(
    a: torch.Tensor, d: torch.Tensor, embedding: int | None, bias: bool = False
) -> torch.Tensor:
    """Exact squared norm of the weight gradient, plus ``||sum_t d_t||^2`` with a bias."""
    weight = _weight_sqnorm(a, d, embedding)
    if bias:
        weight = weight + d.sum(1).pow(2).sum(1, dtype=torch.float64)
    return weight


def _weight_sqnorm(a: torch.Tensor, d: torch.Tensor, embedding: int | None) -> torch.Tensor:
    """Exact ``||sum_t d_t a_t^T||^2`` per example, in ``d``'s dtype, summed in float64."""
    if embedding is not None:  # rows of G are sums of d over equal indices:
        same = (a.unsqueeze(2) == a.unsqueeze(1)).to(d.dtype)  # (B, T, T), no (B, V, dim) tensor
        return (torch.bmm(d, d.transpose(1, 2)) * same).sum((1, 2), dtype=torch.float64)
    a = a.to(d.dtype)
    t, n_in, n_out = a.shape[1], a.shape[2], d.shape[2]
    if t == 1:
        return a.pow(2).sum((1, 2), dtype=torch.float64) * d.pow(2).sum((1, 2), dtype=torch.float64)
    if t * t * (n_in + n_out) < t * n_in * n_out:
        gram = torch.bmm(d, d.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))
        return gram.sum((1, 2), dtype=torch.float64)
    return torch.bmm(d.transpose(1, 2), a).pow(2).sum((1, 2), dtype=torch.float64)


_Call = tuple[torch.Tensor, torch.Tensor]
"""One call of a layer in a forward pass: its input and the gradient of its output."""


def _is_conv(layer: _Layer) -> bool:
    return isinstance(layer.module, nn.Conv1d | nn.Conv2d)


def _is_norm(layer: _Layer) -> bool:
    return isinstance(layer.module, _NORMS)


def _norm_gradients(layer: _Layer, calls: Sequence[_Call]) -> dict[str, torch.Tensor]:
    """A norm layer's exact per-example gradients: ``sum_t d_t * xhat_t`` and ``sum_t d_t``."""
    xhat, d = _layer_positions(layer, calls)
    out = {layer.weight: (xhat * d).sum(1)}
    if layer.bias is not None:
        out[layer.bias] = d.sum(1)
    return out


def _rows(layer: _Layer) -> int | None:
    """An Embedding's number of rows (its one-hot input width); None for other layers."""
    return layer.module.num_embeddings if isinstance(layer.module, nn.Embedding) else None


def _cat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), 1)


def _layer_positions(layer: _Layer, calls: Sequence[_Call]) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``d`` per position over all calls; an Embedding's padding rows get no ``d``."""
    pairs = [_positions(layer, x, g) for x, g in calls]
    a, d = _cat([p[0] for p in pairs]), _cat([p[1] for p in pairs])
    pad = getattr(layer.module, "padding_idx", None)
    if pad is not None:  # the padding row gets no gradient (as in nn.Embedding)
        d = d * (a != pad).unsqueeze(-1).to(d.dtype)
    if not isinstance(layer.module, nn.Embedding):
        a = a.to(d.dtype)
    return a, d


def _conv_gradients(layer: _Layer, calls: Sequence[_Call]) -> dict[str, torch.Tensor]:
    """A convolution's exact per-example gradients, weight (and bias), by name."""
    module = layer.module
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    out = {layer.weight: _conv.weight_gradient(module, calls)}
    if layer.bias is not None:
        sums = [_conv.output_positions(module, g).sum(1) for _, g in calls]
        out[layer.bias] = torch.stack(sums).sum(0)
    return out


def _last_layer(layer: _Layer, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``[a, (1), d]`` of a one-position Linear: the exact last-layer features."""
    if a.shape[1] != 1:
        raise TaskError(
            f"layer {layer.name!r} sees {a.shape[1]} positions per example; the "
            "last-layer path needs one (use projection='kronecker' for sequences)"
        )
    parts = [a[:, 0], d[:, 0]]
    if layer.bias is not None:
        parts.insert(1, torch.ones_like(d[:, 0, :1]))
    return torch.cat(parts, dim=1)


def _exact(
    layer: _Layer, a: torch.Tensor, d: torch.Tensor, emb: int | None
) -> dict[str, torch.Tensor]:
    """Exact per-example gradients of a Linear or Embedding layer, by parameter name."""
    b = a.shape[0]
    if emb is not None:
        return {layer.weight: _embedding_grad(a, d, emb).reshape(b, -1)}
    g = torch.bmm(d.transpose(1, 2), a)  # (B, out, in)
    if layer.bias is None:
        return {layer.weight: g.reshape(b, -1)}
    return {layer.weight: g.reshape(b, -1), layer.bias: d.sum(1)}
