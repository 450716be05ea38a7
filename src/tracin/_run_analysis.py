"""The analyses a `Run` offers over its stored vectors: clusters, embeddings, the contrast.

A mixin of `tracin._run.Run`, kept apart so each module stays short; the maths live in
`tracin.analysis._similarity` and `tracin.analysis._cluster`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from tracin._errors import ConfigError
from tracin.analysis._cluster import Clusters
from tracin.display._tables import RunDisplay
from tracin.scoring._maths import Neighbors, lr_weighted_sum
from tracin.scoring._relevance import Relevance
from tracin.store._store import EMBEDDING

if TYPE_CHECKING:
    from tracin._run import Run
    from tracin.analysis._suspects import MislabelScores

__all__ = ["RunAnalysis"]


class RunAnalysis(RunDisplay):
    """Clustering, embedding neighbors and the contrastive self-influence of a `Run`."""

    if TYPE_CHECKING:  # provided by Run
        n_train: int
        lrs: tuple[float, ...]
        ckpt_ids: tuple[str, ...]
        streaming: bool

        def read_split(self, split: str, key: str) -> np.ndarray: ...
        def self_influence_by_checkpoint(self) -> np.ndarray: ...
        def _unfactor(self, feats: np.ndarray) -> np.ndarray: ...
        def folded_blocks(
            self, weights: Sequence[float] | None = None, *, relevance: Relevance = "tracin"
        ) -> Iterator[tuple[int, np.ndarray]]: ...

    def contrastive_self_influence(self, k: int = 10, *, lr_weighted: bool = True) -> np.ndarray:
        """Self-influence minus the mean influence on the ``k`` nearest embedding neighbors.

        ``s(z) = TracIn(z, z) - mean_{z' in kNN(z)} TracIn(z, z')``, neighbors by cosine of the
        stored embeddings (``featurize(..., embedding_layer=...)``). A mislabelled example is
        memorised (high self-influence) and its gradient opposes those of its correctly
        labelled neighbors (negative influence on them); a rare but correct example helps its
        neighbors. Ranks mislabelled data better than self-influence alone (docs/quality.md).
        Holds the ``(N, C * dim)`` folded training vectors in memory.

        Args:
            k: neighbors per row.
            lr_weighted: weight checkpoints by their lr (TracInCP); ``False`` gives every
                checkpoint weight 1 (measured slightly better for mislabel detection).
        """
        from tracin.analysis._similarity import nearest_other_rows, neighbor_contrast

        neighbors = nearest_other_rows(self.embeddings("train"), k)
        weights = list(self.lrs) if lr_weighted else [1.0] * len(self.lrs)
        si = lr_weighted_sum(zip(weights, self.self_influence_by_checkpoint(), strict=True))
        vectors = np.concatenate([block for _, block in self.folded_blocks(weights)])
        return neighbor_contrast(si, vectors, neighbors)

    def mislabel_scores(
        self, recipe: str = "contrast", *, k: int = 10, strict: bool = False
    ) -> MislabelScores:
        """The mislabel ranking measured best; see `tracin.analysis._suspects.mislabel_scores`.

        ``run.mislabel_scores().order()`` lists training rows, most suspect first;
        ``recipe="paper"`` gives the lr-weighted self-influence.
        """
        from tracin.analysis._suspects import mislabel_scores

        return self._shown(mislabel_scores(cast("Run", self), recipe, k=k, strict=strict))

    def embeddings(self, split: str = "train") -> np.ndarray:
        """Stored ``embedding_layer`` activations of ``split``, shape ``(rows, width)``."""
        return self.read_split(split, EMBEDDING)

    def embedding_neighbors(
        self, query: str | np.ndarray, k: int = 10
    ) -> tuple[Neighbors, Neighbors]:
        """Nearest and farthest training rows by cosine of embeddings: the baseline to TracIn.

        Args:
            query: a stored split name, or query embeddings ``(Q, width)``.
            k: rows per query.
        """
        from tracin.analysis._similarity import embedding_neighbors

        q = self.embeddings(query) if isinstance(query, str) else np.asarray(query)
        near, far = embedding_neighbors(q, self.embeddings("train"), k)
        split = query if isinstance(query, str) else None
        score = "embedding cosine"
        return (self._shown(near, "nearest by embedding", score, query=split),
                self._shown(far, "farthest by embedding", score, query=split))  # fmt: skip

    def clusters(
        self, n_clusters: int | Literal["auto"] = "auto", rows: Any = None, *, seed: int = 0
    ) -> Clusters:
        """Spherical k-means of training rows by TracIn similarity, memory flat in N.

        TracIn similarity is the ``"cosine"`` relevance (lr-weighted mean cosine of
        per-checkpoint gradients); one pass over the stored blocks per k-means iteration.

        Args:
            n_clusters: number of clusters, or ``"auto"``: the best mean silhouette over 2..10
                on a sample of 2000 rows.
            rows: indices of the training rows to cluster (default: all); results follow
                their order.
            seed: seed of the sample and of k-means++.

        Returns:
            `Clusters(labels, centres, similarity)`; ``Clusters.typical(c, n)`` gives the
            members closest to a centre.

        Raises:
            ConfigError: a streaming run, bad ``rows`` or ``n_clusters``.
        """
        from tracin.analysis._cluster import cluster_run

        return self._shown(cluster_run(cast("Run", self), n_clusters, rows, seed=seed), rows=rows)

    def cluster(
        self,
        n_clusters: int | Literal["auto"] = 8,
        rows: Any = None,
        *,
        method: str = "kmeans",
        seed: int = 0,
    ) -> np.ndarray:
        """Cluster training rows by TracIn similarity; labels ``(rows,)`` in ``0..K-1``.

        Args:
            n_clusters: number of clusters, or ``"auto"`` (see `clusters`).
            rows: indices of the training rows to cluster (default: all).
            method: ``"kmeans"`` (spherical k-means, blockwise, see `clusters`) or
                ``"agglomerative"`` (average linkage on an ``(N, N)`` distance matrix; small
                ``N`` only).
            seed: k-means seed.

        Raises:
            ConfigError: a streaming run, bad ``rows``, ``n_clusters`` or ``method``.
        """
        from tracin.analysis._similarity import cluster, similarity_vectors

        if self.streaming:
            raise ConfigError(
                "clustering needs stored features: featurize with a store or proj_dim=..."
            )
        if method == "kmeans":
            return self.clusters(n_clusters, rows, seed=seed).labels
        if method != "agglomerative":
            raise ConfigError(f"method={method!r}; expected 'kmeans' or 'agglomerative'")
        if not isinstance(n_clusters, int):
            raise ConfigError(f"n_clusters={n_clusters!r}: 'auto' needs method='kmeans'")
        index = np.arange(self.n_train) if rows is None else np.asarray(rows, dtype=np.int64)
        feats = [self._unfactor(self.read_split("train", c)[index]) for c in self.ckpt_ids]
        return cluster(similarity_vectors(self.lrs, feats), n_clusters, method=method, seed=seed)
