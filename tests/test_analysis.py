"""Clustering by TracIn similarity and the embedding-neighbor baseline, as library functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import tracin
from conftest import checkpoints
from tracin.analysis._similarity import cluster, embedding_neighbors, similarity_vectors


def test_embeddings_are_the_layer_output_at_the_last_checkpoint(mlp_setup, tmp_path):
    model, train, query, states = mlp_setup
    run = tracin.featurize(
        model, tracin.ClassificationTask(), checkpoints(states), TensorDataset(*train),
        store=tmp_path / "r", proj_dim=16, embedding_layer="1", block_rows=8,
        queries={"test": TensorDataset(*query)},
    )  # fmt: skip
    net = type(model)(*model).double()
    net.load_state_dict(states[-1])
    with torch.no_grad():
        expected = net[1](net[0](train[0])).numpy()
    np.testing.assert_allclose(run.embeddings("train"), expected, rtol=1e-6)
    assert (tmp_path / "r/embeddings/train/block_0.npy").exists()
    near, far = tracin.open(tmp_path / "r").embedding_neighbors("test", k=3)
    sims = embedding_neighbors(run.embeddings("test"), run.embeddings("train"), 30)[0]
    np.testing.assert_array_equal(near.indices, sims.indices[:, :3])
    assert (near.scores[:, 0] >= far.scores[:, 0]).all()
    assert near.scores.max() <= 1.0 + 1e-9 and far.scores.min() >= -1.0 - 1e-9


def test_streaming_runs_keep_embeddings_in_memory(mlp_setup):
    model, train, _, states = mlp_setup
    run = tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states),
                           TensorDataset(*train), embedding_layer="1")  # fmt: skip
    assert run.embeddings().shape == (30, 10)
    with pytest.raises(tracin.ConfigError, match="stored features"):
        run.cluster(2)


def test_bad_embedding_layer_lists_modules(mlp_setup):
    model, train, _, states = mlp_setup
    with pytest.raises(
        tracin.ConfigError, match=r"embedding_layer='fc' is not a module.*'0', '1', '2'"
    ):
        tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states),
                         TensorDataset(*train), embedding_layer="fc")  # fmt: skip


def test_similarity_vectors_are_unit_and_weight_checkpoints_by_lr():
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(5, 4)), rng.normal(size=(5, 3))
    s = similarity_vectors([0.5, 0.1], [f1, f2])
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1.0)
    u1 = f1 / np.linalg.norm(f1, axis=1, keepdims=True)
    u2 = f2 / np.linalg.norm(f2, axis=1, keepdims=True)
    np.testing.assert_allclose(s @ s.T, (0.5 * u1 @ u1.T + 0.1 * u2 @ u2.T) / 0.6, rtol=1e-12)


@pytest.mark.parametrize("method", ["agglomerative", "kmeans"])
def test_cluster_recovers_separated_directions(method):
    rng = np.random.default_rng(1)
    centres = np.eye(6)[:3] * 5
    truth = np.repeat(np.arange(3), 10)
    feats = centres[truth] + rng.normal(scale=0.5, size=(30, 6)) * np.linspace(0.2, 3, 30)[:, None]
    labels = cluster(similarity_vectors([1.0], [feats]), 3, method=method)
    # same partition up to relabelling: each true group maps to one label
    assert all(len(set(labels[truth == g])) == 1 for g in range(3))
    assert len(set(labels)) == 3


def test_run_cluster_on_projected_features(mlp_setup):
    model, train, _, states = mlp_setup
    run = tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states),
                           TensorDataset(*train), proj_dim=32)  # fmt: skip
    labels = run.cluster(n_clusters=3, rows=np.flatnonzero(train[1].numpy() == 1))
    assert labels.shape == ((train[1] == 1).sum().item(),) and set(labels) <= {0, 1, 2}
    with pytest.raises(tracin.ConfigError, match="n_clusters=0"):
        run.cluster(0)
