"""Making the feature engine for a run: which engine, which projection, on which device.

`make_engine` is the one seam between a run's configuration (`RunConfig`) and the engines of this
package; `effective_projection` applies the rule that a projection to ``proj_dim >= P`` keeps the
exact features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from tracin._batch import Batch
from tracin._errors import ConfigError
from tracin.checkpoints._checkpoints import Checkpoint
from tracin.gradients._factored import FactoredEngine, supported_layers
from tracin.gradients._functional import (
    ExampleGradients,
    FeatureEngine,
    FunctionalEngine,
    FunctionalFeatures,
    ScoreFn,
)
from tracin.gradients._loop import LoopEngine
from tracin.gradients._preconditioned import (
    PreconditionedFeatures,
    check_scaling,
    needs_group_scaling,
)
from tracin.gradients._selfcheck import EngineChoice
from tracin.projection._config import ProjectionConfig
from tracin.projection._dense import Projector, make_projector

__all__ = ["ENGINES", "IDENTITY", "RunConfig", "device_of", "effective_projection", "make_engine"]


@dataclass(frozen=True)
class RunConfig:
    """What a run computes, and how; saved in the manifest and compared on reopen.

    Attributes:
        parameters: names of the differentiated parameters, in model order.
        projection: kind, dim and seed of the random projection.
        dtype: feature dtype on disk, ``"float32"`` or ``"float16"``.
        block_rows: rows per stored block.
        batch_size: rows per gradient batch.
        engine: ``"functional"`` (torch.func), ``"factored"`` (layer hooks) or ``"auto"``.
        precondition: ``None``, or ``"adam"`` to scale gradients by each checkpoint's Adam
            second moment (see `tracin.gradients._preconditioned`).
        keep_features: whether the training split's features are stored; ``False`` stores
            only its exact squared norms (query splits always keep their features).
    """

    parameters: tuple[str, ...]
    projection: ProjectionConfig
    dtype: str
    block_rows: int
    batch_size: int
    engine: str = "auto"
    precondition: str | None = None
    keep_features: bool = True

    def to_json(self) -> dict[str, Any]:
        """The comparable part of the configuration (batch size does not change results).

        ``keep_features`` appears only when ``False``, so stores written before it existed
        (which all kept their features) compare equal.
        """
        out = asdict(self)
        out["parameters"] = list(self.parameters)
        del out["batch_size"], out["engine"]
        if self.keep_features:
            del out["keep_features"]
        return out


ENGINES = ("auto", "functional", "factored", "loop")


def make_engine(
    model: nn.Module,
    config: RunConfig,
    choice: EngineChoice | None = None,
    checkpoints: Sequence[Checkpoint] = (),
) -> FeatureEngine:
    """The feature engine a configuration asks for.

    ``auto`` takes the factored (hook) engine whenever a selected layer is hookable
    (Linear, Bilinear, Conv, Embedding, LayerNorm, BatchNorm, PReLU, Hugging Face Conv1D,
    MultiheadAttention's projections, RNN/LSTM/GRU): one batched backward
    gives those layers' per-example gradients and torch.func computes only the other parameters'
    (measured in ``benchmarks/engines.py``: 2-7x faster than torch.func alone on CNNs and
    transformers). With no hookable layer, torch.func. ``loop`` takes one backward per example.
    A dense projection projects the exact features. ``choice`` (from the engine self-check,
    `tracin.gradients._selfcheck`) excludes parameters from the hooks and picks the engine for the
    rest.
    Checkpoints with learning rates per parameter group (or ``precondition``) take torch.func
    with each parameter's gradient scaled
    (`tracin.gradients._preconditioned.PreconditionedFeatures`).

    Raises:
        ConfigError: an unknown engine, or a projection the engine cannot make.
    """
    names, proj = config.parameters, config.projection
    choice = choice or EngineChoice()
    if config.engine not in ENGINES:
        raise ConfigError(
            f"engine={config.engine!r}; expected one of {list(ENGINES)} ('auto' is the default)"
        )
    grouped = needs_group_scaling(checkpoints)
    if config.precondition is not None or grouped:
        check_scaling(config.precondition, grouped, config.engine, proj.kind)
        sizes = _sizes(model, names)
        return PreconditionedFeatures(
            model, names, make_projector(proj, sizes), sum(sizes), config.precondition
        )
    if config.engine == "loop":
        if proj.in_engine:
            raise ConfigError(f"projection={proj.kind!r} needs engine='factored' (or 'auto')")
        choice = EngineChoice(rest="loop")
    hooked, _ = supported_layers(model, names, exclude=choice.exclude)
    factored = config.engine == "factored" or (config.engine == "auto" and bool(hooked))
    if proj.in_engine and not factored:
        if config.engine == "functional":
            raise ConfigError(f"projection={proj.kind!r} needs engine='factored' (or 'auto')")
        factored = True
    if factored:
        own = not proj.dense
        engine = FactoredEngine(
            model, names, proj if own else IDENTITY, exclude=choice.exclude, rest=choice.rest
        )
        if own:
            return engine
        return _Projected(engine, make_projector(proj, _sizes(model, names)))
    sizes = _sizes(model, names)
    rest: ExampleGradients = (
        LoopEngine(model, names) if choice.rest == "loop" else FunctionalEngine(model, names)
    )
    return FunctionalFeatures(rest, make_projector(proj, sizes), sum(sizes))


def effective_projection(
    model: nn.Module, names: tuple[str, ...], proj: ProjectionConfig
) -> ProjectionConfig:
    """``proj``, or no projection when it would be no smaller than the gradient.

    A dense or Kronecker projection to ``proj_dim >= P`` (the number of selected parameters)
    costs more than the exact features (a dense one is wider, a Kronecker one adds matrices
    per layer) and only adds error, so the exact features are kept instead.
    """
    if proj.projected and int(proj.dim or 0) >= sum(_sizes(model, names)):
        return ProjectionConfig("identity", None, proj.seed)
    return proj


IDENTITY = ProjectionConfig()
"""No projection: the exact gradient."""


def _sizes(model: nn.Module, names: tuple[str, ...]) -> list[int]:
    params = dict(model.named_parameters())
    return [params[n].numel() for n in names]


class _Projected:
    """Exact features of another engine, densely projected."""

    def __init__(self, engine: FeatureEngine, projector: Projector) -> None:
        self.engine = engine
        self.projector = projector
        self.verifiable = engine.verifiable

    def prepare(
        self, checkpoint: Checkpoint, weights: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return self.engine.prepare(checkpoint, weights)

    def dim(self) -> int:
        return int(self.projector.dim(self.engine.dim()))

    def features(
        self, weights: Any, score: ScoreFn, batch: Batch, ckpt_key: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g, sq = self.engine.features(weights, score, batch, ckpt_key)
        return self.projector.project(g, ckpt_key), sq

    def sqnorms(self, weights: Any, score: ScoreFn, batch: Batch) -> torch.Tensor:
        return self.engine.sqnorms(weights, score, batch)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU if it has none)."""
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")
