"""Layers the hooks cannot follow on a batch the engine self-check did not see.

The self-check looks at the first rows of the first batch; a later batch (a shorter query that
slices a positional parameter, a batch that needs packing) can take another path. With
engine="auto" the run moves those parameters off the hooks and stays exact (float64 oracle);
a Kronecker run, whose features would change projection, is refused with a fix; a recurrent
module torch.func cannot batch keeps its head on the hooks (vmap failures are blamed on vmap).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import tracin
from conftest import brute_force_influence, rows_of

LRS = [0.3, 1.7]


class Task(tracin.Task):
    def train_loss(self, model, batch):
        *inputs, y = batch
        return F.cross_entropy(model(*inputs), y, reduction="none")


def score(model, batch):
    return Task().train_loss(model, batch)


class PosSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.pos = nn.Parameter(torch.randn(1, 5, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        t = x.shape[1]
        pos = self.pos if t == self.pos.shape[1] else self.pos[:, :t]
        return self.head((self.inp(x) + pos).mean(1))


class CondPack(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x, lengths):
        if bool((lengths < x.shape[1]).any()):
            x = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.head(self.gru(x)[1][-1])


class ProjLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 6, proj_size=2, batch_first=True)
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _states(model):
    gen = torch.Generator().manual_seed(3)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    return [first, {k: v + 0.2 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                    for k, v in first.items()}]  # fmt: skip


def test_a_query_that_slices_a_positional_parameter_is_exact():
    torch.manual_seed(0)
    model = PosSlice().double().eval()
    gen = torch.Generator().manual_seed(0)
    train = (torch.randn(7, 5, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (7,)))
    query = (torch.randn(2, 3, 3, generator=gen, dtype=torch.float64), torch.tensor([0, 1]))
    states = _states(model)
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=LRS)
    run = tracin.featurize(model, Task(), ckpts, train)
    want = brute_force_influence(model, states, LRS, score, rows_of(train), score, rows_of(query))
    np.testing.assert_allclose(run.influence(query), want, rtol=1e-9)


def test_a_later_batch_that_packs_moves_the_module_off_the_hooks_and_says_so():
    torch.manual_seed(0)
    model = CondPack().double().eval()
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5] * 70 + [3] * 10)  # the second batch of 64 needs packing
    data = (torch.randn(80, 5, 3, generator=gen, dtype=torch.float64), lengths,
            torch.randint(0, 2, (80,), generator=gen))  # fmt: skip
    states = _states(model)
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=LRS)
    with pytest.warns(tracin.TracInWarning, match="later batch"):
        run = tracin.featurize(model, Task(), ckpts, data)
    rows = rows_of(data)
    want = np.diag(brute_force_influence(model, states, LRS, score, rows, score, rows))
    np.testing.assert_allclose(run.self_influence(), want, rtol=1e-9)


def test_a_kronecker_run_is_refused_with_a_fix_rather_than_mixing_projections():
    model = CondPack().double().eval()
    data = (torch.randn(80, 5, 3, dtype=torch.float64), torch.tensor([5] * 70 + [3] * 10),
            torch.randint(0, 2, (80,)))  # fmt: skip
    ckpts = tracin.Checkpoints.from_state_dicts(_states(model), lr=LRS)
    with pytest.raises(tracin.EngineError, match="projection='gaussian'"):
        tracin.featurize(model, Task(), ckpts, data, proj_dim=4, projection="kronecker")


def test_a_module_vmap_cannot_batch_leaves_the_other_layers_on_the_hooks():
    torch.manual_seed(0)
    model = ProjLSTM().double().eval()
    data = (torch.randn(7, 5, 3, dtype=torch.float64), torch.randint(0, 2, (7,)))
    states = _states(model)
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=LRS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = tracin.featurize(model, Task(), ckpts, data, proj_dim=64, projection="kronecker")
    notices = [str(w.message) for w in caught if issubclass(w.category, tracin.TracInWarning)]
    assert len(notices) == 1 and "'lstm' (LSTM) cannot be batched" in notices[0]
    assert "head" not in notices[0]  # the head stayed on the hooks
    rows = rows_of(data)
    want = np.diag(brute_force_influence(model, states, LRS, score, rows, score, rows))
    np.testing.assert_allclose(run.self_influence(), want, rtol=1e-9)
    with pytest.raises(tracin.EngineError, match="'lstm' \\(LSTM\\) cannot be batched"):
        tracin.featurize(model, Task(), ckpts, data, engine="factored")
