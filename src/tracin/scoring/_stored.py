"""Scores from stored features: one pass over a split's blocks, memory bounded by one block.

Per checkpoint ``c`` the store holds training features ``f_c`` ``(N, dim)`` (exact gradients, a
projection, or last-layer factors); a query's features ``q_c`` come from the store or from the
model. The TracInCP score is ``sum_c lr_c <q_c, f_c>``, computed as one product per block of
``[w_1 q_1, ..., w_C q_C]`` with ``[f_1, ..., f_C]`` (`lr_scaled_concat`); a normalised
relevance divides each side's rows by their per-checkpoint gradient norms first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch

from tracin._errors import StoreError
from tracin.gradients._engines import RunConfig
from tracin.projection import _last_layer as last_layer
from tracin.scoring._maths import (
    Neighbors,
    fold,
    lr_scaled_concat,
    lr_weighted_sum,
    products,
    update_top_k,
)
from tracin.scoring._relevance import Relevance, checkpoint_weights, inverse_norms, normalises
from tracin.store._store import FeatureStore

__all__ = ["StoredScorer"]

Advance = Callable[[str, int], None]
"""``advance(stage, rows)``: progress after each block."""


class StoredScorer:
    """TracInCP scores and folded vectors from a store's per-checkpoint features.

    Args:
        store: the feature store.
        config: the run's configuration (block rows, dtype, projection).
        ckpt_ids: checkpoint ids in training order, length C.
        lrs: one learning rate per checkpoint, length C.
        split_rows: rows of each stored split (``"train"`` is N).
        advance: progress callback ``advance(stage, rows)``.
    """

    def __init__(
        self,
        store: FeatureStore,
        config: RunConfig,
        ckpt_ids: tuple[str, ...],
        lrs: tuple[float, ...],
        split_rows: dict[str, int],
        advance: Advance,
    ) -> None:
        self.store = store
        self.config = config
        self.ckpt_ids = ckpt_ids
        self.lrs = lrs
        self.split_rows = split_rows
        self.n_train = split_rows["train"]
        self.advance = advance
        self.factors = config.projection.factors

    def n_blocks(self, split: str = "train") -> int:
        """Blocks of ``split`` in the store."""
        return -(-self.split_rows[split] // self.config.block_rows)

    def read_split(self, split: str, key: str) -> np.ndarray:
        """All stored rows of ``split`` for checkpoint id (or embedding) ``key``.

        Raises:
            StoreError: ``split`` is not in the store.
        """
        if split not in self.split_rows:
            raise StoreError(
                f"split {split!r} is not in the store (it has {sorted(self.split_rows)}); "
                "featurize it with queries={...}"
            )
        parts = [
            np.asarray(self.store.read_block(split, key, k)[0]) for k in range(self.n_blocks(split))
        ]
        return np.concatenate(parts)

    def feature_norms(self, f: torch.Tensor) -> torch.Tensor:
        """Per-row norm of the gradient the features stand for, ``(rows,)``."""
        return last_layer.feature_norms(f, self.factors)

    def normalised(
        self, f: torch.Tensor, relevance: Relevance, side: Literal["query", "train"]
    ) -> torch.Tensor:
        """``f`` with rows divided by their gradient norms when ``relevance`` asks for it."""
        if not normalises(relevance, side):
            return f
        inv = inverse_norms(self.feature_norms(f)).to(f.dtype)
        return last_layer.normalise(f, self.factors, inv)

    def unfactor(self, feats: np.ndarray) -> np.ndarray:
        """Last-layer factors ``[a, d]`` -> the flattened gradient ``d a^T`` (else unchanged)."""
        return last_layer.unfactor(feats, self.factors)

    def _train_block(self, ckpt_id: str, k: int) -> np.ndarray:
        return np.asarray(self.store.read_block("train", ckpt_id, k)[0])

    def score_blocks(
        self, q_feats: Sequence[torch.Tensor], relevance: Relevance = "tracin"
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(start_row, (Q, rows) scores)`` for each block of training rows, one pass.

        Args:
            q_feats: per checkpoint, the queries' features ``(Q, dim)``.
            relevance: ``"tracin"`` (raw), ``"cosine"`` or ``"relatif"``.

        Blocks are converted to float32 (float64 for a float64 store) before multiplying: a
        float16 matrix multiply is far slower on CPUs, and scores accumulate in float32 or better.
        """
        dtype = torch.float64 if self.config.dtype == "float64" else torch.float32
        weights = checkpoint_weights(self.lrs, relevance)
        queries = [self.normalised(q.to(dtype), relevance, "query") for q in q_feats]
        if self.factors is not None:  # per-checkpoint products of factors
            yield from self._factor_blocks(weights, queries, relevance, dtype)
            return
        # one multiply per block: [w_1 q_1, ..., w_C q_C] @ [f_1, ..., f_C]^T, K = C x dim
        q_cat = lr_scaled_concat(weights, queries)
        buffer: torch.Tensor | None = None
        for k in range(self.n_blocks()):
            blocks = [self._train_block(c, k) for c in self.ckpt_ids]
            rows = len(blocks[0])
            if buffer is None or buffer.shape[0] != rows:
                buffer = torch.empty(rows, q_cat.shape[1], dtype=dtype)
            col = 0
            for part in blocks:  # float16 -> float32 in a reused buffer: float16 matmul is slow
                view = buffer[:, col : col + part.shape[1]]
                view.copy_(torch.from_numpy(part))
                if normalises(relevance, "train"):
                    view.mul_(inverse_norms(self.feature_norms(view))[:, None])
                col += part.shape[1]
            self.advance("score", rows)
            yield k * self.config.block_rows, products(q_cat, buffer).double().numpy()

    def _factor_blocks(
        self,
        weights: Sequence[float],
        queries: Sequence[torch.Tensor],
        relevance: Relevance,
        dtype: torch.dtype,
    ) -> Iterator[tuple[int, np.ndarray]]:
        for k in range(self.n_blocks()):
            terms = []
            rows = 0
            for w, ckpt_id, q in zip(weights, self.ckpt_ids, queries, strict=True):
                block = torch.from_numpy(self._train_block(ckpt_id, k)).to(dtype)
                inner = last_layer.inner(q, block, self.factors)
                if normalises(relevance, "train"):
                    inner = inner * inverse_norms(self.feature_norms(block))
                terms.append((w, inner.numpy()))
                rows = len(block)
            self.advance("score", rows)
            yield k * self.config.block_rows, lr_weighted_sum(terms)

    def influence(
        self, q_feats: Sequence[torch.Tensor], relevance: Relevance = "tracin"
    ) -> np.ndarray:
        """Scores ``(Q, N)`` of every training row on every query."""
        out = np.empty((q_feats[0].shape[0], self.n_train), dtype=np.float64)
        for start, scores in self.score_blocks(q_feats, relevance):
            out[:, start : start + scores.shape[1]] = scores
        return out

    def neighbors(
        self, q_feats: Sequence[torch.Tensor], k: int, relevance: Relevance = "tracin"
    ) -> tuple[Neighbors, Neighbors]:
        """The ``k`` highest and lowest scoring rows per query, from one pass."""
        best: dict[bool, Neighbors] = {}
        for start, scores in self.score_blocks(q_feats, relevance):
            for largest in (True, False):
                best[largest] = update_top_k(best.get(largest), scores, start, k, largest)
        return best[True], best[False]

    def folded_blocks(
        self, weights: Sequence[float] | None = None, relevance: Relevance = "tracin"
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(start_row, (rows, C * dim) float32)`` training vectors ``u(z)``, block by block."""
        weights = list(weights) if weights is not None else checkpoint_weights(self.lrs, relevance)
        for k in range(self.n_blocks()):
            feats = []
            for c in self.ckpt_ids:
                f = torch.from_numpy(self._train_block(c, k)).float()
                feats.append(self.unfactor(self.normalised(f, relevance, "train").numpy()))
            self.advance("pass over train", len(feats[0]))
            yield k * self.config.block_rows, fold(weights, feats)
