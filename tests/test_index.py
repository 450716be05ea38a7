"""Neighbor indexes: every implementation against the dense top-k, approximate recall, save and
load, and the missing-FAISS message."""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tracin
from tracin.scoring._index import ExactIndex, FaissIndex, NeighborIndex, proponents_and_opponents
from tracin.scoring._maths import top_k

pytest.importorskip("faiss")

K = 10
N_TRAIN, N_QUERY = 500, 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """A stored run (float32 MLP, proj_dim 32, 3 checkpoints), a query batch and dense scores."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))
    x = torch.randn(N_TRAIN, 8, generator=gen)
    y = torch.randint(0, 5, (N_TRAIN,), generator=gen)
    query = (torch.randn(N_QUERY, 8, generator=gen), torch.randint(0, 5, (N_QUERY,), generator=gen))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    states = []
    for lr in (0.5, 0.1, 0.02):
        for group in opt.param_groups:
            group["lr"] = lr
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=[0.5, 0.1, 0.02])
    store = tmp_path_factory.mktemp("index") / "run"
    run = tracin.featurize(
        model, tracin.ClassificationTask(), ckpts, TensorDataset(x, y),
        proj_dim=32, block_rows=50, store=store,
    )  # fmt: skip
    dense = run.influence(query)
    return run, run.folded_queries(query), dense


BUILDERS: dict[str, Callable[[tracin.Run], NeighborIndex]] = {
    "exact": ExactIndex,
    "flat": lambda run: FaissIndex.build(run, "flat"),
    "hnsw": lambda run: FaissIndex.build(run, "hnsw", m=16, ef_construction=100, ef_search=64),
    "ivf": lambda run: FaissIndex.build(run, "ivf", nlist=10, nprobe=8),
}


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want, strict=True)]))


def test_folded_queries_give_the_dense_scores(setup):
    run, q, dense = setup
    u = np.concatenate([block for _, block in run.folded_blocks()])
    np.testing.assert_allclose(q @ u.T, dense, rtol=1e-4, atol=1e-5 * np.abs(dense).max())


@pytest.mark.parametrize("name", ["exact", "flat"])
def test_exact_indexes_equal_dense_top_k(setup, name):
    run, q, dense = setup
    pro, opp = proponents_and_opponents(BUILDERS[name](run), q, K)
    for got, largest in ((pro, True), (opp, False)):
        want = top_k(dense, K, largest=largest)
        assert got.indices.dtype == np.int64 and got.scores.dtype == np.float64
        assert got.indices.shape == got.scores.shape == (N_QUERY, K)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4)
    assert np.all(np.diff(pro.scores, axis=1) <= 0) and np.all(np.diff(opp.scores, axis=1) >= 0)
    assert np.all(opp.scores[:, 0] < 0)  # the true, most negative TracIn scores


@pytest.mark.parametrize("name", ["hnsw", "ivf"])
def test_approximate_recall_at_10(setup, name):
    run, q, dense = setup
    pro, opp = proponents_and_opponents(BUILDERS[name](run), q, K)
    for got, largest in ((pro, True), (opp, False)):
        want = top_k(dense, K, largest=largest)
        r = recall(got.indices, want.indices)
        side = "proponents" if largest else "opponents"
        assert r >= 0.9, f"{name} {side} recall@{K} = {r:.3f} < 0.9"
        hit = got.indices == want.indices
        np.testing.assert_allclose(got.scores[hit], want.scores[hit], rtol=1e-2)


@pytest.mark.parametrize("name", ["flat", "hnsw", "ivf"])
def test_save_load_round_trip(setup, tmp_path, name):
    run, q, _ = setup
    index = BUILDERS[name](run)
    assert isinstance(index, FaissIndex)
    index.save(tmp_path / "index" / f"{name}.faiss")
    loaded = FaissIndex.load(tmp_path / "index" / f"{name}.faiss")
    assert loaded.ntotal == index.ntotal == N_TRAIN
    for got, want in zip(
        proponents_and_opponents(loaded, q, K), proponents_and_opponents(index, q, K), strict=True
    ):
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.scores, want.scores)
    assert [p.name for p in (tmp_path / "index").iterdir()] == [f"{name}.faiss"]


def test_tune_changes_search_parameters(setup):
    run, q, dense = setup
    index = FaissIndex.build(run, "ivf", nlist=10, nprobe=1)
    index.tune(nprobe=10)  # every list: exact up to float16 storage
    got = index.search(q, K)
    want = top_k(dense, K)
    assert recall(got.indices, want.indices) >= 0.98


def test_bad_inputs_raise_config_error(setup, tmp_path):
    run, q, _ = setup
    for index in (ExactIndex(run), FaissIndex.build(run, "flat")):
        with pytest.raises(tracin.ConfigError, match="k=0"):
            index.search(q, 0)
        with pytest.raises(tracin.ConfigError, match=f"between 1 and the {N_TRAIN}"):
            index.search(q, N_TRAIN + 1)
        with pytest.raises(tracin.ConfigError, match="columns"):
            index.search(q[:, :5], K)
        with pytest.raises(tracin.ConfigError, match=r"\(Q, D\)"):
            index.search(q[0], K)
    with pytest.raises(tracin.ConfigError, match="kind='annoy'"):
        FaissIndex.build(run, "annoy")  # type: ignore[arg-type]
    with pytest.raises(tracin.ConfigError, match="nprobe=0"):
        FaissIndex.build(run, "ivf", nprobe=0)
    with pytest.raises(tracin.ConfigError, match="not an IVF index"):
        FaissIndex.build(run, "flat").tune(nprobe=4)
    with pytest.raises(tracin.ConfigError, match="not an HNSW index"):
        FaissIndex.build(run, "flat").tune(ef_search=4)
    with pytest.raises(tracin.StoreError, match=r"no-such\.faiss"):
        FaissIndex.load(tmp_path / "no-such.faiss")


def test_missing_faiss_names_the_extra(setup, monkeypatch):
    run, _, _ = setup
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    with pytest.raises(tracin.MissingDependencyError, match=r"pip install 'tracin\[faiss\]'"):
        FaissIndex.build(run, "flat")
    with pytest.raises(tracin.MissingDependencyError, match=r"tracin\[faiss\]"):
        FaissIndex.load("anything.faiss")
    ExactIndex(run).search(run.folded_queries("train")[:2], 3)  # needs no FAISS
