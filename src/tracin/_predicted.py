"""Explaining what the model predicted: the loss of the predicted class as the query score.

An explanation of a prediction should follow the prediction, not the label: a "1" predicted as
"8" is explained by the training rows that pushed it towards "8". `PredictedClassTask` is a
`ClassificationTask` whose query score is the cross-entropy of the class the model predicts
(``argmax`` of the logits of ``reference``, the model explained, at every checkpoint, as a label
would be; one-logit binary models: the predicted side), so a positive influence
(a proponent) means the training step raised the predicted class's log-probability. On a
correctly predicted query it equals the label's loss; it needs no label.

Why not ``ClassificationTask(query="prediction")`` (the predicted class's raw logit)? Ranked by
the cosine, the raw logit's gradient is no contrast between classes (raising every logit raises
it), and its top proponent had the query's class in 0.19-0.41 of the correctly predicted
queries, against 0.98-1.00 for the predicted class's loss (digits and MNIST-1D superclasses,
docs/quality.md, `tracin eval explain`). And for model randomisation: with re-initialised
weights the predicted class changes, and so does the explanation (top-10 overlap 0.08-0.14
against 0.44-0.64 for the label's loss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tracin._batch import Batch
from tracin._task import ClassificationTask, Model, Task, _cross_entropy, _is_binary

__all__ = ["PredictedClassTask", "predicted_class_task", "predictions"]


def _predicted(logits: torch.Tensor) -> torch.Tensor:
    """The predicted class per row, ``(B,)``."""
    if _is_binary(logits):
        return logits.detach().reshape(-1).ge(0).long()
    return logits.detach().argmax(dim=1)


@dataclass(frozen=True)
class PredictedClassTask(ClassificationTask):
    """`ClassificationTask` whose query score is the cross-entropy of the predicted class.

    Attributes:
        reference: the model whose prediction is explained (e.g. the final weights): its
            predicted class is the target at every checkpoint, as a label would be. ``None``:
            each checkpoint's own prediction (near initialisation a different class).

    Raises:
        ConfigError: a field of the wrong kind, as for `ClassificationTask`.
    """

    reference: nn.Module | None = field(default=None, compare=False, repr=False)

    def query_score(self, model: Model, batch: Batch) -> torch.Tensor:
        """Cross-entropy of each row's predicted class, shape ``(B,)``."""
        logits = self.predict(model, batch)
        judge = logits if self.reference is None else self.predict(self.reference, batch)
        return _cross_entropy(logits, _predicted(judge))


def predicted_class_task(
    task: Task, reference: nn.Module | None = None
) -> PredictedClassTask | None:
    """``task`` with the predicted class's loss as its query score (same inputs, labels, output).

    Returns ``None`` when ``task`` is no `ClassificationTask` (no class to predict).
    """
    if not isinstance(task, ClassificationTask):
        return None
    keep = {f.name: getattr(task, f.name) for f in dataclasses.fields(task)
            if f.init and f.name not in ("query", "query_class")}  # fmt: skip
    return PredictedClassTask(**keep, reference=reference)


def predictions(
    model: nn.Module, task: ClassificationTask, state: dict[str, Any], batches: Sequence[Batch]
) -> tuple[list[int], list[int]]:
    """Predicted classes and labels of ``batches`` with weights ``state`` (the model is restored).

    Returns:
        ``(predicted, labels)``, one int per row of the batches in order.
    """
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    pred: list[int] = []
    labels: list[int] = []
    try:
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            for batch in batches:
                pred += _predicted(task.predict(model, batch)).tolist()
                labels += task.targets(batch).reshape(-1).long().tolist()
    finally:
        model.load_state_dict(saved)
        model.train(was_training)
    return pred, labels
