"""Pure array maths over per-checkpoint results; learning rates are applied here and only here.

TracInCP(z, z') = sum_c lr_c * <g_c(z), g_c(z')>, self_influence(z) = sum_c lr_c * ||g_c(z)||^2.
Callers compute the per-checkpoint inner products; `lr_weighted_sum` weights and adds them, or
`lr_scaled_concat` folds the weights into the queries so one multiply scores every checkpoint.
Proponents are the largest scores, opponents the most negative ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from tracin._batch import products
from tracin._errors import ConfigError
from tracin._validate import integer

__all__ = [
    "update_top_k",
    "Neighbors",
    "fold",
    "lr_scaled_concat",
    "lr_weighted_sum",
    "merge_top_k",
    "products",
    "top_k",
]


class Neighbors(NamedTuple):
    """Retrieved training rows per query, best first.

    Attributes:
        indices: ``(Q, k)`` int64 training-row indices.
        scores: ``(Q, k)`` float64 TracIn scores of those rows.
    """

    indices: np.ndarray
    scores: np.ndarray

    def _repr_html_(self) -> str:
        """A notebook table: per query its top rows with scores, labels and examples."""
        from tracin.display._tables import neighbors_html

        return neighbors_html(self)

    def to_frame(self) -> Any:
        """A pandas DataFrame, one line per (query, rank): query, rank, row, score, label.

        Raises:
            MissingDependencyError: pandas is not installed.
        """
        from tracin.display._tables import neighbors_frame

        return neighbors_frame(self)


def lr_weighted_sum(terms: Iterable[tuple[float, np.ndarray]]) -> np.ndarray:
    """Sum over checkpoints of ``lr_c * term_c``, accumulated in float64.

    Args:
        terms: ``(lr_c, term_c)`` pairs, one per checkpoint; terms share one shape.

    Raises:
        ConfigError: no terms, or terms of different shapes.
    """
    total: np.ndarray | None = None
    for lr, term in terms:
        weighted = float(lr) * np.asarray(term, dtype=np.float64)
        if total is None:
            total = weighted
        elif total.shape != weighted.shape:
            raise ConfigError(
                f"checkpoint terms differ in shape: {total.shape} vs {weighted.shape}"
            )
        else:
            total += weighted
    if total is None:
        raise ConfigError("no checkpoint terms to sum")
    return total


def lr_scaled_concat(lrs: Sequence[float], queries: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[lr_1 q_1, ..., lr_C q_C]``: one multiply with ``[f_1, ..., f_C]`` gives the score.

    Args:
        lrs: one learning rate per checkpoint.
        queries: per checkpoint, ``(Q, dim_c)`` query features.
    """
    if len(lrs) != len(queries):
        raise ConfigError(f"{len(lrs)} learning rates for {len(queries)} checkpoints")
    return torch.cat([float(lr) * q for lr, q in zip(lrs, queries, strict=True)], dim=1)


def fold(lrs: Sequence[float], features: Sequence[np.ndarray]) -> np.ndarray:
    """``u = concat_c sqrt(lr_c) f_c`` so that ``<u(z), u(z')> = sum_c lr_c <f_c(z), f_c(z')>``.

    Args:
        lrs: one learning rate per checkpoint.
        features: per checkpoint, ``(rows, dim_c)`` arrays with the same rows.

    Returns:
        ``(rows, sum_c dim_c)`` float32: the vectors whose inner product is the TracIn score
        (maximum-inner-product search over them retrieves proponents).

    Raises:
        ConfigError: lrs and features of different lengths.
    """
    if len(lrs) != len(features):
        raise ConfigError(f"{len(lrs)} learning rates for {len(features)} checkpoints")
    return np.concatenate(
        [
            np.sqrt(float(lr)) * np.asarray(f, dtype=np.float32)
            for lr, f in zip(lrs, features, strict=True)
        ],
        axis=1,
    ).astype(np.float32, copy=False)


def top_k(scores: np.ndarray, k: int, largest: bool = True) -> Neighbors:
    """The ``k`` largest (or smallest) entries of each row of ``scores`` ``(Q, N)``.

    Ties are broken by the lower index, so results are deterministic and equal to a stable sort.

    Raises:
        ConfigError: ``k`` is not in ``1..N``.
    """
    n = scores.shape[1]
    integer("k", k, maximum=n, of=" training rows")
    signed = -scores if largest else scores
    if k == n:
        indices = np.argsort(signed, axis=1, kind="stable")
    else:
        part = np.argpartition(signed, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(signed, part, axis=1).max(axis=1, keepdims=True)
        # rows where ties straddle the k-th value: fall back to a stable sort for exactness
        tied = np.flatnonzero((signed <= kth).sum(axis=1) > k)
        part[tied] = np.argsort(signed[tied], axis=1, kind="stable")[:, :k]
        picked = np.take_along_axis(signed, part, axis=1)
        order = np.lexsort((part, picked), axis=-1)
        indices = np.take_along_axis(part, order, axis=1)
    indices = indices.astype(np.int64)
    return Neighbors(indices, np.take_along_axis(scores, indices, axis=1).astype(np.float64))


def merge_top_k(first: Neighbors, second: Neighbors, k: int, largest: bool = True) -> Neighbors:
    """Best ``k`` of two candidate sets per query; on ties ``first`` (lower rows) wins."""
    indices = np.concatenate([first.indices, second.indices], axis=1)
    scores = np.concatenate([first.scores, second.scores], axis=1)
    order = np.argsort(-scores if largest else scores, axis=1, kind="stable")[:, :k]
    return Neighbors(
        np.take_along_axis(indices, order, axis=1), np.take_along_axis(scores, order, axis=1)
    )


def update_top_k(
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
