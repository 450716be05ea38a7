"""What a projection is: its kind, dimension and seed (`ProjectionConfig`), and the one seed rule.

Every random matrix of every kind is drawn from ``SeedSequence([seed, ckpt_key, *keys])``
(`generator`), with ``ckpt_key`` a stable integer of the checkpoint id (`checkpoint_key`): the
same seed always gives the same matrices, whatever the batch size, block size or process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from tracin._errors import ConfigError

__all__ = ["KINDS", "Kind", "ProjectionConfig", "checkpoint_key", "generator"]

Kind = Literal["identity", "gaussian", "rademacher", "kronecker", "last_layer"]
KINDS: tuple[Kind, ...] = ("identity", "gaussian", "rademacher", "kronecker", "last_layer")
"""Every projection kind: exact, dense Gaussian or Rademacher, per-layer Kronecker, last layer."""
_EXACT = ("identity", "last_layer")


@dataclass(frozen=True)
class ProjectionConfig:
    """How features are made from gradients.

    Attributes:
        kind: ``"identity"`` (exact, no projection), ``"gaussian"`` or ``"rademacher"`` (dense,
            over all selected parameters), or ``"kronecker"`` (per layer, factored engine).
            ``"last_layer"``: exact factors ``[a, d]`` of one Linear layer, scored as
            ``<a, a'> <d, d'>`` (the paper's Appendix F).
        dim: projected dimension ``k`` (``None`` for exact kinds); per layer for ``"kronecker"``.
        seed: base seed of every projection matrix.
        split: for ``"last_layer"``, how many leading feature columns hold ``a`` (the rest
            hold ``d``); set by featurize.

    Raises:
        ConfigError: an unknown kind, a proj_dim that is not a positive integer (or given with an
            exact kind), or a negative seed.
    """

    kind: Kind = "identity"
    dim: int | None = None
    seed: int = 0
    split: int | None = None

    # --- capabilities: what the rest of tracin asks of a kind, so no one compares strings ---
    @property
    def exact(self) -> bool:
        """No projection at all: features are the full per-example gradients."""
        return self.kind == "identity"

    @property
    def dense(self) -> bool:
        """A dense random matrix over all selected parameters (`DenseProjector`)."""
        return self.kind in ("gaussian", "rademacher")

    @property
    def projected(self) -> bool:
        """Random-projected features (dense or Kronecker): fixed width, inner products estimated."""
        return self.kind in ("gaussian", "rademacher", "kronecker")

    @property
    def in_engine(self) -> bool:
        """Made inside the factored engine from layer factors (Kronecker, last layer)."""
        return self.kind in ("kronecker", "last_layer")

    @property
    def factors(self) -> int | None:
        """For last-layer features ``[a, d]``: the width of ``a`` (else None)."""
        return self.split if self.kind == "last_layer" else None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(
                f"projection kind {self.kind!r}; expected 'identity', 'gaussian', 'rademacher', "
                "'kronecker' or 'last_layer'"
            )
        if self.kind in _EXACT and self.dim is not None:
            raise ConfigError(
                f"proj_dim={self.dim} needs projection 'gaussian', 'rademacher' or 'kronecker'"
            )
        if self.kind not in _EXACT and (
            isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1
        ):
            raise ConfigError(f"proj_dim={self.dim!r} must be a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r} must be a non-negative integer")


def checkpoint_key(checkpoint_id: str) -> int:
    """A stable integer for a checkpoint id, used in projection seeds."""
    return int.from_bytes(hashlib.sha256(checkpoint_id.encode()).digest()[:4], "little")


def generator(seed: int, ckpt_key: int, *keys: int) -> torch.Generator:
    """The torch generator of one random matrix: ``SeedSequence([seed, ckpt_key, *keys])``."""
    state = np.random.SeedSequence([seed, ckpt_key, *keys])
    return torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1))
