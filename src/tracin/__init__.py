"""tracin: which training examples made a model predict what it predicts.

TracInCP (Pruthi et al., NeurIPS 2020): the influence of training example z on query z' is
``sum_c lr_c * <g_c(z), g_c(z')>`` over checkpoints c saved during training, with g_c the
gradient of the per-example loss (or of a prediction score, for unlabelled queries).

    import tracin
    task = tracin.ClassificationTask()
    ckpts = tracin.Checkpoints.from_paths(paths, lr=[0.1, 0.1, 0.01])
    run = tracin.featurize(model, task, ckpts, train_dataset)
    run.self_influence()              # (N,)
    run.proponents(query_batch, k=10) # Neighbors(indices, scores), each (Q, k)

``tracin.TracInTrainerCallback`` (Hugging Face ``Trainer``, extra ``[hf]``) and
``tracin.TracInLightningCallback`` (extra ``[lightning]``) record checkpoints like
`CheckpointRecorder`; they are built on first access, so ``import tracin`` imports neither package.

This module holds the user API. The roles of the data flow are subpackages, each with its contract
in its ``__init__``: `tracin.checkpoints`, `tracin.gradients`, `tracin.projection`, `tracin.store`,
`tracin.scoring`, `tracin.analysis`, `tracin.pipeline` (featurize, open), `tracin.report`,
`tracin.review`, `tracin.cli` and `tracin.experiments` (the demo and the evaluations).
"""

from typing import Any

from tracin._errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EngineError,
    HookError,
    MissingDependencyError,
    StoreError,
    TaskError,
    TracInError,
    TracInWarning,
)
from tracin._predicted import PredictedClassTask
from tracin._run import Run
from tracin._task import (
    ClassificationTask,
    MultiLabelClassificationTask,
    RegressionTask,
    Task,
    check_task,
)
from tracin._version import __version__
from tracin.analysis import Clusters, MislabelScores
from tracin.checkpoints import Checkpoint, CheckpointRecorder, Checkpoints, log_spaced_steps
from tracin.pipeline import TracInIdeal, featurize, open
from tracin.review import ReviewedLabels, apply_decisions, read_decisions
from tracin.scoring import ExactIndex, FaissIndex, NeighborIndex, Neighbors


def __getattr__(name: str) -> Any:
    """Build the optional framework callbacks on first access (their packages are extras)."""
    if name in ("TracInTrainerCallback", "TracInLightningCallback"):
        from tracin import checkpoints

        return getattr(checkpoints, name)
    raise AttributeError(f"module 'tracin' has no attribute {name!r}")


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointRecorder",
    "Checkpoints",
    "ClassificationTask",
    "Clusters",
    "ConfigError",
    "DataError",
    "EngineError",
    "ExactIndex",
    "FaissIndex",
    "HookError",
    "MislabelScores",
    "MissingDependencyError",
    "MultiLabelClassificationTask",
    "NeighborIndex",
    "Neighbors",
    "PredictedClassTask",
    "RegressionTask",
    "ReviewedLabels",
    "Run",
    "StoreError",
    "Task",
    "TaskError",
    "TracInError",
    "TracInIdeal",
    "TracInWarning",
    "__version__",
    "apply_decisions",
    "check_task",
    "featurize",
    "log_spaced_steps",
    "open",
    "read_decisions",
]
