"""Projection: role 3 of the data flow (TracIn-RP, Pruthi et al. 2020, section 3.2).

Contract: a `ProjectionConfig` (kind, ``proj_dim``, seed) names a projection and states its
capabilities (``exact``, ``dense``, ``in_engine``, ``factors``), so no other module compares kind
strings; every random matrix comes from one seed rule (`generator`, keyed by `checkpoint_key`).
One file per kind: ``identity`` and the dense ``gaussian`` / ``rademacher`` (`_dense`:
`make_projector`, `DenseProjector`), per-layer ``kronecker`` (`_kronecker`: `KroneckerProjection`,
applied by the factored engine to each layer's factors) and ``last_layer`` (`_last_layer`: exact
factors ``[a, d]`` scored as ``<a, a'> <d, d'>``).

A new projection kind goes here: a file, a name in `KINDS`, and its capabilities.
"""

from tracin.projection._config import KINDS, ProjectionConfig, checkpoint_key, generator
from tracin.projection._dense import DenseProjector, IdentityProjector, Projector, make_projector
from tracin.projection._kronecker import KroneckerProjection

__all__ = [
    "KINDS",
    "DenseProjector",
    "IdentityProjector",
    "KroneckerProjection",
    "ProjectionConfig",
    "Projector",
    "checkpoint_key",
    "generator",
    "make_projector",
]
