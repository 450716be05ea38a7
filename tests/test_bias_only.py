"""Selecting biases alone (BitFit; a LayerNorm's bias alone): the hooks take ``sum_t d_t`` with
the weight frozen, against a float64 per-example backward() loop on the selected parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tracin
from conftest import brute_force_grads
from test_layers_exact import LRS, FnTask, ce, rows, states_of
from tracin.gradients._factored import FactoredEngine
from tracin.projection._config import ProjectionConfig


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.lin = nn.Linear(3 * 16, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.head(torch.tanh(self.norm(self.lin(h))))


BIASES = ["conv.bias", "bn.bias", "lin.bias", "norm.bias", "head.bias"]


@pytest.mark.parametrize("names", [BIASES, ["norm.bias"], ["lin.bias", "head.weight", "head.bias"]])
def test_biases_alone_are_hooked_and_exact(names):
    torch.manual_seed(0)
    model = Net().double().eval()
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (5,), generator=gen))  # fmt: skip
    oracle = brute_force_grads(model, model.state_dict(), ce, rows(batch), names)
    weights = {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    eng = FactoredEngine(model, names, ProjectionConfig())
    assert eng.rest is None  # nothing left to torch.func
    feats, sq = eng.features(weights, ce, batch, 0)
    np.testing.assert_allclose(feats.numpy(), oracle, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(sq.numpy(), (oracle**2).sum(1), rtol=1e-10)
    kron = FactoredEngine(model, names, ProjectionConfig("kronecker", 4, seed=1))
    _, ksq = kron.features(weights, ce, batch, 0)
    np.testing.assert_allclose(ksq.numpy(), (oracle**2).sum(1), rtol=1e-10)
    ckpts = tracin.Checkpoints.from_state_dicts(states_of(model), lr=list(LRS))
    run = tracin.featurize(model, FnTask(ce), ckpts, batch, layers=names)
    want = sum(
        lr * (brute_force_grads(model, s, ce, rows(batch), names) ** 2).sum(1)
        for lr, s in zip(LRS, states_of(model), strict=True)
    )
    np.testing.assert_allclose(run.self_influence(), want, rtol=1e-8)
