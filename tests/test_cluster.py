"""Spherical k-means over unit TracIn-similarity vectors: planted clusters, blockwise = dense."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, silhouette_score
from torch.utils.data import TensorDataset

import tracin
from conftest import checkpoints
from tracin.analysis._cluster import array_source, choose_n_clusters, silhouette, spherical_kmeans
from tracin.analysis._similarity import similarity_vectors


def planted(n_per: int, k: int, dim: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    truth = np.repeat(np.arange(k), n_per)
    scale = rng.uniform(0.1, 10.0, size=(len(truth), 1))  # norms must not matter
    x = (centres[truth] + rng.normal(scale=noise, size=(len(truth), dim))) * scale
    return x, truth


def test_recovers_planted_clusters_blockwise_as_in_one_block():
    x, truth = planted(60, 5, 20, 0.3)
    dense = spherical_kmeans(array_source(x, len(x)), len(x), 5, seed=3)
    blockwise = spherical_kmeans(array_source(x, 7), len(x), 5, seed=3)
    assert adjusted_rand_score(truth, dense.labels) == 1.0
    np.testing.assert_array_equal(blockwise.labels, dense.labels)
    np.testing.assert_allclose(blockwise.centres, dense.centres, atol=1e-6)
    assert sorted(np.bincount(dense.labels).tolist()) == [60] * 5  # balanced as planted
    # each row's similarity is its cosine to its own (unit) centre, and the best of all centres
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ dense.centres.T
    np.testing.assert_allclose(dense.similarity, sims.max(axis=1), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(dense.centres, axis=1), 1.0)
    top = dense.typical(0, 5)
    assert (dense.labels[top] == 0).all() and (np.diff(dense.similarity[top]) <= 0).all()


def test_silhouette_matches_scikit_learn_and_picks_the_planted_k():
    x, truth = planted(40, 4, 12, 0.4, seed=1)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.random.default_rng(0).integers(3, size=len(x))
    assert silhouette(unit, labels) == pytest.approx(
        silhouette_score(unit, labels, metric="cosine"), abs=1e-9
    )
    assert silhouette(unit, truth) == pytest.approx(silhouette_score(unit, truth, metric="cosine"))
    best, scores = choose_n_clusters(array_source(x, 16), len(x), range(2, 8), seed=0)
    assert best == 4 and scores[4] == max(scores.values())


def test_run_clusters_follow_rows_and_use_tracin_similarity(mlp_setup, tmp_path):
    model, train, _, states = mlp_setup
    run = tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states),
                           TensorDataset(*train), store=tmp_path / "r", proj_dim=16,
                           block_rows=8)  # fmt: skip
    feats = [run.read_split("train", c) for c in run.ckpt_ids]
    s = similarity_vectors(run.lrs, feats)
    folded = np.concatenate([b for _, b in run.folded_blocks(relevance="cosine")])
    np.testing.assert_allclose(folded, s, atol=1e-6)  # the unit vectors clustering uses
    rows = np.array([29, 3, 17, 5, 11, 0, 8, 21, 14, 2])
    found = run.clusters(3, rows, seed=0)
    ref = spherical_kmeans(array_source(s[np.sort(rows)]), len(rows), 3, seed=0)
    order = np.argsort(rows)
    assert adjusted_rand_score(found.labels[order], ref.labels) == 1.0
    np.testing.assert_allclose(found.similarity[order], ref.similarity, atol=1e-6)
    assert run.cluster(3, rows).tolist() == found.labels.tolist()
    auto = run.clusters("auto", seed=0)
    assert 2 <= auto.labels.max() + 1 <= 10


def test_bad_cluster_inputs_are_config_errors(mlp_setup, tmp_path):
    model, train, _, states = mlp_setup
    run = tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states),
                           TensorDataset(*train), proj_dim=8)  # fmt: skip
    with pytest.raises(tracin.ConfigError, match="n_clusters=0"):
        run.clusters(0)
    with pytest.raises(tracin.ConfigError, match="outside the 30 training rows"):
        run.clusters(2, [1, 30])
    with pytest.raises(tracin.ConfigError, match="method='ward'"):
        run.cluster(2, method="ward")
    with pytest.raises(tracin.ConfigError, match="'auto' needs method='kmeans'"):
        run.cluster("auto", method="agglomerative")
