"""Gradient engines: role 2 of the data flow — per-example gradients of a model at a checkpoint.

Contract (`FeatureEngine`): ``dim()``; ``features(weights, score, batch, ckpt_key)`` returns
``(features (B, dim), exact squared norms (B,))``; ``sqnorms(weights, score, batch)`` returns the
squared norms alone. Implementations: `FunctionalEngine` (``torch.func`` ``vmap(grad)``, any
model vmap can batch), `FactoredEngine` (hooks on Linear/Conv/Embedding layers capture each
layer's input and output gradient; exact, and Kronecker-projected per layer), `LoopEngine` (one
``autograd.grad`` per example; exact for every model), `PreconditionedFeatures` (gradients scaled
by Adam's second moment, as LESS does). `make_engine` is the one seam from a run's `RunConfig` to an
engine; `verify_engine` checks an engine against the loop reference on a few rows before a run;
`GradientSource` yields features batch by batch at each checkpoint.

A new engine goes here, implements `FeatureEngine` and is named in `ENGINES`.
"""

from tracin.gradients._engines import ENGINES, RunConfig, effective_projection, make_engine
from tracin.gradients._factored import FactoredEngine, supported_layers
from tracin.gradients._functional import FeatureEngine, FunctionalEngine, ScoreFn, functional_model
from tracin.gradients._loop import LoopEngine
from tracin.gradients._params import eval_mode, select_parameters, unwrap_model
from tracin.gradients._preconditioned import PRECONDITIONERS, PreconditionedFeatures
from tracin.gradients._selfcheck import EngineChoice, verify_engine
from tracin.gradients._source import GradientSource

__all__ = [
    "eval_mode",
    "functional_model",
    "ENGINES",
    "EngineChoice",
    "FactoredEngine",
    "FeatureEngine",
    "FunctionalEngine",
    "GradientSource",
    "LoopEngine",
    "PRECONDITIONERS",
    "PreconditionedFeatures",
    "RunConfig",
    "ScoreFn",
    "effective_projection",
    "make_engine",
    "select_parameters",
    "supported_layers",
    "unwrap_model",
    "verify_engine",
]
