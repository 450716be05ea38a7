"""Clustering training rows by TracIn similarity: spherical k-means, blockwise, memory flat in N.

TracIn similarity is the cosine relevance (`tracin.scoring._relevance`): with unit per-checkpoint
features, ``s(z) = concat_c sqrt(w_c) f_c / ||f_c||`` (``w_c = lr_c / sum lr``) has unit norm and
``<s(z), s(z')>`` is the lr-weighted mean cosine. Spherical k-means maximises the sum over rows
of the cosine to the row's centre (centres are unit means of their members).

Every pass reads the vectors block by block from a `BlockSource` (a function that starts a new
pass each time it is called), so memory is ``O(block_rows x D + K x D)`` plus the ``(N,)``
labels. Initialisation: k-means++ on a random sample of rows, refined by Lloyd steps on the
sample, best of ``n_init``; then full passes until at most ``tol`` of the rows change cluster.
The number of clusters can be chosen by the mean silhouette (cosine distance) over a sample,
`choose_n_clusters`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from tracin._errors import ConfigError
from tracin._validate import integer
from tracin.scoring._protocol import StoredRun
from tracin.scoring._relevance import unit_rows

__all__ = [
    "BlockSource",
    "Clusters",
    "choose_n_clusters",
    "cluster_run",
    "silhouette",
    "spherical_kmeans",
]

BlockSource = Callable[[], Iterable[np.ndarray]]


class Clusters(NamedTuple):
    """A clustering of rows.

    Attributes:
        labels: ``(N,)`` int64 cluster of each row, in ``0..K-1``.
        centres: ``(K, D)`` float64 unit centre of each cluster.
        similarity: ``(N,)`` float64 cosine of each row to its cluster's centre (the most
            typical members have the highest).
    """

    labels: np.ndarray
    centres: np.ndarray
    similarity: np.ndarray

    def typical(self, cluster: int, n: int) -> np.ndarray:
        """Row positions of the ``n`` members of ``cluster`` closest to its centre, best first."""
        members = np.flatnonzero(self.labels == cluster)
        order = np.lexsort((members, -self.similarity[members]))
        return members[order[:n]]

    def _repr_html_(self) -> str:
        """A notebook table: per cluster its size and most typical members."""
        from tracin.display._tables import clusters_html

        return clusters_html(self)

    def to_frame(self) -> Any:
        """A pandas DataFrame: cluster, rank (most typical first), row, similarity, label.

        Raises:
            MissingDependencyError: pandas is not installed.
        """
        from tracin.display._tables import clusters_frame

        return clusters_frame(self)


def array_source(vectors: np.ndarray, block_rows: int = 8192) -> BlockSource:
    """A `BlockSource` over an in-memory ``(N, D)`` array."""
    return lambda: (vectors[i : i + block_rows] for i in range(0, len(vectors), block_rows))


def _check_k(n_clusters: object, n: int) -> int:
    return integer("n_clusters", n_clusters, maximum=n, of=" rows")


SAMPLE_BYTES = 128 * 2**20  # the initialisation sample is capped at this many float32 bytes


def sample_rows(blocks: BlockSource, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``size`` distinct rows (unit-normalised, in row order), drawn with ``rng``.

    Fewer rows are drawn when ``size`` rows would exceed `SAMPLE_BYTES` in float32.
    """
    width = next(iter(blocks())).shape[1]
    size = max(1, min(size, n, SAMPLE_BYTES // (4 * max(1, width))))
    chosen = np.sort(rng.choice(n, size=size, replace=False))
    parts, start = [], 0
    for block in blocks():
        lo, hi = np.searchsorted(chosen, [start, start + len(block)])
        parts.append(unit_rows(np.asarray(block)[chosen[lo:hi] - start], np.float32))
        start += len(block)
    return np.concatenate(parts)


def _plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on unit rows (squared chord distance ``2 - 2 cos``)."""
    centres = [x[rng.integers(len(x))]]
    best = np.maximum(2.0 - 2.0 * x @ centres[0], 0.0)
    for _ in range(1, k):
        total = best.sum()
        pick = rng.integers(len(x)) if total <= 0 else rng.choice(len(x), p=best / total)
        centres.append(x[pick])
        best = np.minimum(best, np.maximum(2.0 - 2.0 * x @ x[pick], 0.0))
    return np.stack(centres)


def _lloyd(x: np.ndarray, centres: np.ndarray, iters: int) -> tuple[np.ndarray, float]:
    """Spherical Lloyd steps on in-memory unit rows; returns centres and the mean cosine."""
    labels = np.full(len(x), -1)
    centres = centres.astype(x.dtype)
    for _ in range(iters):
        sims = x @ centres.T
        new = sims.argmax(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        centres = _update_centres(centres, _sums(x, labels, len(centres))).astype(x.dtype)
    return centres.astype(np.float64), float((x @ centres.T).max(axis=1).mean())


def _sums(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per-cluster sums of rows, ``(k, D)`` float64, by one ``(k, rows) @ (rows, D)`` product."""
    onehot = np.zeros((k, len(x)), dtype=x.dtype)
    onehot[labels, np.arange(len(x))] = 1.0
    return np.asarray(onehot @ x, dtype=np.float64)


def _update_centres(old: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Unit means; a cluster left empty keeps its old centre."""
    norms = np.linalg.norm(sums, axis=1)
    return np.where(norms[:, None] > 0, sums / np.where(norms > 0, norms, 1.0)[:, None], old)


def spherical_kmeans(
    blocks: BlockSource,
    n: int,
    n_clusters: int,
    *,
    seed: int = 0,
    max_iter: int = 20,
    tol: float = 1e-3,
    n_init: int = 4,
    sample: int = 5000,
) -> Clusters:
    """Spherical k-means of ``n`` rows read block by block.

    Args:
        blocks: starts a pass over the rows, yielding ``(rows, D)`` arrays in row order; rows
            are unit-normalised here (zero rows stay zero and join cluster 0).
        n: total rows.
        n_clusters: clusters ``K``, ``1 <= K <= n``.
        seed: seed of the sample and the k-means++ draws (``numpy.random.default_rng``).
        max_iter: full passes at most (each reads every row once).
        tol: stop once at most this fraction of the rows changed cluster in a pass.
        n_init: k-means++ starts tried on the sample; the best mean cosine wins.
        sample: rows sampled for initialisation.

    Returns:
        `Clusters` with labels, unit centres and each row's cosine to its centre.

    Raises:
        ConfigError: ``n_clusters`` outside ``1..n``.
    """
    k = _check_k(n_clusters, n)
    rng = np.random.default_rng(seed)
    x = sample_rows(blocks, n, max(sample, 20 * k), rng)
    best: tuple[float, np.ndarray] | None = None
    for _ in range(max(1, n_init)):
        centres, score = _lloyd(x, _plus_plus(x, k, rng), 100)
        if best is None or score > best[0]:
            best = (score, centres)
    assert best is not None
    centres = best[1]
    labels = np.full(n, -1, dtype=np.int64)
    similarity = np.zeros(n)
    for _ in range(max(1, max_iter)):
        sums, changed, start = np.zeros_like(centres), 0, 0
        c32 = centres.astype(np.float32)
        for block in blocks():
            unit = unit_rows(block, np.float32)
            sims = (unit @ c32.T).astype(np.float64)
            new = sims.argmax(axis=1)
            stop = start + len(unit)
            changed += int((labels[start:stop] != new).sum())
            labels[start:stop] = new
            similarity[start:stop] = sims[np.arange(len(unit)), new]
            sums += _sums(unit, new, k)
            start = stop
        if changed <= tol * n:
            break
        centres = _update_centres(centres, sums)
    return Clusters(labels, centres, similarity)


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of unit rows ``x`` under cosine distance ``1 - cos`` (``O(S^2)`` memory).

    Rows alone in their cluster score 0; a single cluster scores 0.
    """
    k = int(labels.max()) + 1
    if k < 2:
        return 0.0
    onehot = np.zeros((len(x), k))
    onehot[np.arange(len(x)), labels] = 1.0
    counts = onehot.sum(axis=0)
    dist_sums = (1.0 - x @ x.T) @ onehot  # (S, K): summed distance of each row to each cluster
    own = counts[labels] - 1
    a = np.divide(dist_sums[np.arange(len(x)), labels], own, out=np.zeros(len(x)), where=own > 0)
    mean = np.divide(dist_sums, counts, out=np.full_like(dist_sums, np.inf), where=counts > 0)
    mean[np.arange(len(x)), labels] = np.inf
    b = mean.min(axis=1)
    s = np.where(own > 0, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def choose_n_clusters(
    blocks: BlockSource,
    n: int,
    candidates: Sequence[int] = tuple(range(2, 11)),
    *,
    seed: int = 0,
    sample: int = 2000,
) -> tuple[int, dict[int, float]]:
    """The number of clusters with the highest mean silhouette on a sample of rows.

    Args:
        blocks: as for `spherical_kmeans`.
        n: total rows.
        candidates: numbers of clusters to try (those above the sample size are skipped).
        seed: seed of the sample and of k-means.
        sample: rows sampled (silhouette costs ``O(sample^2)``).

    Returns:
        ``(best K, {K: mean silhouette})``.

    Raises:
        ConfigError: no candidate between 2 and the sampled rows.
    """
    x = sample_rows(blocks, n, sample, np.random.default_rng(seed))
    usable = sorted({int(c) for c in candidates if 2 <= int(c) <= len(x)})
    if not usable:
        raise ConfigError(
            f"no number of clusters in {list(candidates)} fits {len(x)} rows; pass n_clusters=K "
            "with 2 <= K <= rows"
        )
    scores = {}
    for c in usable:
        labels = spherical_kmeans(array_source(x), len(x), c, seed=seed).labels
        scores[c] = silhouette(x, labels)
    return max(usable, key=lambda c: (scores[c], -c)), scores


def _run_source(run: StoredRun, rows: Any) -> tuple[BlockSource, int, np.ndarray | None]:
    """Unit TracIn-similarity vectors of ``rows`` (sorted, distinct) of ``run``'s training set."""
    if rows is None:
        return (lambda: (b for _, b in run.folded_blocks(relevance="cosine"))), run.n_train, None
    index = np.asarray(rows)
    if index.ndim != 1 or index.size == 0 or not np.issubdtype(index.dtype, np.integer):
        raise ConfigError(f"rows must be a non-empty list of training-row indices, got {rows!r}")
    if index.min() < 0 or index.max() >= run.n_train:
        raise ConfigError(
            f"rows include {int(index.min() if index.min() < 0 else index.max())}, outside the "
            f"{run.n_train} training rows (0..{run.n_train - 1})"
        )
    unique, inverse = np.unique(index.astype(np.int64), return_inverse=True)

    def source() -> Iterator[np.ndarray]:
        for start, block in run.folded_blocks(relevance="cosine"):
            lo, hi = np.searchsorted(unique, [start, start + len(block)])
            if hi > lo:
                yield block[unique[lo:hi] - start]

    return source, len(unique), inverse


def cluster_run(
    run: StoredRun, n_clusters: int | Literal["auto"] = "auto", rows: Any = None, *, seed: int = 0
) -> Clusters:
    """Spherical k-means of a run's training rows by TracIn similarity.

    Args:
        run: a run with stored features.
        n_clusters: clusters, or ``"auto"`` for the best silhouette over 2..10.
        rows: training rows to cluster (default all); results follow this order.
        seed: seed of sampling and k-means.

    Raises:
        ConfigError: a streaming run, bad ``rows`` or ``n_clusters``.
    """
    source, n, inverse = _run_source(run, rows)
    if n_clusters == "auto":
        n_clusters = choose_n_clusters(source, n, seed=seed)[0] if n > 2 else 1
    found = spherical_kmeans(source, n, _check_k(n_clusters, n), seed=seed)
    if inverse is None:
        return found
    return Clusters(found.labels[inverse], found.centres, found.similarity[inverse])
