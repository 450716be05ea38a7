"""Engine self-check, the loop engine, and errors that tell model faults from data faults."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import TensorDataset

import tracin
from tracin._errors import EngineError, TracInWarning
from tracin.gradients._functional import row_sqnorms

LRS = [0.3, 0.07]


class OutsideUse(nn.Module):
    """An Embedding whose weight is also the output layer, through F.linear (GPT-2 style)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.mid(self.emb(x))), self.emb.weight)


class GRURegressor(nn.Module):
    """A recurrent regressor; ``packed`` feeds it a PackedSequence (no hook, no vmap rule)."""

    def __init__(self, cell: type[nn.Module] = nn.GRU, packed: bool = False) -> None:
        super().__init__()
        self.packed = packed
        self.rnn = cell(3, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.out = nn.Linear(10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return self.out(self.rnn(x)[0][:, -1])
        lengths = [x.shape[1]] * x.shape[0]
        seq = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        out, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(seq)[0], batch_first=True)
        return self.out(out[:, -1])


class ItemControlFlow(nn.Module):
    """A data-dependent branch taken per example (``.item()``): vmap cannot batch it."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in self.l1(x):
            rows.append(row * 2 if row.sum().item() > 0 else row)
        return self.l2(torch.stack(rows))


def _checkpoints(model: nn.Module) -> tracin.Checkpoints:
    first = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    second = {
        k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
        if v.is_floating_point()
        else v
        for k, v in first.items()
    }
    return tracin.Checkpoints.from_state_dicts([first, second], lr=LRS)


def _oracle(
    model: nn.Module, task: tracin.Task, ckpts: tracin.Checkpoints, train: list, query: list
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 self-influence (N,) and influence (Q, N) from one backward() per example."""

    def grads(data: list, fn: str) -> torch.Tensor:
        rows = []
        for i in range(len(data[0])):
            model.zero_grad()
            getattr(task, fn)(model, [t[i : i + 1] for t in data]).sum().backward()
            rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        return torch.stack(rows)

    self_inf, inf = 0.0, 0.0
    keep = {k: v.clone() for k, v in model.state_dict().items()}
    for ckpt in ckpts:
        model.load_state_dict(ckpt.state_dict())
        g, q = grads(train, "train_loss"), grads(query, "query_score")
        self_inf = self_inf + ckpt.lr * (g * g).sum(1)
        inf = inf + ckpt.lr * q @ g.T
    model.load_state_dict(keep)
    return np.asarray(self_inf), np.asarray(inf)


def _data(model: nn.Module) -> tuple[list, tracin.Task]:
    gen = torch.Generator().manual_seed(0)
    if isinstance(model, OutsideUse):
        return [
            torch.randint(0, 11, (9,), generator=gen),
            torch.randint(0, 11, (9,), generator=gen),
        ], tracin.ClassificationTask()
    if isinstance(model, ItemControlFlow):
        return [
            torch.randn(9, 3, generator=gen).double(),
            torch.randint(0, 2, (9,), generator=gen),
        ], tracin.ClassificationTask()
    return [
        torch.randn(9, 4, 3, generator=gen).double(),
        torch.randn(9, 1, generator=gen).double(),
    ], tracin.RegressionTask()


MODELS = {
    "outside_use": OutsideUse,
    "gru": GRURegressor,
    "rnn": lambda: GRURegressor(nn.RNN),
    "packed_gru": lambda: GRURegressor(packed=True),
    "item_control_flow": ItemControlFlow,
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("engine", ["auto", "loop"])
def test_auto_and_loop_match_float64_oracle(name: str, engine: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().double().eval()
    data, task = _data(model)
    ckpts = _checkpoints(model)
    want_self, want_inf = _oracle(model, task, ckpts, data, [t[:3] for t in data])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = tracin.featurize(model, task, ckpts, TensorDataset(*data), engine=engine)
        got_self = run.self_influence()
        got_inf = run.influence([t[:3] for t in data])
    np.testing.assert_allclose(got_self, want_self, rtol=1e-9)
    np.testing.assert_allclose(got_inf, want_inf, rtol=1e-9, atol=1e-12 * np.abs(want_inf).max())
    notices = [w for w in caught if issubclass(w.category, TracInWarning)]
    if engine == "loop" or name in ("item_control_flow", "gru", "rnn"):  # hooks need no vmap
        assert not notices
    else:  # auto had to leave its fast path, and says so once, naming what it moved
        assert len(notices) == 1
        text = str(notices[0].message)
        assert ("emb.weight" in text) if name == "outside_use" else ("cannot be batched" in text)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("engine", ["functional", "factored"])
def test_named_engines_refuse_what_they_get_wrong(name: str, engine: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().double().eval()
    data, task = _data(model)
    # torch.func is right on a weight used outside its module; hooks need no vmap
    right = {("outside_use", "functional"), ("item_control_flow", "factored"),
             ("gru", "factored"), ("rnn", "factored")}  # fmt: skip
    if (name, engine) in right:
        run = tracin.featurize(
            model, task, _checkpoints(model), TensorDataset(*data), engine=engine
        )
        want, _ = _oracle(model, task, _checkpoints(model), data, data)
        np.testing.assert_allclose(run.self_influence(), want, rtol=1e-9)
        return
    with pytest.raises(EngineError) as info:
        tracin.featurize(model, task, _checkpoints(model), TensorDataset(*data), engine=engine)
    text = str(info.value)
    assert "engine='loop'" in text or "engine='auto'" in text
    if name == "outside_use":
        assert "emb.weight" in text
    if name in ("gru", "rnn", "packed_gru") and engine == "functional":
        assert "'rnn'" in text


def test_kronecker_run_checks_its_exact_twin() -> None:
    """A projected run falls back the same way; its exact squared norms match the oracle."""
    torch.manual_seed(0)
    model = OutsideUse().double().eval()
    data, task = _data(model)
    ckpts = _checkpoints(model)
    want, _ = _oracle(model, task, ckpts, data, data)
    with pytest.warns(TracInWarning, match="emb.weight"):
        run = tracin.featurize(model, task, ckpts, TensorDataset(*data), proj_dim=16,
                               projection="kronecker")  # fmt: skip
        got = run.self_influence()
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_dense_projection_no_smaller_than_the_gradient_stays_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    x, y = torch.randn(20, 5).double(), torch.randint(0, 3, (20,))
    ckpts = _checkpoints(model)
    task = tracin.ClassificationTask()
    n_params = sum(p.numel() for p in model.parameters())
    exact = tracin.featurize(model, task, ckpts, TensorDataset(x, y))
    big = tracin.featurize(model, task, ckpts, TensorDataset(x, y), proj_dim=n_params + 5)
    np.testing.assert_allclose(big.influence((x[:4], y[:4])), exact.influence((x[:4], y[:4])),
                               rtol=1e-9)  # fmt: skip


def test_first_batch_failure_names_the_module_not_the_rows() -> None:
    class Wants2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.reshape(x.shape[0], 4))  # wrong for these inputs

    model = Wants2().eval()
    data = TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    with pytest.raises(tracin.TaskError, match=r"model or task failed .*'<root>' \(Wants2\)"):
        tracin.featurize(model, tracin.ClassificationTask(), _checkpoints(model), data)


def test_later_failure_names_the_rows() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 4).eval()
    y = torch.randint(0, 4, (80,))
    y[70] = 9  # out of range, past the first batch
    data = TensorDataset(torch.randn(80, 3), y)
    with pytest.raises(tracin.DataError, match=r"train rows 64\.\.79"):
        tracin.featurize(model, tracin.ClassificationTask(), _checkpoints(model), data)


def test_half_precision_squares_do_not_overflow() -> None:
    g = torch.full((2, 3), 264.0, dtype=torch.float16)
    assert torch.isfinite(g.pow(2).sum(1)).all() == torch.tensor(False)
    np.testing.assert_allclose(row_sqnorms(g).numpy(), [3 * 264.0**2] * 2)
