"""Every score equals a per-example backward() loop in float64 (relative tolerance 1e-8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tracin
from conftest import (
    LRS,
    SmallCNN,
    brute_force_grads,
    brute_force_influence,
    checkpoints,
    rows_of,
    train_states,
)

RTOL = 1e-8


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    atol = 1e-12 * float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=atol)


def ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def test_mlp_influence_and_self_influence(mlp_setup):
    model, train, query, states = mlp_setup
    run = tracin.featurize(
        model, tracin.ClassificationTask(), checkpoints(states), TensorDataset(*train), batch_size=7
    )
    expected = brute_force_influence(model, states, LRS, ce, rows_of(train), ce, rows_of(query))
    assert_close(run.influence(query), expected)
    self_expected = np.diag(
        brute_force_influence(model, states, LRS, ce, rows_of(train), ce, rows_of(train))
    )
    assert_close(run.self_influence(), self_expected)


def test_proponents_and_opponents_match_oracle_ranking(mlp_setup):
    model, train, query, states = mlp_setup
    run = tracin.featurize(
        model, tracin.ClassificationTask(), checkpoints(states), TensorDataset(*train)
    )
    expected = brute_force_influence(model, states, LRS, ce, rows_of(train), ce, rows_of(query))
    props = run.proponents(query, k=4, relevance="tracin")  # the raw score (default: cosine)
    opps = run.opponents(query, k=4, relevance="tracin")
    np.testing.assert_array_equal(props.indices, np.argsort(-expected, axis=1)[:, :4])
    np.testing.assert_array_equal(opps.indices, np.argsort(expected, axis=1)[:, :4])
    assert_close(props.scores, np.take_along_axis(expected, props.indices, 1))
    assert_close(opps.scores, np.take_along_axis(expected, opps.indices, 1))
    assert (np.diff(props.scores, axis=1) <= 0).all() and (np.diff(opps.scores, axis=1) >= 0).all()


def test_layer_restriction(mlp_setup):
    model, train, query, states = mlp_setup
    run = tracin.featurize(
        model,
        tracin.ClassificationTask(),
        checkpoints(states),
        TensorDataset(*train),
        layers=["2", "0.bias"],
    )
    names = ["0.bias", "2.weight", "2.bias"]
    expected = brute_force_influence(
        model, states, LRS, ce, rows_of(train), ce, rows_of(query), names
    )
    assert run.config.parameters == tuple(names)
    assert_close(run.influence(query), expected)


def test_cnn_with_batchnorm_and_dropout_in_eval_mode(gen):
    torch.manual_seed(1)
    model = SmallCNN().double()
    x = torch.randn(12, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    states = train_states(model, lambda m: nn.functional.cross_entropy(m(x), y))
    # batch-norm running statistics moved during training: the checkpoints' buffers matter
    assert not torch.equal(states[0]["bn.running_mean"], states[2]["bn.running_mean"])
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=False)
    run = tracin.featurize(model.train(), tracin.ClassificationTask(), checkpoints(states), loader)
    expected = brute_force_influence(model, states, LRS, ce, rows_of((x, y)), ce, rows_of((x, y)))
    assert_close(run.influence((x[:4], y[:4])), expected[:4])
    assert_close(run.self_influence(), np.diag(expected))


def test_regression_loss_and_prediction_queries(gen):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    x = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(20, generator=gen, dtype=torch.float64)
    states = train_states(model, lambda m: ((m(x).squeeze(1) - y) ** 2).mean())
    run = tracin.featurize(model, tracin.RegressionTask(), checkpoints(states), TensorDataset(x, y))

    def sq(m, b):
        return (m(b[0]).squeeze(1) - b[1]) ** 2

    def pred(m, b):  # minus the prediction: a positive influence raised it
        return -m(b[0]).squeeze(1)

    assert_close(
        run.influence((x[:3], y[:3])),
        brute_force_influence(model, states, LRS, sq, rows_of((x, y)), sq, rows_of((x[:3], y[:3]))),
    )
    unlabelled = run.influence(x[:3], query_task=tracin.RegressionTask(query="prediction"))
    assert_close(
        unlabelled,
        brute_force_influence(model, states, LRS, sq, rows_of((x, y)), pred, rows_of((x[:3],))),
    )


@pytest.mark.parametrize("query_class", [None, 2])
def test_classification_prediction_score(mlp_setup, query_class):
    model, train, query, states = mlp_setup
    run = tracin.featurize(
        model, tracin.ClassificationTask(), checkpoints(states), TensorDataset(*train)
    )
    task = tracin.ClassificationTask(query="prediction", query_class=query_class)

    def logit(m, b):  # minus the followed logit: a positive influence raised it
        out = m(b[0])
        cls = out.argmax(1) if query_class is None else torch.full((1,), query_class)
        return -out.gather(1, cls[:, None]).squeeze(1)

    expected = brute_force_influence(
        model, states, LRS, ce, rows_of(train), logit, rows_of((query[0],))
    )
    assert_close(run.influence(query[0], query_task=task), expected)


class DictModel(nn.Module):
    """A Hugging Face-style model: keyword inputs, an attention-like mask, dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        h = self.emb(input_ids) * attention_mask[..., None]
        pooled = h.sum(1) / attention_mask.sum(1, keepdim=True)
        return {"logits": self.head(pooled)}


def test_dict_batches_and_padding_mask(gen):
    torch.manual_seed(3)
    model = DictModel().double()
    ids = torch.randint(1, 11, (10, 6), generator=gen)
    mask = torch.ones(10, 6, dtype=torch.float64)
    mask[::2, 4:] = 0
    ids[::2, 4:] = 0
    labels = torch.randint(0, 2, (10,), generator=gen)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(m, b):
        logits = m(b["input_ids"], b["attention_mask"])["logits"]
        return nn.functional.cross_entropy(logits, b["labels"], reduction="none")

    states = train_states(model, lambda m: loss(m, batch).mean())
    task = tracin.ClassificationTask(output="logits")

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {k: v[i] for k, v in batch.items()}

    run = tracin.featurize(model, task, checkpoints(states), Rows(), batch_size=4)
    rows = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(10)]
    expected = brute_force_influence(model, states, LRS, loss, rows, loss, rows[:3])
    assert_close(run.influence({k: v[:3] for k, v in batch.items()}), expected)


def test_float32_model_scores_accumulate_in_float64(mlp_setup):
    model, train, _, states = mlp_setup
    model32 = model.float()
    states32 = [{k: v.float() for k, v in s.items()} for s in states]
    train32 = (train[0].float(), train[1])
    run = tracin.featurize(
        model32, tracin.ClassificationTask(), checkpoints(states32), TensorDataset(*train32)
    )
    g = brute_force_grads(model32, states32[0], ce, rows_of((train32[0].double(), train[1])))
    assert run.self_influence().dtype == np.float64
    np.testing.assert_allclose(run.self_influence_by_checkpoint()[0], (g**2).sum(1), rtol=1e-4)


def test_subset_dataset_and_drop_last(mlp_setup):
    model, train, query, states = mlp_setup
    subset = torch.utils.data.Subset(TensorDataset(*train), range(6))
    run = tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states), subset)
    full = tracin.featurize(
        model, tracin.ClassificationTask(), checkpoints(states), TensorDataset(*train)
    )
    assert run.n_train == 6
    np.testing.assert_allclose(run.influence(query), full.influence(query)[:, :6], rtol=1e-12)
    loader = DataLoader(TensorDataset(*train), batch_size=4, drop_last=True)
    with pytest.raises(tracin.DataError, match="drop_last=False"):
        tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states), loader)
