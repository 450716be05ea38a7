"""`Run.trak_influence`: the TRAK-style preconditioned score against a dense float64 oracle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tracin
from tracin.projection._config import ProjectionConfig, checkpoint_key
from tracin.projection._dense import DenseProjector
from tracin.scoring._trak import kernel_inverse, preconditioner

N_TRAIN, N_QUERY, DIM = 60, 5, 16
LRS = [0.5, 0.1]
TASK = tracin.ClassificationTask()
Pair = tuple[torch.Tensor, torch.Tensor]
Case = tuple[tracin.Run, Path, tracin.Checkpoints, Pair, Pair]


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _setup() -> tuple[nn.Module, tracin.Checkpoints, Pair, Pair]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_QUERY, 4, generator=gen)
    y = torch.randint(0, 3, (N_TRAIN + N_QUERY,), generator=gen)
    states = [_model(s).state_dict() for s in (1, 2)]
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=LRS, steps=[10, 20])
    return _model(0), ckpts, (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def _grads(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-example loss gradients in float64, one backward per row, ``(rows, P)``."""
    m = _model(0).double()
    m.load_state_dict({k: v.double() for k, v in state.items()})
    rows = []
    for xi, yi in zip(x.double(), y, strict=True):
        m.zero_grad()
        nn.functional.cross_entropy(m(xi[None]), yi[None]).backward()  # type: ignore[no-untyped-call]
        rows.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    return torch.stack(rows).numpy()


def _oracle(
    ckpts: tracin.Checkpoints, train: Pair, query: Pair, damping: float, weights: list[float]
) -> np.ndarray:
    """``sum_c w_c (P^T g_q)^T (Phi^T Phi + lambda I)^{-1} (P^T g_z)``, dense float64."""
    model = _model(0)
    sizes = [p.numel() for p in model.parameters()]
    total = np.zeros((N_QUERY, N_TRAIN))
    for w, ckpt in zip(weights, ckpts, strict=True):
        assert isinstance(ckpt.state, dict)
        state = ckpt.state
        proj = DenseProjector(sizes, ProjectionConfig("gaussian", DIM, seed=0))
        p = proj.project(torch.eye(sum(sizes)), checkpoint_key(ckpt.id)).double().numpy()
        phi = _grads(state, *train) @ p
        phi_q = _grads(state, *query) @ p
        kernel = phi.T @ phi
        kernel += damping * np.trace(kernel) / DIM * np.eye(DIM)
        total += w * phi_q @ np.linalg.solve(kernel, phi.T)
    return total


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    model, ckpts, train, query = _setup()
    store = tmp_path_factory.mktemp("trak") / "run"
    run = tracin.featurize(
        model, TASK, ckpts, TensorDataset(*train), store=store, proj_dim=DIM, block_rows=16,
        queries={"test": query},
    )  # fmt: skip
    return run, store, ckpts, train, query


@pytest.mark.parametrize(("weighting", "damping"), [("mean", 0.1), ("lr", 0.01)])
def test_matches_dense_oracle(case: Case, weighting: str, damping: float) -> None:
    run, _, ckpts, train, query = case
    weights = [0.5, 0.5] if weighting == "mean" else LRS
    expected = _oracle(ckpts, train, query, damping, weights)
    got = run.trak_influence(query, damping=damping, weighting=weighting)  # type: ignore[arg-type]
    assert got.shape == (N_QUERY, N_TRAIN) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4 * np.abs(expected).max())
    # the stored query split gives the same scores; the preconditioning changes the ranking
    np.testing.assert_allclose(run.trak_influence("test", damping=damping, weighting=weighting),  # type: ignore[arg-type]
                               got, rtol=1e-5, atol=1e-6 * np.abs(got).max())  # fmt: skip
    plain = run.influence(query)
    assert np.abs(np.corrcoef(plain.ravel(), got.ravel())[0, 1]) < 0.99


def test_kernel_inverse_blockwise_equals_dense() -> None:
    phi = np.random.default_rng(3).standard_normal((50, 8)).astype(np.float32)
    whole, lam = kernel_inverse([phi], 0.05)
    parts, lam2 = kernel_inverse([phi[:7], phi[7:30], phi[30:]], 0.05)
    dense = phi.astype(np.float64).T @ phi
    expected_lam = 0.05 * np.trace(dense) / 8
    assert lam == pytest.approx(expected_lam) and lam2 == pytest.approx(expected_lam)
    np.testing.assert_allclose(whole, np.linalg.inv(dense + expected_lam * np.eye(8)), rtol=1e-9)
    np.testing.assert_allclose(parts, whole, rtol=1e-9)


def test_precompute_is_saved_and_reused(case: Case) -> None:
    run, store, _, _, query = case
    first = run.trak_influence(query, damping=0.3)
    saved = sorted((store / "preconditioner").glob("*.npz"))
    assert saved and not list((store / "preconditioner").glob(".*.tmp"))
    assert preconditioner(run, 0.3) is preconditioner(run, 0.3)  # in-memory cache
    reopened = tracin.open(store)
    np.testing.assert_allclose(reopened.trak_influence("test", damping=0.3), first, rtol=1e-5,
                               atol=1e-6 * np.abs(first).max())  # fmt: skip
    assert sorted((store / "preconditioner").glob("*.npz")) == saved  # read, not rebuilt


def test_exact_run_refused_naming_proj_dim() -> None:
    model, ckpts, train, query = _setup()
    run = tracin.featurize(model, TASK, ckpts, TensorDataset(*train))
    with pytest.raises(tracin.ConfigError, match=r"proj_dim=") as err:
        run.trak_influence(query)
    assert "trak_influence" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"damping": 0.0}, "damping=0.0"),
        ({"damping": float("nan")}, "damping=nan"),
        ({"weighting": "sum"}, "weighting='sum'"),
    ],
)
def test_bad_options_refused(case: Case, kwargs: dict[str, Any], match: str) -> None:
    run, _, _, _, query = case
    with pytest.raises(tracin.ConfigError, match=match):
        run.trak_influence(query, **kwargs)
