"""The Task seam: batch layouts, query-score variants, and check_task catching broken tasks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import tracin


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Linear(3, 4)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, generator=g), torch.randint(0, 4, (6,), generator=g)


def test_classification_loss_shape_and_values(model, batch):
    loss = tracin.ClassificationTask().train_loss(model, batch)
    expected = nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")
    torch.testing.assert_close(loss, expected)


def test_labels_and_inputs_by_key_and_index(model, batch):
    x, y = batch
    swapped = tracin.ClassificationTask(inputs=1, labels=0).train_loss(model, (y, x))
    as_dict = tracin.ClassificationTask(inputs="x", labels="y").train_loss(model, {"x": x, "y": y})
    default = tracin.ClassificationTask().train_loss(model, (x, y))
    torch.testing.assert_close(swapped, default)
    torch.testing.assert_close(as_dict, default)


def test_prediction_scores(model, batch):
    # the score is the followed logit negated: a positive influence means the step raised it
    x, _ = batch
    logits = model(x)
    predicted = tracin.ClassificationTask(query="prediction").query_score(model, x)
    torch.testing.assert_close(predicted, -logits.max(1).values)
    chosen = tracin.ClassificationTask(query="prediction", query_class=2).query_score(model, (x,))
    torch.testing.assert_close(chosen, -logits[:, 2])


def test_binary_logits(batch):
    x, y = batch
    model = nn.Linear(3, 1)
    loss = tracin.ClassificationTask().train_loss(model, (x, y % 2))
    expected = nn.functional.binary_cross_entropy_with_logits(
        model(x).squeeze(1), (y % 2).float(), reduction="none"
    )
    torch.testing.assert_close(loss, expected)


def test_regression_multi_output(batch):
    x, _ = batch
    model = nn.Linear(3, 2)
    y = torch.zeros(6, 2)
    loss = tracin.RegressionTask().train_loss(model, (x, y))
    torch.testing.assert_close(loss, (model(x) ** 2).sum(1))
    pred = tracin.RegressionTask(query="prediction").query_score(model, x)
    torch.testing.assert_close(pred, -model(x).sum(1))


def test_bad_configurations_are_errors():
    with pytest.raises(tracin.ConfigError, match="query='prediction'"):
        tracin.ClassificationTask(query_class=1)
    with pytest.raises(tracin.ConfigError, match="'logits'"):
        tracin.ClassificationTask(query="logits")  # type: ignore[arg-type]


def test_missing_label_key_names_the_keys(model, batch):
    x, y = batch
    with pytest.raises(
        tracin.TaskError, match=r"labels key 'labels' not in the batch's keys \['x', 'y'\]"
    ):
        tracin.ClassificationTask(inputs="x").train_loss(model, {"x": x, "y": y})


def test_float_class_labels_are_an_error(model, batch):
    x, y = batch
    with pytest.raises(tracin.TaskError, match="integer class indices"):
        tracin.ClassificationTask().train_loss(model, (x, y.float()))


def test_model_with_dict_output_needs_output_key(batch):
    class HF(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            return {"logits": self.lin(x)}

    with pytest.raises(tracin.TaskError, match="output='logits'"):
        tracin.ClassificationTask().train_loss(HF(), batch)
    loss = tracin.ClassificationTask(output="logits").train_loss(HF(), batch)
    assert loss.shape == (6,)


@dataclasses.dataclass(frozen=True)
class MeanLoss(tracin.ClassificationTask):
    def train_loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])


@dataclasses.dataclass(frozen=True)
class BroadcastMean(tracin.ClassificationTask):
    def train_loss(self, model, batch):
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        return loss.expand(batch[0].shape[0])


def test_check_task_catches_reduced_losses(model, batch):
    tracin.check_task(tracin.ClassificationTask(), model, batch)
    with pytest.raises(tracin.TaskError, match=r"shape \(\), expected \(6,\).*reduction='none'"):
        tracin.check_task(MeanLoss(), model, batch)
    with pytest.raises(tracin.TaskError, match="not per-example"):
        tracin.check_task(BroadcastMean(), model, batch)


def test_featurize_runs_check_task(model, batch):
    ckpts = tracin.Checkpoints.from_state_dicts([model.state_dict()], lr=[0.1])
    data = torch.utils.data.TensorDataset(*batch)
    with pytest.raises(tracin.TaskError, match="not per-example"):
        tracin.featurize(model, BroadcastMean(), ckpts, data)
