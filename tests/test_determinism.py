"""Determinism: the same inputs and seed give bitwise-identical stores and scores, across runs
and across batch sizes, exact and projected (float32, the default dtype, where kernels'
summation orders show)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tracin
from tracin.experiments._demo import DemoCNN

BATCHES = (1, 7, 64, 65, 70)


def setup(kind: str, n: int = 130):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        x = torch.randn(n, 64, generator=gen)
    else:
        model = DemoCNN()
        x = torch.randn(n, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    states = [
        {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
         for k, v in model.state_dict().items()}
        for _ in range(3)
    ]  # fmt: skip
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=[0.3, 0.1, 0.01])
    return model, ckpts, TensorDataset(x, y), (x[:5], y[:5])


def files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*.npy")}


@pytest.mark.parametrize(("kind", "engine"), [("mlp", "functional"), ("mlp", "factored"),
                                              ("cnn", "factored")])  # fmt: skip
def test_streaming_scores_are_bitwise_equal_across_batch_sizes(kind, engine):
    model, ckpts, data, query = setup(kind, n=70)
    task = tracin.ClassificationTask()
    results = []
    for bs in BATCHES:
        run = tracin.featurize(model, task, ckpts, data, batch_size=bs, engine=engine)
        results.append((run.self_influence(), run.influence(query)))
    for si, infl in results[1:]:
        assert np.array_equal(si, results[0][0])
        assert np.array_equal(infl, results[0][1])


@pytest.mark.parametrize("projection", [None, "gaussian", "kronecker"])
def test_stores_are_bitwise_equal_across_runs_and_batch_sizes(projection, tmp_path):
    model, ckpts, data, query = setup("cnn")
    task = tracin.ClassificationTask()
    kwargs = {} if projection is None else {"projection": projection, "proj_dim": 64}
    stores, scores = [], []
    for i, bs in enumerate((7, 64, 65, 64)):  # 64 twice: across runs too
        store = tmp_path / f"s{i}"
        run = tracin.featurize(model, task, ckpts, data, store=store, batch_size=bs,
                               block_rows=50, queries={"q": query}, embedding_layer="fc1",
                               **kwargs)  # fmt: skip
        stores.append(files(store))
        props = run.proponents("q", k=5)
        scores.append((run.self_influence(), run.influence("q"), props.indices, props.scores))
    assert len(stores[0]) > 10
    for other in stores[1:]:
        assert other == stores[0]
    for other in scores[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(other, scores[0], strict=True))
