"""Layer types the factored engine hooks, and the per-example gradient maths of each.

A hooked layer records, per call in a forward pass, its input (for a norm layer the normalised
input ``xhat``) and, after one ``autograd.grad`` to its outputs, the output gradient ``d``.
Linear, Embedding and convolution gradients are ``sum_t d_t a_t^T`` over positions ``t``;
LayerNorm and BatchNorm (eval) gradients are ``sum_t d_t * xhat_t`` and ``sum_t d_t``; PReLU's
slope gradient is ``sum_t d_t * min(x_t, 0)``. ``nn.Bilinear`` is a Linear over the outer products
``x1 x2^T`` of its inputs (its weight ``(out, in1, in2)`` flattened to ``(out, in1 * in2)``).
Hugging Face ``Conv1D`` (``y = x @ W + b``, ``W`` of shape ``(in, out)``) is a Linear whose
gradient is ``G^T``; ``nn.EmbeddingBag`` is an Embedding over bag members
(`tracin.gradients._bags`). Modules that apply their weights through ``F.linear``
(``nn.MultiheadAttention``, ``nn.LSTM``/``nn.GRU``/``nn.RNN``) give one Linear layer per
projection, recorded from those calls (`tracin.gradients._intercept`).

Only a layer whose gradient is provably ``sum_t d_t a_t^T`` is hooked. A weight shared by one
Embedding and Linears (tied input/output embeddings, `embedding_ties`) is hooked in every module
that uses it, its gradient the sum of the uses' (`tie_cross` gives the cross terms of its norm);
a tied Linear's bias (BERT-MLM's decoder, whose bias its parent module also holds) is a layer of
its own. Any other parameter owned by two modules, a weight computed by a
parametrization (or by a pre-hook, as the old ``weight_norm``), or a subclass or instance that
replaces ``forward`` is left to torch.func, which is exact. Hooks record a layer's own output
before any user forward hook changes it. Sums of many products run in float32 or better
whatever the model's dtype (float16 products overflow at 65504).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from tracin._errors import HookError, TaskError
from tracin.gradients import _bags, _bare, _conv, _intercept


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
    versions: list[tuple[int, int]] = field(default_factory=list)
    clone: bool = False  # set once the model was seen to modify an input/output in place
    tied: bool = False  # a Linear whose weight is an Embedding's: G taken as the Embedding's (D, V)
    parent: nn.Module | None = None  # called by this module via F.linear (_intercept)
    offsets: list[int] = field(default_factory=list)  # per call: its first row of the weight
    bias_start: int = 0  # the layer owns rows [bias_start, bias_start + out) of its bias ...
    bias_rows: int | None = None  # ... of this size (a third of MultiheadAttention's in_proj_bias)
    bias_only: bool = False  # only the bias is selected (``weight`` names it): sum_t d_t, exact

    def params(self) -> tuple[str, ...]:
        """The layer's selected parameter names (weight, then bias if any)."""
        return (self.weight,) if self.bias is None else (self.weight, self.bias)


@contextmanager
def own_calls_detached(layers: Sequence[_Layer]) -> Iterator[None]:
    """Inside each layer's own call, its parameters are leaves of their own.

    The factored engine takes a hooked layer's gradient from the captured ``(a, d)``, never from
    autograd; so with the layer's own calls given copies, any gradient that still reaches the
    parameter comes from a use outside the layer's call (a weight tied to another module,
    ``F.linear(h, emb.weight)``) that the hooks would miss. `FactoredEngine` asks autograd for
    those gradients in the same backward: ``None`` (no such path) costs nothing.
    """
    handles: list[Any] = []
    saved: list[dict[str, Any]] = []
    for layer in layers:
        if layer.parent is not None:  # _intercept.intercepted gives its calls copies
            continue
        attrs = tuple(n.rsplit(".", 1)[-1] for n in layer.params())

        def pre(mod: nn.Module, args: Any, names: tuple[str, ...] = attrs) -> None:
            own: dict[str, Any] = {a: mod._parameters.get(a) for a in names}
            own = {a: t for a, t in own.items() if t is not None}
            saved.append(own)
            for a, tensor in own.items():  # a leaf of its own: the graph stays, apart
                mod._parameters[a] = tensor.detach().requires_grad_(tensor.requires_grad)

        def post(mod: nn.Module, args: Any, out: Any) -> None:
            for a, tensor in saved.pop().items():
                mod._parameters[a] = tensor

        handles.append(layer.module.register_forward_pre_hook(pre, prepend=True))
        handles.append(layer.module.register_forward_hook(post))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _layer_shape(layer: _Layer) -> tuple[int, int]:
    """``(out, in)`` of the layer's gradient matrix ``G`` (bias column included in ``in``)."""
    weight = layer.module.weight
    assert isinstance(weight, torch.Tensor)
    if (
        isinstance(layer.module, nn.Embedding | nn.EmbeddingBag)
        or _is_hf_conv1d(layer.module)
        or layer.tied
    ):
        bias = 1 if layer.bias is not None else 0  # G^T: (out, in) as d a^T
        return int(weight.shape[1]), int(weight.shape[0]) + bias
    n_in = math.prod(weight.shape[1:]) + (1 if layer.bias is not None else 0)  # no tensor op
    return int(weight.shape[0]), n_in


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` of shape ``(in, out)``."""
    weight = module._parameters.get("weight")
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and weight is not None
        and weight.dim() == 2
        and int(weight.shape[1]) == getattr(module, "nf", None)
    )


def _own_forward(module: nn.Module, base: type[nn.Module], *methods: str) -> bool:
    """Whether ``module`` runs ``base``'s own ``forward`` (and helpers), not an override."""
    names = ("forward", *methods)
    return not any(n in vars(module) for n in names) and all(
        getattr(type(module), n) is getattr(base, n) for n in names
    )


def _conv_ok(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv1d | nn.Conv2d)
        and _own_forward(module, _conv_base(module), "_conv_forward")
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _conv_base(module: nn.Module) -> type[nn.Module]:
    return nn.Conv1d if isinstance(module, nn.Conv1d) else nn.Conv2d


_NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)
_ELEMENTWISE = (*_NORMS, nn.PReLU, _bare.BareParameter)  # sum_t d_t * (input)_t, kept exact


def _norm_ok(module: nn.Module) -> bool:
    if isinstance(module, nn.LayerNorm):
        return module.elementwise_affine and _own_forward(module, nn.LayerNorm)
    return (
        isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d)
        and _own_forward(module, nn.BatchNorm1d)
        and module.affine
        and module.track_running_stats
    )


def _supported(module: nn.Module) -> bool:
    """Whether the module's weight gradient is exactly the factored formula of its type."""
    if isinstance(module, nn.Embedding):
        return (
            _own_forward(module, nn.Embedding)
            and module.max_norm is None
            and not module.scale_grad_by_freq
        )
    if isinstance(module, nn.EmbeddingBag):
        return _own_forward(module, nn.EmbeddingBag) and _bags.bag_ok(module)
    if isinstance(module, nn.Linear):
        return _own_forward(module, nn.Linear)
    if isinstance(module, nn.Bilinear | nn.PReLU):
        return _own_forward(module, type(module))
    return _is_hf_conv1d(module) or _conv_ok(module) or _norm_ok(module)


def _plain(module: nn.Module) -> bool:
    """The weight the forward pass uses is the module's own parameter (not computed)."""
    return isinstance(module._parameters.get("weight"), torch.Tensor) and not getattr(
        module, "parametrizations", None
    )


def shared_parameters(model: nn.Module) -> set[int]:
    """``id`` of every parameter tensor that more than one module (or attribute) owns."""
    owners: dict[int, set[tuple[int, str]]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), set()).add((id(module), attr))
    return {pid for pid, owner in owners.items() if len(owner) > 1}


def supported_layers(
    model: nn.Module, names: Sequence[str], exclude: Collection[str] = ()
) -> tuple[list[_Layer], list[str]]:
    """Split selected parameter names into hookable layers and the rest (for torch.func).

    A layer is hooked when its weight is selected, its bias is selected or absent (an
    Embedding has no bias), neither is in ``exclude`` nor shared with another module (unless
    it is an Embedding/Linear tie, hooked in all its modules or none), and its gradient is the
    factored formula (see the module docstring). Anything else falls back to the functional
    engine, which is exact.

    Args:
        model: the network.
        names: selected parameter names (as ``model.named_parameters()`` spells them).
        exclude: parameter names that must not be hooked; the layer owning one is not hooked.

    Returns:
        The hooked layers, and the selected names outside them, in ``names`` order.
    """
    chosen, banned = set(names), set(exclude)
    shared = shared_parameters(model)
    ties = embedding_ties(model)
    name_of = {id(p): n for n, p in model.named_parameters()}
    group_index: dict[int, int] = {}
    layers: list[_Layer] = []
    covered: set[str] = set()
    # MultiheadAttention uses out_proj's weight without calling the module: no hook would fire
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    inside_mha = {f"{n}.out_proj" if n else "out_proj" for n in attention}
    for mod_name, module in model.named_modules():
        layers += _projection_layers(mod_name, module, chosen - banned, shared, len(layers))
        if mod_name in inside_mha or not _plain(module) or not _supported(module):
            continue
        params = [p for p in module._parameters.values() if p is not None]
        tie = id(module.weight) if id(module.weight) in ties else None
        tied_linear = tie is not None and isinstance(module, nn.Linear)
        other = [p for p in params if id(p) in shared and id(p) not in ties]
        if other and not (tied_linear and other == [module.bias]):  # a tied head's bias: below
            continue
        prefix = f"{mod_name}." if mod_name else ""
        weight = name_of.get(tie, f"{prefix}weight") if tie is not None else f"{prefix}weight"
        bias_param = getattr(module, "bias", None)
        bias = name_of.get(id(bias_param), f"{prefix}bias") if bias_param is not None else None
        if tie is not None and tied_linear and bias is not None:  # BERT-MLM's decoder
            layers += _tied_head(mod_name, module, weight, bias, chosen - banned,
                                 group_index.setdefault(tie, len(layers)), len(layers))  # fmt: skip
            continue
        own = {weight} | ({bias} if bias else set())
        if own <= chosen and not own & banned:
            index = len(layers) if tie is None else group_index.setdefault(tie, len(layers))
            tied = tie is not None and isinstance(module, nn.Linear)
            layers.append(_Layer(mod_name, module, index, weight, bias, tied=tied))
            covered |= own
        elif bias and bias in chosen and weight not in chosen and bias not in banned:
            layers.append(_Layer(mod_name, module, len(layers), bias, None, bias_only=True))
            covered.add(bias)  # a frozen weight (BitFit, a LayerNorm's bias alone)
    layers = _whole_ties(model, layers, ties)
    covered = {n for layer in layers for n in layer.params()}
    for name, stand_in in _bare.bare_candidates(model, names, shared):
        if name not in covered and name not in banned:
            layers.append(_Layer(name, stand_in, len(layers), name, None))
            covered.add(name)
    return layers, [n for n in names if n not in covered]


def _tied_head(
    mod_name: str, module: nn.Module, weight: str, bias: str, allowed: set[str], index: int, n: int
) -> list[_Layer]:
    """A Linear whose weight is an Embedding's and whose bias is its own: two layers.

    The weight joins its tie (``index``); the bias, ``sum_t d_t``, is a layer of its own (a use
    of the bias outside this Linear's call still reaches autograd and is refused).
    """
    out = []
    if weight in allowed:
        out.append(_Layer(mod_name, module, index, weight, None, tied=True))
    if bias in allowed:
        out.append(_Layer(mod_name, module, n + len(out), bias, None, bias_only=True))
    return out


def _projection_layers(
    mod_name: str, module: nn.Module, allowed: set[str], shared: set[int], first: int
) -> list[_Layer]:
    """A module's F.linear projections (`_intercept`) whose parameters are allowed, unshared."""
    prefix = f"{mod_name}." if mod_name else ""
    out: list[_Layer] = []
    for proj in _intercept.projections(module):
        bias = prefix + proj.bias if proj.bias else None
        own = {prefix + proj.weight} | ({bias} if bias else set())
        tensors = [p for p in proj.linear._parameters.values() if p is not None]
        if own <= allowed and not any(id(p) in shared for p in tensors):
            layer = _Layer(prefix + proj.name, proj.linear, first + len(out), prefix + proj.weight,
                           bias, parent=module, bias_start=proj.bias_start,
                           bias_rows=proj.bias_rows)  # fmt: skip
            out.append(layer)
    return out


def embedding_ties(model: nn.Module) -> set[int]:
    r"""``id`` of each weight shared only by one ``nn.Embedding`` and ``nn.Linear``\ s.

    The tied input/output embedding of language models (GPT-2's ``wte`` and ``lm_head``): the
    weight's gradient is the sum of the uses' gradients, each a sum of per-position outer
    products, so the hooks can take it exactly (`tie_cross` adds the cross terms of its norm).
    """
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, attr))
    out = set()
    for pid, uses in owners.items():
        mods = {id(m): m for m, _ in uses}
        if len(mods) < 2 or any(attr != "weight" for _, attr in uses):
            continue
        kinds = [type(m) for m in mods.values()]
        embeddings = [m for m in mods.values() if type(m) is nn.Embedding]
        linears = [m for m in mods.values() if type(m) is nn.Linear]
        whole = len(embeddings) == 1 and len(linears) == len(kinds) - 1
        if whole and all(_plain(m) and _supported(m) for m in mods.values()):
            out.add(pid)
    return out


def _whole_ties(model: nn.Module, layers: list[_Layer], ties: set[int]) -> list[_Layer]:
    """Drop the hooked uses of a tied weight unless every use of it is hooked."""
    uses: dict[int, int] = {}
    for _, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None and id(weight) in ties:
            uses[id(weight)] = uses.get(id(weight), 0) + 1
    hooked: dict[int, int] = {}
    for layer in layers:
        if layer.bias_only:  # a tied head's bias is not a use of the tied weight
            continue
        weight = layer.module._parameters.get("weight")
        if weight is not None and id(weight) in ties:
            hooked[id(weight)] = hooked.get(id(weight), 0) + 1
    partial = {pid for pid, n in hooked.items() if n != uses.get(pid)}
    return [
        layer
        for layer in layers
        if layer.bias_only or id(layer.module._parameters.get("weight")) not in partial
    ]


def tie_cross(parts: Sequence[tuple[torch.Tensor, torch.Tensor, int | None]]) -> torch.Tensor:
    """``2 sum_{i<j} <G_i, G_j>`` ``(B,)`` float64 for the uses of one tied weight.

    Each use ``(a, d, rows)`` is ``G = sum_t u_t w_t^T`` in the weight's ``(V, D)`` layout: an
    Embedding (``rows`` set) has ``u_t = onehot(a_t)``, ``w_t = d_t``; a Linear has ``u_t = d_t``
    (the ``V`` outputs) and ``w_t = a_t``. ``<G_i, G_j> = sum_{t,s} <u_it, u_js> <w_it, w_js>``.
    """
    sides = [(a, d) if rows is not None else (d, a) for a, d, rows in parts]  # (u, w)
    total = torch.zeros(parts[0][1].shape[0], dtype=torch.float64, device=parts[0][1].device)
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            (ui, wi), (uj, wj) = sides[i], sides[j]
            gu = _u_gram(ui, parts[i][2] is not None, uj, parts[j][2] is not None)
            gw = torch.bmm(wi, wj.transpose(1, 2).to(wi.dtype))
            total += 2 * (gu.to(torch.float64) * gw.to(torch.float64)).sum((1, 2))
    return total


def _u_gram(ui: torch.Tensor, i_idx: bool, uj: torch.Tensor, j_idx: bool) -> torch.Tensor:
    """``<u_it, u_js>`` ``(B, T, S)``: one-hot sides are index tensors ``(B, T)``."""
    if i_idx and j_idx:
        return (ui[:, :, None] == uj[:, None, :]).to(torch.float64)
    if i_idx:  # onehot(ui_t) . uj_s = uj_s[ui_t]
        b, t, s = ui.shape[0], ui.shape[1], uj.shape[1]
        return uj.gather(2, ui[:, None, :].expand(b, s, t)).transpose(1, 2)
    if j_idx:
        return _u_gram(uj, True, ui, False).transpose(1, 2)
    return torch.bmm(ui, uj.transpose(1, 2))


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of products run in: float32 for half-precision models, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _positions(
    layer: _Layer, x: torch.Tensor, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer input per position and output (gradient) per position.

    Returns ``a`` as ``(B, T, in)`` (for an Embedding: indices ``(B, T)``) and ``out`` as
    ``(B, T, out)``; a convolution's positions are its unfolded patches, an EmbeddingBag's its
    members (`tracin.gradients._bags`). ``out`` is upcast to float32 for a half-precision model.
    """
    module = layer.module
    out = out.to(_acc(out.dtype))
    if isinstance(module, _bare.BareParameter):  # out: the per-example copies' gradient
        d = out.reshape(out.shape[0], 1, -1)
        return d, d
    b = x.shape[0]
    if isinstance(module, nn.EmbeddingBag):
        return _bags.positions(x, out)
    if isinstance(module, nn.LayerNorm):
        width = int(np.prod(module.normalized_shape))
        return x.reshape(b, -1, width), out.reshape(b, -1, width)
    if isinstance(module, nn.PReLU) and module.num_parameters == 1:  # one slope: every entry
        return x.reshape(b, -1, 1), out.reshape(b, -1, 1)
    if isinstance(module, _ELEMENTWISE):  # BatchNorm, PReLU: channels second
        c = x.shape[1]
        return x.reshape(b, c, -1).transpose(1, 2), out.reshape(b, c, -1).transpose(1, 2)
    if isinstance(module, nn.Embedding):
        return x.reshape(b, -1), out.reshape(b, -1, out.shape[-1])
    if isinstance(module, nn.Linear | nn.Bilinear) or _is_hf_conv1d(module):
        return x.reshape(b, -1, x.shape[-1]), out.reshape(b, -1, out.shape[-1])
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    return _conv.patches(module, x), _conv.output_positions(module, out)


@contextmanager
def _capture(layers: Sequence[_Layer], batch: int | None = None) -> Iterator[None]:
    """Record every call's input and output of each layer; hooks removed on exit.

    With ``batch``, a call whose input has batch size 1 is broadcast to ``batch`` rows, input and
    output alike (BERT's position embeddings take ``(1, T)`` ids and are added to every example:
    each example needs its own copy for its own gradient); any other size is an error. The
    version counters of input and output are recorded (see `modified_in_place`); a layer marked
    ``clone`` records a copy of its input and hands the model a copy of its output.
    """
    handles = []
    for layer in layers:
        layer.inputs.clear()
        layer.outputs.clear()
        layer.versions.clear()
        layer.offsets.clear()
        if layer.parent is not None:  # recorded by _intercept.intercepted
            continue

        def hook(
            mod: nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            out: torch.Tensor,
            lay: _Layer = layer,
        ) -> torch.Tensor:
            x = _input(mod, args, kwargs)
            if batch is not None and x.shape[0] != batch:
                if x.shape[0] != 1 or out.shape[0] != 1:
                    raise HookError(
                        f"layer {lay.name!r} got input of shape {tuple(x.shape)} for a batch of "
                        f"{batch}: the hooks need the examples along the first dimension (a "
                        "sequence-first layer, batch_first=False, has them second; an "
                        "EmbeddingBag needs one bag per example). engine='auto' computes it "
                        "another way; with engine='factored', leave it out of layers=[...]",
                        lay.params(),
                    )
                x = x.expand(batch, *x.shape[1:])
                out = out.expand(batch, *out.shape[1:]).contiguous()
            recorded = _recorded_input(mod, x.clone() if lay.clone else x)
            lay.inputs.append(recorded)
            lay.outputs.append(out)
            lay.versions.append((recorded._version, out._version))
            return out.clone() if lay.clone else out

        # first among the module's forward hooks: a user hook that replaces the output then
        # sits downstream of the recorded output, and autograd accounts for it
        handles.append(layer.module.register_forward_hook(hook, with_kwargs=True, prepend=True))
    try:
        with _intercept.intercepted(layers, batch):
            yield
    finally:
        for handle in handles:
            handle.remove()


def _input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The call's input (detached), positional or ``input=``; an EmbeddingBag's packed members."""
    if isinstance(module, nn.EmbeddingBag):
        return _bags.members(module, args, kwargs)
    if isinstance(module, nn.Bilinear):  # a Linear over the outer products x1_i x2_j
        x1, x2 = (args[0], args[1]) if len(args) > 1 else (kwargs["input1"], kwargs["input2"])
        assert isinstance(x1, torch.Tensor) and isinstance(x2, torch.Tensor)
        return (x1.detach().unsqueeze(-1) * x2.detach().unsqueeze(-2)).flatten(-2)
    x = args[0] if args else kwargs["input"]
    assert isinstance(x, torch.Tensor)
    return x.detach()


def modified_in_place(layers: Sequence[_Layer]) -> bool:
    """Whether the model modified a recorded input or output in place after its layer's call.

    The gradient to an output changed in place (``nn.ReLU(inplace=True)`` after a layer) is the
    gradient to the changed value, not to the layer's output. Marks such layers ``clone`` (the
    next pass copies them) and returns True: the caller repeats the pass.
    """
    stale = False
    for layer in layers:
        if layer.clone:
            continue
        for (x_ver, out_ver), x, out in zip(
            layer.versions, layer.inputs, layer.outputs, strict=True
        ):
            if x._version != x_ver or out._version != out_ver:
                layer.clone = stale = True
                break
    return stale


def _recorded_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a layer's gradient needs of its input: ``x``, or for a norm layer ``xhat``.

    Computed inside the forward pass, so a BatchNorm's running statistics are the checkpoint's.
    """
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.PReLU):  # d y / d slope = min(x, 0)
        return x.clamp(max=0)
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
    """Exact ``||sum_t d_t a_t^T||^2`` per example, in ``d``'s dtype, summed in float64.

    ``d`` (and ``a``) come from `_layer_positions`: float32 or better, so no product overflows.
    """
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
    return isinstance(layer.module, nn.Conv1d | nn.Conv2d) and not layer.bias_only


def _is_norm(layer: _Layer) -> bool:
    """An elementwise layer (LayerNorm, BatchNorm, PReLU, a bias alone): exact, never projected."""
    return layer.bias_only or isinstance(layer.module, _ELEMENTWISE)


def _norm_gradients(layer: _Layer, calls: Sequence[_Call]) -> dict[str, torch.Tensor]:
    """A norm layer's exact per-example gradients: ``sum_t d_t * xhat_t`` and ``sum_t d_t``."""
    if layer.bias_only:  # a bias alone: sum_t d_t (a convolution's d per output position)
        module = layer.module
        if isinstance(module, nn.Conv1d | nn.Conv2d):
            sums = [_conv.output_positions(module, g).to(_acc(g.dtype)).sum(1) for _, g in calls]
            return {layer.weight: torch.stack(sums).sum(0)}
        return {layer.weight: _layer_positions(layer, calls)[1].sum(1)}
    xhat, d = _layer_positions(layer, calls)
    if isinstance(layer.module, _bare.BareParameter):  # the copies' gradients, summed over uses
        return {layer.weight: d.sum(1)}
    out = {layer.weight: (xhat * d).sum(1)}
    if layer.bias is not None:
        out[layer.bias] = d.sum(1)
    return out


def _rows(layer: _Layer) -> int | None:
    """An Embedding's (or EmbeddingBag's) number of rows (its one-hot input width), else None."""
    module = layer.module
    return module.num_embeddings if isinstance(module, nn.Embedding | nn.EmbeddingBag) else None


def _cat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), 1)


def _layer_positions(layer: _Layer, calls: Sequence[_Call]) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``d`` per position over all calls; an Embedding's padding rows get no ``d``."""
    pairs = [_positions(layer, x, g) for x, g in calls]
    a, d = _cat([p[0] for p in pairs]), _cat([p[1] for p in pairs])
    pad = getattr(layer.module, "padding_idx", None)
    if pad is not None:  # the padding row gets no gradient (as in nn.Embedding)
        d = d * (a != pad).unsqueeze(-1).to(d.dtype)
    if _rows(layer) is None:
        a = a.to(d.dtype)
    return a, d


def _conv_gradients(layer: _Layer, calls: Sequence[_Call]) -> dict[str, torch.Tensor]:
    """A convolution's exact per-example gradients, weight (and bias), by name."""
    module = layer.module
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    out = {layer.weight: _conv.weight_gradient(module, calls)}
    if layer.bias is not None:
        sums = [_conv.output_positions(module, g).to(_acc(g.dtype)).sum(1) for _, g in calls]
        out[layer.bias] = torch.stack(sums).sum(0)
    return out


def _exact(
    layer: _Layer, a: torch.Tensor, d: torch.Tensor, emb: int | None
) -> dict[str, torch.Tensor]:
    """Exact per-example gradients of a Linear or Embedding layer, by parameter name."""
    b = a.shape[0]
    if emb is not None:
        return {layer.weight: _embedding_grad(a, d, emb).reshape(b, -1)}
    g = torch.bmm(d.transpose(1, 2), a)  # (B, out, in)
    if _is_hf_conv1d(layer.module):  # its weight is (in, out)
        g = g.transpose(1, 2)
    if layer.bias is None:
        return {layer.weight: g.reshape(b, -1)}
    bias = d.sum(1)
    if layer.bias_rows is not None:  # a third of a packed bias
        bias = _intercept.pad_rows(bias, layer.bias_start, layer.bias_rows)
    return {layer.weight: g.reshape(b, -1), layer.bias: bias}
