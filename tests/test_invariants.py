"""Invariants of TracInCP that hold whatever the model: each one fails on a plausible bug."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tracin
from conftest import checkpoints


def featurize(setup, **kwargs):
    model, train, _, states = setup
    return tracin.featurize(
        model,
        tracin.ClassificationTask(),
        kwargs.pop("ckpts", None) or checkpoints(states),
        TensorDataset(*train),
        **kwargs,
    )


def test_self_influence_is_the_diagonal_of_train_by_train(mlp_setup):
    run = featurize(mlp_setup, batch_size=8)
    train = mlp_setup[1]
    matrix = run.influence(train)
    np.testing.assert_allclose(np.diag(matrix), run.self_influence(), rtol=1e-10)
    # and the matrix is symmetric: influence of i on j equals that of j on i
    np.testing.assert_allclose(matrix, matrix.T, rtol=1e-10, atol=1e-14)


@dataclasses.dataclass(frozen=True)
class ConstantQuery(tracin.ClassificationTask):
    """A query score that does not depend on the weights (still touches the model)."""

    def query_score(self, model, batch):
        return model(batch[0]).sum(1) * 0.0 + 3.0


def test_constant_query_score_gives_zero(mlp_setup):
    run = featurize(mlp_setup)
    scores = run.influence(mlp_setup[2], query_task=ConstantQuery())
    assert scores.shape == (5, 30)
    assert np.array_equal(scores, np.zeros_like(scores))


@dataclasses.dataclass(frozen=True)
class Negated(tracin.ClassificationTask):
    def query_score(self, model, batch):
        return -super().query_score(model, batch)


def test_opponents_of_q_are_proponents_of_minus_q(mlp_setup):
    run = featurize(mlp_setup)
    query = mlp_setup[2]
    opp = run.opponents(query, k=6)
    prop_neg = run.proponents(query, k=6, query_task=Negated())
    np.testing.assert_array_equal(opp.indices, prop_neg.indices)
    np.testing.assert_allclose(opp.scores, -prop_neg.scores, rtol=1e-12)


def test_scaling_the_lr_of_one_checkpoint_scales_every_score(mlp_setup):
    states = mlp_setup[3]
    base = featurize(mlp_setup, ckpts=tracin.Checkpoints.from_state_dicts(states[1:2], lr=[0.1]))
    scaled = featurize(mlp_setup, ckpts=tracin.Checkpoints.from_state_dicts(states[1:2], lr=[0.37]))
    query = mlp_setup[2]
    np.testing.assert_allclose(scaled.influence(query), 3.7 * base.influence(query), rtol=1e-12)
    np.testing.assert_allclose(scaled.self_influence(), 3.7 * base.self_influence(), rtol=1e-12)


def test_checkpoint_scores_add_up(mlp_setup):
    states = mlp_setup[3]
    query = mlp_setup[2]
    whole = featurize(mlp_setup).influence(query)
    parts = [
        featurize(mlp_setup, ckpts=tracin.Checkpoints.from_state_dicts([s], lr=[lr])).influence(
            query
        )
        for s, lr in zip(states, (0.5, 0.1, 0.02), strict=True)
    ]
    np.testing.assert_allclose(whole, sum(parts), rtol=1e-12)


def test_batch_size_does_not_change_scores(mlp_setup):
    query = mlp_setup[2]
    a = featurize(mlp_setup, batch_size=1)
    b = featurize(mlp_setup, batch_size=64)
    np.testing.assert_allclose(a.influence(query), b.influence(query), rtol=1e-12)
    np.testing.assert_allclose(a.self_influence(), b.self_influence(), rtol=1e-12)


def test_identity_regression_makes_each_example_its_own_top_proponent():
    # y = w x on one-hot inputs: each example's gradient lives in its own coordinate
    n = 8
    x = torch.eye(n, dtype=torch.float64)
    y = torch.arange(1, n + 1, dtype=torch.float64)
    model = nn.Linear(n, 1, bias=False).double()
    states = [{"weight": torch.full((1, n), 0.1 * c, dtype=torch.float64)} for c in range(3)]
    run = tracin.featurize(
        model,
        tracin.RegressionTask(),
        tracin.Checkpoints.from_state_dicts(states, lr=[0.3, 0.2, 0.1]),
        TensorDataset(x, y),
    )
    props = run.proponents((x, y), k=1)
    np.testing.assert_array_equal(props.indices[:, 0], np.arange(n))
