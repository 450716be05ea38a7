"""Last-layer features (``projection="last_layer"``): exact factors ``[a, (1), d]`` of a Linear.

For one Linear layer seen at one position, the per-example gradient is ``G = d a^T`` (with a bias,
``a`` gets a trailing 1), so ``<G, G'> = <a, a'> <d, d'>`` and ``||G|| = ||a|| ||d||`` (TracIn,
Pruthi et al. 2020, Appendix F). The store keeps ``[a, d]`` per row; ``split`` is the width of
``a`` (`tracin.projection.ProjectionConfig.factors`). With ``split=None`` (every other kind: plain
feature vectors) each function reduces to the ordinary one.
"""

from __future__ import annotations

import numpy as np
import torch

from tracin._batch import products
from tracin._errors import TaskError

__all__ = ["factors", "feature_norms", "inner", "normalise", "unfactor"]


def factors(name: str, a: torch.Tensor, d: torch.Tensor, bias: bool) -> torch.Tensor:
    """``[a, (1), d]`` ``(B, in (+1) + out)`` of a Linear seen at one position.

    Args:
        name: the layer's name, for the error message.
        a: ``(B, T, in)`` inputs; ``T`` must be 1.
        d: ``(B, T, out)`` output gradients.
        bias: whether the layer has a bias (a column of ones joins ``a``).

    Raises:
        TaskError: the layer sees more than one position per example.
    """
    if a.shape[1] != 1:
        raise TaskError(
            f"layer {name!r} sees {a.shape[1]} positions per example; the "
            "last-layer path needs one (use projection='kronecker' for sequences)"
        )
    parts = [a[:, 0], d[:, 0]]
    if bias:
        parts.insert(1, torch.ones_like(d[:, 0, :1]))
    return torch.cat(parts, dim=1)


def feature_norms(f: torch.Tensor, split: int | None) -> torch.Tensor:
    """Per-row norm of the gradient the features stand for, ``(rows,)``: ``||a|| ||d||``."""
    if split is None:
        plain: torch.Tensor = f.norm(dim=1)
        return plain
    norms: torch.Tensor = f[:, :split].norm(dim=1) * f[:, split:].norm(dim=1)
    return norms


def normalise(f: torch.Tensor, split: int | None, inv: torch.Tensor) -> torch.Tensor:
    """Rows scaled by ``inv`` ``(rows,)``: only ``d`` is scaled, as ``d a^T`` is bilinear."""
    if split is None:
        return f * inv[:, None]
    return torch.cat([f[:, :split], f[:, split:] * inv[:, None]], dim=1)


def inner(q: torch.Tensor, f: torch.Tensor, split: int | None) -> torch.Tensor:
    """Gradient inner products ``(Q, rows)`` from features: ``<a, a'> <d, d'>`` for factors."""
    if split is None:
        return products(q, f)
    return products(q[:, :split], f[:, :split]) * products(q[:, split:], f[:, split:])


def unfactor(feats: np.ndarray, split: int | None) -> np.ndarray:
    """Factors ``[a, d]`` -> the flattened gradient ``d a^T`` ``(rows, out * in)``."""
    if split is None:
        return feats
    a, d = np.asarray(feats[:, :split], np.float32), np.asarray(feats[:, split:], np.float32)
    return (d[:, :, None] * a[:, None, :]).reshape(len(feats), -1)
