"""`featurize` and `Run`: TracInCP scores for a model, a task, checkpoints and training data.

Exact mode (no projection, no store): featurize makes one pass over the training data per
checkpoint and keeps the exact squared gradient norms ``||g_c(z)||^2`` (self-influence needs
nothing else). Each query pass (`Run.influence`, `Run.proponents`, `Run.opponents`) loads each
checkpoint once, takes the query gradients, then streams the training gradients batch by batch:
memory is ``O(Q x P + B x P + Q x N)``, never ``N x N`` or ``N x P``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from tracin._batch import Batch, Data, batch_size, iter_batches, map_tensors
from tracin._checkpoints import Checkpoint, Checkpoints
from tracin._engine import FunctionalEngine, ScoreFn
from tracin._errors import ConfigError, DataError
from tracin._params import eval_mode, fit_state, select_parameters
from tracin._scoring import Neighbors, lr_weighted_sum, top_k
from tracin._task import Task, check_task

__all__ = ["Progress", "Run", "featurize"]

Progress = Callable[[str, int, int | None], None]
"""``progress(stage, rows_done, total_rows)``: called as work advances (the CLI draws bars)."""


@dataclass(frozen=True)
class RunConfig:
    """What a run computed, and how.

    Attributes:
        parameters: names of the differentiated parameters, in model order.
        batch_size: rows per gradient batch.
        n_train: number of training rows.
    """

    parameters: tuple[str, ...]
    batch_size: int
    n_train: int


def _device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


class Run:
    """Scores for one model, task, checkpoints and training set. Made by `featurize`.

    Results are NumPy arrays in float64; row/column ``j`` is training example ``j``.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        checkpoints: Checkpoints,
        train_data: Data,
        config: RunConfig,
        progress: Progress | None,
    ) -> None:
        self.model = model
        self.task = task
        self.checkpoints = checkpoints
        self.train_data = train_data
        self.config = config
        self._engine = FunctionalEngine(model, config.parameters)
        self._progress = progress
        self._sqnorms: np.ndarray | None = None

    @property
    def n_train(self) -> int:
        """Number of training rows."""
        return self.config.n_train

    # --- passes over the data -------------------------------------------------------------
    def _weights(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        return fit_state(self.model, checkpoint.state_dict(), repr(checkpoint.id))

    def _grads(
        self, weights: dict[str, torch.Tensor], score: ScoreFn, data: Data | Batch, stage: str
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start_row, (B, P) gradients)`` for each batch of ``data``."""
        device = _device(self.model)
        start = 0
        for batch in iter_batches(data, self.config.batch_size):
            batch = map_tensors(lambda t: t.to(device), batch)
            grads = self._engine.gradients(weights, score, batch)
            bad = ~torch.isfinite(grads).all(dim=1)
            if bool(bad.any()):
                rows = (torch.nonzero(bad).flatten() + start).tolist()
                raise DataError(
                    f"non-finite gradients for {stage} rows {rows[:10]}; check those examples "
                    "(NaN/inf inputs or labels) or the checkpoint's weights"
                )
            yield start, grads
            start += grads.shape[0]
            if self._progress is not None:
                self._progress(stage, start, None)

    def _train_grads(self, weights: dict[str, torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
        end = 0
        for start, grads in self._grads(weights, self.task.train_loss, self.train_data, "train"):
            end = start + grads.shape[0]
            if end > self.n_train:
                break
            yield start, grads
        if end != self.n_train:
            raise DataError(
                f"the training data now has {'more' if end > self.n_train else 'fewer'} rows than "
                f"the {self.n_train} featurized; featurize again after changing the data"
            )

    def _featurize(self) -> None:
        norms = []
        for checkpoint in self.checkpoints:
            weights = self._weights(checkpoint)
            rows = [
                grads.double().pow(2).sum(dim=1).cpu().numpy()
                for _, grads in self._train_grads(weights)
            ]
            norms.append(np.concatenate(rows))
        self._sqnorms = np.stack(norms)

    # --- scores ---------------------------------------------------------------------------
    def self_influence_by_checkpoint(self) -> np.ndarray:
        """Exact ``||g_c(z)||^2`` per checkpoint, without learning rates, shape ``(C, N)``."""
        if self._sqnorms is None:
            raise ConfigError("this Run was not featurized; make runs with tracin.featurize")
        return np.array(self._sqnorms, dtype=np.float64, copy=True)

    def self_influence(self) -> np.ndarray:
        """``sum_c lr_c ||g_c(z)||^2`` for every training row, shape ``(N,)``."""
        sq = self.self_influence_by_checkpoint()
        return lr_weighted_sum(zip(self.checkpoints.lrs, sq, strict=True))

    def influence(self, query: Data | Batch, *, query_task: Task | None = None) -> np.ndarray:
        """TracInCP score of every training row on every query, shape ``(Q, N)``.

        Args:
            query: a batch (tensor, tuple or dict of tensors), a Dataset, or a DataLoader.
            query_task: task whose ``query_score`` is differentiated for the queries (default:
                the run's task); e.g. ``ClassificationTask(query="prediction")`` for unlabelled
                queries.
        """
        qtask = self.task if query_task is None else query_task
        if not isinstance(qtask, Task):
            raise ConfigError(f"query_task is a {type(qtask).__name__}, not a tracin.Task")

        def terms() -> Iterator[tuple[float, np.ndarray]]:
            for checkpoint in self.checkpoints:
                weights = self._weights(checkpoint)
                q = torch.cat(
                    [g for _, g in self._grads(weights, qtask.query_score, query, "query")]
                )
                out = np.empty((q.shape[0], self.n_train), dtype=np.float64)
                for start, grads in self._train_grads(weights):
                    block = q @ grads.T
                    out[:, start : start + grads.shape[0]] = block.double().cpu().numpy()
                yield checkpoint.lr, out

        with eval_mode(self.model):
            return lr_weighted_sum(terms())

    def proponents(
        self, query: Data | Batch, k: int = 10, *, query_task: Task | None = None
    ) -> Neighbors:
        """The ``k`` training rows with the largest scores on each query (helped it most)."""
        _check_k(k, self.n_train)
        return top_k(self.influence(query, query_task=query_task), k, largest=True)

    def opponents(
        self, query: Data | Batch, k: int = 10, *, query_task: Task | None = None
    ) -> Neighbors:
        """The ``k`` training rows with the most negative scores on each query (hurt it most)."""
        _check_k(k, self.n_train)
        return top_k(self.influence(query, query_task=query_task), k, largest=False)


def _check_k(k: Any, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"k={k!r} must be an integer between 1 and the {n} training rows")


def featurize(
    model: nn.Module,
    task: Task,
    checkpoints: Checkpoints,
    train_data: Data,
    *,
    store: str | Path | None = None,
    layers: list[str] | tuple[str, ...] | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> Run:
    """Take the training gradients at every checkpoint and return a `Run` to query.

    Args:
        model: the network, architecture only; weights come from each checkpoint. It is left
            exactly as given (mode, parameters, buffers, ``requires_grad``).
        task: per-example training loss and query score (`ClassificationTask`, ...).
        checkpoints: the checkpoints with their learning rates.
        train_data: a Dataset or an unshuffled DataLoader of training batches.
        store: must be ``None`` in this version (scores are computed in memory).
        layers: module or parameter names to differentiate; ``None`` = all trainable.
        batch_size: rows per gradient batch (used for Datasets and in-memory query batches).
        progress: optional callback ``(stage, rows_done, total)``.

    Raises:
        TracInError: for any bad input, with the value and the fix in the message.
    """
    if store is not None:
        raise ConfigError(
            f"store={str(store)!r}: this version computes in memory only; pass store=None"
        )
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model is a {type(model).__name__}, not a torch.nn.Module")
    if not isinstance(task, Task):
        raise ConfigError(f"task is a {type(task).__name__}, not a tracin.Task")
    if not isinstance(checkpoints, Checkpoints):
        raise ConfigError(
            f"checkpoints is a {type(checkpoints).__name__}; build it with "
            "tracin.Checkpoints.from_paths(paths, lr=...) or from_state_dicts"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
    names = tuple(select_parameters(model, layers))
    with eval_mode(model):
        weights = fit_state(model, checkpoints[0].state_dict(), repr(checkpoints[0].id))
        first = next(iter(iter_batches(train_data, batch_size)), None)
        if first is None:
            raise DataError("the training data is empty; featurize needs at least one row")
        first = map_tensors(lambda t: t.to(_device(model)), first)
        check_task(task, FunctionalEngine(model, names).functional(weights), first, ("train_loss",))
        n = _count_rows(train_data, batch_size)
        run = Run(model, task, checkpoints, train_data, RunConfig(names, batch_size, n), progress)
        run._featurize()
    return run


def _count_rows(data: Data, size: int) -> int:
    if isinstance(data, DataLoader):
        if data.drop_last:
            raise DataError(
                "the DataLoader has drop_last=True, so some training rows would never be scored; "
                "use drop_last=False"
            )
        source: Any = data.dataset
    else:
        source = data
    try:
        return len(source)
    except TypeError:  # an iterable dataset: count what it yields
        return sum(batch_size(b) for b in iter_batches(data, size))
