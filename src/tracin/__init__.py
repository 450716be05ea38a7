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
"""

from typing import Any

from tracin._api import featurize, open
from tracin._checkpoints import Checkpoint, Checkpoints
from tracin._errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EngineError,
    TaskError,
    TracInError,
    TracInWarning,
)
from tracin._ideal import TracInIdeal
from tracin._index import ExactIndex, FaissIndex, NeighborIndex
from tracin._index import neighbors as index_neighbors
from tracin._predicted import PredictedClassTask
from tracin._recorder import CheckpointRecorder, log_spaced_steps
from tracin._run import Run
from tracin._scoring import Neighbors
from tracin._store import StoreError
from tracin._task import (
    ClassificationTask,
    MultiLabelClassificationTask,
    RegressionTask,
    Task,
    check_task,
)
from tracin.review._decisions import ReviewedLabels, apply_decisions, read_decisions

__version__ = "0.1.0"

_CALLBACKS = {"TracInTrainerCallback": "trainer", "TracInLightningCallback": "lightning"}


def __getattr__(name: str) -> Any:
    """Build the optional framework callbacks on first access (their packages are extras)."""
    if name in _CALLBACKS:
        from tracin import _callbacks

        if _CALLBACKS[name] == "trainer":
            return _callbacks.trainer_callback_class()
        return _callbacks.lightning_callback_class()
    raise AttributeError(f"module 'tracin' has no attribute {name!r}")


__all__ = [
    "Checkpoint",
    "CheckpointRecorder",
    "CheckpointError",
    "Checkpoints",
    "ClassificationTask",
    "ConfigError",
    "DataError",
    "EngineError",
    "ExactIndex",
    "FaissIndex",
    "MultiLabelClassificationTask",
    "NeighborIndex",
    "PredictedClassTask",
    "Neighbors",
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
    "index_neighbors",
    "log_spaced_steps",
    "open",
    "read_decisions",
]
