"""nn.Bilinear (a Linear over the outer products of its inputs) and nn.PReLU (an elementwise
slope) on the hooks, against a float64 per-example backward() loop (`check_exact`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from test_layers_exact import ce, check_exact


class Net(nn.Module):
    def __init__(self, channels=1, seq=False, bias=True):
        super().__init__()
        self.seq = seq
        self.a = nn.Linear(4, 5)
        self.bil = nn.Bilinear(5, 3, 6, bias=bias)
        self.act = nn.PReLU(channels)
        self.conv = nn.Conv1d(2, 2, 1)
        self.act2 = nn.PReLU(2, init=0.1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = self.act(self.bil(h, torch.sin(x[..., :3])))
        if self.seq:
            h = h.mean(1)
        c = self.act2(self.conv(h.reshape(h.shape[0], 2, 3))).reshape(h.shape[0], 6)
        return self.head(c)


@pytest.mark.parametrize(
    "kwargs,seq",
    [({}, False), ({"channels": 6}, False), ({"bias": False}, False), ({}, True)],
    ids=["one_slope", "channel_slopes", "bilinear_no_bias", "positions"],
)
def test_bilinear_and_prelu_are_hooked_and_exact(kwargs, seq):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    shape = (5, 3, 4) if seq else (5, 4)
    batch = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2,
             torch.randint(0, 3, (5,), generator=gen))  # fmt: skip
    model = Net(seq=seq, **kwargs)
    check_exact(model, ce, batch, hooked=["a", "bil", "act", "conv", "act2", "head"])
