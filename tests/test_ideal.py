"""TracIn-ideal: against a float64 per-example backward() loop, and against the real loss change."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import tracin

N, Q, B, D = 24, 5, 8, 6
Q_T = tuple[torch.Tensor, torch.Tensor]


def make_data(seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N + Q, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (N + Q,), generator=g)
    return (x[:N], y[:N]), (x[N:], y[N:])


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 10), nn.Tanh(), nn.Linear(10, 4)).double()


TASK = tracin.ClassificationTask()


def flat_grad(model: nn.Module, value: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(value, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def brute_force_terms(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], queries: Q_T, lr_vec: torch.Tensor
) -> torch.Tensor:
    """(Q, B) lr x <grad l(z_i), grad f(z'_j)> / B, one backward() per example."""
    x, y = batch
    qx, qy = queries
    gq = torch.stack(
        [flat_grad(model, TASK.query_score(model, (qx[j : j + 1], qy[j : j + 1]))[0])
         for j in range(qx.shape[0])]
    )  # fmt: skip
    gt = torch.stack(
        [flat_grad(model, TASK.train_loss(model, (x[i : i + 1], y[i : i + 1]))[0])
         for i in range(x.shape[0])]
    )  # fmt: skip
    return (gq * lr_vec) @ gt.T / x.shape[0]


def sgd_loop(
    model: nn.Module,
    train: Q_T,
    steps: int,
    lr_at: Callable[[int], float],
    on_step: Callable[[Q_T, np.ndarray, torch.optim.Optimizer], None],
    groups: bool = False,
    seed: int = 1,
) -> None:
    """Mean-loss SGD over random batches; ``on_step`` runs after backward, before the step."""
    params: list[dict[str, object]]
    if groups:
        first, second = model[0], model[2]  # type: ignore[index]
        params = [{"params": first.parameters()}, {"params": second.parameters(), "scale": 0.5}]
    else:
        params = [{"params": model.parameters()}]
    opt = torch.optim.SGD(params, lr=1.0)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(t) * float(group.get("scale", 1.0))  # type: ignore[arg-type]
        rows = rng.choice(N, size=B, replace=False)
        batch = (train[0][rows], train[1][rows])
        loss = TASK.train_loss(model, batch).mean()
        opt.zero_grad()
        loss.backward()
        on_step(batch, rows, opt)
        opt.step()


def lr_vector(model: nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    by_id = {id(p): float(g["lr"]) for g in opt.param_groups for p in g["params"]}
    return torch.cat(
        [torch.full((p.numel(),), by_id[id(p)], dtype=torch.float64) for p in model.parameters()]
    )


@pytest.mark.parametrize("groups", [False, True], ids=["one_lr", "group_lrs"])
def test_matches_per_example_backward_loop(groups: bool) -> None:
    train, queries = make_data()
    model = make_model()
    ideal = tracin.TracInIdeal(model, TASK, queries, n_train=N, loss_reduction="mean")
    expected = np.zeros((Q, N))

    def on_step(batch: Q_T, rows: np.ndarray, opt: torch.optim.Optimizer) -> None:
        grads_before = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
        ideal.step(batch, rows, opt)
        for p, g in zip(model.parameters(), grads_before, strict=True):
            assert torch.equal(p.grad, g)  # the training step's gradients are left alone
        terms = brute_force_terms(model, batch, queries, lr_vector(model, opt))
        np.add.at(expected, (slice(None), rows), terms.detach().numpy())

    sgd_loop(model, train, 4, lambda t: (0.3, 0.1, 0.7, 0.05)[t], on_step, groups=groups)
    assert ideal.n_steps == 4
    np.testing.assert_allclose(ideal.scores, expected, rtol=1e-10, atol=1e-13)
    assert np.count_nonzero(ideal.scores) > Q * N // 2


def relative_gap(lr: float, steps: int = 20) -> float:
    """||sum of ideal - (loss(w_0) - loss(w_T))|| / ||loss(w_0) - loss(w_T)|| over the queries."""
    train, queries = make_data(2)
    model = make_model(2)
    ideal = tracin.TracInIdeal(model, TASK, queries, n_train=N, loss_reduction="mean")
    before = TASK.query_score(model, queries).detach().numpy()
    sgd_loop(model, train, steps, lambda t: lr, lambda b, r, o: ideal.step(b, r, o))
    change = before - TASK.query_score(model, queries).detach().numpy()
    return float(np.linalg.norm(ideal.scores.sum(axis=1) - change) / np.linalg.norm(change))


def test_sum_over_examples_and_steps_is_the_loss_decrease() -> None:
    big, small, tiny = relative_gap(0.5), relative_gap(0.05), relative_gap(0.005)
    # first order: the gap is O(lr) relative to the change, so it shrinks ~10x per 10x in lr
    # (measured: 0.32, 0.036, 0.0035)
    assert tiny < 0.01
    assert small < 0.2 * big
    assert tiny < 0.2 * small


def test_mean_and_sum_reduction() -> None:
    train, queries = make_data()
    model = make_model()
    mean = tracin.TracInIdeal(model, TASK, queries, n_train=N, loss_reduction="mean")
    summed = tracin.TracInIdeal(model, TASK, queries, n_train=N, loss_reduction="sum")

    def on_step(batch: Q_T, rows: np.ndarray, opt: torch.optim.Optimizer) -> None:
        lr = opt.param_groups[0]["lr"]
        mean.step(batch, rows, opt)
        # the same update written as SGD on the summed loss with lr / B
        summed.step(batch, rows, lr=lr / B)

    sgd_loop(model, train, 3, lambda t: 0.2, on_step)
    np.testing.assert_allclose(summed.scores, mean.scores, rtol=1e-12, atol=1e-15)
    wrong = tracin.TracInIdeal(model, TASK, queries, n_train=N, loss_reduction="sum")
    right = tracin.TracInIdeal(model, TASK, queries, n_train=N, loss_reduction="mean")
    batch, rows = (train[0][:B], train[1][:B]), np.arange(B)
    wrong.step(batch, rows, lr=0.1)
    right.step(batch, rows, lr=0.1)
    np.testing.assert_allclose(wrong.scores, B * right.scores, rtol=1e-12)


def test_model_and_mode_unchanged() -> None:
    train, queries = make_data()
    model = make_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ideal = tracin.TracInIdeal(model, TASK, queries, n_train=N, loss_reduction="mean")
    ideal.step((train[0][:B], train[1][:B]), torch.arange(B), lr=0.1)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_layers_subset_is_part_of_the_sum() -> None:
    train, queries = make_data()
    model = make_model()
    batch, rows = (train[0][:B], train[1][:B]), np.arange(B)
    parts = []
    for layers in (None, ["0"], ["2"]):
        ideal = tracin.TracInIdeal(
            model, TASK, queries, n_train=N, loss_reduction="mean", layers=layers
        )
        ideal.step(batch, rows, lr=0.1)
        parts.append(ideal.scores)
    np.testing.assert_allclose(parts[0], parts[1] + parts[2], rtol=1e-10, atol=1e-14)


def test_optimizer_must_be_plain_sgd() -> None:
    train, queries = make_data()
    model = make_model()
    ideal = tracin.TracInIdeal(model, TASK, queries, n_train=N, loss_reduction="mean")
    batch, rows = (train[0][:B], train[1][:B]), np.arange(B)
    for opt in (
        torch.optim.Adam(model.parameters(), lr=0.1),
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
    ):
        with pytest.raises(tracin.ConfigError, match="plain SGD"):
            ideal.step(batch, rows, opt)
    ideal.step(batch, rows, lr=0.1)  # the explicit escape hatch, for any optimiser
    with pytest.raises(tracin.ConfigError, match="exactly one"):
        ideal.step(batch, rows)
    with pytest.raises(tracin.ConfigError, match="exactly one"):
        ideal.step(batch, rows, torch.optim.SGD(model.parameters(), lr=0.1), lr=0.1)
    with pytest.raises(tracin.ConfigError, match="finite"):
        ideal.step(batch, rows, lr=float("nan"))


def test_bad_arguments() -> None:
    train, queries = make_data()
    model = make_model()
    with pytest.raises(tracin.ConfigError, match="loss_reduction='avg'"):
        tracin.TracInIdeal(model, TASK, queries, n_train=N, loss_reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(tracin.ConfigError, match="n_train=0"):
        tracin.TracInIdeal(model, TASK, queries, n_train=0, loss_reduction="mean")
    ideal = tracin.TracInIdeal(model, TASK, queries, n_train=N, loss_reduction="mean")
    batch = (train[0][:B], train[1][:B])
    with pytest.raises(tracin.DataError, match=r"\[24\] lie outside"):
        ideal.step(batch, np.arange(B) + N - B + 1, lr=0.1)
    with pytest.raises(tracin.DataError, match="expected 8 integers"):
        ideal.step(batch, np.arange(B - 1), lr=0.1)
