"""Factored per-example gradients: capture each layer's input ``a`` and output gradient ``d``.

For ``nn.Linear`` (with or without a sequence dimension), ``nn.Conv1d``/``nn.Conv2d`` (as a
Linear over unfolded patches) and ``nn.Embedding`` (one-hot inputs), the per-example gradient of
the weight is ``G = sum_t d_t a_t^T``; a bias is one more input column of ones. One batched forward
and one ``autograd.grad`` to the layer outputs give every example's ``a`` and ``d``: no loop over
examples, no weight gradients. From them:

- exact features: ``G`` itself, flattened like ``param.flatten()`` (weight, then bias);
- Kronecker projection (LoGra): ``sum_t (P_out^T d_t)(a_t^T P_in)``, never forming ``G``;
- exact ``||G||^2``: ``||a||^2 ||d||^2`` for one position, else ``sum(Gram(d) * Gram(a))`` or
  ``||G||^2`` directly, whichever is cheaper.

Hooks live only inside `_capture`, which removes them on exit. A layer called more than once in
a forward pass (weight sharing) accumulates over all its calls, which is the exact gradient.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call

from tracin._batch import Batch
from tracin._engine import FunctionalEngine, ScoreFn
from tracin._errors import ConfigError, TaskError
from tracin._projection import ProjectionConfig

__all__ = ["FactoredEngine", "supported_layers"]


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


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Embedding):
        return module.max_norm is None and not module.scale_grad_by_freq
    return isinstance(module, nn.Linear) or _conv_ok(module)


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
    if isinstance(module, nn.Embedding):
        return x.reshape(b, -1), out.reshape(b, -1, out.shape[-1])
    if isinstance(module, nn.Linear):
        return x.reshape(b, -1, x.shape[-1]), out.reshape(b, -1, out.shape[-1])
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    pad = tuple(int(p) for p in module.padding)  # str padding is routed to torch.func
    spec: list[tuple[int, ...]] = [
        tuple(module.kernel_size),
        tuple(module.dilation),
        pad,
        tuple(module.stride),
    ]
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        spec = [(1, *s) if i != 2 else (0, *s) for i, s in enumerate(spec)]
    kernel, dil, padding, stride = spec
    a = F.unfold(x, kernel, dilation=dil, padding=padding, stride=stride).transpose(1, 2)
    return a, out.reshape(b, out.shape[1], -1).transpose(1, 2)


@contextmanager
def _capture(layers: Sequence[_Layer]) -> Iterator[None]:
    """Record every call's input and output of each layer; hooks removed on exit."""
    handles = []
    for layer in layers:
        layer.inputs.clear()
        layer.outputs.clear()

        def hook(
            mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor, lay: _Layer = layer
        ) -> None:
            lay.inputs.append(args[0].detach())
            lay.outputs.append(out)

        handles.append(layer.module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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


class FactoredEngine:
    """Per-example features from captured layer inputs and output gradients.

    Args:
        model: the network (eval mode is the caller's business).
        names: selected parameter names.
        projection: ``identity`` (exact gradients) or ``kronecker`` (per-layer ``k_out x k_in``
            with ``k_in = k_out = round(sqrt(dim))``).
    """

    def __init__(
        self, model: nn.Module, names: Sequence[str], projection: ProjectionConfig
    ) -> None:
        self.model = model
        self.names = tuple(names)
        self.projection = projection
        self.layers, rest = supported_layers(model, names)
        if not self.layers:
            raise ConfigError("no Linear/Conv/Embedding layer among the selected parameters")
        if projection.kind not in ("identity", "kronecker", "last_layer"):
            raise ConfigError(
                f"the factored engine projects with 'kronecker', not {projection.kind!r}"
            )
        if projection.kind == "last_layer" and (
            rest or len(self.layers) != 1 or not isinstance(self.layers[0].module, nn.Linear)
        ):
            raise ConfigError(
                f"projection='last_layer' needs exactly one Linear layer selected, got "
                f"{list(names)}; pass layers=['<name of the final Linear>']"
            )
        self.rest = FunctionalEngine(model, rest) if rest else None
        if self.rest is not None and projection.kind == "kronecker":
            raise ConfigError(
                f"parameters {rest[:5]} are not in Linear/Conv/Embedding layers and cannot be "
                "Kronecker-projected; select layers=[...] without them, or use "
                "projection='gaussian'"
            )
        self._mats: dict[tuple[int, int, int], torch.Tensor] = {}
        params = dict(model.named_parameters())
        self.sizes = {n: params[n].numel() for n in names}

    def dim(self) -> int:
        """Feature dimension."""
        if self.projection.kind == "identity":
            return sum(self.sizes.values())
        if self.projection.kind == "last_layer":
            return self.split() + int(self._weight_shape()[0])
        return sum(o * i for o, i in (self._sides(layer) for layer in self.layers))

    def _sides(self, layer: _Layer) -> tuple[int, int]:
        """Projected ``(k_out, k_in)`` of a layer.

        A side no larger than the projection is kept exact (identity): small layers lose nothing.
        """
        n_out, n_in = _layer_shape(layer)
        side = self._side()
        return min(n_out, side), min(n_in, side)

    def split(self) -> int:
        """For ``last_layer``: how many leading columns hold ``a`` (bias column included)."""
        return int(self._weight_shape()[1]) + (1 if self.layers[0].bias is not None else 0)

    def _weight_shape(self) -> torch.Size:
        weight = self.layers[0].module.weight
        assert isinstance(weight, torch.Tensor)
        return weight.shape

    def _side(self) -> int:
        assert self.projection.dim is not None
        return max(1, round(float(np.sqrt(self.projection.dim))))

    def _matrix(self, checkpoint: int, layer: int, which: int, rows: int) -> torch.Tensor:
        key = (checkpoint, layer, which)
        if key not in self._mats:
            if len(self._mats) > 4 * len(self.layers):
                self._mats.clear()
            seq = np.random.SeedSequence([self.projection.seed, checkpoint, layer, which])
            gen = torch.Generator().manual_seed(int(seq.generate_state(1, np.uint64)[0] >> 1))
            side = self._side()
            self._mats[key] = torch.randn(rows, side, generator=gen) / float(np.sqrt(side))
        return self._mats[key]

    def _captured(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        params = {n: w.detach().requires_grad_(n in self.sizes) if w.is_floating_point() else w
                  for n, w in weights.items()}  # fmt: skip

        def model(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, params, args, kwargs)

        with torch.enable_grad(), _capture(self.layers):
            out = score(model, batch)
            if out.dim() != 1:
                raise TaskError(f"score returned shape {tuple(out.shape)}; expected (B,)")
            outputs = [o for layer in self.layers for o in layer.outputs]
            grads = torch.autograd.grad(out.sum(), outputs, allow_unused=True)
        result, i = [], 0
        for layer in self.layers:
            a_parts, d_parts = [], []
            for x, o in zip(layer.inputs, layer.outputs, strict=True):
                g = grads[i] if grads[i] is not None else torch.zeros_like(o)
                a, d = _positions(layer, x, g.detach())
                a_parts.append(a)
                d_parts.append(d)
                i += 1
            if not a_parts:
                raise TaskError(f"layer {layer.name!r} was not called by the model's forward pass")
            a, d = torch.cat(a_parts, 1), torch.cat(d_parts, 1)
            pad = getattr(layer.module, "padding_idx", None)
            if pad is not None:  # the padding row gets no gradient (as in nn.Embedding)
                d = d * (a != pad).unsqueeze(-1).to(d.dtype)
            result.append((a, d))  # a bias is the column of ones that ``a`` leaves implicit
        return result

    def features(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch, checkpoint: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(B, dim)`` and exact squared gradient norms ``(B,)`` (float64)."""
        captured = self._captured(weights, score, batch)
        sq = torch.zeros(captured[0][0].shape[0], dtype=torch.float64)
        pieces: dict[str, torch.Tensor] = {}
        kron = []
        for layer, (a, d) in zip(self.layers, captured, strict=True):
            emb = layer.module.num_embeddings if isinstance(layer.module, nn.Embedding) else None
            if self.projection.kind != "identity":
                sq += _sqnorm(a, d, emb, layer.bias is not None)
            if self.projection.kind == "last_layer":
                if a.shape[1] != 1:
                    raise TaskError(
                        f"layer {layer.name!r} sees {a.shape[1]} positions per example; the "
                        "last-layer path needs one (use projection='kronecker' for sequences)"
                    )
                parts = [a[:, 0].to(d.dtype), d[:, 0]]
                if layer.bias is not None:
                    parts.insert(1, torch.ones_like(d[:, 0, :1]))
                kron.append(torch.cat(parts, dim=1))
            elif self.projection.kind == "kronecker":
                kron.append(self._kron(layer, a, d, emb, checkpoint))
            else:
                pieces.update(self._exact(layer, a, d, emb))
        if kron:
            return torch.cat(kron, dim=1), sq
        if self.rest is not None:
            g = self.rest.gradients(weights, score, batch)
            offset = 0
            for name in self.rest.names:
                pieces[name] = g[:, offset : offset + self.sizes[name]]
                offset += self.sizes[name]
        for piece in pieces.values():  # exact features: the norm is the features' own
            sq += piece.pow(2).sum(1, dtype=torch.float64)
        return torch.cat([pieces[n] for n in self.names], dim=1), sq

    def sqnorms(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> torch.Tensor:
        """Exact squared gradient norms ``(B,)`` (float64) without forming any gradient."""
        captured = self._captured(weights, score, batch)
        sq = torch.zeros(captured[0][0].shape[0], dtype=torch.float64)
        for layer, (a, d) in zip(self.layers, captured, strict=True):
            emb = layer.module.num_embeddings if isinstance(layer.module, nn.Embedding) else None
            sq += _sqnorm(a, d, emb, layer.bias is not None)
        if self.rest is not None:
            sq += self.rest.gradients(weights, score, batch).pow(2).sum(1, dtype=torch.float64)
        return sq

    def _exact(
        self, layer: _Layer, a: torch.Tensor, d: torch.Tensor, emb: int | None
    ) -> dict[str, torch.Tensor]:
        b = a.shape[0]
        if emb is not None:
            return {layer.weight: _embedding_grad(a, d, emb).reshape(b, -1)}
        g = torch.bmm(d.transpose(1, 2), a.to(d.dtype))  # (B, out, in)
        if layer.bias is None:
            return {layer.weight: g.reshape(b, -1)}
        return {layer.weight: g.reshape(b, -1), layer.bias: d.sum(1)}

    def _kron(
        self, layer: _Layer, a: torch.Tensor, d: torch.Tensor, emb: int | None, checkpoint: int
    ) -> torch.Tensor:
        n_out, n_in = _layer_shape(layer)  # n_in counts the bias column
        k_out, k_in = self._sides(layer)
        bias = layer.bias is not None
        if k_in < n_in:
            p_in = self._matrix(checkpoint, layer.index, 0, n_in).to(d.dtype)
            if emb is not None:
                a_proj = p_in[a]  # (B, T, k_in)
            else:  # [a, 1] @ P_in without copying a: a @ P_in[:-1] + P_in[-1]
                a_proj = a.to(d.dtype) @ p_in[: n_in - bias] + (p_in[-1] if bias else 0.0)
        elif emb is not None:  # exact: the layer is no wider than the projection
            a_proj = F.one_hot(a, n_in).to(d.dtype)
        else:
            a_proj = a.to(d.dtype)
            if bias:
                a_proj = torch.cat([a_proj, torch.ones_like(a_proj[..., :1])], dim=2)
        d_proj = (
            d @ self._matrix(checkpoint, layer.index, 1, n_out).to(d.dtype) if k_out < n_out else d
        )
        return torch.bmm(d_proj.transpose(1, 2), a_proj).reshape(a.shape[0], -1)
