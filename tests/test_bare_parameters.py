"""Bare parameters broadcast over the batch (learned positions, a class token, a layer scale) on
the hooks, against a float64 per-example backward() loop (`check_exact`); uses the hooks cannot
follow go to torch.func without a warning, exactly."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from test_layers_exact import ce, check_exact, check_influence


class Bare(nn.Module):
    def __init__(self, use="add"):
        super().__init__()
        self.use = use
        self.inp = nn.Linear(4, 8)
        self.pos = nn.Parameter(torch.randn(6, 8) * 0.3)
        self.cls = nn.Parameter(torch.randn(1, 1, 8) * 0.3)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.temp = nn.Parameter(torch.tensor(1.3))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        if self.use == "index":  # pos[: T]: not broadcast over the batch -> torch.func
            h = h + self.pos[: x.shape[1]]
        else:
            h = self.pos + h  # right-hand and left-hand uses
            h = h * 1.5 - self.pos
        cls = self.cls.expand(x.shape[0], -1, -1)
        h = torch.cat([cls, torch.tanh(h)], dim=1) * self.gamma
        return self.head(h.mean(1)) / self.temp


def _batch(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 6, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen))  # fmt: skip


def test_broadcast_parameters_are_hooked_and_exact():
    torch.manual_seed(0)
    eng = check_exact(Bare(), ce, _batch(), hooked=["inp", "head", "pos", "cls", "gamma", "temp"])
    assert eng.rest is None


def test_other_uses_go_to_torch_func_quietly_and_exactly():
    torch.manual_seed(0)
    model = Bare("index")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no TracInWarning: nothing changed for the user
        check_influence(model.double().eval(), ce, _batch(), engines=("auto", "factored"))


def test_a_refused_use_names_the_parameter():
    import tracin
    from tracin.gradients._factored import FactoredEngine
    from tracin.projection._config import ProjectionConfig

    model = Bare("index").double().eval()
    names = [n for n, _ in model.named_parameters()]
    eng = FactoredEngine(model, names, ProjectionConfig())
    weights = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.raises(tracin.HookError, match="'pos'") as info:
        eng.features(weights, ce, _batch(), 0)
    assert info.value.quiet and info.value.params == ("pos",)


class Chunked(nn.Module):
    """A bare parameter split into tensors (a tuple result) before use: torch.func, exactly."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.pair = nn.Parameter(torch.randn(2, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        a, b = self.pair.chunk(2)
        return self.head(torch.tanh(self.inp(x).mean(1) * a + b))


def test_a_use_that_returns_several_tensors_goes_to_torch_func():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_influence(Chunked().double().eval(), ce, _batch(), engines=("auto", "factored"))
