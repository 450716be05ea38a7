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

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from tracin._batch import Batch, Data, iter_batches
from tracin._checkpoints import Checkpoints
from tracin._errors import ConfigError, DataError
from tracin._featurize import RunConfig
from tracin._params import eval_mode
from tracin._relevance import (
    Relevance,
    check_relevance,
    checkpoint_weights,
    inverse_norms,
    normalises,
)
from tracin._run_analysis import RunAnalysis
from tracin._scoring import (
    Neighbors,
    fold,
    lr_scaled_concat,
    lr_weighted_sum,
    merge_top_k,
    products,
    top_k,
)
from tracin._source import GradientSource
from tracin._store import FeatureStore, StoreError
from tracin._task import Task

__all__ = ["Run"]


class Run(RunAnalysis):
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
        self.progress: Callable[[str, int, int], None] | None = None
        """``progress(stage, rows, total)`` after each block or batch of a scoring pass."""

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
            if self.streaming and (query == "train" or query not in self.split_rows):
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

    def _score_blocks(
        self, q_feats: list[torch.Tensor], relevance: Relevance = "tracin"
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(start_row, (Q, rows) scores)`` for each stored block of training rows.

        Blocks are converted to float32 (float64 for a float64 store) before multiplying: a
        float16 matrix multiply is far slower on CPUs, and scores accumulate in float32 or better.
        ``relevance`` (see `tracin._relevance`) divides rows by their per-checkpoint norms.
        """
        dtype = torch.float64 if self.config.dtype == "float64" else torch.float32
        weights = checkpoint_weights(self.lrs, relevance)
        queries = [self._normalised(q.to(dtype), relevance, "query") for q in q_feats]
        if self.config.projection.kind == "last_layer":  # per-checkpoint products of factors
            for k in range(self._n_blocks()):
                terms = []
                for w, ckpt_id, q in zip(weights, self.ckpt_ids, queries, strict=True):
                    block = torch.from_numpy(
                        np.asarray(self.store.read_block("train", ckpt_id, k)[0])
                    ).to(dtype)
                    inner = self._inner(q, block)
                    if normalises(relevance, "train"):
                        inner = inner * inverse_norms(self._feature_norms(block))
                    terms.append((w, inner.numpy()))
                self._advance("score", len(block))
                yield k * self.config.block_rows, lr_weighted_sum(terms)
            return
        # one multiply per block: [w_1 q_1, ..., w_C q_C] @ [f_1, ..., f_C]^T, K = C x dim
        q_cat = lr_scaled_concat(weights, queries)
        buffer: torch.Tensor | None = None
        for k in range(self._n_blocks()):
            blocks = [self.store.read_block("train", c, k)[0] for c in self.ckpt_ids]
            rows = len(blocks[0])
            if buffer is None or buffer.shape[0] != rows:
                buffer = torch.empty(rows, q_cat.shape[1], dtype=dtype)
            col = 0
            for part in blocks:  # float16 -> float32 in a reused buffer: float16 matmul is slow
                view = buffer[:, col : col + part.shape[1]]
                view.copy_(torch.from_numpy(part))
                if normalises(relevance, "train"):
                    view.mul_(inverse_norms(self._feature_norms(view))[:, None])
                col += part.shape[1]
            self._advance("score", rows)
            yield k * self.config.block_rows, products(q_cat, buffer).double().numpy()

    def _feature_norms(self, f: torch.Tensor) -> torch.Tensor:
        """Per-row norm of the gradient the features stand for, ``(rows,)``.

        Last-layer factors ``[a, d]`` give ``||d a^T|| = ||a|| ||d||``; other features their own
        Euclidean norm (exact gradients, or their projection).
        """
        split = self.config.projection.split
        if self.config.projection.kind == "last_layer" and split is not None:
            norms: torch.Tensor = f[:, :split].norm(dim=1) * f[:, split:].norm(dim=1)
            return norms
        norms = f.norm(dim=1)
        return norms

    def _normalised(
        self, f: torch.Tensor, relevance: Relevance, side: Literal["query", "train"]
    ) -> torch.Tensor:
        """``f`` with rows divided by their gradient norms when ``relevance`` asks for it.

        Last-layer factors ``[a, d]`` have only ``d`` scaled: the gradient ``d a^T`` is bilinear.
        """
        if not normalises(relevance, side):
            return f
        inv = inverse_norms(self._feature_norms(f))[:, None].to(f.dtype)
        split = self.config.projection.split
        if self.config.projection.kind == "last_layer" and split is not None:
            return torch.cat([f[:, :split], f[:, split:] * inv], dim=1)
        return f * inv

    def folded_queries(
        self,
        query: Data | Batch | str,
        *,
        query_task: Task | None = None,
        relevance: Relevance = "tracin",
    ) -> np.ndarray:
        """Query vectors ``u(q)`` ``(Q, C * dim)`` float32, with ``<u(q), u(z)>`` = score.

        Args:
            query: as for `influence`.
            query_task: as for `influence`.
            relevance: ``"tracin"`` (raw score), ``"cosine"`` or ``"relatif"``; fold the
                training rows with the same relevance (`folded_blocks`).
        """
        relevance = check_relevance(relevance)
        feats = [
            self._normalised(q.detach().cpu().float(), relevance, "query").numpy()
            for q in self.query_features(query, query_task)
        ]
        weights = checkpoint_weights(self.lrs, relevance)
        return fold(weights, [self._unfactor(f) for f in feats])

    def folded_blocks(
        self, weights: Sequence[float] | None = None, *, relevance: Relevance = "tracin"
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(start_row, (rows, C * dim) float32)`` training vectors ``u(z)``, block by block.

        Args:
            weights: per-checkpoint weights folded in as ``sqrt(w_c)`` (default: the lrs, or
                the lrs over their sum for ``"cosine"``).
            relevance: ``"tracin"`` (raw features), ``"cosine"`` or ``"relatif"`` (each
                checkpoint's rows divided by their gradient norms). With ``"cosine"`` and the
                default weights, the vectors have unit norm (zero-gradient rows: zero).
        """
        relevance = check_relevance(relevance)
        if self.streaming:
            raise ConfigError(
                "folded vectors need stored features: featurize with a store or proj_dim"
            )
        weights = list(weights) if weights is not None else checkpoint_weights(self.lrs, relevance)
        for k in range(self._n_blocks()):
            feats = []
            for c in self.ckpt_ids:
                f = torch.from_numpy(np.asarray(self.store.read_block("train", c, k)[0])).float()
                feats.append(self._unfactor(self._normalised(f, relevance, "train").numpy()))
            self._advance("pass over train", len(feats[0]))
            yield k * self.config.block_rows, fold(weights, feats)

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

    def _advance(self, stage: str, rows: int) -> None:
        if self.progress is not None:
            self.progress(stage, rows, self.n_train)

    def _streamed(
        self, query: Data | Batch | str, query_task: Task | None, relevance: Relevance = "tracin"
    ) -> np.ndarray:
        if self._source is None or self._train_data is None:
            raise ConfigError(
                "this store holds no training features, so queries stream the training "
                "gradients again: reopen with tracin.open(path, model=..., task=..., "
                "train_data=...), or featurize with keep_features=True or proj_dim=..."
            )
        source = self._need_source("streaming mode")
        qtask = _query_task(self.task, query_task)
        assert self.checkpoints is not None and self.task is not None
        task = self.task
        weights = checkpoint_weights(self.lrs, relevance)

        def terms() -> Iterator[tuple[float, np.ndarray]]:
            assert self.checkpoints is not None
            for w, checkpoint in zip(weights, self.checkpoints, strict=True):
                params = source.weights(checkpoint)
                if isinstance(query, str):  # a stored query split (its features are stored)
                    q = self._stored_split(query, checkpoint.id).to(_dtype(self.config.dtype))
                else:
                    q = source.features(params, checkpoint, qtask.query_score, query, "query")[0]
                q = self._normalised(q, relevance, "query")
                out = np.empty((q.shape[0], self.n_train), dtype=np.float64)
                end = 0
                for start, g in _train_batches(source, params, task, self._train_data, checkpoint):
                    end = start + g.shape[0]
                    if end > self.n_train:
                        break
                    g = self._normalised(g, relevance, "train")
                    out[:, start:end] = products(q.to(g), g).double().cpu().numpy()
                    self._advance(f"score {checkpoint.id}", g.shape[0])
                if end != self.n_train:
                    raise _changed(end, self.n_train)
                yield w, out

        with eval_mode(source.model):
            return lr_weighted_sum(terms())

    def influence(
        self,
        query: Data | Batch | str,
        *,
        query_task: Task | None = None,
        relevance: Relevance = "tracin",
    ) -> np.ndarray:
        """TracInCP score of every training row on every query, shape ``(Q, N)``.

        Args:
            query: a batch (tensor, tuple or dict of tensors), a Dataset, a DataLoader, or the
                name of a split stored with `featurize`'s ``queries``.
            query_task: task whose ``query_score`` is differentiated for the queries (default:
                the run's task), e.g. ``ClassificationTask(query="prediction")`` for unlabelled
                queries.
            relevance: ``"tracin"`` (default: the raw TracInCP score), or ``"cosine"`` /
                ``"relatif"`` for the normalised relevances that `neighbors` ranks by
                (see `tracin._relevance`).

        Raises:
            ConfigError: an unknown ``relevance``, or a query the run cannot score.
        """
        relevance = check_relevance(relevance)
        if self.streaming:
            if isinstance(query, str) and (query == "train" or query not in self.split_rows):
                raise ConfigError(
                    f"query split {query!r}: this run stores no features for it; pass the query "
                    "batch itself, or featurize it with queries={...}"
                )
            return self._streamed(query, query_task, relevance)
        q_feats = self.query_features(query, query_task)
        out = np.empty((q_feats[0].shape[0], self.n_train), dtype=np.float64)
        for start, scores in self._score_blocks(q_feats, relevance):
            out[:, start : start + scores.shape[1]] = scores
        return out

    def trak_influence(
        self,
        query: Data | Batch | str,
        *,
        query_task: Task | None = None,
        damping: float = 1.0,
        weighting: Literal["mean", "lr"] = "mean",
    ) -> np.ndarray:
        """TRAK-style preconditioned score (not TracInCP) of every row on every query, ``(Q, N)``.

        ``sum_c w_c phi_c(q)^T (Phi_c^T Phi_c + lambda_c I)^{-1} phi_c(z)`` over the stored
        projected features, ``lambda_c = damping * trace(Phi_c^T Phi_c) / k``, ``w_c = 1 / C``
        (``weighting="mean"``) or ``lr_c`` (``"lr"``); see `tracin._preconditioned` (TRAK, Park
        et al. 2023). The per-checkpoint inverses are built once per damping and cached.

        Raises:
            ConfigError: the store holds no projected features (featurize with ``proj_dim=``),
                a bad ``damping`` or ``weighting``, or a query the run cannot score.
            StoreError: the inverses cannot be saved under ``<run>/preconditioner/``.
        """
        from tracin._preconditioned import trak_influence

        return trak_influence(
            self, query, query_task=query_task, damping=damping, weighting=weighting
        )

    def neighbors(
        self,
        query: Data | Batch | str,
        k: int = 10,
        *,
        query_task: Task | None = None,
        relevance: Relevance = "cosine",
    ) -> tuple[Neighbors, Neighbors]:
        """Proponents and opponents from one pass: ``(proponents, opponents)``.

        Args:
            query: as for `influence`.
            k: rows per query.
            query_task: as for `influence`.
            relevance: how rows are ranked and what ``scores`` hold: ``"cosine"`` (default:
                the lr-weighted mean cosine of per-checkpoint gradients, in ``[-1, 1]``; it
                passes the identical-class and sub-class tests where the raw score fails,
                docs/quality.md), ``"relatif"``, or ``"tracin"`` (the raw TracInCP score).

        Raises:
            ConfigError: bad ``k`` or ``relevance``.
        """
        _check_k(k, self.n_train)
        relevance = check_relevance(relevance)
        if self.streaming:
            scores = self.influence(query, query_task=query_task, relevance=relevance)
            props, opps = top_k(scores, k, largest=True), top_k(scores, k, largest=False)
            return self._shown_pair(props, opps, query, relevance)
        q_feats = self.query_features(query, query_task)
        best: dict[bool, Neighbors] = {}
        for start, scores in self._score_blocks(q_feats, relevance):
            for largest in (True, False):
                best[largest] = _update(best.get(largest), scores, start, k, largest)
        return self._shown_pair(best[True], best[False], query, relevance)

    def proponents(
        self,
        query: Data | Batch | str,
        k: int = 10,
        *,
        query_task: Task | None = None,
        relevance: Relevance = "cosine",
    ) -> Neighbors:
        """The ``k`` training rows most relevant to each query, in favour (see `neighbors`)."""
        return self.neighbors(query, k, query_task=query_task, relevance=relevance)[0]

    def opponents(
        self,
        query: Data | Batch | str,
        k: int = 10,
        *,
        query_task: Task | None = None,
        relevance: Relevance = "cosine",
    ) -> Neighbors:
        """The ``k`` training rows most relevant to each query, against it (see `neighbors`)."""
        return self.neighbors(query, k, query_task=query_task, relevance=relevance)[1]


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


def _dtype(name: str) -> torch.dtype:
    """The dtype scores of a ``name`` store are computed in: float32, or float64."""
    return torch.float64 if name == "float64" else torch.float32
