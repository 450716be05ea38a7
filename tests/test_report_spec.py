"""`tracin report` gives the demo's report: predictions and labels, explanations for the
prediction (PredictedClassTask, checked against real SGD steps), the raw score beside the
default, clusters, a title, and no word of flipped labels the spec does not name."""

from __future__ import annotations

import copy

import numpy as np
import torch
from tests.test_cli import invoke, write_spec
from torch import nn
from torch.utils.data import Subset, TensorDataset

import tracin
from tracin._predicted import PredictedClassTask, predicted_class_task


def test_predicted_class_task_scores_the_prediction_and_its_sign_follows_sgd():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    logits = net(x)
    pred = logits.argmax(1)
    task = PredictedClassTask()
    want = nn.functional.cross_entropy(logits, pred, reduction="none")
    torch.testing.assert_close(task.query_score(net, (x, y)), want)
    right = pred == y  # on correctly predicted rows: the label's loss
    label_loss = tracin.ClassificationTask().query_score(net, (x, y))
    torch.testing.assert_close(task.query_score(net, (x, y))[right], label_loss[right])
    # a positive influence means one SGD step on the training row raised the predicted class's
    # log-probability (lowered its loss): compare with real steps, in float64
    xt, yt = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    lr = 1e-4
    g_q = torch.autograd.grad(task.query_score(net, (x[:1], y[:1])).sum(), list(net.parameters()))
    for j in range(12):
        loss = tracin.ClassificationTask().train_loss(net, (xt[j : j + 1], yt[j : j + 1])).sum()
        g_z = torch.autograd.grad(loss, list(net.parameters()))
        influence = lr * sum(float((a * b).sum()) for a, b in zip(g_z, g_q, strict=True))
        stepped = copy.deepcopy(net)
        with torch.no_grad():
            for p, g in zip(stepped.parameters(), g_z, strict=True):
                p -= lr * g
        with torch.no_grad():
            before = float(task.query_score(net, (x[:1], y[:1])).sum())
            after = float(task.query_score(stepped, (x[:1], y[:1])).sum())
        assert np.isclose(before - after, influence, rtol=1e-2, atol=1e-12)


def test_predicted_class_task_keeps_the_spec_task_settings():
    task = predicted_class_task(tracin.ClassificationTask(inputs=0, labels=1, output=None))
    assert isinstance(task, PredictedClassTask) and task.inputs == 0 and task.labels == 1
    assert predicted_class_task(tracin.RegressionTask()) is None


def test_cli_report_is_the_demos_report(tmp_path):
    spec = write_spec(tmp_path, n_train=60, n_query=6)
    store = tmp_path / "run"
    assert invoke("featurize", spec, "--store", store, "--proj-dim", 16).exit_code == 0
    res = invoke("report", store, "--spec", spec, "--split", "test", "--rows", "0,1,2")
    assert res.exit_code == 0, res.output
    html = (store / "report" / "index.html").read_text()
    assert "<h1>tracin report: run</h1>" in html
    assert html.count("predicted ") >= 3 and html.count(", label ") >= 3
    assert 'id="clusters"' in html and "cluster 1 (" in html and "most typical first" in html
    assert "raw TracInCP score: proponents" in html and "default: cosine of gradients" in html
    assert "flipped" not in html.lower()
    # the explanation follows the prediction: the same as the library's, by PredictedClassTask
    s_model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    _, _, xq, yq = torch.load(tmp_path / "data.pt", weights_only=True)
    ckpts = tracin.Checkpoints.from_paths(sorted(tmp_path.glob("ckpt_*.pt")), lr="lr")
    run = tracin.open(store, model=s_model, task=tracin.ClassificationTask(), checkpoints=ckpts)
    final = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    final.load_state_dict(ckpts[len(ckpts) - 1].state_dict())
    with torch.no_grad():
        pred = final(xq[:3]).argmax(1)
    # the same as the label's loss with the final model's predictions as labels
    props, _ = run.neighbors(Subset(TensorDataset(xq, yq), [0, 1, 2]), 6,
                             query_task=PredictedClassTask(reference=final))  # fmt: skip
    same, _ = run.neighbors(TensorDataset(xq[:3], pred), 6)
    np.testing.assert_array_equal(props.indices, same.indices)
    first = html.index("TracIn proponents (default")
    shown = [int(s.split(" ")[0]) for s in html[first:].split("#")[1:7]]
    assert shown == props.indices[0].tolist()
