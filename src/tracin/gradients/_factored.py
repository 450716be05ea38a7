"""Factored per-example gradients: capture each layer's input ``a`` and output gradient ``d``.

For ``nn.Linear`` (with or without a sequence dimension), ``nn.Conv1d``/``nn.Conv2d`` (a
Linear over unfolded patches) and ``nn.Embedding`` (one-hot inputs), the per-example gradient of
the weight is ``G = sum_t d_t a_t^T``; a bias is one more input column of ones. One batched forward
and one ``autograd.grad`` to the layer outputs give every example's ``a`` and ``d``: no loop over
examples. Normalisation layers (LayerNorm, BatchNorm in eval mode) are elementwise:
their per-example gradients are ``sum_t d_t * xhat_t`` (weight) and ``sum_t d_t`` (bias), with
``xhat`` the normalised input recorded by the hook; they are always kept exact. From them:

- exact features: ``G`` itself, flattened like ``param.flatten()`` (weight, then bias); for a
  convolution by one grouped convolution backward (`tracin.gradients._conv`), never unfolding;
- Kronecker projection (LoGra): ``sum_t (P_out^T d_t)(a_t^T P_in)``, never forming ``G``;
- exact ``||G||^2``: ``||a||^2 ||d||^2`` for one position, else ``sum(Gram(d) * Gram(a))`` or
  ``||G||^2`` directly, whichever is cheaper.

Hugging Face ``Conv1D`` is a Linear with a transposed weight; ``nn.EmbeddingBag`` (sum/mean)
an Embedding over its bag members. A weight tied between an Embedding and Linears is hooked in
all of them and the uses' gradients (and Kronecker features, same matrices) add. Which modules
are hooked, and why the rest (other shared weights, parametrizations, overridden forwards) go to
torch.func: `tracin.gradients._layers`.

Hooks live only inside `_capture`, which removes them on exit. A layer called more than once in
a forward pass (weight sharing) accumulates over all its calls, which is the exact gradient. A
pass in which the model changed a layer's output in place (``ReLU(inplace=True)``) is repeated
with that layer's output copied, once; later batches copy it from the start.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from tracin._batch import Batch, batch_size
from tracin._errors import ConfigError, HookError, TaskError
from tracin.checkpoints._checkpoints import Checkpoint
from tracin.gradients import _bare, _conv, _intercept
from tracin.gradients._aliases import call
from tracin.gradients._functional import ExampleGradients, FunctionalEngine, ScoreFn, row_sqnorms
from tracin.gradients._layers import (
    _acc,
    _Call,
    _capture,
    _cat,
    _conv_gradients,
    _exact,
    _is_conv,
    _is_norm,
    _Layer,
    _layer_positions,
    _layer_shape,
    _norm_gradients,
    _rows,
    _sqnorm,
    modified_in_place,
    own_calls_detached,
    supported_layers,
    tie_cross,
)
from tracin.gradients._loop import LoopEngine
from tracin.projection import _last_layer as last_layer
from tracin.projection._config import ProjectionConfig
from tracin.projection._dense import DenseProjector
from tracin.projection._kronecker import KroneckerProjection

__all__ = ["FactoredEngine", "supported_layers"]


class FactoredEngine:
    """Per-example features from captured layer inputs and output gradients.

    Args:
        model: the network (eval mode is the caller's business).
        names: selected parameter names.
        projection: ``identity`` (exact gradients) or ``kronecker`` (per-layer ``k_out x k_in``
            with ``k_in = k_out = round(sqrt(dim))``; parameters outside hooked layers, e.g.
            a ``nn.Conv3d``'s, get one dense Gaussian projection to
            ``dim`` more features, seeded apart from the layers' matrices; when they number no
            more than ``dim``, their exact gradients instead).
        exclude: parameter names never hooked (their layer goes to ``rest``).
        rest: engine for parameters outside hooked layers: ``"functional"`` (torch.func) or
            ``"loop"`` (one backward per example, for modules vmap cannot batch).

    Raises:
        ConfigError: the model has no layer the hooks support among the selected parameters, or a
            bad projection.
    """

    verifiable = True

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        projection: ProjectionConfig,
        exclude: Collection[str] = (),
        rest: str = "functional",
    ) -> None:
        self.model = model
        self.names = tuple(names)
        self.projection = projection
        self.layers, rest_names = supported_layers(model, names, exclude=exclude)
        if not self.layers:
            raise ConfigError(
                "engine='factored' has no layer to hook among the selected parameters (tied or "
                "shared weights, parametrized layers and modules without a hook rule go to "
                "torch.func); use engine='auto' or engine='functional'"
            )
        if projection.kind not in ("identity", "kronecker", "last_layer"):
            raise ConfigError(
                f"the factored engine projects with 'kronecker', not {projection.kind!r}"
            )
        if projection.kind == "last_layer" and (
            rest_names or len(self.layers) != 1 or not isinstance(self.layers[0].module, nn.Linear)
        ):
            raise ConfigError(
                f"projection='last_layer' needs exactly one Linear layer selected, got "
                f"{list(names)}; pass layers=['<name of the final Linear>']"
            )
        engine = LoopEngine if rest == "loop" else FunctionalEngine
        self.rest: ExampleGradients | None = engine(model, rest_names) if rest_names else None
        counts = Counter(layer.index for layer in self.layers)
        self.tied_groups = {index for index, n in counts.items() if n > 1}
        """Layer indices shared by the hooked uses of one tied weight (their gradients add)."""
        self.kronecker = (
            KroneckerProjection(projection, len(self.layers))
            if projection.kind == "kronecker"
            else None
        )
        params = dict(model.named_parameters())
        self.sizes = {n: params[n].numel() for n in names}
        self.rest_projector: DenseProjector | None = None
        self.rest_exact = 0  # Kronecker runs: width of the rest's exact gradients (few params)
        rest_size = sum(self.sizes[n] for n in rest_names)
        kron_rest = self.rest is not None and projection.kind == "kronecker"
        if kron_rest and rest_size <= int(projection.dim or 0):  # projecting would only widen
            self.rest_exact = rest_size
        if self.rest is not None and projection.kind == "kronecker" and not self.rest_exact:
            dense = ProjectionConfig("gaussian", projection.dim, projection.seed)
            self.rest_projector = DenseProjector(  # layer ids after the hooked layers' seeds
                [self.sizes[n] for n in rest_names], dense, layer_offset=len(self.layers)
            )

    def prepare(
        self, checkpoint: Checkpoint, weights: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``weights`` unchanged."""
        return weights

    def dim(self) -> int:
        """Feature dimension."""
        if self.projection.kind == "identity":
            return sum(self.sizes.values())
        if self.projection.kind == "last_layer":
            return self.split() + int(self._weight_shape()[0])
        rest = self.rest_exact if self.rest_projector is None else self.rest_projector.k
        first = {layer.index: layer for layer in reversed(self.layers)}  # a tied weight once
        return rest + sum(
            sum(self.sizes[n] for n in (layer.weight, layer.bias) if n)
            if _is_norm(layer)
            else int(np.prod(self._sides(layer)))
            for layer in first.values()
        )

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
        assert self.kronecker is not None
        return self.kronecker.side

    def _matrix(
        self, ckpt_key: int, layer: int, which: int, rows: int, device: Any = "cpu"
    ) -> torch.Tensor:
        assert self.kronecker is not None
        return self.kronecker.matrix(ckpt_key, layer, which, rows, device)

    def _captured(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> list[list[_Call]]:
        """Each layer's calls in one pass, as (input, output gradient) pairs."""
        params = {n: w.detach().requires_grad_(n in self.sizes) if w.is_floating_point() else w
                  for n, w in weights.items()}  # fmt: skip

        bare = [layer for layer in self.layers if isinstance(layer.module, _bare.BareParameter)]
        given = _bare.tracked(params, bare, batch_size(batch)) if bare else params

        def model(*args: Any, **kwargs: Any) -> Any:
            return call(self.model, given, args, kwargs)

        hooked = list(dict.fromkeys(n for layer in self.layers for n in layer.params()))
        for _ in range(2):  # a second pass copies what the model modified in place
            with (
                torch.enable_grad(),
                own_calls_detached(self.layers),
                _capture(self.layers, batch_size(batch)),
            ):
                out = score(model, batch)
                if out.dim() != 1:
                    raise TaskError(f"score returned shape {tuple(out.shape)}; expected (B,)")
                if modified_in_place(self.layers):
                    continue
                outputs = [o for layer in self.layers for o in layer.outputs]
                leaves = [params[n] for n in hooked]
                grads = torch.autograd.grad(out.sum(), outputs + leaves, allow_unused=True)
                break
        _check_no_outside_use(hooked, grads[len(grads) - len(hooked) :], self.layers)
        result, i = [], 0
        for layer in self.layers:
            calls = []
            starts: list[int | None] = [*layer.offsets] or [None] * len(layer.inputs)
            for x, o, start in zip(layer.inputs, layer.outputs, starts, strict=True):
                g = (grads[i] if grads[i] is not None else torch.zeros_like(o)).detach()
                if start is not None:  # a call on a row block of a packed weight
                    g = _intercept.pad_rows(g, start, _layer_shape(layer)[0])
                calls.append((x, g))
                i += 1
            layer.inputs.clear()
            layer.outputs.clear()
            layer.versions.clear()
            layer.offsets.clear()
            if not calls:
                raise HookError(
                    f"layer {layer.name!r} was not called by the model's forward pass; its "
                    "gradient is zero: leave it out of layers=[...] or use engine='auto'",
                    layer.params(),
                )
            result.append(calls)
        return result

    def features(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch, ckpt_key: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(B, dim)`` and exact squared gradient norms ``(B,)`` (float64)."""
        captured = self._captured(weights, score, batch)
        sq = torch.zeros(
            captured[0][0][1].shape[0], dtype=torch.float64, device=captured[0][0][1].device
        )
        kind = self.projection.kind
        pieces: dict[str, torch.Tensor] = {}
        kron: list[torch.Tensor] = []
        slots: dict[int, int] = {}
        tied: dict[int, list[tuple[torch.Tensor, torch.Tensor, int | None]]] = {}
        for layer, calls in zip(self.layers, captured, strict=True):
            if _is_conv(layer) or _is_norm(layer):
                grads = (_conv_gradients if _is_conv(layer) else _norm_gradients)(layer, calls)
                if kind == "identity":
                    pieces.update(grads)
                    continue
                sq += sum(row_sqnorms(g) for g in grads.values())
                if _is_norm(layer):  # elementwise layers stay exact
                    kron.append(torch.cat(list(grads.values()), dim=1))
                    continue
                if self._sides(layer) == _layer_shape(layer):  # both sides exact: G itself
                    kron.append(_conv_matrix(layer, grads))
                    continue
                a_proj, d = self._conv_inputs(layer, calls, ckpt_key)
                kron.append(self._kron(layer, a_proj, d, ckpt_key))
                continue
            a, d = _layer_positions(layer, calls)
            emb = _rows(layer)
            if kind != "identity":
                sq += _sqnorm(a, d, emb, layer.bias is not None)
                if layer.index in self.tied_groups:
                    tied.setdefault(layer.index, []).append((a, d, emb))
            if kind == "last_layer":
                kron.append(last_layer.factors(layer.name, a, d, layer.bias is not None))
            elif kind == "kronecker":
                a_in, d_out = (d, a) if layer.tied else (a, d)  # a tied Linear's G^T
                a_proj = self._linear_inputs(layer, a_in, ckpt_key)
                block = self._kron(layer, a_proj, d_out, ckpt_key)
                if layer.index in slots:  # the uses of a tied weight add up
                    kron[slots[layer.index]] = kron[slots[layer.index]] + block
                else:
                    slots[layer.index] = len(kron)
                    kron.append(block)
            else:
                for name, g in _exact(layer, a, d, emb).items():
                    pieces[name] = pieces[name] + g if name in pieces else g
        for parts in tied.values():  # ||sum_i G_i||^2 = sum_i ||G_i||^2 + the cross terms
            sq += tie_cross(parts)
        if kind == "kronecker" and self.rest is not None:
            g = self.rest.gradients(weights, score, batch)
            sq += row_sqnorms(g)
            projector = self.rest_projector
            kron.append(g if projector is None else projector.project(g, ckpt_key))
        if kron:
            return torch.cat(kron, dim=1), sq
        if self.rest is not None:
            pieces.update(self.rest.gradient_dict(weights, score, batch))
        for piece in pieces.values():  # exact features: the norm is the features' own
            sq += row_sqnorms(piece)
        return torch.cat([pieces[n] for n in self.names], dim=1), sq

    def sqnorms(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> torch.Tensor:
        """Exact squared gradient norms ``(B,)`` (float64) without forming any gradient."""
        captured = self._captured(weights, score, batch)
        tied: dict[int, list[tuple[torch.Tensor, torch.Tensor, int | None]]] = {}
        sq = torch.zeros(
            captured[0][0][1].shape[0], dtype=torch.float64, device=captured[0][0][1].device
        )
        for layer, calls in zip(self.layers, captured, strict=True):
            if _is_conv(layer) or _is_norm(layer):
                fn = _conv_gradients if _is_conv(layer) else _norm_gradients
                sq += sum(row_sqnorms(g) for g in fn(layer, calls).values())
            else:
                a, d = _layer_positions(layer, calls)
                sq += _sqnorm(a, d, _rows(layer), layer.bias is not None)
                if layer.index in self.tied_groups:
                    tied.setdefault(layer.index, []).append((a, d, _rows(layer)))
        for parts in tied.values():
            sq += tie_cross(parts)
        if self.rest is not None:
            sq += self.rest.sqnorms(weights, score, batch)
        return sq

    def _linear_inputs(self, layer: _Layer, a: torch.Tensor, ckpt_key: int) -> torch.Tensor:
        """``[a, 1] @ P_in`` (one-hot rows of P_in for an Embedding), or ``[a, 1]`` if exact."""
        n_in, bias, emb = _layer_shape(layer)[1], layer.bias is not None, _rows(layer)
        if self._sides(layer)[1] < n_in:
            p_in = self._matrix(ckpt_key, layer.index, 0, n_in, a.device)
            if emb is not None:
                return p_in[a]  # (B, T, k_in)
            p_in = p_in.to(a.dtype)  # [a, 1] @ P_in without copying a: a @ P_in[:-1] + P_in[-1]
            return a @ p_in[: n_in - bias] + (p_in[-1] if bias else 0.0)
        if emb is not None:  # exact: the layer is no wider than the projection
            return F.one_hot(a, n_in)
        return torch.cat([a, torch.ones_like(a[..., :1])], dim=2) if bias else a

    def _conv_inputs(
        self, layer: _Layer, calls: Sequence[_Call], ckpt_key: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input patches projected by a convolution with P_in; output gradients per position."""
        module = layer.module
        assert isinstance(module, nn.Conv1d | nn.Conv2d)
        n_in, bias = _layer_shape(layer)[1], layer.bias is not None
        d = _cat([_conv.output_positions(module, g).to(_acc(g.dtype)) for _, g in calls])
        if self._sides(layer)[1] < n_in:
            p_in = self._matrix(ckpt_key, layer.index, 0, n_in, d.device).to(d.dtype)
            a = _cat([_conv.input_projection(module, x, p_in, bias) for x, _ in calls])
            return a, d
        a = _cat([_conv.patches(module, x).to(d.dtype) for x, _ in calls])
        return (torch.cat([a, torch.ones_like(a[..., :1])], dim=2) if bias else a), d

    def _kron(
        self, layer: _Layer, a_proj: torch.Tensor, d: torch.Tensor, ckpt_key: int
    ) -> torch.Tensor:
        """``sum_t (P_out^T d_t)(a_proj_t)^T`` flattened, ``(B, k_out * k_in)``."""
        assert self.kronecker is not None
        return self.kronecker.outer(a_proj, d, _layer_shape(layer)[0], layer.index, ckpt_key)


def _conv_matrix(layer: _Layer, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """A convolution's exact gradient as the matrix ``G = [W, b]`` ``(out, in + 1)``, flattened.

    The layout of ``sum_t d_t [a_t, 1]^T`` (the Kronecker features with both sides exact),
    from the per-example gradients of one grouped convolution backward instead of unfolded
    patches (faster on CPU, ``benchmarks/small_model_profile.py``).
    """
    weight = grads[layer.weight]
    b, n_out = weight.shape[0], _layer_shape(layer)[0]
    parts = [weight.reshape(b, n_out, -1)]
    if layer.bias is not None:
        parts.append(grads[layer.bias].reshape(b, n_out, 1).to(weight.dtype))
    return torch.cat(parts, dim=2).reshape(b, -1)


def _check_no_outside_use(
    hooked: Sequence[str], grads: Sequence[torch.Tensor | None], layers: Sequence[_Layer]
) -> None:
    """Raise if a hooked parameter received a gradient outside its layer's own calls.

    Raises:
        HookError: naming the parameters; ``engine="auto"`` computes them with torch.func.
    """
    outside = [n for n, g in zip(hooked, grads, strict=True) if g is not None]
    if outside:
        owners = {n: layer for layer in layers for n in layer.params()}
        bad = tuple(n for layer in {owners[n].name: owners[n] for n in outside}.values()
                    for n in layer.params())  # fmt: skip
        raise HookError(
            f"parameters {list(outside)} are also used outside their layer's call (a tied "
            "weight, or F.linear on another module's weight): the layer hooks would miss that "
            "use. Pass engine='auto' (it computes them with torch.func) or engine='functional'",
            bad,
        )
