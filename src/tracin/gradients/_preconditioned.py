"""Optimizer-aware TracIn: gradients preconditioned by Adam's second moment, as LESS does.

For a model trained with Adam (or AdamW), the update at checkpoint c moves the weights along
``Gamma_c g`` rather than ``g``, with ``Gamma_c = diag(1 / (sqrt(v_hat_c) + eps))``, ``v_hat_c``
the bias-corrected second-moment estimate ``v / (1 - beta2^t)`` saved with the checkpoint
(Xia et al., LESS, arXiv 2402.04333). The preconditioned score is

    TracIn_adam(z, z') = sum_c lr_c * < Gamma_c g_c(z), g_c(z') >

Convention: since ``Gamma_c`` is diagonal and positive, ``<Gamma g, g'> = <s * g, s * g'>`` with
``s = Gamma^{1/2} = (sqrt(v_hat) + eps)^{-1/2}`` elementwise. Every gradient, training and query
alike, is scaled by ``s_c`` before projection, so the features stay one vector per row:
self-influence is ``sum_c lr_c ||s_c * g_c(z)||^2 = sum_c lr_c <Gamma_c g_c(z), g_c(z)>``, and
folding, retrieval and clustering are unchanged. (LESS itself preconditions only the training
gradient and normalises; the inner product here is the same, written symmetrically.)

The elementwise scale does not factor through a layer's ``a (x) d`` structure, so this needs
the torch.func engine (no ``engine='factored'``, no Kronecker or last-layer projection).

Per-group learning rates use the same mechanism (see `tracin.checkpoints._lrs`): with reference lr
``lr_c``
(the checkpoint's ``lr``, applied by scoring), parameter p's gradient is further scaled by
``sqrt(lr_{c,g(p)} / lr_c)``, so ``lr_c <s g, s g'> = sum_g lr_{c,g} <g_g, g'_g>`` (times Adam's
``Gamma_c`` when preconditioning too). `needs_group_scaling` says when an engine must do this,
`check_scaling` refuses the engines that cannot, and `PreconditionedFeatures` with
``precondition=None`` applies only the group scales.

Adam's state is indexed by parameter position in the optimiser. The recorders and callbacks save
the names in that order (``optimizer_param_names``); without them, the optimiser is assumed to
have been built as ``Adam(model.parameters())``, and every size is checked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tracin._batch import Batch
from tracin._errors import CheckpointError, ConfigError
from tracin.checkpoints._checkpoints import Checkpoint
from tracin.gradients._functional import FunctionalEngine, ScoreFn

__all__ = [
    "PRECONDITIONERS",
    "PreconditionedFeatures",
    "adam_scales",
    "check_precondition",
    "check_scaling",
    "group_scales",
    "needs_group_scaling",
]

PRECONDITIONERS = ("adam",)
_FIX = (
    "record checkpoints with CheckpointRecorder(save_optimizer=True) (or the callbacks' "
    "save_optimizer=True), or featurize without precondition"
)


def check_precondition(value: Any, engine: str, projection: str) -> None:
    """Refuse an unknown preconditioner, or one combined with a factored engine/projection."""
    if value is None:
        return
    if value not in PRECONDITIONERS:
        raise ConfigError(
            f"precondition={value!r}; expected None or one of {list(PRECONDITIONERS)}"
        )
    if engine == "factored" or projection in ("kronecker", "last_layer"):
        raise ConfigError(
            f"precondition={value!r} scales each gradient entry, which the factored engine's "
            f"a (x) d form cannot (engine={engine!r}, projection={projection!r}): use "
            "engine='functional' or 'auto' with projection=None, 'gaussian' or 'rademacher'"
        )


def needs_group_scaling(checkpoints: Iterable[Checkpoint]) -> bool:
    """Whether any checkpoint has per-group lrs, so features need `PreconditionedFeatures`."""
    return any(c.group_lrs for c in checkpoints)


def check_scaling(precondition: Any, group_lrs: bool, engine: str, projection: str) -> None:
    """`check_precondition`, and refuse per-group lrs with the factored engine/projections."""
    check_precondition(precondition, engine, projection)
    if group_lrs and (engine == "factored" or projection in ("kronecker", "last_layer")):
        raise ConfigError(
            "the checkpoints have per-group learning rates, which scale each parameter's "
            f"gradient in the torch.func engine only (engine={engine!r}, "
            f"projection={projection!r}): use engine='functional' or 'auto' with "
            "projection=None, 'gaussian' or 'rademacher'"
        )


def group_scales(checkpoint: Checkpoint, names: Sequence[str]) -> dict[str, float]:
    """``sqrt(lr_{g(p)} / lr)`` per parameter p in ``names`` at ``checkpoint`` (1 without groups).

    Raises:
        CheckpointError: a parameter in none of the checkpoint's groups.
    """
    lrs = checkpoint.parameter_lrs(names)
    if checkpoint.lr == 0:  # every group lr is 0: the checkpoint contributes nothing
        return dict.fromkeys(names, 0.0)
    return {n: math.sqrt(lr / checkpoint.lr) for n, lr in lrs.items()}


def _optimizer_state(checkpoint: Checkpoint) -> tuple[Mapping[str, Any], list[str] | None]:
    payload = checkpoint.payload()
    state = payload.get("optimizer_state_dict") if isinstance(payload, Mapping) else None
    if not isinstance(state, Mapping) or "state" not in state or "param_groups" not in state:
        raise CheckpointError(
            f"checkpoint {checkpoint.id!r} holds no optimizer_state_dict, which "
            f"precondition='adam' reads: {_FIX}"
        )
    names = payload.get("optimizer_param_names")
    return state, None if names is None else [str(n) for n in names]


def _index_of(
    state: Mapping[str, Any], names: list[str] | None, model: nn.Module, where: str
) -> dict[str, tuple[int, Mapping[str, Any]]]:
    """Parameter name -> (state index, its param group)."""
    positions = [(i, g) for g in state["param_groups"] for i in g["params"]]
    if names is None:  # assumed: the optimiser was built from model.parameters(), in order
        names = [n for n, _ in model.named_parameters()]
    if len(names) != len(positions):
        raise CheckpointError(
            f"checkpoint {where}: the optimiser has {len(positions)} parameters but "
            f"{len(names)} names to match them to; build the optimiser from model.parameters() "
            "or record with CheckpointRecorder(save_optimizer=True), which saves their names"
        )
    return {n: pos for n, pos in zip(names, positions, strict=True) if n}


def adam_scales(
    checkpoint: Checkpoint, model: nn.Module, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """``s = (sqrt(v_hat) + eps)^{-1/2}`` per selected parameter, float64, at ``checkpoint``.

    Raises:
        CheckpointError: no optimiser state, no Adam moment for a parameter, or a size mismatch.
    """
    where = repr(checkpoint.id)
    state, saved_names = _optimizer_state(checkpoint)
    index = _index_of(state, saved_names, model, where)
    params = dict(model.named_parameters())
    scales = {}
    for name in names:
        if name not in index:
            raise CheckpointError(
                f"checkpoint {where}: parameter {name!r} is not in the saved optimiser; select "
                "only trained parameters with layers=[...]"
            )
        i, group = index[name]
        moments = state["state"].get(i, {})
        v = moments.get("max_exp_avg_sq") if group.get("amsgrad") else moments.get("exp_avg_sq")
        if v is None:
            raise CheckpointError(
                f"checkpoint {where}: no Adam second moment (exp_avg_sq) for {name!r}; "
                "precondition='adam' needs an Adam/AdamW optimiser that has updated it"
            )
        if tuple(v.shape) != tuple(params[name].shape):
            raise CheckpointError(
                f"checkpoint {where}: Adam state {i} has shape {tuple(v.shape)} but {name!r} has "
                f"{tuple(params[name].shape)}: the optimiser's parameter order differs from the "
                "model's; record with CheckpointRecorder(save_optimizer=True)"
            )
        t = float(moments["step"])
        beta2, eps = float(group["betas"][1]), float(group["eps"])
        v_hat = v.detach().double().cpu() / (1.0 - beta2**t)
        scales[name] = (v_hat.sqrt() + eps).rsqrt()
    return scales


class _ScaledWeights(dict[str, torch.Tensor]):
    """A checkpoint's weights, carrying the flat gradient scale of that checkpoint (or None)."""

    scale: torch.Tensor | None


class PreconditionedFeatures:
    """torch.func gradients scaled per entry at each checkpoint, then projected.

    The scale is Adam's ``s_c`` (``precondition="adam"``) times the per-group lr factors
    ``sqrt(lr_{c,g} / lr_c)`` of checkpoints with group lrs; ``precondition=None`` applies only
    the latter. `prepare` attaches the scale to the checkpoint's weights (the feature
    source calls it when it loads a checkpoint); `features` and `sqnorms` read it from there.

    Args:
        model: the network.
        names: selected parameter names, in model order.
        projector: the `Projector` applied to the scaled gradients.
        n_params: total size of the selected parameters.
        precondition: ``"adam"`` or ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        projector: Any,
        n_params: int,
        precondition: str | None = "adam",
    ) -> None:
        self.model = model
        self.names = tuple(names)
        self.engine = FunctionalEngine(model, names)
        self.projector = projector
        self.n_params = n_params
        self.precondition = precondition

    def dim(self) -> int:
        """Feature dimension."""
        return int(self.projector.dim(self.n_params))

    verifiable = False  # rescaled gradients are not the loop reference's plain ones

    def prepare(self, checkpoint: Checkpoint, weights: dict[str, torch.Tensor]) -> _ScaledWeights:
        """``weights`` with ``checkpoint``'s flat scale ``(P,)`` attached (``None``: no scale)."""
        bound = _ScaledWeights(weights)
        bound.scale = None
        params = dict(self.model.named_parameters())
        if self.precondition is not None:
            scales = adam_scales(checkpoint, self.model, self.names)
        else:
            scales = {n: torch.ones((), dtype=torch.float64) for n in self.names}
        if checkpoint.group_lrs:
            factors = group_scales(checkpoint, self.names)
            scales = {n: scales[n] * factors[n] for n in self.names}
        elif self.precondition is None:
            return bound
        bound.scale = torch.cat([scales[n].expand(params[n].shape).flatten() for n in self.names])
        return bound

    def _scaled(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> torch.Tensor:
        if not isinstance(weights, _ScaledWeights):
            raise ConfigError(
                "preconditioned features need weights from prepare(checkpoint, weights)"
            )
        g = self.engine.gradients(weights, score, batch)
        if weights.scale is None:
            return g
        return g * weights.scale.to(device=g.device, dtype=g.dtype)

    def features(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch, ckpt_key: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected scaled gradients and their exact squared norms (float64)."""
        g = self._scaled(weights, score, batch)
        return self.projector.project(g, ckpt_key), g.pow(2).sum(dim=1, dtype=torch.float64)

    def sqnorms(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> torch.Tensor:
        """Squared norms of the scaled gradients ``(B,)``, float64."""
        return self._scaled(weights, score, batch).pow(2).sum(dim=1, dtype=torch.float64)
