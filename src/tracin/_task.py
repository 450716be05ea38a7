"""The user seam: what is differentiated for training and query examples.

A `Task` maps ``(model, batch)`` to one number per example:

- ``train_loss(model, batch) -> (B,)``: the per-example training loss, f(w, z) of TracIn.
- ``query_score(model, batch) -> (B,)``: what the query gradient is taken of; the loss for a
  labelled query (the default), or a prediction score for an unlabelled one.

The sign: TracIn's influence is ``lr * <grad train_loss, grad query_score>``, and one SGD step of
``lr`` on a training example changes the query score by about minus that. So a positive score
means the training step *lowered* the query score. The ready-made tasks therefore define the
prediction query score as the *negated* outcome (``-logit``, ``-prediction``): with
``query="prediction"``, a positive influence (a proponent) means the training step *raised* the
outcome, the way the model went; with ``query="loss"`` it means the step lowered the query's loss.

Where a batch keeps its inputs and labels, and what ``inputs=``/``labels=`` say: `tracin._layout`.

``model`` is whatever callable the engine hands in (the user's module, or a functional view of
it with a checkpoint's weights); tasks only call it. Both methods must not reduce over the batch:
`check_task` catches a mean- or sum-reduced loss and a wrong shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F  # noqa: N812

from tracin._batch import Batch, Key, batch_size, describe, select, slice_batch
from tracin._errors import ConfigError, DataError, TaskError
from tracin._layout import (
    Inputs,
    as_class_index,
    as_inputs,
    as_key,
    label_item,
    layout_fix,
    model_args,
)

__all__ = [
    "ClassificationTask",
    "MultiLabelClassificationTask",
    "RegressionTask",
    "Task",
    "check_task",
]

Model = Callable[..., Any]
QueryScore = Literal["loss", "prediction"]


class Task:
    """Base class: subclass it and implement `train_loss` (and `query_score` if it differs).

    The per-example contract: each method returns a tensor of shape ``(B,)`` whose entry ``i``
    depends on example ``i`` only. Call `check_task` on a real batch to verify it. A query score
    is read like a loss: influence is positive when a training step lowers it.
    """

    def train_loss(self, model: Model, batch: Batch) -> torch.Tensor:
        """Per-example training loss, shape ``(B,)``.

        Raises:
            NotImplementedError: always; a subclass implements it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement train_loss")

    def query_score(self, model: Model, batch: Batch) -> torch.Tensor:
        """Per-example query score, shape ``(B,)``; the training loss unless overridden."""
        return self.train_loss(model, batch)


def _checked_class(query_class: int, n_classes: int, what: str) -> int:
    if not -n_classes <= query_class < n_classes:
        raise ConfigError(
            f"query_class={query_class} is outside the {n_classes} {what} (0..{n_classes - 1})"
        )
    return query_class % n_classes


@dataclass(frozen=True)
class _SupervisedTask(Task):
    """Shared batch plumbing: where the inputs and labels sit, and how the model is called.

    The fields ``inputs``, ``labels``, ``output`` and ``query`` are documented where they are
    declared, so that the API reference shows them on each public task.

    Raises:
        ConfigError: a value of the wrong kind, naming it and the fix.
    """

    inputs: Inputs | Sequence[Key] | None = None
    """Where the model inputs sit: an index (tuple batch) or key (dict batch), passed as one
    argument; or a tuple/list of them, passed positionally in that order (tuple batches) or as
    keyword arguments (dict batches). ``None``: a tensor batch is the input, a tuple/list of one
    or two items is ``(inputs,)``/``(inputs, labels)``, a dict batch passes every key but the
    labels as keyword arguments; a longer tuple needs ``inputs``/``labels`` (the items other than
    ``labels``, when only that is set)."""
    labels: Key | None = None
    """Index or key of the targets; ``None``: index 1 of a two-item batch, the one item
    ``inputs`` leaves, or key ``"labels"`` of a dict batch. Prediction queries never read it."""
    output: Key | None = None
    """For models that return a dict or tuple (Hugging Face ``logits``), the key or index of the
    prediction tensor in the output; ``None`` uses the output as is."""
    query: QueryScore = "loss"
    """``"loss"`` (labelled queries) or ``"prediction"`` (unlabelled queries)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", as_inputs(self.inputs))
        if isinstance(self.labels, tuple | list):
            raise ConfigError(
                f"labels={self.labels!r}: the labels are one item of the batch; pass one index "
                "or key, e.g. labels=2 (inputs=(0, 1) takes several)"
            )
        object.__setattr__(self, "labels", as_key(self.labels, "labels"))
        object.__setattr__(self, "output", as_key(self.output, "output"))
        if self.query not in ("loss", "prediction"):
            raise ConfigError(
                f"query={self.query!r}; expected 'loss' (labelled queries) or 'prediction' "
                "(unlabelled queries)"
            )
        keys = self.inputs if isinstance(self.inputs, tuple) else (self.inputs,)
        if self.labels is not None and self.labels in keys:
            raise ConfigError(f"labels={self.labels!r} is also in inputs={self.inputs!r}")

    def _inputs(self) -> Inputs | None:
        return cast("Inputs | None", self.inputs)  # a tuple or one key after __post_init__

    def targets(self, batch: Batch) -> torch.Tensor:
        """The label tensor of ``batch``.

        Raises:
            TaskError: the batch holds no labels where the task looks, or they are no tensor.
        """
        value = label_item(batch, self._inputs(), self.labels, type(self).__name__)
        if not isinstance(value, torch.Tensor):
            raise TaskError(
                f"labels must be a tensor, got {type(value).__name__}; convert them with "
                "torch.as_tensor(labels)"
            )
        return value

    def predict(self, model: Model, batch: Batch) -> torch.Tensor:
        """Model output for ``batch`` (logits or predictions), shape ``(B, ...)``.

        Raises:
            TaskError: the model cannot be called with the batch's inputs, or its output holds
                no tensor where ``output`` says.
        """
        owner = type(self).__name__
        args, kwargs = model_args(batch, self._inputs(), self.labels, owner)
        try:
            out = model(*args, **kwargs)
        except TypeError as exc:
            if "argument" not in str(exc):
                raise
            passed = [describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in kwargs.items()]
            raise TaskError(
                f"calling the model with ({', '.join(passed)}) failed: {exc}; the batch is "
                f"{describe(batch)}: tell the task which items are inputs, e.g. "
                f"{layout_fix(batch, owner)}"
            ) from exc
        if self.output is not None:
            out = select(out, self.output, "output", "model output")
        if not isinstance(out, torch.Tensor):
            keys = list(out) if isinstance(out, Mapping) else None
            hint = f"output={keys[0]!r} (its keys: {keys})" if keys else "output=0"
            raise TaskError(
                f"model returned {type(out).__name__}, not a tensor; pass {hint} to the task "
                "(e.g. output='logits' for Hugging Face models)"
            )
        return out


def _is_binary(logits: torch.Tensor) -> bool:
    return logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy of ``(B, K)`` logits (or binary ``(B,)``/``(B, 1)``)."""
    n, shapes = logits.shape[0], f"labels {tuple(y.shape)}, logits {tuple(logits.shape)}"
    if _is_binary(logits):
        if y.numel() != n:
            raise TaskError(
                f"binary (one-logit) classification takes one 0/1 label per example; got "
                f"{shapes} (for K classes the model must output K logits)"
            )
        z = logits.reshape(-1)
        return F.binary_cross_entropy_with_logits(z, y.reshape(-1).to(z.dtype), reduction="none")
    if logits.dim() != 2:
        raise TaskError(
            f"ClassificationTask takes logits of shape (B, K) or binary (B,)/(B, 1); got {shapes}; "
            "for per-token outputs subclass tracin.Task and sum the loss over tokens per example"
        )
    if y.dim() == 2 and tuple(y.shape) == tuple(logits.shape):
        raise TaskError(
            f"labels have the logits' shape ({shapes}): for several labels per example (multi-hot "
            "targets) use tracin.MultiLabelClassificationTask(); for one-hot class labels pass "
            "labels.argmax(1)"
        )
    if y.dim() == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.dim() != 1 or y.shape[0] != n:
        raise TaskError(f"ClassificationTask takes one class index per example; got {shapes}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TaskError(
            f"class labels have dtype {y.dtype}; cross-entropy needs integer class indices "
            "(convert with labels.long())"
        )
    return F.cross_entropy(logits, y.long(), reduction="none")


def _class_outcome(logits: torch.Tensor, query_class: int | None) -> torch.Tensor:
    """The logit a prediction query follows, ``(B,)``: see `ClassificationTask`."""
    if _is_binary(logits):
        z = logits.reshape(-1)
        if query_class is not None:
            return z if _checked_class(query_class, 2, "classes of a one-logit model") else -z
        return (z.detach().ge(0).to(z.dtype) * 2 - 1) * z  # the predicted side's log-odds
    if query_class is not None:
        return logits[:, _checked_class(query_class, logits.shape[1], "classes")]
    predicted = logits.detach().argmax(dim=1, keepdim=True)
    return logits.gather(1, predicted).squeeze(1)


@dataclass(frozen=True)
class ClassificationTask(_SupervisedTask):
    """Cross-entropy on logits of shape ``(B, K)`` (or ``(B,)``/``(B, 1)`` binary logits).

    Labels are integer class indices ``(B,)`` (0/1 for binary logits, any dtype). Several labels
    per example (multi-hot) are `MultiLabelClassificationTask`'s.

    Query scores: ``query="loss"`` (default) differentiates the cross-entropy of the query's
    label (positive influence: the training step lowered the query's loss). ``query="prediction"``
    needs no label and follows the predicted class's logit; for a binary one-logit model the
    log-odds of the predicted side (``+logit`` if ``logit >= 0``, else ``-logit``); with
    ``query_class=c`` class ``c``'s logit (binary: ``c=1`` the logit, ``c=0`` its negation).
    The score is that outcome negated, so a positive influence (a proponent) means the training
    step raised it.

    Attributes:
        query_class: class whose logit the prediction score follows; ``None`` = the predicted
            class. Negative indices count from the end.

    Raises:
        ConfigError: a field of the wrong kind (see ``inputs``, ``labels``, ``output``,
            ``query``), or ``query_class`` without ``query="prediction"``.
    """

    query_class: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "query_class", as_class_index(self.query_class))
        if self.query_class is not None and self.query != "prediction":
            raise ConfigError(
                f"query_class={self.query_class} applies only to query='prediction'; "
                "pass query='prediction' as well"
            )

    def train_loss(self, model: Model, batch: Batch) -> torch.Tensor:
        """Per-example cross-entropy, shape ``(B,)``.

        Raises:
            TaskError: labels of a shape or dtype cross-entropy cannot take, naming the fix.
        """
        y = self.targets(batch)  # first: a missing label is named before the model runs
        return _cross_entropy(self.predict(model, batch), y)

    def query_score(self, model: Model, batch: Batch) -> torch.Tensor:
        """The loss, or minus the followed logit (see the class docstring), shape ``(B,)``."""
        if self.query == "loss":
            return self.train_loss(model, batch)
        return -_class_outcome(self.predict(model, batch), self.query_class)


@dataclass(frozen=True)
class MultiLabelClassificationTask(_SupervisedTask):
    """Independent labels per example: logits ``(B, L)``, multi-hot targets ``(B, L)``.

    The training loss is the sum over the ``L`` labels of binary cross-entropy with logits
    (``BCEWithLogitsLoss``), one value per example; targets may be 0/1 of any dtype or
    probabilities.

    Query scores: ``query="loss"`` (default), or ``query="prediction"``, which needs no label
    and follows the sum of the logits of the labels the model predicts present (``logit > 0``;
    if none is, the most likely label's logit), or label ``query_class``'s logit. The score is
    that outcome negated, so a positive influence (a proponent) means the training step raised
    it: the predicted labels became more confident.

    Attributes:
        query_class: label whose logit the prediction score follows; ``None`` = the predicted
            labels.

    Raises:
        ConfigError: a field of the wrong kind (see ``inputs``, ``labels``, ``output``,
            ``query``), or ``query_class`` without ``query="prediction"``.
    """

    query_class: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "query_class", as_class_index(self.query_class))
        if self.query_class is not None and self.query != "prediction":
            raise ConfigError(
                f"query_class={self.query_class} applies only to query='prediction'; "
                "pass query='prediction' as well"
            )

    def train_loss(self, model: Model, batch: Batch) -> torch.Tensor:
        """Per-example sum over labels of binary cross-entropy, shape ``(B,)``.

        Raises:
            TaskError: targets whose shape does not match the logits', naming the fix.
        """
        y = self.targets(batch)
        logits = self.predict(model, batch)
        z = logits.reshape(logits.shape[0], -1)
        if y.numel() != z.numel():
            hint = (
                "; one class index per example is ClassificationTask's (or one-hot it with "
                "F.one_hot(labels, num_labels).float())"
                if y.dim() == 1
                else ""
            )
            raise TaskError(
                f"multi-hot labels of shape {tuple(y.shape)} do not match the logits' shape "
                f"{tuple(logits.shape)}{hint}"
            )
        target = y.reshape(z.shape).to(z.dtype)
        return F.binary_cross_entropy_with_logits(z, target, reduction="none").sum(1)

    def query_score(self, model: Model, batch: Batch) -> torch.Tensor:
        """The loss, or minus the followed logits' sum (see the class docstring), ``(B,)``."""
        if self.query == "loss":
            return self.train_loss(model, batch)
        logits = self.predict(model, batch)
        z = logits.reshape(logits.shape[0], -1)
        if self.query_class is not None:
            return -z[:, _checked_class(self.query_class, z.shape[1], "labels")]
        held = z.detach()
        present = held > 0
        top = held == held.max(dim=1, keepdim=True).values
        chosen = present | (top & ~present.any(dim=1, keepdim=True))
        return -(z * chosen.to(z.dtype)).sum(1)


@dataclass(frozen=True)
class RegressionTask(_SupervisedTask):
    """Squared error ``sum over outputs of (prediction - target)^2`` per example.

    Query scores: ``query="loss"`` (default), or ``query="prediction"``, which needs no target
    and follows the prediction (summed over outputs when there are several). The score is the
    prediction negated, so a positive influence (a proponent) means the training step raised
    the prediction, and an opponent lowered it.

    Raises:
        ConfigError: a field of the wrong kind (see ``inputs``, ``labels``, ``output``,
            ``query``).
    """

    def train_loss(self, model: Model, batch: Batch) -> torch.Tensor:
        """Per-example squared error, shape ``(B,)``.

        Raises:
            TaskError: targets with a different number of values than the predictions.
        """
        y = self.targets(batch)
        pred = self.predict(model, batch)
        y = y.to(pred.dtype)
        if y.numel() != pred.numel():
            raise TaskError(
                f"targets of shape {tuple(y.shape)} do not match predictions of shape "
                f"{tuple(pred.shape)}"
            )
        return (pred.reshape(pred.shape[0], -1) - y.reshape(pred.shape[0], -1)).pow(2).sum(1)

    def query_score(self, model: Model, batch: Batch) -> torch.Tensor:
        """The loss, or minus the prediction (summed over outputs), shape ``(B,)``."""
        if self.query == "loss":
            return self.train_loss(model, batch)
        pred = self.predict(model, batch)
        return -pred.reshape(pred.shape[0], -1).sum(1)


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
        DataError: a score is NaN or infinite (naming the rows of ``batch``).
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
