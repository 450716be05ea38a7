"""Analysis over stored vectors: TracIn-similarity clustering and the embedding-kNN baseline.

TracIn similarity (for clustering): with unit-normalised per-checkpoint features
``f_c / ||f_c||``, the vector ``s(z) = concat_c sqrt(lr_c) f_c / ||f_c||``, normalised again, and
similarity ``<s(z), s(z')>`` (a cosine); distance ``1 - similarity``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tracin._errors import ConfigError, MissingDependencyError
from tracin._validate import integer
from tracin.scoring._maths import Neighbors, top_k

__all__ = ["cluster", "embedding_neighbors", "similarity_vectors"]


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: np.ndarray = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return out


def similarity_vectors(lrs: Sequence[float], features: Sequence[np.ndarray]) -> np.ndarray:
    """Unit vectors whose inner products are TracIn similarities, ``(rows, sum dim)``."""
    parts = [
        np.sqrt(lr) * _unit(np.asarray(f, dtype=np.float64))
        for lr, f in zip(lrs, features, strict=True)
    ]
    return _unit(np.concatenate(parts, axis=1))


def cluster(
    vectors: np.ndarray, n_clusters: int, *, method: str = "agglomerative", seed: int = 0
) -> np.ndarray:
    """Cluster unit vectors by cosine distance; labels ``(rows,)`` in ``0..n_clusters-1``.

    ``"kmeans"``: spherical k-means (`tracin.analysis._cluster`, no extra dependency);
    ``"agglomerative"``: average linkage on the ``(N, N)`` distances (scikit-learn).

    Raises:
        ConfigError: bad ``n_clusters`` or ``method``, or scikit-learn missing.
    """
    n = len(vectors)
    integer("n_clusters", n_clusters, maximum=n, of=" rows")
    if method == "agglomerative":
        try:
            from sklearn.cluster import AgglomerativeClustering
        except ImportError:
            raise MissingDependencyError(
                "agglomerative clustering needs scikit-learn: pip install 'tracin[analysis]', "
                "or use method='kmeans'"
            ) from None
        distance = np.clip(1.0 - vectors @ vectors.T, 0.0, 2.0)
        model = AgglomerativeClustering(
            n_clusters=n_clusters, metric="precomputed", linkage="average"
        )
        return np.asarray(model.fit_predict(distance), dtype=np.int64)
    if method == "kmeans":
        from tracin.analysis._cluster import array_source, spherical_kmeans

        return spherical_kmeans(array_source(vectors), n, n_clusters, seed=seed).labels
    raise ConfigError(f"method={method!r}; expected 'agglomerative' or 'kmeans'")


def embedding_neighbors(
    queries: np.ndarray, train: np.ndarray, k: int
) -> tuple[Neighbors, Neighbors]:
    """Nearest (most cosine-similar) and farthest training rows per query; scores are cosines.

    Raises:
        ConfigError: bad ``k`` (not in 1..rows), or query and train vectors of different widths.
    """
    if queries.ndim != 2 or queries.shape[1] != train.shape[1]:
        raise ConfigError(
            f"query embeddings of shape {queries.shape} do not match the training embeddings' "
            f"width {train.shape[1]}"
        )
    sims = _unit(np.asarray(queries, np.float64)) @ _unit(np.asarray(train, np.float64)).T
    return top_k(sims, k, largest=True), top_k(sims, k, largest=False)


def nearest_other_rows(embeddings: np.ndarray, k: int, block: int = 2048) -> np.ndarray:
    """Indices ``(N, k)`` of each row's ``k`` most cosine-similar other rows (itself excluded)."""
    n = len(embeddings)
    integer("k", k, maximum=n - 1, of=" other rows")
    unit = _unit(np.asarray(embeddings, np.float64))
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, block):
        sims = unit[start : start + block] @ unit.T
        rows = np.arange(start, min(start + block, n))
        sims[rows - start, rows] = -np.inf
        out[start : start + block] = top_k(sims, k, largest=True).indices
    return out


def neighbor_contrast(
    self_influence: np.ndarray, vectors: np.ndarray, neighbors: np.ndarray
) -> np.ndarray:
    """``self_influence(z) - mean_{z' in neighbors(z)} <u(z), u(z')>`` per row.

    Args:
        self_influence: ``(N,)`` TracIn self-influence.
        vectors: ``(N, D)`` folded vectors ``u`` whose inner products are TracIn scores.
        neighbors: ``(N, k)`` row indices of each row's neighbors.
    """
    cross = np.einsum("nd,nkd->n", vectors, vectors[neighbors], dtype=np.float64)
    contrast: np.ndarray = np.asarray(self_influence, np.float64) - cross / neighbors.shape[1]
    return contrast
