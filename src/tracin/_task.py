"""The user seam: what is differentiated for training and query examples.

A `Task` maps ``(model, batch)`` to one number per example:

- ``train_loss(model, batch) -> (B,)``: the per-example training loss, f(w, z) of TracIn.
- ``query_score(model, batch) -> (B,)``: what the query gradient is taken of; the loss for a
  labelled query (the default), or a prediction score for an unlabelled one.

``model`` is whatever callable the engine hands in (the user's module, or a functional view of
it with a checkpoint's weights); tasks only call it. Both methods must not reduce over the batch:
`check_task` catches a mean- or sum-reduced loss and a wrong shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812

from tracin._batch import Batch, Key, batch_size, select, slice_batch
from tracin._errors import ConfigError, DataError, TaskError

__all__ = ["ClassificationTask", "RegressionTask", "Task", "check_task"]

Model = Callable[..., Any]
QueryScore = Literal["loss", "prediction"]


class Task:
    """Base class: subclass it and implement `train_loss` (and `query_score` if it differs).

    The per-example contract: each method returns a tensor of shape ``(B,)`` whose entry ``i``
    depends on example ``i`` only. Call `check_task` on a real batch to verify it.
    """

    def train_loss(self, model: Model, batch: Batch) -> torch.Tensor:
        """Per-example training loss, shape ``(B,)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement train_loss")

    def query_score(self, model: Model, batch: Batch) -> torch.Tensor:
        """Per-example query score, shape ``(B,)``; the training loss unless overridden."""
        return self.train_loss(model, batch)


def _call(model: Model, inputs: Any, unpack: bool) -> Any:
    if isinstance(inputs, dict) and unpack:
        return model(**inputs)
    if isinstance(inputs, tuple | list) and unpack:
        return model(*inputs)
    return model(inputs)


@dataclass(frozen=True)
class _SupervisedTask(Task):
    """Shared batch plumbing: where the inputs and labels sit, and how the model is called.

    Attributes:
        inputs: key or index of the model input in the batch; ``None`` means "everything but the
            labels", passed as keyword arguments for dict batches and positionally for tuples;
            a plain tensor batch is the input itself.
        labels: key or index of the targets; ``None`` means index 1 of a tuple batch or key
            ``"labels"`` of a dict batch.
        output: for models that return a dict or tuple (Hugging Face ``logits``), the key or index
            of the prediction tensor in the output; ``None`` uses the output as is.
        query: ``"loss"`` (labelled queries) or ``"prediction"`` (unlabelled queries).
    """

    inputs: Key | None = None
    labels: Key | None = None
    output: Key | None = None
    query: QueryScore = "loss"

    def __post_init__(self) -> None:
        if self.query not in ("loss", "prediction"):
            raise ConfigError(f"query={self.query!r}; expected 'loss' or 'prediction'")

    def _labels_key(self, batch: Batch) -> Key:
        if self.labels is not None:
            return self.labels
        return "labels" if isinstance(batch, dict) else 1

    def targets(self, batch: Batch) -> torch.Tensor:
        """The label tensor of ``batch``."""
        value = select(batch, self._labels_key(batch), "labels")
        if not isinstance(value, torch.Tensor):
            raise TaskError(f"labels must be a tensor, got {type(value).__name__}")
        return value

    def predict(self, model: Model, batch: Batch) -> torch.Tensor:
        """Model output for ``batch`` (logits or predictions), shape ``(B, ...)``."""
        if isinstance(batch, torch.Tensor):
            out = model(batch)
        elif self.inputs is not None:
            out = _call(model, select(batch, self.inputs, "inputs"), unpack=False)
        elif isinstance(batch, dict):
            key = self._labels_key(batch)
            out = model(**{k: v for k, v in batch.items() if k != key})
        else:
            key = self._labels_key(batch)
            # an unlabelled tuple batch (x,) has no label at index 1: pass everything
            in_range = isinstance(key, int) and -len(batch) <= key < len(batch)
            idx = key % len(batch) if in_range and isinstance(key, int) else None
            out = model(*[v for i, v in enumerate(batch) if i != idx])
        if self.output is not None:
            out = select(out, self.output, "output")
        if not isinstance(out, torch.Tensor):
            raise TaskError(
                f"model returned {type(out).__name__}, not a tensor; pass output=<key> to the task "
                "(e.g. output='logits' for Hugging Face models)"
            )
        return out


@dataclass(frozen=True)
class ClassificationTask(_SupervisedTask):
    """Cross-entropy on logits of shape ``(B, K)`` (or ``(B,)``/``(B, 1)`` binary logits).

    Query scores: ``query="loss"`` (default) differentiates the cross-entropy of the query's
    label; ``query="prediction"`` differentiates the logit of ``query_class`` if given, else of
    the class the model predicts, and needs no label.

    Attributes:
        query_class: class whose logit is the prediction score; ``None`` = the predicted class.
    """

    query_class: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query_class is not None and self.query != "prediction":
            raise ConfigError(
                f"query_class={self.query_class} applies only to query='prediction'; "
                "pass query='prediction' as well"
            )

    def train_loss(self, model: Model, batch: Batch) -> torch.Tensor:
        """Per-example cross-entropy, shape ``(B,)``."""
        logits = self.predict(model, batch)
        y = self.targets(batch)
        if logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1):
            return F.binary_cross_entropy_with_logits(
                logits.reshape(-1), y.reshape(-1).to(logits.dtype), reduction="none"
            )
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise TaskError(
                f"class labels have dtype {y.dtype}; cross-entropy needs integer class indices "
                "(convert with labels.long())"
            )
        return F.cross_entropy(logits, y.long(), reduction="none")

    def query_score(self, model: Model, batch: Batch) -> torch.Tensor:
        """The loss, or the logit of the chosen/predicted class, shape ``(B,)``."""
        if self.query == "loss":
            return self.train_loss(model, batch)
        logits = self.predict(model, batch)
        if logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1):
            return logits.reshape(-1)
        if self.query_class is not None:
            if not 0 <= self.query_class < logits.shape[1]:
                raise ConfigError(
                    f"query_class={self.query_class} is outside the {logits.shape[1]} classes"
                )
            return logits[:, self.query_class]
        predicted = logits.detach().argmax(dim=1, keepdim=True)
        return logits.gather(1, predicted).squeeze(1)


@dataclass(frozen=True)
class RegressionTask(_SupervisedTask):
    """Squared error ``sum over outputs of (prediction - target)^2`` per example.

    Query scores: ``query="loss"`` (default) or ``query="prediction"``, the prediction itself
    (summed over outputs when there are several), which needs no target.
    """

    def train_loss(self, model: Model, batch: Batch) -> torch.Tensor:
        """Per-example squared error, shape ``(B,)``."""
        pred = self.predict(model, batch)
        y = self.targets(batch).to(pred.dtype)
        if y.numel() != pred.numel():
            raise TaskError(
                f"targets of shape {tuple(y.shape)} do not match predictions of shape "
                f"{tuple(pred.shape)}"
            )
        return (pred.reshape(pred.shape[0], -1) - y.reshape(pred.shape[0], -1)).pow(2).sum(1)

    def query_score(self, model: Model, batch: Batch) -> torch.Tensor:
        """The loss, or the prediction, shape ``(B,)``."""
        if self.query == "loss":
            return self.train_loss(model, batch)
        pred = self.predict(model, batch)
        return pred.reshape(pred.shape[0], -1).sum(1)


def _checked(name: str, scores: Any, n: int) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TaskError(f"{name} returned {type(scores).__name__}; it must return a tensor")
    if tuple(scores.shape) != (n,):
        hint = (
            " (a scalar: the loss was reduced over the batch; use reduction='none')"
            if scores.dim() == 0
            else ""
        )
        raise TaskError(f"{name} returned shape {tuple(scores.shape)}, expected ({n},){hint}")
    if not scores.dtype.is_floating_point:
        raise TaskError(f"{name} returned dtype {scores.dtype}; it must be floating point")
    return scores


def check_task(
    task: Task, model: Model, batch: Batch, methods: Sequence[str] = ("train_loss", "query_score")
) -> None:
    """Verify that ``task`` is per-example on a real ``batch``.

    Checks, for each method: a tensor of shape ``(B,)``, floating point, and that scoring the
    first ``B - 1`` examples alone gives the same values as in the full batch (a mean-reduced
    loss broadcast to ``(B,)``, or any mixing across examples, fails this).

    Raises:
        TaskError: naming the method and what is wrong.
    """
    n = batch_size(batch)
    with torch.no_grad():
        for name in methods:
            fn = getattr(task, name)
            full = _checked(name, fn(model, batch), n)
            bad = torch.nonzero(~torch.isfinite(full)).flatten().tolist()
            if bad:
                raise DataError(
                    f"{name} is not finite for rows {bad[:10]} of the first batch; check those "
                    "examples (NaN/inf inputs or labels)"
                )
            if n < 2:
                continue
            part = _checked(name, fn(model, slice_batch(batch, 0, n - 1)), n - 1)
            tol = 1e-4 * (1.0 + float(full.abs().max()))
            if not torch.allclose(full[: n - 1], part, rtol=1e-4, atol=tol):
                raise TaskError(
                    f"{name} is not per-example: scores of the first {n - 1} examples change when "
                    "the last one is dropped (a loss reduced with 'mean' or 'sum' and broadcast, "
                    "or batch-mixing layers in train mode); return one unreduced value per example"
                )
