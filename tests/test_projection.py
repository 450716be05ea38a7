"""TracIn-RP: seeded, blockwise projection that preserves inner products as JL promises."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tracin
from tracin.projection._config import ProjectionConfig
from tracin.projection._dense import DenseProjector


def grads(n: int = 40, p: int = 3000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, p, generator=g)  # correlated rows: inner products far from zero
    return torch.randn(n, 4, generator=g) @ base + 0.5 * torch.randn(n, p, generator=g)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_same_seed_same_features_other_seed_other(kind):
    g = grads()
    sizes = [1000, 2000]
    a = DenseProjector(sizes, ProjectionConfig(kind, 64, seed=7)).project(g, 3)
    b = DenseProjector(sizes, ProjectionConfig(kind, 64, seed=7)).project(g, 3)
    c = DenseProjector(sizes, ProjectionConfig(kind, 64, seed=8)).project(g, 3)
    d = DenseProjector(sizes, ProjectionConfig(kind, 64, seed=7)).project(g, 4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, d)


def test_blocks_are_generated_not_held_whole():
    g = grads()
    cached = DenseProjector([3000], ProjectionConfig("gaussian", 32), block_rows=256)
    uncached = DenseProjector(
        [3000], ProjectionConfig("gaussian", 32), block_rows=256, cache_bytes=0
    )
    torch.testing.assert_close(cached.project(g, 0), uncached.project(g, 0), rtol=0, atol=0)
    assert len(uncached._cache) == 0 and len(cached._cache) == math.ceil(3000 / 256)
    # the same matrix whatever the batch: rows are projected independently
    g64 = g.double()
    torch.testing.assert_close(cached.project(g64[:7], 0), cached.project(g64, 0)[:7])


def test_rademacher_entries():
    proj = DenseProjector([10], ProjectionConfig("rademacher", 16))
    mat = proj.matrix_block(0, 0, 0, 10)
    assert set(np.unique(mat.numpy() * 4).tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_inner_product_error_falls_with_dim_within_jl_bound(kind):
    g = grads().double()
    exact = (g @ g.T).numpy()
    norms = np.sqrt(np.diag(exact))
    scale = np.outer(norms, norms)
    pairs = len(g) * (len(g) + 1) // 2
    delta = 1e-3
    mean_err = []
    for k in (64, 256, 1024):
        f = DenseProjector([g.shape[1]], ProjectionConfig(kind, k, seed=1)).project(g, 0)
        err = np.abs((f @ f.T).numpy() - exact) / scale  # relative to ||g|| ||g'||
        # JL for inner products: P(|err| > eps) <= 2 exp(-k eps^2 / 8), union over all pairs
        bound = math.sqrt(8 * math.log(2 * pairs / delta) / k)
        assert err.max() <= bound, (k, err.max(), bound)
        mean_err.append(err.mean())
    assert mean_err[0] > mean_err[1] > mean_err[2]
    assert mean_err[2] < 0.5 * mean_err[0]


def test_self_influence_stays_exact_under_projection(mlp_setup):
    model, train, _, states = mlp_setup
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=[0.5, 0.1, 0.02])
    data = torch.utils.data.TensorDataset(*train)
    task = tracin.ClassificationTask()
    exact = tracin.featurize(model, task, ckpts, data)
    projected = tracin.featurize(model, task, ckpts, data, proj_dim=8)
    np.testing.assert_allclose(projected.self_influence(), exact.self_influence(), rtol=1e-12)


def test_bad_projection_configs():
    with pytest.raises(tracin.ConfigError, match="proj_dim=0 must be a positive integer"):
        ProjectionConfig("gaussian", 0)
    with pytest.raises(
        tracin.ConfigError, match="needs projection 'gaussian', 'rademacher' or 'kronecker'"
    ):
        ProjectionConfig("identity", 16)
    with pytest.raises(tracin.ConfigError, match="'sparse'"):
        ProjectionConfig("sparse", 16)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "kronecker"])
def test_a_projection_no_smaller_than_the_gradient_keeps_the_exact_features(kind):
    from torch import nn

    from tracin.gradients import effective_projection

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # 26 parameters
    names = tuple(n for n, _ in model.named_parameters())
    assert effective_projection(model, names, ProjectionConfig(kind, 26)).kind == "identity"
    assert effective_projection(model, names, ProjectionConfig(kind, 25)).kind == kind
    x, y = torch.randn(7, 3), torch.randint(0, 2, (7,))
    ckpts = tracin.Checkpoints.from_state_dicts([model.state_dict()], lr=[0.3])
    task = tracin.ClassificationTask()
    run = tracin.featurize(model, task, ckpts, (x, y), proj_dim=64, projection=kind)
    exact = tracin.featurize(model, task, ckpts, (x, y))
    np.testing.assert_allclose(run.influence((x, y)), exact.influence((x, y)), rtol=1e-5)


def test_kronecker_matrices_live_on_the_features_device():
    from tracin.projection._kronecker import KroneckerProjection

    proj = KroneckerProjection(ProjectionConfig("kronecker", 16, seed=2), n_layers=1)
    cpu = proj.matrix(0, 0, 1, 9)
    meta = proj.matrix(0, 0, 1, 9, device="meta")
    assert meta.device.type == "meta" and meta.shape == cpu.shape
    assert proj.matrix(0, 0, 1, 9) is cpu  # cached per device, the same numbers on each
