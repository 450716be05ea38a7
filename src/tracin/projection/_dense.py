"""Random projection of gradients (TracIn-RP), seeded and generated blockwise.

A projector maps a ``(B, P)`` gradient block to ``(B, k)`` features: ``f = g P`` with ``P`` a
``(P, k)`` matrix of i.i.d. entries of variance ``1/k`` (Gaussian, or Rademacher ``+-1/sqrt(k)``),
so ``E[<f, f'>] = <g, g'>`` (Johnson-Lindenstrauss). ``P`` is never held whole: it is cut into
row blocks per parameter tensor ("layer") and each block is generated from its own seed,
``SeedSequence([seed, checkpoint, layer, block])``, so the same seed always gives the same matrix
whatever the batch size or process. Blocks are cached while they fit ``cache_bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from tracin._errors import ConfigError
from tracin.projection._config import ProjectionConfig, generator

__all__ = ["DenseProjector", "IdentityProjector", "Projector", "make_projector"]


class Projector(Protocol):
    """Maps per-example gradients of one checkpoint to features."""

    def dim(self, n_params: int) -> int:
        """Feature dimension for gradients of ``n_params`` entries."""
        ...

    def project(self, grads: torch.Tensor, ckpt_key: int) -> torch.Tensor:
        """``(B, P)`` gradients -> ``(B, dim)`` features, in the gradients' dtype."""
        ...


class IdentityProjector:
    """Exact features: the gradients themselves."""

    def dim(self, n_params: int) -> int:
        """``n_params``: no reduction."""
        return n_params

    def project(self, grads: torch.Tensor, ckpt_key: int) -> torch.Tensor:
        """Return ``grads`` unchanged."""
        return grads


class DenseProjector:
    """Seeded dense projection, generated in row blocks per parameter tensor.

    Args:
        sizes: number of entries of each selected parameter tensor, in feature order.
        config: kind, dim and seed.
        block_rows: rows of ``P`` generated per seed.
        cache_bytes: keep generated blocks of the current checkpoint up to this size; beyond
            it they are regenerated for every batch (slow: use per-layer projection for big models).
        layer_offset: added to the layer index in the seeds (keeps this projector's matrices
            apart from others seeded with the same base seed).

    Raises:
        ConfigError: a bad proj_dim or seed.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        config: ProjectionConfig,
        block_rows: int = 16384,
        cache_bytes: int = 1 << 30,
        layer_offset: int = 0,
    ) -> None:
        if config.dim is None or not config.dense:
            raise ConfigError("DenseProjector needs kind 'gaussian' or 'rademacher' and a dim")
        self.sizes = tuple(int(s) for s in sizes)
        self.config = config
        self.k = config.dim
        self.block_rows = block_rows
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[int, int, int], torch.Tensor] = {}
        self._cached_ckpt: int | None = None
        self.layer_offset = layer_offset

    def dim(self, n_params: int) -> int:
        """The projected dimension ``k``."""
        return self.k

    def matrix_block(self, ckpt_key: int, layer: int, block: int, rows: int) -> torch.Tensor:
        """Rows ``block * block_rows ...`` of layer ``layer``'s part of ``P``, float32."""
        gen = generator(self.config.seed, ckpt_key, layer + self.layer_offset, block)
        scale = 1.0 / float(np.sqrt(self.k))
        if self.config.kind == "gaussian":
            return torch.randn(rows, self.k, generator=gen) * scale
        signs = torch.randint(0, 2, (rows, self.k), generator=gen, dtype=torch.int8)
        return (signs.float() * 2 - 1) * scale

    def _block(self, ckpt_key: int, layer: int, block: int, rows: int) -> torch.Tensor:
        if self._cached_ckpt != ckpt_key:
            self._cache.clear()
            self._cached_ckpt = ckpt_key
        key = (ckpt_key, layer, block)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        mat = self.matrix_block(ckpt_key, layer, block, rows)
        held = sum(m.numel() * m.element_size() for m in self._cache.values())
        if held + mat.numel() * mat.element_size() <= self.cache_bytes:
            self._cache[key] = mat
        return mat

    def project(self, grads: torch.Tensor, ckpt_key: int) -> torch.Tensor:
        """``grads @ P`` for this checkpoint, ``(B, P) -> (B, k)``.

        Raises:
            ConfigError: features whose width differs from the one the projector was made for.
        """
        if grads.shape[1] != sum(self.sizes):
            raise ConfigError(
                f"gradients have {grads.shape[1]} columns, the projector expects {sum(self.sizes)}"
            )
        out = torch.zeros(grads.shape[0], self.k, dtype=grads.dtype, device=grads.device)
        offset = 0
        for layer, size in enumerate(self.sizes):
            for block, start in enumerate(range(0, size, self.block_rows)):
                rows = min(self.block_rows, size - start)
                mat = self._block(ckpt_key, layer, block, rows).to(grads.device, grads.dtype)
                out += grads[:, offset + start : offset + start + rows] @ mat
            offset += size
        return out


def make_projector(config: ProjectionConfig, sizes: Sequence[int]) -> Projector:
    """The projector a configuration names."""
    if not config.dense:
        return IdentityProjector()
    return DenseProjector(sizes, config)
