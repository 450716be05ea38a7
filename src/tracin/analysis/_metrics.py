"""Ranking metrics for flagged rows (e.g. flipped labels): recall at a fraction inspected, AUROC.

One implementation for the evaluations, the demo, the report and the benchmarks. ``scores`` rank
rows by descending value; ``flagged`` is a boolean array of the same length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["auroc", "recall_at", "recall_curve"]


def recall_at(scores: np.ndarray, flagged: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    """Fraction of the flagged rows among the top ``f`` of the rows, each ``f`` in ``fractions``.

    Args:
        scores: ``(N,)``, higher = inspected first (stable order for ties).
        flagged: ``(N,)`` booleans with at least one True.
        fractions: fractions of the N rows inspected, each in ``[0, 1]``.

    Returns:
        ``(len(fractions),)`` recalls in ``[0, 1]``.
    """
    flagged = np.asarray(flagged, dtype=bool)
    order = np.argsort(-np.asarray(scores), kind="stable")
    return np.array(
        [flagged[order[: round(f * len(order))]].sum() / flagged.sum() for f in fractions]
    )


def recall_curve(scores: np.ndarray, flagged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fraction inspected, fraction of flagged rows found)``, each ``(N,)``, by score."""
    flagged = np.asarray(flagged, dtype=bool)
    order = np.argsort(-np.asarray(scores), kind="stable")
    found = np.cumsum(flagged[order]) / max(1, int(flagged.sum()))
    inspected = np.arange(1, len(order) + 1) / len(order)
    return inspected, found


def auroc(scores: np.ndarray, flagged: np.ndarray) -> float:
    """Probability that a flagged row outranks an unflagged one (ties count half).

    The Mann-Whitney statistic with average ranks for ties; needs both kinds of rows.
    """
    flagged = np.asarray(flagged, dtype=bool)
    scores = np.asarray(scores)
    ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable") + 1.0
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]  # average ranks for ties
    pos, neg = int(flagged.sum()), int((~flagged).sum())
    return float((ranks[flagged].sum() - pos * (pos + 1) / 2) / (pos * neg))
