"""`mislabel_scores` (the default mislabel ranking), `tracin suspects` and the review app's use."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tracin
from tracin.analysis._suspects import mislabel_scores
from tracin.cli._app import app
from tracin.review._data import rank_scores

LRS = [0.5, 0.1, 0.02]


def _bias_grads(model, state, x, y):
    """Oracle: per-example gradients of the final bias, one backward() each, float64."""
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    net.load_state_dict({k: v.double() for k, v in state.items()})
    rows = []
    for i in range(len(y)):
        net.zero_grad()
        nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(net[2].bias.grad.detach().clone().numpy())
    return np.stack(rows), net


@pytest.fixture
def setup(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    y = torch.randint(0, 4, (40,), generator=gen)
    centres = 3 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    x = centres[y] + torch.randn(40, 6, generator=gen, dtype=torch.float64)  # classes apart
    y[:4] = (y[:4] + 1) % 4  # four flipped labels
    states, opt = [], torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(3):
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=LRS)
    data = torch.utils.data.TensorDataset(x, y)
    task = tracin.ClassificationTask()
    bias = tracin.featurize(model, task, ckpts, data, store=tmp_path / "bias", layers=["2.bias"],
                            embedding_layer="1", dtype="float64")  # fmt: skip
    return model, states, x, y, bias, tmp_path


def test_default_is_the_contrast_on_the_final_bias_with_unit_weights(setup):
    model, states, x, y, run, _ = setup
    grads = [_bias_grads(model, s, x, y) for s in states]
    with torch.no_grad():  # embeddings of the model as given (the last state)
        emb = torch.relu(model[0](x)).numpy()
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    nbrs = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    gram = sum(g @ g.T for g, _ in grads)  # unit checkpoint weights
    want = np.diag(gram) - np.take_along_axis(gram, nbrs, 1).mean(1)
    got = mislabel_scores(run)
    assert got.recipe == "contrast" and got.notice is None and "k=10" in got.description
    np.testing.assert_allclose(got.scores, want, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(run.mislabel_scores().scores, want, rtol=1e-6, atol=1e-12)
    assert got.order(5).tolist() == np.argsort(-want, kind="stable")[:5].tolist()
    paper = mislabel_scores(run, "paper")
    want_paper = sum(lr * (g**2).sum(1) for lr, (g, _) in zip(LRS, grads, strict=True))
    np.testing.assert_allclose(paper.scores, want_paper, rtol=1e-6)
    plain = mislabel_scores(run, "self-influence")
    np.testing.assert_allclose(plain.scores, np.diag(gram), rtol=1e-6)
    assert "k=39" in mislabel_scores(run, k=100, strict=True).description  # clipped to N - 1


def test_the_fix_for_missing_features_is_named_whole(setup):
    """Following the refusal's fix once (store, final bias, embeddings) gives the contrast."""
    model, states, x, y, _, tmp_path = setup
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=LRS)
    data = torch.utils.data.TensorDataset(x, y)
    streaming = tracin.featurize(model, tracin.ClassificationTask(), ckpts, data)
    with pytest.raises(tracin.ConfigError, match=r"keep_features=True.*embedding_layer"):
        mislabel_scores(streaming, strict=True)
    fixed = tracin.featurize(model, tracin.ClassificationTask(), ckpts, data,
                             store=tmp_path / "fixed", keep_features=True, layers=["2.bias"],
                             embedding_layer="1")  # fmt: skip
    assert mislabel_scores(fixed, strict=True).recipe == "contrast"


def test_missing_embeddings_fall_back_with_a_notice_or_refuse(setup):
    model, states, x, y, _, tmp_path = setup
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=LRS)
    data = torch.utils.data.TensorDataset(x, y)
    run = tracin.featurize(model, tracin.ClassificationTask(), ckpts, data, store=tmp_path / "all")
    got = mislabel_scores(run)
    assert got.recipe == "self-influence"
    assert "embedding_layer" in got.notice and "layers=['2.bias']" in got.notice
    np.testing.assert_allclose(got.scores, run.self_influence_by_checkpoint().sum(0))
    with pytest.raises(tracin.ConfigError, match="embedding_layer"):
        mislabel_scores(run, strict=True)
    with pytest.raises(tracin.ConfigError, match="recipe='best'; expected one of contrast"):
        mislabel_scores(run, "best")
    with pytest.raises(tracin.ConfigError, match="k=0 must be a positive integer"):
        mislabel_scores(run, k=0)


def test_cli_suspects_and_review_use_the_library_ranking(setup):
    _, _, _, _, run, tmp_path = setup
    runner = CliRunner()
    res = runner.invoke(app, ["suspects", str(tmp_path / "bias"), "--top", "0", "-f", "csv"])
    assert res.exit_code == 0, res.output
    table = list(csv.DictReader(io.StringIO(res.stdout)))
    want = mislabel_scores(run)
    assert [int(r["train_row"]) for r in table] == want.order().tolist()
    np.testing.assert_allclose([float(r["score"]) for r in table], np.sort(want.scores)[::-1])
    res = runner.invoke(app, ["suspects", str(tmp_path / "bias"), "--recipe", "paper",
                              "--top", "3", "-f", "csv"])  # fmt: skip
    rows = [int(r["train_row"]) for r in csv.DictReader(io.StringIO(res.stdout))]
    assert rows == np.argsort(-run.self_influence(), kind="stable")[:3].tolist()
    res = runner.invoke(app, ["suspects", str(tmp_path / "bias"), "--recipe", "nope"])
    assert res.exit_code == 2 and "--recipe 'nope'" in res.output
    name, scores = rank_scores(run, "auto")
    assert name == "contrastive self-influence"
    np.testing.assert_array_equal(scores, want.scores)


def test_contrast_needs_neighbors_that_share_a_label(setup, monkeypatch):
    _, _, _, y, run, _ = setup
    from tracin.analysis import _suspects
    from tracin.analysis._similarity import nearest_other_rows

    nbrs = nearest_other_rows(run.embeddings("train"), 10)
    want = float((y.numpy()[nbrs] == y.numpy()[:, None]).mean())  # labels read back exactly
    assert _suspects.label_agreement(run, nbrs) == pytest.approx(want)
    monkeypatch.setattr(_suspects, "AGREEMENT_MIN", want + 0.01)
    got = mislabel_scores(run)
    assert got.recipe == "self-influence" and "share a label" in got.notice
    np.testing.assert_allclose(got.scores, run.self_influence_by_checkpoint().sum(0))
    assert mislabel_scores(run, strict=True).recipe == "contrast"  # strict keeps the contrast


def test_layer_notice_names_the_final_layer_even_without_a_bias(setup):
    """A bias-free final layer (GPT-2's score head) is named by its weight, not another bias."""
    _, _, x, y, _, tmp_path = setup
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 4, bias=False)).double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpts = tracin.Checkpoints.from_state_dicts([state, state], lr=[0.1, 0.01])
    data = torch.utils.data.TensorDataset(x, y)
    run = tracin.featurize(model, tracin.ClassificationTask(), ckpts, data, store=tmp_path / "nb")
    notice = mislabel_scores(run).notice
    assert notice is not None and "layers=['2.weight']" in notice
