"""Per-example gradients with torch.func: ``vmap(grad(f))`` over the examples of a batch.

For each example x of a batch, g(x) = d f(w, x) / d w for the selected parameters w, flattened
and concatenated in the model's parameter order: one row of the returned ``(B, P)`` matrix.
Works for any `nn.Module` whose forward pass treats examples independently (eval mode).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.func import grad, vmap

from tracin._batch import Batch, batch_size, map_tensors
from tracin._errors import TaskError
from tracin.checkpoints._checkpoints import Checkpoint
from tracin.gradients import _aliases as aliases

__all__ = [
    "DictGradients",
    "ExampleGradients",
    "FeatureEngine",
    "FunctionalEngine",
    "FunctionalFeatures",
    "ScoreFn",
    "functional_model",
    "row_sqnorms",
]

ScoreFn = Callable[[Callable[..., Any], Batch], torch.Tensor]
"""A task method: ``(model, batch) -> (B,)`` per-example scores."""


def row_sqnorms(g: torch.Tensor) -> torch.Tensor:
    """Squared norm of each row of ``g`` ``(B, P)`` as float64 ``(B,)``, whatever ``g``'s dtype.

    Half-precision rows are squared in float32 (a float16 entry of 264 squares past float16's
    largest value, 65504). Rows are summed in their own precision (float32 or float64) by
    torch's cascade summation (relative error about 1e-7 in float32 over 10^4-10^5 entries),
    then returned as float64: 4-6x faster than a float64 sum of a float32 matrix, whose
    conversion dominated the exact self-influence pass on small CNNs.
    """
    if g.dtype in (torch.float16, torch.bfloat16):
        g = g.float()
    sq: torch.Tensor = torch.linalg.vecdot(g, g, dim=1)
    return sq.to(torch.float64)


class ExampleGradients(Protocol):
    """Per-example gradients of the selected parameters (`FunctionalEngine`, `LoopEngine`)."""

    names: tuple[str, ...]

    def gradients(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> torch.Tensor:
        """Per-example gradients ``(B, P)``, parameters concatenated in model order."""
        ...

    def sqnorms(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> torch.Tensor:
        """Squared per-example gradient norms ``(B,)``, float64."""
        ...

    def gradient_dict(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> dict[str, torch.Tensor]:
        """Per-example gradients ``(B, numel)`` of each selected parameter, in model order."""
        ...


def _flatten(batch: Batch) -> tuple[list[torch.Tensor], Callable[[Sequence[torch.Tensor]], Batch]]:
    leaves: list[torch.Tensor] = []
    map_tensors(leaves.append, batch)

    def rebuild(new: Sequence[torch.Tensor]) -> Batch:
        it = iter(new)
        return map_tensors(lambda _: next(it), batch)

    return leaves, rebuild


def functional_model(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
    """``model`` as a plain callable that runs with ``weights`` (the module is not modified)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return aliases.call(model, weights, args, kwargs)

    return call


class DictGradients:
    """Shared by the per-example engines: everything derived from ``gradient_dict``.

    Args:
        model: the network (left unmodified; put in eval mode by the caller).
        names: parameter names to differentiate (see `select_parameters`), in model order.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model = model
        self.names = tuple(names)

    def gradient_dict(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> dict[str, torch.Tensor]:
        """Per-example gradients ``(B, numel)`` of each selected parameter, in model order."""
        raise NotImplementedError

    def gradients(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> torch.Tensor:
        """Per-example gradients of ``score``, shape ``(B, P)``."""
        return torch.cat(list(self.gradient_dict(weights, score, batch).values()), dim=1)

    def sqnorms(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> torch.Tensor:
        """Squared per-example gradient norms ``(B,)``, float64, without concatenating them."""
        grads = self.gradient_dict(weights, score, batch).values()
        return sum(
            (row_sqnorms(g) for g in grads),
            torch.zeros((), dtype=torch.float64),
        )


class FunctionalEngine(DictGradients):
    """Exact per-example gradients of any module via ``functional_call`` + ``vmap`` + ``grad``.

    Args:
        model: the network (left unmodified; put in eval mode by the caller).
        names: parameter names to differentiate (see `select_parameters`).
    """

    def gradient_dict(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> dict[str, torch.Tensor]:
        """Per-example gradients ``(B, numel)`` of each selected parameter, in model order."""
        params = {n: weights[n] for n in self.names}
        frozen = {n: w for n, w in weights.items() if n not in params}
        leaves, rebuild = _flatten(batch)
        n = batch_size(batch)

        def one(p: dict[str, torch.Tensor], *row: torch.Tensor) -> torch.Tensor:
            single = rebuild([t.unsqueeze(0) for t in row])
            model = functional_model(self.model, {**frozen, **p})
            out = score(model, single)
            if out.shape != (1,):
                raise TaskError(
                    f"score returned shape {tuple(out.shape)} for a batch of one example; "
                    "expected (1,): return one unreduced value per example"
                )
            return out[0]

        grads = vmap(grad(one), in_dims=(None, *([0] * len(leaves))))(params, *leaves)
        return {name: grads[name].reshape(n, -1) for name in self.names}


class FeatureEngine(Protocol):
    """Computes per-example features and exact squared gradient norms for one checkpoint.

    Per checkpoint, a caller loads the weights, passes them through `prepare` once, then calls
    `features` or `sqnorms` for each batch with the prepared weights.

    Attributes:
        verifiable: True when the engine's exact features are the plain gradients, which the
            engine self-check compares with the loop reference (False for rescaled gradients,
            e.g. Adam-preconditioned ones).
    """

    verifiable: bool

    def prepare(
        self, checkpoint: Checkpoint, weights: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The weights the engine computes with for ``checkpoint`` (e.g. with scales attached)."""
        ...

    def dim(self) -> int:
        """Feature dimension."""
        ...

    def features(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch, ckpt_key: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(B, dim)`` and float64 squared gradient norms ``(B,)``."""
        ...

    def sqnorms(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> torch.Tensor:
        """Only the float64 squared gradient norms ``(B,)`` (self-influence needs no more)."""
        ...


class FunctionalFeatures:
    """Per-example gradients (`FunctionalEngine` or `LoopEngine`) followed by a `Projector`."""

    verifiable = True

    def __init__(self, engine: ExampleGradients, projector: Any, n_params: int) -> None:
        self.engine = engine
        self.projector = projector
        self.n_params = n_params

    def prepare(
        self, checkpoint: Checkpoint, weights: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``weights`` unchanged."""
        return weights

    def dim(self) -> int:
        """Feature dimension."""
        return int(self.projector.dim(self.n_params))

    def features(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch, ckpt_key: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected gradients and their exact squared norms."""
        g = self.engine.gradients(weights, score, batch)
        return self.projector.project(g, ckpt_key), row_sqnorms(g)

    def sqnorms(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> torch.Tensor:
        """Squared gradient norms ``(B,)``, float64."""
        return self.engine.sqnorms(weights, score, batch)
