"""The sign of every ready-made query score, against real SGD steps.

For each training row, one SGD step of ``lr`` on that row's loss from the checkpoint's weights
changes the query's outcome; TracIn's score with that single checkpoint must follow the change:
a positive score means the step lowered the query's loss (``query="loss"``) or raised its
predicted outcome (``query="prediction"``: the predicted class's logit, the predicted side's
log-odds of a one-logit model, class ``query_class``'s logit, the regression prediction, the
predicted labels' logits).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tracin
from conftest import train_states

N, Q, LR = 20, 3, 1e-3
bce = nn.functional.binary_cross_entropy_with_logits


def _losses(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-example training loss of ``(output, target)``, written independently of tracin."""
    return {
        "multiclass": lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"),
        "binary": lambda out, y: bce(out.squeeze(1), y, reduction="none"),
        "regression": lambda out, y: ((out - y) ** 2).sum(1),
        "multilabel": lambda out, y: bce(out, y, reduction="none").sum(1),
    }[kind]


def _outcome(kind: str, query_class: int | None, reference: torch.Tensor):
    """The query's outcome as a function of the model output; choices fixed at ``reference``."""
    if kind == "multiclass":
        cls = reference.argmax(1) if query_class is None else torch.full((Q,), query_class)
        return lambda out: out.gather(1, cls[:, None]).squeeze(1)
    if kind == "binary":
        side = torch.where(reference.squeeze(1) >= 0, 1.0, -1.0).double()
        if query_class is not None:
            side = torch.full((Q,), 1.0 if query_class == 1 else -1.0).double()
        return lambda out: side * out.squeeze(1)
    if kind == "regression":
        return lambda out: out.sum(1)
    if query_class is not None:
        return lambda out: out[:, query_class]
    present = reference > 0  # the labels predicted present; the most likely one if none is
    top = reference == reference.max(1, keepdim=True).values
    chosen = (present | (top & ~present.any(1, keepdim=True))).double()
    assert (~present.any(1)).any()  # the fallback is exercised
    return lambda out: (out * chosen).sum(1)


def _setup(kind: str):
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    width = {"multiclass": 4, "binary": 1, "regression": 2, "multilabel": 5}[kind]
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, width)).double()
    x = torch.randn(N + Q, 6, generator=g, dtype=torch.float64)
    y = {
        "multiclass": torch.randint(0, 4, (N + Q,), generator=g),
        "binary": torch.randint(0, 2, (N + Q,), generator=g).double(),
        "regression": torch.randn(N + Q, 2, generator=g, dtype=torch.float64),
        "multilabel": (torch.rand(N + Q, 5, generator=g) < 0.4).double(),
    }[kind]
    loss = _losses(kind)
    state = train_states(
        model, lambda m: loss(m(x[:N]), y[:N]).mean(), lrs=(0.3,), steps_per_ckpt=5
    )
    return model, (x[:N], y[:N]), (x[N:], y[N:]), state[0]


def _task(kind: str, query: str, query_class: int | None) -> tracin.Task:
    cls = {"multiclass": tracin.ClassificationTask, "binary": tracin.ClassificationTask,
           "regression": tracin.RegressionTask,
           "multilabel": tracin.MultiLabelClassificationTask}[kind]  # fmt: skip
    if query_class is not None:
        return cls(query=query, query_class=query_class)  # type: ignore[call-arg]
    return cls(query=query)


CASES = [
    (kind, query, None)
    for kind in ("multiclass", "binary", "regression", "multilabel")
    for query in ("loss", "prediction")
] + [("multiclass", "prediction", 2), ("binary", "prediction", 0), ("binary", "prediction", 1),
     ("multilabel", "prediction", 3)]  # fmt: skip


@pytest.mark.parametrize(("kind", "query", "query_class"), CASES)
def test_scores_follow_one_real_sgd_step(kind, query, query_class):
    model, (x, y), (xq, yq), state = _setup(kind)
    loss = _losses(kind)
    net = copy.deepcopy(model).eval()
    net.load_state_dict(state)
    with torch.no_grad():
        before = net(xq)
    outcome = _outcome(kind, query_class, before)

    def measure(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out = m(xq)
            return -loss(out, yq) if query == "loss" else outcome(out)

    change = np.zeros((Q, N))
    for i in range(N):  # one real SGD step on row i alone, from the checkpoint's weights
        stepped = copy.deepcopy(net)
        opt = torch.optim.SGD(stepped.parameters(), lr=LR)
        loss(stepped(x[i : i + 1]), y[i : i + 1]).sum().backward()
        opt.step()
        change[:, i] = (measure(stepped) - measure(net)).numpy()

    task = _task(kind, query, query_class)
    ckpts = tracin.Checkpoints.from_state_dicts([state], lr=[LR])
    run = tracin.featurize(model, _task(kind, "loss", None), ckpts, TensorDataset(x, y))
    scores = run.influence((xq, yq) if query == "loss" else xq, query_task=task)
    for q in range(Q):
        corr = np.corrcoef(scores[q], change[q])[0, 1]
        assert corr > 0.99, (kind, query, query_class, q, corr)
    # first order: the score is the change itself, up to O(lr^2)
    np.testing.assert_allclose(scores, change, atol=0.02 * np.abs(change).max())
