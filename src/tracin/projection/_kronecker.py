"""Per-layer Kronecker projection (``projection="kronecker"``): ``P_out^T G P_in`` for each layer.

A layer's per-example gradient ``G = sum_t d_t a_t^T`` (``(out, in)``, over positions ``t``) is
projected to ``(P_out^T d_t)(P_in^T a_t)^T`` summed over ``t``, ``k_out x k_in`` values with
``k_out = k_in = round(sqrt(proj_dim))`` (a side no larger than that stays exact). ``G`` is never
formed: the factored engine projects ``a`` and ``d`` first (the LoGra / TRAK-for-LLMs trick).
``P`` has i.i.d. ``N(0, 1/side)`` entries, so ``E[<f, f'>] = <G, G'>``; it is drawn from the one
seed rule (`tracin.projection.generator`) with keys ``(layer, side)``: 0 for ``P_in``, 1 for
``P_out``.
"""

from __future__ import annotations

import numpy as np
import torch

from tracin._errors import ConfigError
from tracin.projection._config import ProjectionConfig, generator

__all__ = ["KroneckerProjection"]


class KroneckerProjection:
    """The per-layer matrices of a Kronecker projection, generated on demand and cached.

    Args:
        config: a ``"kronecker"`` `ProjectionConfig` (its ``dim`` is ``k`` per layer).
        n_layers: the number of projected layers (bounds the cache: four checkpoints' worth).

    Raises:
        ConfigError: ``config`` is not a Kronecker projection with a ``dim``.
    """

    def __init__(self, config: ProjectionConfig, n_layers: int) -> None:
        if config.kind != "kronecker" or config.dim is None:
            raise ConfigError(f"KroneckerProjection needs kind 'kronecker' and a dim, got {config}")
        self.config = config
        self.side = max(1, round(float(np.sqrt(config.dim))))
        self.n_layers = n_layers
        self._mats: dict[tuple[int, int, int, str], torch.Tensor] = {}

    def sides(self, n_out: int, n_in: int) -> tuple[int, int]:
        """Projected ``(k_out, k_in)`` of an ``(n_out, n_in)`` layer (small sides stay exact)."""
        return min(n_out, self.side), min(n_in, self.side)

    def matrix(
        self,
        ckpt_key: int,
        layer: int,
        which: int,
        rows: int,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """``P_in`` (``which=0``) or ``P_out`` (``which=1``) of ``layer``, ``(rows, side)``.

        Drawn on the CPU (the same numbers on every device), kept on ``device``.
        """
        key = (ckpt_key, layer, which, str(device))
        if key not in self._mats:
            if len(self._mats) > 4 * self.n_layers:
                self._mats.clear()
            gen = generator(self.config.seed, ckpt_key, layer, which)
            mat = torch.randn(rows, self.side, generator=gen) / float(np.sqrt(self.side))
            self._mats[key] = mat.to(device)
        return self._mats[key]

    def outer(
        self, a_proj: torch.Tensor, d: torch.Tensor, n_out: int, layer: int, ckpt_key: int
    ) -> torch.Tensor:
        """``sum_t (P_out^T d_t)(a_proj_t)^T`` flattened, ``(B, k_out * k_in)``.

        Args:
            a_proj: ``(B, T, k_in)`` inputs already projected by ``P_in`` (or exact).
            d: ``(B, T, n_out)`` output gradients.
            n_out: the layer's output width.
            layer: the layer's index (its seed key).
            ckpt_key: the checkpoint's key (`checkpoint_key` of its id).
        """
        if self.sides(n_out, 1)[0] < n_out:
            d = d @ self.matrix(ckpt_key, layer, 1, n_out, d.device).to(d.dtype)
        return torch.bmm(d.transpose(1, 2), a_proj.to(d.dtype)).reshape(d.shape[0], -1)
