"""Mislabel evaluation: metrics against scikit-learn, and a fast quality check that fails when
the ranking regresses."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tracin._eval import MislabelConfig, _auroc, evaluate_mislabel, recall_at


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    flags = rng.random(200) < 0.2
    for scores in (rng.normal(size=200), rng.integers(0, 5, 200).astype(float)):
        assert _auroc(scores, flags) == pytest.approx(roc_auc_score(flags, scores), abs=1e-12)


def test_recall_at():
    scores = np.array([5.0, 4, 3, 2, 1, 0, -1, -2, -3, -4])
    flags = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1], dtype=bool)
    np.testing.assert_allclose(recall_at(scores, flags, (0.1, 0.3, 1.0)), [1 / 3, 2 / 3, 1.0])


def test_brief_regime_quality_on_digits():
    result = evaluate_mislabel(MislabelConfig(seeds=(0,), regime="brief", n_checkpoints=12))
    at10 = {name: r[0, 1] for name, r in result.recall.items()}
    # measured 0.89 (bias, unit weights) and 0.91 (final loss); random finds 0.10
    assert at10["TracIn self-influence, last-layer bias, unit weights"] >= 0.8, at10
    assert at10["random"] < 0.25
    assert result.auroc["TracIn self-influence, all parameters, lr-weighted"][0] > 0.95
    assert len(result.table()) == len(result.recall)
