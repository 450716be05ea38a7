"""Per-example convolution gradients without unfolding: one grouped convolution backward.

For a convolution with input ``x`` (B, C, H, W) and output gradient ``g`` (B, O, H', W'), the
per-example weight gradient is the weight gradient of a convolution with ``groups=B`` over the
batch folded into channels, ``x.reshape(1, B*C, H, W)`` and ``g.reshape(1, B*O, H', W')``: one
call, no ``(B, H'W', C*kh*kw)`` patch matrix. The Kronecker input projection of the unfolded
patches, ``unfold(x) @ P_in``, is itself a convolution whose kernel is ``P_in`` reshaped. Conv1d
runs as a Conv2d of height 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.grad import conv2d_weight

__all__ = [
    "ConvSpec",
    "as_2d",
    "conv_spec",
    "input_projection",
    "output_positions",
    "patches",
    "weight_gradient",
]

ConvSpec = tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]
"""Kernel size, stride, padding and dilation, each as a 2-d pair."""


def conv_spec(module: nn.Conv1d | nn.Conv2d) -> ConvSpec:
    """The module's geometry in 2-d form (a Conv1d is a Conv2d of height 1)."""
    pad = tuple(int(p) for p in module.padding)  # str padding is routed to torch.func
    parts = [tuple(module.kernel_size), tuple(module.stride), pad, tuple(module.dilation)]
    if isinstance(module, nn.Conv1d):
        parts = [(1, *p) if i != 2 else (0, *p) for i, p in enumerate(parts)]
    kernel, stride, padding, dilation = (tuple(int(v) for v in p) for p in parts)
    return kernel, stride, padding, dilation  # type: ignore[return-value]


def as_2d(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A Conv1d's ``(B, C, L)`` tensor as ``(B, C, 1, L)``; a Conv2d's unchanged."""
    return t.unsqueeze(2) if isinstance(module, nn.Conv1d) else t


def patches(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches ``(B, positions, C*kh*kw)`` (channel-major, as ``weight[o]``)."""
    kernel, stride, padding, dilation = conv_spec(module)
    cols = F.unfold(as_2d(module, x), kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2)


def weight_gradient(
    module: nn.Conv1d | nn.Conv2d, calls: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Per-example weight gradients ``(B, weight.numel())``, summed over the calls ``(x, g)``.

    Computed in float32 for a half-precision model (its sums of products overflow float16).
    """
    kernel, stride, padding, dilation = conv_spec(module)
    total: torch.Tensor | None = None
    for x, g in calls:
        acc = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
        x2, g2 = as_2d(module, x).to(acc), as_2d(module, g).to(acc)
        b, c_in, c_out = x2.shape[0], x2.shape[1], g2.shape[1]
        part = conv2d_weight(  # type: ignore[no-untyped-call]
            x2.reshape(1, b * c_in, *x2.shape[2:]),
            (b * c_out, c_in, *kernel),
            g2.reshape(1, b * c_out, *g2.shape[2:]),
            stride,
            padding,
            dilation,
            groups=b,
        ).reshape(b, -1)
        total = part if total is None else total + part
    assert total is not None
    return total


def input_projection(
    module: nn.Conv1d | nn.Conv2d, x: torch.Tensor, p_in: torch.Tensor, bias: bool
) -> torch.Tensor:
    """``[patches(x), 1] @ p_in`` as one convolution, shape ``(B, positions, k_in)``.

    ``p_in`` is ``(C*kh*kw + bias, k_in)``; its last row multiplies the bias column of ones.
    """
    kernel, stride, padding, dilation = conv_spec(module)
    n_in = p_in.shape[0] - int(bias)
    c_in = n_in // (kernel[0] * kernel[1])
    weight = p_in[:n_in].T.reshape(-1, c_in, *kernel)
    out = F.conv2d(
        as_2d(module, x).to(p_in.dtype), weight, p_in[-1] if bias else None,
        stride, padding, dilation,
    )  # fmt: skip
    return out.flatten(2).transpose(1, 2)


def output_positions(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output gradient per position, ``(B, positions, O)``."""
    g2 = as_2d(module, g)
    return g2.reshape(g2.shape[0], g2.shape[1], -1).transpose(1, 2)
