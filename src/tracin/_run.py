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

from tracin._batch import Batch, Data
from tracin._errors import ConfigError
from tracin._run_analysis import RunAnalysis
from tracin._task import Task
from tracin._validate import integer
from tracin.checkpoints._checkpoints import Checkpoints
from tracin.gradients._engines import RunConfig
from tracin.gradients._params import eval_mode
from tracin.gradients._source import GradientSource
from tracin.scoring._maths import (
    Neighbors,
    fold,
    lr_weighted_sum,
)
from tracin.scoring._relevance import (
    Relevance,
    check_relevance,
    checkpoint_weights,
)
from tracin.scoring._stored import StoredScorer
from tracin.scoring._streaming import StreamingScorer
from tracin.scoring._trak import trak_influence
from tracin.store._store import FeatureStore

__all__ = ["Run"]

_NO_FEATURES = {
    False: "folded vectors (clusters, indexes) need stored features, and this store keeps only "
    "the exact squared norms (an exact run wider than 4,096 values): featurize again with "
    "keep_features=True, or with proj_dim=... (e.g. proj_dim=1024, projection='kronecker')",
    True: "folded vectors (clusters, indexes) need stored features, and this run keeps only "
    "exact squared norms: featurize with proj_dim=... (e.g. proj_dim=1024), or with a store "
    "and keep_features=True",
}
""" ``folded_blocks`` without training features: keyed by "the run has no store folder". """


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
        self._stored = StoredScorer(store, config, ckpt_ids, lrs, self.split_rows, self._advance)
        self._scorer: StoredScorer | StreamingScorer = self._stored
        if streaming:
            self._scorer = StreamingScorer(
                source, task, checkpoints, train_data, self._stored, self._advance
            )

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
        return self._stored.n_blocks()

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
        """Query features per checkpoint, each ``(Q, dim)`` float32 (or the model's dtype).

        Raises:
            ConfigError: a split name on a streaming run, or a query batch on a run without the
                model (reopen with ``tracin.open(path, model=..., task=...)``).
            StoreError: the split is not in the store.
        """
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
        """All stored rows of ``split`` for checkpoint id (or embedding) ``key``.

        Raises:
            StoreError: ``split`` is not in the store.
        """
        return self._stored.read_split(split, key)

    def score_blocks(
        self, q_feats: list[torch.Tensor], relevance: Relevance = "tracin"
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(start_row, (Q, rows) scores)`` for each stored block of training rows, one pass.

        The blockwise scorer under `influence` and `neighbors` (memory: one block), for callers
        that hold query features already (e.g. a stored row, as ``tracin review`` does).

        Args:
            q_feats: per checkpoint, the queries' features ``(Q, dim)`` (`query_features`).
            relevance: ``"tracin"`` (raw), ``"cosine"`` or ``"relatif"`` (see `Relevance`).
        """
        return self._stored.score_blocks(q_feats, relevance)

    def _normalised(
        self, f: torch.Tensor, relevance: Relevance, side: Literal["query", "train"]
    ) -> torch.Tensor:
        return self._stored.normalised(f, relevance, side)

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

        Raises:
            ConfigError: the run stores no training features (an exact streaming run), or an unknown
                ``relevance``.
        """
        relevance = check_relevance(relevance)
        if self.streaming:
            raise ConfigError(_NO_FEATURES[self.store.root is None])
        return self._stored.folded_blocks(weights, relevance)

    def _unfactor(self, feats: np.ndarray) -> np.ndarray:
        """Last-layer factors ``[a, d]`` -> the flattened gradient ``d a^T`` (else unchanged)."""
        return self._stored.unfactor(feats)

    def _advance(self, stage: str, rows: int) -> None:
        if self.progress is not None:
            self.progress(stage, rows, self.n_train)

    def influence(
        self,
        query: Data | Batch | str,
        *,
        query_task: Task | None = None,
        relevance: Relevance = "tracin",
    ) -> np.ndarray:
        """TracInCP score of every training row on every query, shape ``(Q, N)``.

        Args:
            query: a batch (tensor, tuple or dict of tensors; a NumPy array counts as
                ``torch.as_tensor(array)``, dtype kept), a Dataset, a DataLoader, or the name of
                a split stored with `featurize`'s ``queries``.
            query_task: task whose ``query_score`` is differentiated for the queries (default:
                the run's task), e.g. ``ClassificationTask(query="prediction")`` for unlabelled
                queries.
            relevance: ``"tracin"`` (default: the raw TracInCP score), or ``"cosine"`` /
                ``"relatif"`` for the normalised relevances that `neighbors` ranks by
                (see `tracin.scoring._relevance`).

        Raises:
            ConfigError: an unknown ``relevance``, or a query the run cannot score.
        """
        relevance = check_relevance(relevance)
        if isinstance(self._scorer, StreamingScorer):
            return self._scorer.influence(query, query_task, relevance)
        return self._stored.influence(self.query_features(query, query_task), relevance)

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
        (``weighting="mean"``) or ``lr_c`` (``"lr"``); see `tracin.scoring._trak` (TRAK, Park
        et al. 2023). The per-checkpoint inverses are built once per damping and cached.

        Raises:
            ConfigError: the store holds no projected features (featurize with ``proj_dim=``),
                a bad ``damping`` or ``weighting``, or a query the run cannot score.
            StoreError: the inverses cannot be saved under ``<run>/preconditioner/``.
        """
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
        if isinstance(self._scorer, StreamingScorer):
            props, opps = self._scorer.neighbors(query, k, query_task, relevance)
        else:
            props, opps = self._stored.neighbors(
                self.query_features(query, query_task), k, relevance
            )
        return self._shown_pair(props, opps, query, relevance)

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


def _query_task(task: Task | None, query_task: Task | None) -> Task:
    qtask = task if query_task is None else query_task
    if not isinstance(qtask, Task):
        raise ConfigError(
            f"query_task is a {type(qtask).__name__}, not a tracin.Task; pass query_task=..."
        )
    return qtask


def _check_k(k: Any, n: int) -> None:
    integer("k", k, maximum=n, of=" training rows")
