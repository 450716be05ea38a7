"""The data contract: where a task finds inputs and labels, rows in dataset order, wrapped models,
multi-label targets, and every task argument checked. Scores are compared with a float64
per-example backward() loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
)

import tracin
from conftest import LRS, brute_force_influence, checkpoints, rows_of, train_states

N, Q = 20, 4


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-8, atol=1e-12 * np.abs(expected).max())


class TwoInputs(nn.Module):
    """A model of two inputs: features and a side input of another width."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.b = nn.Linear(2, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.a(x) + self.b(side)))


@pytest.fixture
def two_inputs():
    """(model, (x, side, y), (xq, sideq, yq), states) for a float64 two-input classifier."""
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(3)
    model = TwoInputs().double()
    x, side = torch.randn(N, 5, generator=g).double(), torch.randn(N, 2, generator=g).double()
    y = torch.randint(0, 3, (N,), generator=g)
    query = (torch.randn(Q, 5, generator=g).double(), torch.randn(Q, 2, generator=g).double(),
             torch.randint(0, 3, (Q,), generator=g))  # fmt: skip
    states = train_states(model, lambda m: nn.functional.cross_entropy(m(x, side), y))
    return model, (x, side, y), query, states


def ce2(m, b):
    return nn.functional.cross_entropy(m(b[0], b[1]), b[2], reduction="none")


def test_three_item_batches_need_the_layout_named(two_inputs):
    model, train, query, states = two_inputs
    with pytest.raises(tracin.TaskError) as err:
        tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states), train)
    message = str(err.value)
    assert "batch of 3 items" in message and "Tensor(8, 2) float64" in message
    assert "ClassificationTask(inputs=(0, 1), labels=2)" in message
    expected = brute_force_influence(model, states, LRS, ce2, rows_of(train), ce2, rows_of(query))
    for task in (
        tracin.ClassificationTask(inputs=(0, 1), labels=2),  # the fix, as given
        tracin.ClassificationTask(labels=2),  # the other items are the inputs
        tracin.ClassificationTask(inputs=[0, 1]),
    ):  # the one item left: labels
        run = tracin.featurize(model, task, checkpoints(states), TensorDataset(*train))
        assert_close(run.influence(query), expected)
        assert_close(
            run.self_influence(),
            np.diag(
                brute_force_influence(model, states, LRS, ce2, rows_of(train), ce2, rows_of(train))
            ),
        )


def test_unlabelled_two_input_queries(two_inputs):
    model, train, query, states = two_inputs
    task = tracin.ClassificationTask(inputs=(0, 1), labels=2)
    run = tracin.featurize(model, task, checkpoints(states), TensorDataset(*train))

    def minus_logit(m, b):
        out = m(b[0], b[1])
        return -out.gather(1, out.argmax(1, keepdim=True)).squeeze(1)

    expected = brute_force_influence(
        model, states, LRS, ce2, rows_of(train), minus_logit, rows_of(query[:2])
    )
    predicted = dataclasses.replace(task, query="prediction")  # what --query-score does
    assert_close(run.influence(query[:2], query_task=predicted), expected)  # no labels in it
    assert_close(run.influence(query, query_task=predicted), expected)  # labels there, unused


def test_extra_items_after_the_labels(mlp_setup):
    model, (x, y), _, states = mlp_setup
    row_id = torch.arange(len(y))
    with pytest.raises(tracin.TaskError, match=r"ClassificationTask\(inputs=\(0, 1\), labels=2\)"):
        tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states), (x, y, row_id))
    reference = tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states), (x, y))
    run = tracin.featurize(model, tracin.ClassificationTask(inputs=0, labels=1),
                           checkpoints(states), TensorDataset(x, y, row_id))  # fmt: skip
    np.testing.assert_array_equal(run.self_influence(), reference.self_influence())


class KeywordModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 4)

    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.lin(features) * scale


def test_dict_batches_pass_keys_as_keywords(gen):
    model = KeywordModel().double()
    batch = {"scale": torch.rand(6, 1, generator=gen).double() + 0.5,
             "features": torch.randn(6, 6, generator=gen).double(),
             "target": torch.randint(0, 4, (6,), generator=gen), "id": torch.arange(6)}  # fmt: skip
    expected = nn.functional.cross_entropy(
        model(batch["features"], batch["scale"]), batch["target"], reduction="none"
    )
    task = tracin.ClassificationTask(inputs=["features", "scale"], labels="target")
    torch.testing.assert_close(task.train_loss(model, batch), expected)
    unlabelled = {k: batch[k] for k in ("features", "scale")}  # prediction needs no labels
    score = tracin.ClassificationTask(query="prediction").query_score(model, unlabelled)
    torch.testing.assert_close(score, -model(**unlabelled).max(1).values)


def test_prediction_never_reads_labels(mlp_setup):
    model, (x, y), _, _ = mlp_setup
    task = tracin.ClassificationTask(query="prediction")
    expected = -model(x).max(1).values
    for batch in (x, (x,), [x], (x, y), (x, torch.zeros(len(x), 9))):
        torch.testing.assert_close(task.query_score(model, batch), expected)
    with pytest.raises(tracin.TaskError, match=r"one tensor .*query='prediction'"):
        tracin.ClassificationTask().query_score(model, x)
    with pytest.raises(tracin.TaskError, match="holds one item, no labels"):
        tracin.ClassificationTask().train_loss(model, (x,))


def test_wrong_arity_names_the_layout(two_inputs):
    model, (x, side, _), _, _ = two_inputs
    with pytest.raises(tracin.TaskError, match=r"calling the model with \(Tensor\(20, 5\)"):
        tracin.ClassificationTask(query="prediction").query_score(model, (x, side))


# ---- rows in dataset order ---------------------------------------------------------------


class LengthBuckets(torch.utils.data.Sampler):
    """Batches of similar 'length' (here: the label), as length bucketing does."""

    def __init__(self, lengths: torch.Tensor, size: int) -> None:
        self.order, self.size = torch.argsort(lengths, stable=True).tolist(), size

    def __iter__(self):
        return iter([self.order[i : i + self.size] for i in range(0, len(self.order), self.size)])

    def __len__(self) -> int:
        return -(-len(self.order) // self.size)


class InOrder(torch.utils.data.Sampler):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


class Reversed(InOrder):
    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))


def test_loaders_out_of_dataset_order_are_refused(mlp_setup):
    model, (x, y), _, states = mlp_setup
    data = TensorDataset(x, y)
    bad = {
        "batch_sampler LengthBuckets": DataLoader(data, batch_sampler=LengthBuckets(y, 4)),
        "sampler RandomSampler": DataLoader(data, batch_size=4, shuffle=True),
        "sampler SubsetRandomSampler": DataLoader(
            data, batch_size=4, sampler=SubsetRandomSampler(range(len(y)))
        ),
        "sampler Reversed": DataLoader(data, batch_size=4, sampler=Reversed(len(y))),
    }
    for name, loader in bad.items():
        with pytest.raises(tracin.DataError, match=rf"{name}.*pass the Dataset itself"):
            tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states), loader)


def test_loaders_in_dataset_order_work(mlp_setup):
    model, (x, y), query, states = mlp_setup
    data = TensorDataset(x, y)
    reference = tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states), data)
    good = [
        DataLoader(data, batch_sampler=BatchSampler(SequentialSampler(data), 7, False)),
        DataLoader(data, batch_size=7, sampler=InOrder(len(y))),
        DataLoader(data, batch_sampler=[list(range(16)), list(range(16, 30))]),
        DataLoader(Rows(x, y), batch_size=None),
    ]
    for loader in good:
        run = tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states), loader)
        np.testing.assert_allclose(run.influence(query), reference.influence(query), rtol=1e-12)


class Rows(IterableDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        return iter([(self.x[i : i + 8], self.y[i : i + 8]) for i in range(0, len(self.y), 8)])


# ---- label kinds: multi-label targets, and errors whose fix works ------------------------


def test_multi_label_task_matches_the_oracle(gen):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 5)).double()
    x = torch.randn(N, 6, generator=gen, dtype=torch.float64)
    y = (torch.rand(N, 5, generator=gen) < 0.4).double()  # multi-hot
    xq = torch.randn(Q, 6, generator=gen, dtype=torch.float64)
    yq = (torch.rand(Q, 5, generator=gen) < 0.4).double()
    bce = nn.BCEWithLogitsLoss(reduction="none")
    states = train_states(model, lambda m: bce(m(x), y).sum(1).mean())

    def loss(m, b):
        return bce(m(b[0]), b[1]).sum(1)

    with pytest.raises(tracin.TaskError, match=r"use tracin\.MultiLabelClassificationTask"):
        tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states), (x, y))
    task = tracin.MultiLabelClassificationTask()
    run = tracin.featurize(model, task, checkpoints(states), TensorDataset(x, y))
    expected = brute_force_influence(model, states, LRS, loss, rows_of((x, y)), loss,
                                     rows_of((xq, yq)))  # fmt: skip
    assert_close(run.influence((xq, yq)), expected)
    assert_close(run.influence((xq, yq.long())), expected)  # 0/1 targets of any dtype

    def predicted(m, b):  # the predicted-present labels' logits (the top one if none is)
        z = m(b[0])
        held = z.detach()
        mask = (held > 0) | ((held == held.max(1, keepdim=True).values) & ~(held > 0).any(1))
        return -(z * mask).sum(1)

    unlabelled = brute_force_influence(model, states, LRS, loss, rows_of((x, y)), predicted,
                                       rows_of((xq,)))  # fmt: skip
    query_task = tracin.MultiLabelClassificationTask(query="prediction")
    assert_close(run.influence(xq, query_task=query_task), unlabelled)


def test_label_errors_point_to_fixes_that_work(mlp_setup):
    model, (x, y), _, states = mlp_setup
    reference = tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states), (x, y))
    with pytest.raises(tracin.TaskError, match=r"convert with labels.long\(\)"):
        tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states), (x, y.double()))
    fixed = tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states),
                             (x, y.double().long()))  # fmt: skip
    np.testing.assert_array_equal(fixed.self_influence(), reference.self_influence())
    one_hot = nn.functional.one_hot(y, 4).double()
    with pytest.raises(tracin.TaskError, match=r"labels.argmax\(1\)"):
        tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states), (x, one_hot))
    fixed = tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states),
                             (x, one_hot.argmax(1)))  # fmt: skip
    np.testing.assert_array_equal(fixed.self_influence(), reference.self_influence())
    column = tracin.featurize(
        model, tracin.ClassificationTask(), checkpoints(states), (x, y[:, None])
    )
    np.testing.assert_array_equal(column.self_influence(), reference.self_influence())
    with pytest.raises(
        tracin.TaskError, match=r"one class index per example; got labels \(30, 2\)"
    ):
        tracin.ClassificationTask().train_loss(model, (x, y.reshape(15, 2).repeat(2, 1)))
    with pytest.raises(tracin.TaskError, match="ClassificationTask's"):
        tracin.MultiLabelClassificationTask().train_loss(model, (x, y))


# ---- wrapped models ----------------------------------------------------------------------


def _prefixed(states, prefix):
    return [{prefix + k: v for k, v in s.items()} for s in states]


def test_wrapped_models_are_unwrapped(mlp_setup, tmp_path):
    model, train, query, states = mlp_setup
    task = tracin.ClassificationTask()
    reference = tracin.featurize(model, task, checkpoints(states), train, store=tmp_path / "ref",
                                 proj_dim=8).influence(query)  # fmt: skip
    wrapped = {
        "dataparallel": (nn.DataParallel(model), "module."),
        "compile": (torch.compile(model, backend="eager"), "_orig_mod."),
        "compile of dataparallel": (torch.compile(nn.DataParallel(model), backend="eager"),
                                    "_orig_mod.module."),
    }  # fmt: skip
    for name, (net, prefix) in wrapped.items():
        for saved in (states, _prefixed(states, prefix)):  # inner or wrapper's state_dict keys
            run = tracin.featurize(net, task, checkpoints(saved), train, store=tmp_path / name,
                                   proj_dim=8, overwrite=True)  # fmt: skip
            np.testing.assert_array_equal(run.influence(query), reference, err_msg=name)
        reopened = tracin.open(
            tmp_path / name, model=net, task=task, checkpoints=checkpoints(states)
        )
        np.testing.assert_array_equal(reopened.influence(query), reference, err_msg=name)


def test_distributed_data_parallel_is_unwrapped(mlp_setup, tmp_path):
    dist = torch.distributed
    model, train, query, states = mlp_setup
    task = tracin.ClassificationTask()
    reference = tracin.featurize(model, task, checkpoints(states), train).influence(query)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        run = tracin.featurize(ddp, task, checkpoints(_prefixed(states, "module.")), train)
        np.testing.assert_array_equal(run.influence(query), reference)
    finally:
        dist.destroy_process_group()


# ---- every task argument -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inputs": 1.5}, r"inputs=1.5 must be an index \(int\)"),
        ({"inputs": True}, "inputs=True must be an index"),
        ({"inputs": ()}, r"inputs=\(\) names no input; pass indices or keys, e.g. inputs=\(0, 1\)"),
        ({"inputs": (0, 0)}, "names an item twice"),
        ({"inputs": (0, "mask")}, "mixes indices and keys"),
        ({"labels": (1, 2)}, "labels are one item of the batch; pass one index"),
        ({"labels": 1.0}, "labels=1.0 must be an index"),
        ({"inputs": (0, 2), "labels": 2}, r"labels=2 is also in inputs=\(0, 2\)"),
        ({"output": ["logits"]}, r"output=\['logits'\] must be an index"),
        ({"query": "Prediction"}, "query='Prediction'; expected 'loss'"),
        ({"query": None}, "query=None; expected 'loss'"),
        ({"query_class": 2}, "applies only to query='prediction'"),
        ({"query": "prediction", "query_class": "cat"}, "query_class='cat' must be a class index"),
        ({"query": "prediction", "query_class": 1.0}, "query_class=1.0 must be a class index"),
    ],
)
def test_bad_task_arguments(kwargs, message):
    for cls in (tracin.ClassificationTask, tracin.MultiLabelClassificationTask):
        with pytest.raises(tracin.ConfigError, match=message):
            cls(**kwargs)
    if "query_class" not in kwargs:
        with pytest.raises(tracin.ConfigError, match=message):
            tracin.RegressionTask(**kwargs)


def test_plausible_task_arguments_are_accepted(mlp_setup):
    model, (x, y), _, _ = mlp_setup
    expected = tracin.ClassificationTask().train_loss(model, (x, y))
    same = [
        tracin.ClassificationTask(inputs=np.int64(0), labels=np.int64(1)),
        tracin.ClassificationTask(inputs=[0], labels=-1),
        tracin.ClassificationTask(inputs=np.array([-2]), labels=1),
        tracin.ClassificationTask(inputs=(0,)),
    ]
    for task in same:
        torch.testing.assert_close(task.train_loss(model, (x, y)), expected)
    assert tracin.ClassificationTask(inputs=[0, 1]) == tracin.ClassificationTask(inputs=(0, 1))
    hash(tracin.ClassificationTask(inputs=[0, 1]))  # a list is stored as a tuple: hashable
    logits = model(x)
    for c in (np.int64(3), -1, 3):
        score = tracin.ClassificationTask(query="prediction", query_class=c).query_score(model, x)
        torch.testing.assert_close(score, -logits[:, 3])
    with pytest.raises(tracin.ConfigError, match=r"query_class=4 is outside the 4 classes"):
        tracin.ClassificationTask(query="prediction", query_class=4).query_score(model, x)


def test_bad_keys_name_the_batch(mlp_setup):
    model, (x, y), _, _ = mlp_setup
    with pytest.raises(tracin.TaskError, match=r"labels=2 does not fit a tuple batch of 2 items"):
        tracin.ClassificationTask(labels=2).train_loss(model, (x, y))
    with pytest.raises(tracin.TaskError, match=r"inputs='x' does not fit a tuple batch"):
        tracin.ClassificationTask(inputs="x").train_loss(model, (x, y))
    with pytest.raises(tracin.TaskError, match=r"inputs key 'features' not in the batch's keys"):
        tracin.ClassificationTask(inputs="features").train_loss(model, {"x": x, "labels": y})
    with pytest.raises(tracin.TaskError, match=r"output key 'logits' not in the model output's"):
        tracin.ClassificationTask(output="logits").train_loss(lambda v: {"out": model(v)}, (x, y))
    with pytest.raises(tracin.TaskError, match=r"pass output='out' \(its keys: \['out'\]\)"):
        tracin.ClassificationTask().train_loss(lambda v: {"out": model(v)}, (x, y))
    with pytest.raises(tracin.TaskError, match=r"inputs=\(0, 1\) names several items"):
        tracin.ClassificationTask(inputs=(0, 1), query="prediction").query_score(model, x)
    with pytest.raises(tracin.TaskError, match=r"say which holds the labels, e.g. .*labels=2"):
        tracin.ClassificationTask(inputs=0).train_loss(model, (x, y, y))
