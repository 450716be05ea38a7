"""Relevance: how proponents, opponents and neighbors are ranked.

TracInCP ranks training rows by ``sum_c lr_c <g_c(q), g_c(z)>``. That raw score is dominated by
rows with large gradients (mislabelled and rare examples), which then crowd every query's
proponents: Hanawa et al. (ICLR 2021) found such dot products fail their identical-class and
sub-class tests where the cosine of gradients passes. The relevances offered:

- ``"cosine"`` (the default for retrieval): per checkpoint the cosine of the two gradients,
  averaged with the learning rates as weights,
  ``sum_c lr_c cos(g_c(q), g_c(z)) / sum_c lr_c``, in ``[-1, 1]``;
- ``"relatif"``: only the training side normalised per checkpoint (RelatIF-style),
  ``sum_c lr_c <g_c(q), g_c(z)> / ||g_c(z)||``;
- ``"tracin"``: the raw TracInCP score (what `Run.influence` returns by default).

Norms are those of the features themselves (exact gradients, last-layer factors
``||a|| ||d||``, or projected features): with projection, the cosine of the projected vectors
ranked as well as the projected inner product over exact norms (docs/quality.md), and it stays
a cosine. Rows whose gradient is zero get relevance 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from tracin._errors import ConfigError

__all__ = ["RELEVANCES", "Relevance", "check_relevance", "checkpoint_weights", "inverse_norms"]

Relevance = Literal["cosine", "relatif", "tracin"]
RELEVANCES: tuple[str, ...] = ("cosine", "relatif", "tracin")


def check_relevance(relevance: object) -> Relevance:
    """Return ``relevance`` if it names a relevance.

    Raises:
        ConfigError: anything else, naming the choices.
    """
    if not isinstance(relevance, str) or relevance not in RELEVANCES:
        raise ConfigError(
            f"relevance={relevance!r}; expected one of {list(RELEVANCES)} ('cosine' ranks by "
            "the cosine of gradients, 'tracin' by the raw TracInCP score)"
        )
    return relevance  # type: ignore[return-value]


def checkpoint_weights(lrs: Sequence[float], relevance: Relevance) -> list[float]:
    """Per-checkpoint weights: the lrs, divided by their sum for ``"cosine"`` (a mean cosine).

    Raises:
        ConfigError: ``"cosine"`` with learning rates summing to zero.
    """
    if relevance != "cosine":
        return [float(lr) for lr in lrs]
    total = float(sum(lrs))
    if total <= 0.0:
        raise ConfigError(
            f"relevance='cosine' weights checkpoints by lr, but the lrs {list(lrs)} sum to "
            f"{total}; use relevance='tracin' or positive learning rates"
        )
    return [float(lr) / total for lr in lrs]


def normalises(relevance: Relevance, side: Literal["query", "train"]) -> bool:
    """Whether rows on ``side`` are divided by their per-checkpoint norms."""
    return relevance == "cosine" or (relevance == "relatif" and side == "train")


def inverse_norms(norms: torch.Tensor) -> torch.Tensor:
    """``1 / norms`` with 0 where a norm is 0 (a zero gradient is relevant to nothing)."""
    return torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)


def unit_rows(x: np.ndarray, dtype: type[np.floating[Any]] = np.float64) -> np.ndarray:
    """Rows of ``x`` divided by their Euclidean norms (zero rows stay zero), in ``dtype``."""
    x = np.asarray(x, dtype=dtype)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: np.ndarray = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return out
