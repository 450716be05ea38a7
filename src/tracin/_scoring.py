"""Pure array maths over per-checkpoint results; learning rates are applied here and only here.

TracInCP(z, z') = sum_c lr_c * <g_c(z), g_c(z')>, self_influence(z) = sum_c lr_c * ||g_c(z)||^2.
Callers compute the per-checkpoint inner products; `lr_weighted_sum` weights and adds them.
Proponents are the largest scores, opponents the most negative ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from tracin._errors import ConfigError

__all__ = ["Neighbors", "lr_weighted_sum", "top_k"]


class Neighbors(NamedTuple):
    """Retrieved training rows per query, best first.

    Attributes:
        indices: ``(Q, k)`` int64 training-row indices.
        scores: ``(Q, k)`` float64 TracIn scores of those rows.
    """

    indices: np.ndarray
    scores: np.ndarray


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


def top_k(scores: np.ndarray, k: int, largest: bool = True) -> Neighbors:
    """The ``k`` largest (or smallest) entries of each row of ``scores`` ``(Q, N)``.

    Ties are broken by the lower index, so results are deterministic.

    Raises:
        ConfigError: ``k`` is not in ``1..N``.
    """
    n = scores.shape[1]
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n:
        raise ConfigError(f"k={k!r} must be an integer between 1 and the {n} training rows")
    signed = -scores if largest else scores
    indices = np.argsort(signed, axis=1, kind="stable")[:, :k].astype(np.int64)
    return Neighbors(indices, np.take_along_axis(scores, indices, axis=1).astype(np.float64))
