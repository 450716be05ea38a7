"""``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` as hooked Linear layers, through an unrolled forward.

A recurrent layer's weights are Linear layers applied at every step: ``weight_ih_l{k}`` to the
layer's input (all steps in one call) and ``weight_hh_l{k}`` to the previous hidden state (one
call per step), each with its bias; the per-example gradient is ``sum_t d_t a_t^T`` over the
calls. The fused kernels (``_VF.lstm``...) hide those calls, and torch.func cannot batch them on
the CPU, so while the hooks record (`tracin.gradients._intercept`) the module runs `unrolled`:
the same equations as PyTorch's documentation, step by step, with its projections as
``F.linear`` calls. It equals the fused kernel up to float rounding (the engine self-check
compares the two on the first rows of every run). ``proj_size`` LSTMs, packed sequences,
unbatched inputs and dropout in training mode are left to the other engines.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from tracin.gradients._projections import LinearStandIn, Projection

__all__ = ["recurrent_projections", "unrolled"]

_KINDS = (nn.RNN, nn.LSTM, nn.GRU)


def _plain_recurrent(module: nn.Module) -> bool:
    return (
        type(module) in _KINDS
        and "forward" not in vars(module)
        and not getattr(module, "proj_size", 0)
        and isinstance(module, nn.RNNBase)
        and module.mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
    )


def _suffixes(module: nn.RNNBase) -> list[str]:
    """``_l{k}`` and ``_l{k}_reverse`` for each layer and direction, in PyTorch's order."""
    directions = ("", "_reverse") if module.bidirectional else ("",)
    return [f"_l{k}{d}" for k in range(module.num_layers) for d in directions]


def recurrent_projections(module: nn.Module) -> list[Projection]:
    """The input and hidden projections of each layer and direction of a recurrent module.

    Empty unless ``module`` is a plain ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (its own forward, no
    ``proj_size``).
    """
    if not _plain_recurrent(module):
        return []
    assert isinstance(module, nn.RNNBase)
    out = []
    for sfx in _suffixes(module):
        for kind in ("ih", "hh"):
            weight = module._parameters.get(f"weight_{kind}{sfx}")
            bias = module._parameters.get(f"bias_{kind}{sfx}")
            if not isinstance(weight, nn.Parameter):
                return []
            name = f"bias_{kind}{sfx}" if bias is not None else None
            linear = LinearStandIn(weight, bias)
            out.append(Projection(f"{kind}{sfx}", f"weight_{kind}{sfx}", name, linear))
    return out


def unrolled(module: nn.Module) -> Any:
    """A forward for ``module`` (bound to it) made of ``F.linear`` calls; None if not recurrent.

    Same arguments and results as the module's own forward (``(input, hx=None)``; batch-first
    or not). Only for the calls `tracin.gradients._intercept` lets through (no packed
    sequence, no unbatched input, no dropout while training).
    """
    if not _plain_recurrent(module):
        return None
    assert isinstance(module, nn.RNNBase)

    def forward(input: Any, hx: Any = None) -> Any:
        return _run(module, input, hx)

    return forward


def _run(module: nn.RNNBase, x: Any, hx: Any) -> Any:
    # `_intercept.intercepted` refused packed, unbatched and training-dropout calls already
    assert isinstance(x, torch.Tensor) and x.dim() == 3
    seq = x.transpose(0, 1) if module.batch_first else x  # (T, B, in)
    lstm = module.mode == "LSTM"
    n_dirs = 2 if module.bidirectional else 1
    b, h_size = seq.shape[1], module.hidden_size
    if hx is None:
        zeros = seq.new_zeros(module.num_layers * n_dirs, b, h_size)
        hx = (zeros, zeros) if lstm else zeros
    h0, c0 = hx if lstm else (hx, None)
    last_h, last_c = [], []
    for k in range(module.num_layers):
        outs = []
        for d in range(n_dirs):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            i = k * n_dirs + d
            out, h, c = _direction(module, sfx, seq, h0[i], None if c0 is None else c0[i], d == 1)
            outs.append(out)
            last_h.append(h)
            last_c.append(c)
        seq = outs[0] if n_dirs == 1 else torch.cat(outs, dim=2)
    output = seq.transpose(0, 1).contiguous() if module.batch_first else seq  # as the kernel's
    h_n = torch.stack(last_h)
    return (output, (h_n, torch.stack(last_c))) if lstm else (output, h_n)


def _direction(
    module: nn.RNNBase,
    sfx: str,
    seq: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor | None,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer in one direction: outputs ``(T, B, H)``, last ``h`` and ``c`` (LSTM)."""
    w_ih, w_hh = getattr(module, f"weight_ih{sfx}"), getattr(module, f"weight_hh{sfx}")
    b_ih = getattr(module, f"bias_ih{sfx}") if module.bias else None
    b_hh = getattr(module, f"bias_hh{sfx}") if module.bias else None
    gi = F.linear(seq, w_ih, b_ih)  # (T, B, gates * H): every step's input projection
    steps = range(seq.shape[0] - 1, -1, -1) if reverse else range(seq.shape[0])
    outs: list[torch.Tensor] = [seq] * seq.shape[0]
    for t in steps:
        gh = F.linear(h, w_hh, b_hh)
        if module.mode == "LSTM":
            assert c is not None
            i, f, g, o = (gi[t] + gh).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        elif module.mode == "GRU":
            ir, iz, in_ = gi[t].chunk(3, 1)
            hr, hz, hn = gh.chunk(3, 1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(in_ + r * hn)
            h = (1 - z) * n + z * h
        else:
            pre = gi[t] + gh
            h = torch.tanh(pre) if module.mode == "RNN_TANH" else torch.relu(pre)
        outs[t] = h
    return torch.stack(outs), h, (h if c is None else c)
