"""`Run`: TracInCP scores over the training rows of one featurized model.

Two modes share one interface:

- streaming (``store=None``, no projection): featurize keeps only the exact squared norms;
  each query pass loads every checkpoint once and streams exact training gradients, in memory
  ``O(Q x P + B x P + Q x N)``;
- stored (a store directory, or any projection): features were written by featurize; query
  passes read them block by block (memory ``O(Q x block_rows)``), without the model for splits
  that were stored.

Learning rates enter only through `lr_weighted_sum`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tracin._batch import Batch, Data, iter_batches
from tracin._checkpoints import Checkpoints
from tracin._errors import ConfigError, DataError
from tracin._featurize import GradientSource, RunConfig
from tracin._params import eval_mode
from tracin._scoring import (
    Neighbors,
    fold,
    lr_scaled_concat,
    lr_weighted_sum,
    merge_top_k,
    products,
    top_k,
)
from tracin._store import EMBEDDING, FeatureStore, StoreError
from tracin._task import Task

__all__ = ["Run"]


class Run:
    """Scores for one model, task, checkpoints and training set.

    Made by `tracin.featurize` or `tracin.open`. Results are NumPy float64 arrays; column ``j``
    is training row ``j``.
    """

    def __init__(
        self,
        *,
        config: RunConfig,
        ckpt_ids: tuple[str, ...],
        lrs: tuple[float, ...],
        n_train: int,
        store: FeatureStore,
        streaming: bool = False,
        split_rows: dict[str, int] | None = None,
        source: GradientSource | None = None,
        task: Task | None = None,
        checkpoints: Checkpoints | None = None,
        train_data: Any = None,
        sqnorms: np.ndarray | None = None,
    ) -> None:
        self.config = config
        self.ckpt_ids = ckpt_ids
        self.lrs = lrs
        self.n_train = n_train
        self.store = store
        self.streaming = streaming
        self.split_rows = dict(split_rows or {"train": n_train})
        self.task = task
        self.checkpoints = checkpoints
        self._source = source
        self._train_data = train_data
        self._sqnorms = sqnorms

    @property
    def model(self) -> nn.Module | None:
        """The model, when the run has one (``tracin.open`` without a model has none)."""
        return None if self._source is None else self._source.model

    # --- self-influence ---------------------------------------------------------------------
    def self_influence_by_checkpoint(self) -> np.ndarray:
        """Exact ``||g_c(z)||^2`` per checkpoint, without learning rates, shape ``(C, N)``."""
        if self._sqnorms is None:
            blocks = range(self._n_blocks())
            self._sqnorms = np.stack(
                [
                    np.concatenate([self.store.read_block("train", c, k)[1] for k in blocks])
                    for c in self.ckpt_ids
                ]
            )
        return np.array(self._sqnorms, dtype=np.float64, copy=True)

    def self_influence(self) -> np.ndarray:
        """``sum_c lr_c ||g_c(z)||^2`` for every training row, exact, shape ``(N,)``."""
        return lr_weighted_sum(zip(self.lrs, self.self_influence_by_checkpoint(), strict=True))

    # --- influence ----------------------------------------------------------------------------
    def _n_blocks(self) -> int:
        return -(-self.n_train // self.config.block_rows)

    def _need_source(self, what: str) -> GradientSource:
        if self._source is None or self.checkpoints is None:
            raise ConfigError(
                f"{what} needs the model: reopen with tracin.open(path, model=..., task=..., "
                "checkpoints=...) or query a stored split by name"
            )
        return self._source

    def query_features(
        self, query: Data | Batch | str, query_task: Task | None = None
    ) -> list[torch.Tensor]:
        """Query features per checkpoint, each ``(Q, dim)`` float32 (or the model's dtype)."""
        if isinstance(query, str):
            if self.streaming:
                raise ConfigError(
                    f"query split {query!r}: this run streams exact gradients and stores no "
                    "query features; pass the query batch itself, or featurize with a store"
                )
            return [self._stored_split(query, c) for c in self.ckpt_ids]
        source = self._need_source("scoring a query batch")
        qtask = _query_task(self.task, query_task)
        assert self.checkpoints is not None
        out = []
        with eval_mode(source.model):
            for checkpoint in self.checkpoints:
                weights = source.weights(checkpoint)
                feats, _ = source.features(weights, checkpoint, qtask.query_score, query, "query")
                out.append(feats.detach())
        return out

    def _stored_split(self, split: str, ckpt_id: str) -> torch.Tensor:
        return torch.from_numpy(self.read_split(split, ckpt_id))

    def read_split(self, split: str, key: str) -> np.ndarray:
        """All stored rows of ``split`` for checkpoint id (or embedding) ``key``."""
        if split not in self.split_rows:
            raise StoreError(
                f"split {split!r} is not in the store (it has {sorted(self.split_rows)}); "
                "featurize it with queries={...}"
            )
        blocks = -(-self.split_rows[split] // self.config.block_rows)
        parts = [np.asarray(self.store.read_block(split, key, k)[0]) for k in range(blocks)]
        return np.concatenate(parts)

    def _score_blocks(self, q_feats: list[torch.Tensor]) -> Iterator[tuple[int, np.ndarray]]:
        """``(start_row, (Q, rows) scores)`` for each stored block of training rows.

        Blocks are converted to float32 (float64 for a float64 store) before multiplying: a
        float16 matrix multiply is far slower on CPUs, and scores accumulate in float32 or better.
        """
        dtype = torch.float64 if self.config.dtype == "float64" else torch.float32
        queries = [q.to(dtype) for q in q_feats]
        if self.config.projection.kind == "last_layer":  # per-checkpoint products of factors
            for k in range(self._n_blocks()):
                terms = []
                for lr, ckpt_id, q in zip(self.lrs, self.ckpt_ids, queries, strict=True):
                    block = torch.from_numpy(
                        np.asarray(self.store.read_block("train", ckpt_id, k)[0])
                    )
                    terms.append((lr, self._inner(q, block.to(dtype)).numpy()))
                yield k * self.config.block_rows, lr_weighted_sum(terms)
            return
        # one multiply per block: [lr_1 q_1, ..., lr_C q_C] @ [f_1, ..., f_C]^T, K = C x dim
        q_cat = lr_scaled_concat(self.lrs, queries)
        buffer: torch.Tensor | None = None
        for k in range(self._n_blocks()):
            blocks = [self.store.read_block("train", c, k)[0] for c in self.ckpt_ids]
            rows = len(blocks[0])
            if buffer is None or buffer.shape[0] != rows:
                buffer = torch.empty(rows, q_cat.shape[1], dtype=dtype)
            col = 0
            for part in blocks:  # float16 -> float32 in a reused buffer: float16 matmul is slow
                buffer[:, col : col + part.shape[1]].copy_(torch.from_numpy(part))
                col += part.shape[1]
            yield k * self.config.block_rows, products(q_cat, buffer).double().numpy()

    def folded_queries(
        self, query: Data | Batch | str, *, query_task: Task | None = None
    ) -> np.ndarray:
        """Query vectors ``u(q)`` ``(Q, C * dim)`` float32, with ``<u(q), u(z)>`` = score."""
        feats = [
            self._unfactor(q.detach().cpu().numpy()) for q in self.query_features(query, query_task)
        ]
        return fold(self.lrs, feats)

    def folded_blocks(
        self, weights: Sequence[float] | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(start_row, (rows, C * dim) float32)`` training vectors ``u(z)``, block by block.

        Args:
            weights: per-checkpoint weights folded in as ``sqrt(w_c)`` (default: the lrs).
        """
        if self.streaming:
            raise ConfigError(
                "folded vectors need stored features: featurize with a store or proj_dim"
            )
        for k in range(self._n_blocks()):
            feats = [self._unfactor(self.store.read_block("train", c, k)[0]) for c in self.ckpt_ids]
            yield k * self.config.block_rows, fold(weights or self.lrs, feats)

    def _inner(self, q: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Per-checkpoint scores ``(Q, rows)`` from features: ``<g, g'>`` in feature space."""
        split = self.config.projection.split
        if self.config.projection.kind == "last_layer" and split is not None:
            return products(q[:, :split], f[:, :split]) * products(q[:, split:], f[:, split:])
        return products(q, f)

    def _unfactor(self, feats: np.ndarray) -> np.ndarray:
        """Last-layer factors ``[a, d]`` -> the flattened gradient ``d a^T`` (else unchanged)."""
        split = self.config.projection.split
        if self.config.projection.kind != "last_layer" or split is None:
            return feats
        a, d = np.asarray(feats[:, :split], np.float32), np.asarray(feats[:, split:], np.float32)
        return (d[:, :, None] * a[:, None, :]).reshape(len(feats), -1)

    # --- analysis -----------------------------------------------------------------------------
    def contrastive_self_influence(self, k: int = 10, *, lr_weighted: bool = True) -> np.ndarray:
        """Self-influence minus the mean influence on the ``k`` nearest embedding neighbours.

        ``s(z) = TracIn(z, z) - mean_{z' in kNN(z)} TracIn(z, z')``, neighbours by cosine of the
        stored embeddings (``featurize(..., embedding_layer=...)``). A mislabelled example is
        memorised (high self-influence) and its gradient opposes those of its correctly
        labelled neighbours (negative influence on them); a rare but correct example helps its
        neighbours. Ranks mislabelled data better than self-influence alone (docs/quality.md).
        Holds the ``(N, C * dim)`` folded training vectors in memory.

        Args:
            k: neighbours per row.
            lr_weighted: weight checkpoints by their lr (TracInCP); ``False`` gives every
                checkpoint weight 1 (measured slightly better for mislabel detection).
        """
        from tracin._analysis import nearest_other_rows, neighbour_contrast

        neighbours = nearest_other_rows(self.embeddings("train"), k)
        weights = list(self.lrs) if lr_weighted else [1.0] * len(self.lrs)
        si = lr_weighted_sum(zip(weights, self.self_influence_by_checkpoint(), strict=True))
        vectors = np.concatenate([block for _, block in self.folded_blocks(weights)])
        return neighbour_contrast(si, vectors, neighbours)

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
        from tracin._analysis import embedding_neighbors

        q = self.embeddings(query) if isinstance(query, str) else np.asarray(query)
        return embedding_neighbors(q, self.embeddings("train"), k)

    def cluster(
        self, n_clusters: int = 8, rows: Any = None, *, method: str = "agglomerative", seed: int = 0
    ) -> np.ndarray:
        """Cluster training rows by TracIn similarity; labels in ``0..n_clusters-1``.

        Similarity is the cosine of ``concat_c sqrt(lr_c) f_c / ||f_c||`` (unit-normalised
        gradients per checkpoint), distance ``1 - similarity``.

        Args:
            n_clusters: number of clusters.
            rows: indices of the training rows to cluster (default: all).
            method: ``"agglomerative"`` (average linkage on the distances) or ``"kmeans"``
                (on the unit vectors; for many rows).
            seed: k-means seed.
        """
        from tracin._analysis import cluster, similarity_vectors

        if self.streaming:
            raise ConfigError(
                "clustering needs stored features: featurize with a store or proj_dim=..."
            )
        index = np.arange(self.n_train) if rows is None else np.asarray(rows, dtype=np.int64)
        feats = [self._unfactor(self.read_split("train", c)[index]) for c in self.ckpt_ids]
        return cluster(similarity_vectors(self.lrs, feats), n_clusters, method=method, seed=seed)

    def _streamed(self, query: Data | Batch, query_task: Task | None) -> np.ndarray:
        source = self._need_source("streaming mode")
        qtask = _query_task(self.task, query_task)
        assert self.checkpoints is not None and self.task is not None
        task = self.task

        def terms() -> Iterator[tuple[float, np.ndarray]]:
            assert self.checkpoints is not None
            for checkpoint in self.checkpoints:
                weights = source.weights(checkpoint)
                q, _ = source.features(weights, checkpoint, qtask.query_score, query, "query")
                out = np.empty((q.shape[0], self.n_train), dtype=np.float64)
                end = 0
                for start, g in _train_batches(source, weights, task, self._train_data, checkpoint):
                    end = start + g.shape[0]
                    if end > self.n_train:
                        break
                    out[:, start:end] = products(q, g).double().cpu().numpy()
                if end != self.n_train:
                    raise _changed(end, self.n_train)
                yield checkpoint.lr, out

        with eval_mode(source.model):
            return lr_weighted_sum(terms())

    def influence(self, query: Data | Batch | str, *, query_task: Task | None = None) -> np.ndarray:
        """TracInCP score of every training row on every query, shape ``(Q, N)``.

        Args:
            query: a batch (tensor, tuple or dict of tensors), a Dataset, a DataLoader, or the
                name of a split stored with `featurize`'s ``queries``.
            query_task: task whose ``query_score`` is differentiated for the queries (default:
                the run's task), e.g. ``ClassificationTask(query="prediction")`` for unlabelled
                queries.
        """
        if self.streaming:
            if isinstance(query, str):
                raise ConfigError(f"query split {query!r}: this run has no store")
            return self._streamed(query, query_task)
        q_feats = self.query_features(query, query_task)
        out = np.empty((q_feats[0].shape[0], self.n_train), dtype=np.float64)
        for start, scores in self._score_blocks(q_feats):
            out[:, start : start + scores.shape[1]] = scores
        return out

    def neighbors(
        self, query: Data | Batch | str, k: int = 10, *, query_task: Task | None = None
    ) -> tuple[Neighbors, Neighbors]:
        """Proponents and opponents from one pass: ``(proponents, opponents)``."""
        _check_k(k, self.n_train)
        if self.streaming:
            scores = self.influence(query, query_task=query_task)
            return top_k(scores, k, largest=True), top_k(scores, k, largest=False)
        q_feats = self.query_features(query, query_task)
        best: dict[bool, Neighbors] = {}
        for start, scores in self._score_blocks(q_feats):
            for largest in (True, False):
                best[largest] = _update(best.get(largest), scores, start, k, largest)
        return best[True], best[False]

    def proponents(
        self, query: Data | Batch | str, k: int = 10, *, query_task: Task | None = None
    ) -> Neighbors:
        """The ``k`` training rows with the largest scores on each query (helped it most)."""
        return self.neighbors(query, k, query_task=query_task)[0]

    def opponents(
        self, query: Data | Batch | str, k: int = 10, *, query_task: Task | None = None
    ) -> Neighbors:
        """The ``k`` training rows with the most negative scores on each query (hurt it most)."""
        return self.neighbors(query, k, query_task=query_task)[1]


def _update(
    best: Neighbors | None, scores: np.ndarray, start: int, k: int, largest: bool
) -> Neighbors:
    """Merge one block's ``(Q, rows)`` scores into the running top ``k``.

    Once ``k`` rows are held, only queries with a score strictly beyond their current k-th are
    touched (equal scores at later rows never displace earlier ones), so most blocks cost one
    comparison pass instead of a partial sort.
    """
    if best is not None and best.indices.shape[1] == k:
        kth = best.scores[:, -1:]
        rows = np.flatnonzero((scores > kth if largest else scores < kth).any(axis=1))
        if rows.size == 0:
            return best
        part = top_k(scores[rows], min(k, scores.shape[1]), largest=largest)
        merged = merge_top_k(Neighbors(best.indices[rows], best.scores[rows]),
                             Neighbors(part.indices + start, part.scores), k, largest)  # fmt: skip
        best.indices[rows], best.scores[rows] = merged.indices, merged.scores
        return best
    part = top_k(scores, min(k, scores.shape[1]), largest=largest)
    part = Neighbors(part.indices + start, part.scores)
    return part if best is None else merge_top_k(best, part, k, largest)


def _query_task(task: Task | None, query_task: Task | None) -> Task:
    qtask = task if query_task is None else query_task
    if not isinstance(qtask, Task):
        raise ConfigError(
            f"query_task is a {type(qtask).__name__}, not a tracin.Task; pass query_task=..."
        )
    return qtask


def _train_batches(
    source: GradientSource, weights: dict[str, torch.Tensor], task: Task, data: Any, ckpt: Any
) -> Iterator[tuple[int, torch.Tensor]]:
    start = 0
    for batch in iter_batches(data, source.batch_size):
        g, _ = source.batch_features(weights, task.train_loss, batch, ckpt, start, "train")
        yield start, g
        start += g.shape[0]


def _changed(end: int, n: int) -> Exception:
    return DataError(
        f"the training data now has {'more' if end > n else 'fewer'} rows than the {n} "
        "featurized; featurize again after changing the data"
    )


def _check_k(k: Any, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"k={k!r} must be an integer between 1 and the {n} training rows")
