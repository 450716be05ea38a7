"""The programs the CLI ships: ``tracin demo`` and the evaluations (they train models).

Contract: each is a library function returning a result with a table, JSON and plots —
`run_demo`, `evaluate_mislabel`, `evaluate_explain`, `evaluate_cluster`, `evaluate_fix` — built on
bundled data (scikit-learn's digits, MNIST-1D), seeded, and reproducible from the CLI.
"""

from tracin.experiments._cluster import ClusterResult, cluster_scores, evaluate_cluster
from tracin.experiments._cluster import timing as cluster_timing
from tracin.experiments._demo import DemoCNN, run_demo
from tracin.experiments._explain import COLUMNS as EXPLAIN_COLUMNS
from tracin.experiments._explain import ExplainResult, evaluate_explain, explain_scores
from tracin.experiments._fix import FixConfig, FixResult, evaluate_fix
from tracin.experiments._mislabel import (
    MislabelConfig,
    MislabelResult,
    cleanlab_scores,
    evaluate_mislabel,
    train_mlp,
)
from tracin.experiments._setup import SetupConfig, prepare

__all__ = [
    "EXPLAIN_COLUMNS",
    "cleanlab_scores",
    "cluster_scores",
    "cluster_timing",
    "explain_scores",
    "prepare",
    "train_mlp",
    "ClusterResult",
    "DemoCNN",
    "ExplainResult",
    "FixConfig",
    "FixResult",
    "MislabelConfig",
    "MislabelResult",
    "SetupConfig",
    "evaluate_cluster",
    "evaluate_explain",
    "evaluate_fix",
    "evaluate_mislabel",
    "run_demo",
]
