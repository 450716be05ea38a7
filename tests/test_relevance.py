"""Relevance (cosine, RelatIF-style, raw TracIn) against a float64 per-example backward() oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tracin
from conftest import LRS, brute_force_grads, checkpoints, rows_of
from tracin.scoring._index import ExactIndex, FaissIndex, proponents_and_opponents
from tracin.scoring._relevance import checkpoint_weights, inverse_norms

RTOL = 1e-8


def ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def oracle(model, states, train, query, names=None):
    """Brute-force relevances ``{name: (Q, N)}`` from exact per-example gradients, float64."""
    out = {
        name: np.zeros((len(query[0]), len(train[0]))) for name in ("cosine", "relatif", "tracin")
    }
    for lr, state in zip(LRS, states, strict=True):
        g = brute_force_grads(model, state, ce, rows_of(train), names)
        q = brute_force_grads(model, state, ce, rows_of(query), names)
        dots = q @ g.T
        out["tracin"] += lr * dots
        out["relatif"] += lr * dots / np.linalg.norm(g, axis=1)[None]
        out["cosine"] += lr / sum(LRS) * dots / np.outer(np.linalg.norm(q, axis=1),
                                                         np.linalg.norm(g, axis=1))  # fmt: skip
    return out


def _runs(mlp_setup, tmp_path):
    """Streaming, stored in 8-row blocks (bounded memory) and stored in one block (dense)."""
    model, train, _, states = mlp_setup
    task, ck, ds = tracin.ClassificationTask(), checkpoints(states), TensorDataset(*train)
    return {
        "streaming": tracin.featurize(model, task, ck, ds, batch_size=7),
        "blockwise": tracin.featurize(model, task, ck, ds, store=tmp_path / "s", block_rows=8,
                                      dtype="float64"),
        "dense": tracin.featurize(model, task, ck, ds, store=tmp_path / "t", dtype="float64"),
    }  # fmt: skip


def test_relevance_equals_oracle_streaming_blockwise_and_dense(mlp_setup, tmp_path):
    model, train, query, states = mlp_setup
    expected = oracle(model, states, train, query)
    for name, run in _runs(mlp_setup, tmp_path).items():
        for relevance, want in expected.items():
            got = run.influence(query, relevance=relevance)
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-12, err_msg=name)
    assert np.abs(expected["cosine"]).max() <= 1.0 + 1e-12  # a weighted mean of cosines


def test_last_layer_cosine_equals_oracle(mlp_setup, tmp_path):
    model, train, query, states = mlp_setup
    run = tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states),
                           TensorDataset(*train), layers=["2"], projection="last_layer",
                           store=tmp_path / "l", block_rows=8, dtype="float64")  # fmt: skip
    expected = oracle(model, states, train, query, ["2.weight", "2.bias"])
    for relevance, want in expected.items():
        np.testing.assert_allclose(run.influence(query, relevance=relevance), want,
                                   rtol=1e-7, atol=1e-12)  # fmt: skip
    # the folded unit vectors give the same cosine (the FAISS path)
    u = np.concatenate([b for _, b in run.folded_blocks(relevance="cosine")])
    q = run.folded_queries(query, relevance="cosine")
    np.testing.assert_allclose(q @ u.T, expected["cosine"], rtol=1e-4, atol=1e-6)


def test_neighbors_default_to_cosine_and_influence_stays_raw(mlp_setup, tmp_path):
    model, train, query, states = mlp_setup
    run = tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states),
                           TensorDataset(*train), store=tmp_path / "r", block_rows=8,
                           dtype="float64")  # fmt: skip
    expected = oracle(model, states, train, query)
    cos, raw = expected["cosine"], expected["tracin"]
    np.testing.assert_allclose(run.influence(query), raw, rtol=RTOL, atol=1e-12)
    props, opps = run.neighbors(query, k=5)  # blockwise (8-row blocks) top-k of the cosine
    np.testing.assert_array_equal(props.indices, np.argsort(-cos, axis=1, kind="stable")[:, :5])
    np.testing.assert_array_equal(opps.indices, np.argsort(cos, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(props.scores, np.take_along_axis(cos, props.indices, 1), rtol=1e-8)
    assert run.proponents(query, k=5).indices.tolist() == props.indices.tolist()
    raw_props = run.proponents(query, k=5, relevance="tracin")
    np.testing.assert_array_equal(raw_props.indices, np.argsort(-raw, axis=1)[:, :5])


def test_projected_cosine_is_the_cosine_of_the_stored_features(mlp_setup, tmp_path):
    model, train, query, states = mlp_setup
    run = tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states),
                           TensorDataset(*train), store=tmp_path / "p", proj_dim=16, block_rows=8,
                           queries={"test": TensorDataset(*query)})  # fmt: skip
    expected = np.zeros((len(query[0]), len(train[0])))
    for lr, c in zip(LRS, run.ckpt_ids, strict=True):
        f = run.read_split("train", c).astype(np.float64)
        q = run.read_split("test", c).astype(np.float64)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        expected += lr / sum(LRS) * q @ f.T
    np.testing.assert_allclose(run.influence("test", relevance="cosine"), expected, rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    props = run.proponents("test", k=4)
    np.testing.assert_array_equal(props.indices, np.argsort(-expected, axis=1)[:, :4])
    # the cosine index over unit folded vectors finds the same rows
    index = ExactIndex(run, relevance="cosine")
    found, _ = proponents_and_opponents(index, run.folded_queries("test", relevance="cosine"), 4)
    np.testing.assert_array_equal(found.indices, props.indices)
    flat = FaissIndex.build(run, "flat", relevance="cosine")
    np.testing.assert_array_equal(
        flat.search(run.folded_queries("test", relevance="cosine"), 4).indices, props.indices
    )


def test_zero_gradient_rows_are_relevant_to_nothing():
    norms = torch.tensor([2.0, 0.0, 0.5])
    assert inverse_norms(norms).tolist() == [0.5, 0.0, 2.0]
    assert checkpoint_weights([0.5, 0.1, 0.4], "cosine") == pytest.approx([0.5, 0.1, 0.4])
    assert checkpoint_weights([1.0, 3.0], "cosine") == pytest.approx([0.25, 0.75])
    assert checkpoint_weights([1.0, 3.0], "tracin") == [1.0, 3.0]
    with pytest.raises(tracin.ConfigError, match="sum to 0"):
        checkpoint_weights([0.0, 0.0], "cosine")


def test_bad_relevance_is_one_config_error(mlp_setup):
    model, train, query, states = mlp_setup
    run = tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states),
                           TensorDataset(*train))  # fmt: skip
    with pytest.raises(tracin.ConfigError, match=r"relevance='cos'.*'cosine'.*'tracin'"):
        run.neighbors(query, k=3, relevance="cos")  # type: ignore[arg-type]
    with pytest.raises(tracin.ConfigError, match="relevance="):
        run.influence(query, relevance="dot")  # type: ignore[arg-type]


def test_cosine_passes_the_class_tests_where_the_raw_score_fails():
    """Quality regression on real data: digits, classes merged in pairs, 10% flipped labels.

    A linear softmax model on 600 of scikit-learn's digits, 6 checkpoints: the cosine's top
    proponent has the query's true superclass and its top 10 hold fewer flipped rows than their
    share; the raw score, crowded by flipped rows, does worse on both (benchmarks/relevance.py
    measures the full version).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.target))
    x = torch.tensor(digits.data[order] / 16.0, dtype=torch.float32)
    fine = digits.target[order]
    superclass = torch.tensor(fine // 2)
    train, test = slice(0, 600), slice(600, 800)
    flipped = rng.random(600) < 0.1
    y = superclass[train].clone()
    y[flipped] = (y[flipped] + torch.tensor(rng.integers(1, 5, flipped.sum()))) % 5
    torch.manual_seed(0)
    model = nn.Linear(64, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    states = []
    for step in range(1, 121):
        idx = torch.tensor(rng.choice(600, 32, replace=False))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[train][idx]), y[idx]).backward()
        opt.step()
        if step in (2, 5, 12, 30, 60, 120):
            states.append({k: v.clone() for k, v in model.state_dict().items()})
    run = tracin.featurize(model, tracin.ClassificationTask(),
                           tracin.Checkpoints.from_state_dicts(states, lr=0.5),
                           TensorDataset(x[train], y), batch_size=600)  # fmt: skip
    with torch.no_grad():
        right = model(x[test]).argmax(1) == superclass[test]  # correctly predicted queries
    truth = fine[train] // 2
    query_class = superclass[test][right].numpy()
    results = {}
    for relevance in ("cosine", "tracin"):
        query = (x[test][right], superclass[test][right])
        top = run.proponents(query, k=10, relevance=relevance).indices
        results[relevance] = (
            float((truth[top[:, 0]] == query_class).mean()),
            float(flipped[top].mean()),
        )
    (cos_class, cos_flipped), (raw_class, raw_flipped) = results["cosine"], results["tracin"]
    assert int(right.sum()) > 150
    assert cos_class >= 0.95 and cos_flipped < flipped.mean(), results
    assert raw_class < cos_class and raw_flipped > cos_flipped, results
