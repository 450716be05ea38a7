"""``nn.EmbeddingBag`` as an Embedding over bag members with one coefficient per member.

A bag's output is ``sum_i c_i E[idx_i]`` with ``c_i`` the per-sample weight (mode ``sum``) or
``1 / |bag|`` (mode ``mean``), members equal to ``padding_idx`` left out (and not counted). So the
gradient of row ``r`` of ``E`` is ``sum_{i: idx_i = r} c_i d_bag``: an Embedding's gradient with
positions ``i`` and output gradients ``d_i = c_i d_bag``. Bags must map one-to-one to examples
(a 2-D input, or offsets with one bag per example); mode ``max`` is left to torch.func.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["bag_ok", "members", "positions"]


def bag_ok(module: nn.Module) -> bool:
    """Whether the factored engine reproduces this EmbeddingBag's gradient exactly."""
    return (
        isinstance(module, nn.EmbeddingBag)
        and module.mode in ("sum", "mean")
        and module.max_norm is None
        and not module.scale_grad_by_freq
    )


def _argument(args: tuple[Any, ...], kwargs: Mapping[str, Any], i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(name)


def members(
    module: nn.EmbeddingBag, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> torch.Tensor:
    """One call's bag members as ``(bags, T, 2)`` float64: index and coefficient per slot.

    Slots past a bag's end (and padding members) have coefficient 0. Float64 holds every
    index below ``2**53`` exactly (float32, on a device without float64, below ``2**24``).
    """
    x = _argument(args, kwargs, 0, "input")
    offsets = _argument(args, kwargs, 1, "offsets")
    weights = _argument(args, kwargs, 2, "per_sample_weights")
    wide = torch.float32 if x.device.type == "mps" else torch.float64
    if x.dim() == 2:
        idx = x
        valid = torch.ones_like(x, dtype=torch.bool)
        coef = torch.ones(x.shape, dtype=wide, device=x.device)
        if weights is not None:
            coef = weights.detach().to(wide).reshape(x.shape)
    else:
        idx, valid, coef = _from_offsets(module, x, offsets, weights, wide)
    if module.padding_idx is not None:
        valid = valid & (idx != module.padding_idx)
    coef = coef * valid
    if module.mode == "mean":
        coef = coef / valid.sum(1, keepdim=True).clamp(min=1)
    return torch.stack([idx.to(wide), coef], dim=2)


def _from_offsets(
    module: nn.EmbeddingBag, x: torch.Tensor, offsets: torch.Tensor, weights: Any, wide: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices with offsets as padded ``(bags, T)`` indices, validity and coefficients."""
    n = x.shape[0]
    offsets = offsets.to(torch.long)
    if module.include_last_offset:
        starts, ends = offsets[:-1], offsets[1:].clamp(max=n)
    else:
        starts, ends = offsets, torch.cat([offsets[1:], offsets.new_tensor([n])])
    lengths = (ends - starts).clamp(min=0)
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    slot = torch.arange(width, device=x.device)
    valid = slot < lengths[:, None]
    where = (starts[:, None] + slot).clamp(max=max(n - 1, 0))
    idx = x[where] if n else torch.zeros_like(where)
    coef = torch.ones(where.shape, dtype=wide, device=x.device)
    if weights is not None and n:
        coef = weights.detach().to(wide)[where]
    return idx * valid, valid, coef


def positions(packed: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(B, T)`` and per-member output gradients ``(B, T, dim)`` from ``members``."""
    idx = packed[..., 0].to(torch.long)
    d = packed[..., 1].to(g.dtype).unsqueeze(-1) * g.unsqueeze(1)
    return idx, d
