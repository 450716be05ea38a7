"""TracIn-ideal: the exact influence, accumulated at every optimiser step of a training loop.

Plain SGD moves the weights by ``w_{t+1} = w_t - eta_t * grad L_t(w_t)``, where ``L_t`` is the
loss of the step's batch ``B_t``: the mean ``(1 / |B_t|) sum_{z in B_t} l(w_t, z)`` or the sum
``sum_{z in B_t} l(w_t, z)``. To first order the step changes a query's score ``f(w, z')`` by
``-eta_t <grad L_t(w_t), grad f(w_t, z')>``, one term per training example in the batch.
TracIn-ideal (Pruthi et al., NeurIPS 2020, section 2) credits each example with its terms:

    ideal(z, z') = sum over steps t with z in B_t of (eta_t / s_t) <grad l(w_t, z), grad f(w_t, z')>

with ``s_t = |B_t|`` for a mean-reduced loss and ``s_t = 1`` for a summed one. Positive means the
example lowered the query's score (for a loss: it helped). Summed over every example and step it
is the first-order estimate of ``f(w_0, z') - f(w_T, z')``, exact as the learning rate shrinks.
Parameter groups with different learning rates give ``<g, diag(eta) g'>``, eta per parameter.

The definition is for plain SGD (the paper's): momentum and Adam move the weights along a
history of gradients, so a step's change is not the sum of its batch's terms. `TracInIdeal.step`
refuses such an optimiser; pass ``lr=`` yourself to record the SGD-equivalent terms anyway. L2
weight decay in SGD is accepted; its share of the change is credited to no example.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from tracin._batch import Batch, batch_size, map_tensors, slice_batch
from tracin._errors import ConfigError, DataError
from tracin._task import Task, check_task
from tracin._validate import integer
from tracin.gradients._functional import FunctionalEngine, functional_model
from tracin.gradients._params import eval_mode, select_parameters, unwrap_model

__all__ = ["TracInIdeal"]

Reduction = Literal["mean", "sum"]


class TracInIdeal:
    """Accumulate TracIn-ideal scores of every training example on a fixed set of queries.

    Call `step` once per optimiser step, after ``loss.backward()`` and BEFORE
    ``optimizer.step()``, with the batch, the training-set indices of its rows, and the
    optimiser (or the step's lr)::

        ideal = tracin.TracInIdeal(model, task, query_batch, n_train=len(train_set),
                                   loss_reduction="mean")
        for batch, indices in loader:
            loss = task.train_loss(model, batch).mean()
            optimizer.zero_grad(); loss.backward()
            ideal.step(batch, indices, optimizer)
            optimizer.step(); scheduler.step()
        ideal.scores                      # (Q, N) float64

    Gradients are taken with ``torch.func`` (``vmap(grad)``) at the model's current weights in
    eval mode; the model, its ``.grad`` fields and the optimiser are left untouched. With
    dropout or batch norm the training step itself runs in train mode, so its terms are
    approximated by the eval-mode ones. A step costs
    per-example gradients of the batch and of the queries: a few training steps, and memory for
    ``(B + Q) x P`` floats (P = differentiated parameters; restrict them with ``layers``).

    Args:
        model: the network being trained.
        task: its per-example ``train_loss`` and the queries' ``query_score``.
        queries: one batch (tensor, tuple or dict of tensors) of Q query examples.
        n_train: number of training examples; indices passed to `step` lie in ``[0, n_train)``.
        loss_reduction: how the loss the optimiser steps on reduces the batch's per-example
            losses: ``"mean"`` (divide each term by the batch size) or ``"sum"``.
        layers: module or parameter names to differentiate (``None``: every trainable one).
            Scores over a subset are the part of the influence carried by those parameters.
        query_batch_size: queries per ``vmap`` call, to bound memory.

    Raises:
        ConfigError: a bad argument, named with the fix.
        TaskError: the task is not per-example on the queries.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        queries: Batch,
        *,
        n_train: int,
        loss_reduction: Reduction,
        layers: Sequence[str] | None = None,
        query_batch_size: int = 64,
    ) -> None:
        _check_args(model, task, n_train, loss_reduction, query_batch_size)
        model = unwrap_model(model)  # DataParallel/DDP/torch.compile share the inner parameters
        self.model = model
        self.task = task
        self.loss_reduction = loss_reduction
        self.query_batch_size = query_batch_size
        self.names = tuple(select_parameters(model, layers))
        self._engine = FunctionalEngine(model, self.names)
        self._queries = _to_device(queries, model)
        self._n_queries = batch_size(self._queries)
        self._scores: np.ndarray = np.zeros((self._n_queries, n_train), dtype=np.float64)
        self._checked = False
        self.n_steps = 0
        with eval_mode(model):
            check_task(task, functional_model(model, self._weights()), self._queries,
                       ("query_score",))  # fmt: skip

    @property
    def n_train(self) -> int:
        """Number of training examples (columns of `scores`)."""
        return int(self._scores.shape[1])

    @property
    def scores(self) -> np.ndarray:
        """TracIn-ideal so far, shape ``(Q, n_train)``, float64 (a copy)."""
        return np.array(self._scores, dtype=np.float64, copy=True)

    def step(
        self,
        batch: Batch,
        indices: Sequence[int] | np.ndarray | torch.Tensor,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        lr: float | None = None,
    ) -> None:
        """Add one optimiser step's terms; call it before ``optimizer.step()``.

        Args:
            batch: the step's training batch, as ``task.train_loss`` takes it.
            indices: training-set index of each row of ``batch``, length B.
            optimizer: the optimiser about to step; its learning rates (per parameter group)
                are read now, so they are the ones this step uses. Plain SGD only.
            lr: the step's learning rate, instead of ``optimizer`` (any optimiser; you vouch
                that ``lr * gradient`` is the update you want credited).

        Raises:
            ConfigError: neither or both of ``optimizer`` and ``lr``; an optimiser other than
                plain SGD; a bad lr.
            DataError: indices of the wrong length or outside ``[0, n_train)``.
        """
        batch = _to_device(batch, self.model)
        n = batch_size(batch)
        rows = self._indices(indices, n)
        scale = self._lr_vector(optimizer, lr)
        weights = self._weights()
        with eval_mode(self.model):
            if not self._checked:
                model_fn = functional_model(self.model, weights)
                check_task(self.task, model_fn, batch, ("train_loss",))
                self._checked = True
            train = self._engine.gradients(weights, self.task.train_loss, batch)
            query = self._query_gradients(weights)
        divisor = n if self.loss_reduction == "mean" else 1
        terms = (query * scale.to(query.dtype)) @ train.T / divisor
        np.add.at(self._scores.T, rows, terms.T.detach().double().cpu().numpy())  # repeats add up
        self.n_steps += 1

    def _weights(self) -> dict[str, torch.Tensor]:
        state = {n: p.detach() for n, p in self.model.named_parameters()}
        state.update({n: b.detach() for n, b in self.model.named_buffers()})
        return state

    def _query_gradients(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        chunks = []
        for start in range(0, self._n_queries, self.query_batch_size):
            stop = min(start + self.query_batch_size, self._n_queries)
            part = slice_batch(self._queries, start, stop)
            chunks.append(self._engine.gradients(weights, self.task.query_score, part))
        return torch.cat(chunks)

    def _indices(self, indices: Any, n: int) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        rows = np.asarray(indices)
        if rows.ndim != 1 or rows.shape[0] != n or not np.issubdtype(rows.dtype, np.integer):
            raise DataError(
                f"indices have shape {rows.shape} and dtype {rows.dtype}; expected {n} integers, "
                "the training-set index of each row of the batch (e.g. from a Dataset that "
                "returns (x, y, index))"
            )
        bad = rows[(rows < 0) | (rows >= self.n_train)]
        if bad.size:
            raise DataError(
                f"indices {bad[:5].tolist()} lie outside [0, {self.n_train}); pass the index of "
                "each row in the training set, or a larger n_train"
            )
        return rows.astype(np.int64)

    def _lr_vector(self, optimizer: torch.optim.Optimizer | None, lr: float | None) -> torch.Tensor:
        """The step's lr for every differentiated coordinate, shape ``(P,)``."""
        if (optimizer is None) == (lr is None):
            raise ConfigError(
                "pass exactly one of optimizer=<the optimiser about to step> or lr=<its lr> "
                "to TracInIdeal.step"
            )
        params = dict(self.model.named_parameters())
        if lr is not None:
            per_name = {name: _checked_lr(lr, "lr") for name in self.names}
        else:
            assert optimizer is not None
            per_name = _optimizer_lrs(optimizer, {n: params[n] for n in self.names})
        device = next(iter(params.values())).device
        parts = [
            torch.full((params[n].numel(),), per_name[n], dtype=torch.float64) for n in self.names
        ]
        return torch.cat(parts).to(device)


def _check_args(
    model: Any, task: Any, n_train: Any, loss_reduction: Any, query_batch_size: Any
) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model is a {type(model).__name__}, not a torch.nn.Module")
    if not isinstance(task, Task):
        raise ConfigError(f"task is a {type(task).__name__}, not a tracin.Task")
    for name, value in (("n_train", n_train), ("query_batch_size", query_batch_size)):
        integer(name, value)
    if loss_reduction not in ("mean", "sum"):
        raise ConfigError(
            f"loss_reduction={loss_reduction!r}; expected 'mean' (the optimiser steps on the "
            "batch's mean loss) or 'sum' (on its summed loss)"
        )


def _checked_lr(value: Any, where: str) -> float:
    try:
        lr = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r} is not a number") from None
    if not math.isfinite(lr) or lr < 0:
        raise ConfigError(f"{where}={value!r}; a learning rate must be finite and >= 0")
    return lr


def _optimizer_lrs(
    optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Each parameter's lr in ``optimizer`` (0 for one it does not update); plain SGD only."""
    if type(optimizer) is not torch.optim.SGD:
        raise ConfigError(
            f"TracIn-ideal is defined for plain SGD; the optimiser is {type(optimizer).__name__}, "
            "whose update is not lr x the batch gradient. Use torch.optim.SGD without momentum, "
            "or pass lr=<the step's lr> to record the SGD-equivalent terms knowingly"
        )
    lrs: dict[int, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        for key, plain in (("momentum", 0), ("nesterov", False), ("maximize", False)):
            if group.get(key, plain) != plain:
                raise ConfigError(
                    f"param group {i} has {key}={group[key]!r}; TracIn-ideal is defined for "
                    f"plain SGD ({key}={plain!r}). Remove it, or pass lr=<the step's lr> to "
                    "record the SGD-equivalent terms knowingly"
                )
        lr = _checked_lr(group["lr"], f"param group {i} lr")
        lrs.update({id(p): lr for p in group["params"]})
    return {name: lrs.get(id(p), 0.0) for name, p in params.items()}


def _to_device(batch: Batch, model: nn.Module) -> Batch:
    device = next(iter(model.parameters()), torch.empty(0)).device
    return map_tensors(lambda t: t.to(device), batch)
