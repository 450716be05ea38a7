"""Shared fixtures: small float64 models, data, checkpoints from real SGD steps, and the oracle."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from torch import nn

import tracin

LRS = (0.5, 0.1, 0.02)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).double()


class SmallCNN(nn.Module):
    """Conv + batch-norm + dropout + linear: exercises buffers and eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(h.flatten(1)))


def train_states(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    lrs: Sequence[float] = LRS,
    steps_per_ckpt: int = 2,
) -> list[dict[str, torch.Tensor]]:
    """SGD on a copy of ``model``; one state dict saved after each block of steps."""
    net = copy.deepcopy(model).train()
    opt = torch.optim.SGD(net.parameters(), lr=lrs[0])
    states = []
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        for _ in range(steps_per_ckpt):
            opt.zero_grad()
            loss_fn(net).backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    return states


def brute_force_grads(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    score: Callable[[nn.Module, object], torch.Tensor],
    rows: list[object],
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """The oracle: one backward() per example, in float64, on a fresh copy of the model."""
    net = copy.deepcopy(model).double().eval()
    net.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    params = dict(net.named_parameters())
    chosen = list(params) if names is None else list(names)
    out = []
    for row in rows:
        net.zero_grad()
        value = score(net, row)
        assert value.shape == (1,)
        value[0].backward()
        out.append(torch.cat([params[n].grad.reshape(-1) for n in chosen]).numpy())
    return np.stack(out)


def brute_force_influence(
    model: nn.Module,
    states: Sequence[dict[str, torch.Tensor]],
    lrs: Sequence[float],
    train_score: Callable[[nn.Module, object], torch.Tensor],
    train_rows: list[object],
    query_score: Callable[[nn.Module, object], torch.Tensor],
    query_rows: list[object],
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """sum_c lr_c <g_c(z), g_c(z')> from per-example backward(): shape (Q, N)."""
    total = np.zeros((len(query_rows), len(train_rows)))
    for lr, state in zip(lrs, states, strict=True):
        g_train = brute_force_grads(model, state, train_score, train_rows, names)
        g_query = brute_force_grads(model, state, query_score, query_rows, names)
        total += lr * g_query @ g_train.T
    return total


def rows_of(batch: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """Split a tuple batch into single-example tuple batches."""
    n = batch[0].shape[0]
    return [tuple(t[i : i + 1] for t in batch) for i in range(n)]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def mlp_setup(gen: torch.Generator):
    """(model, train batch, query batch, states) for a float64 MLP classifier."""
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (30,), generator=gen)
    xq = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    yq = torch.randint(0, 4, (5,), generator=gen)
    states = train_states(model, lambda m: nn.functional.cross_entropy(m(x), y))
    return model, (x, y), (xq, yq), states


def checkpoints(states, lrs=LRS) -> tracin.Checkpoints:
    return tracin.Checkpoints.from_state_dicts(states, lr=list(lrs))
