"""The user's model comes back exactly as it went in, whatever tracin did with it."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

import tracin
from conftest import SmallCNN, checkpoints, train_states


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [m.training for m in model.modules()],
        [p.grad for p in model.parameters()],
    )


def test_mode_flags_weights_and_buffers_restored():
    torch.manual_seed(0)
    model = SmallCNN().double()
    x = torch.randn(8, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    states = train_states(model, lambda m: nn.functional.cross_entropy(m(x), y))
    model.train()
    model.bn.eval()  # a mixed mode must survive too
    model.conv.bias.requires_grad_(False)
    before = snapshot(model)
    run = tracin.featurize(
        model, tracin.ClassificationTask(), checkpoints(states), TensorDataset(x, y)
    )
    run.influence((x[:2], y[:2]))
    run.proponents((x[:2], y[:2]), k=2)
    after = snapshot(model)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]
    # the frozen bias is not differentiated by default
    assert "conv.bias" not in run.config.parameters
    assert run.config.parameters == ("conv.weight", "bn.weight", "bn.bias", "fc.weight", "fc.bias")
