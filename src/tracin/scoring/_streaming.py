"""Scores without stored training features: each checkpoint's training gradients streamed again.

For a run that keeps only the exact squared norms (an exact run without a store, or a store with
``keep_features=False``), a query pass loads every checkpoint once, takes the queries' gradients
(or reads a stored query split), then streams the training gradients batch by batch: memory
``O(Q x P + B x P + Q x N)``, exact scores ``sum_c lr_c <g_c(q), g_c(z)>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from tracin._batch import Batch, Data, iter_batches
from tracin._errors import ConfigError, DataError
from tracin._task import Task
from tracin.checkpoints._checkpoints import Checkpoint, Checkpoints
from tracin.gradients._params import eval_mode
from tracin.gradients._source import GradientSource
from tracin.scoring._maths import Neighbors, lr_weighted_sum, products, top_k
from tracin.scoring._relevance import Relevance, checkpoint_weights
from tracin.scoring._stored import StoredScorer

__all__ = ["StreamingScorer"]


class StreamingScorer:
    """Exact TracInCP scores streamed through the model (no stored training features).

    Args:
        source: the model's gradient source (None: the run was reopened without the model).
        task: the training task (its ``train_loss`` is differentiated for training rows).
        checkpoints: the checkpoints with their lrs.
        train_data: the featurized training rows (None: not given to `tracin.open`).
        stored: the stored-feature scorer, for stored query splits and normalisation.
        advance: progress callback ``advance(stage, rows)``.
    """

    def __init__(
        self,
        source: GradientSource | None,
        task: Task | None,
        checkpoints: Checkpoints | None,
        train_data: Any,
        stored: StoredScorer,
        advance: Callable[[str, int], None],
    ) -> None:
        self.source = source
        self.task = task
        self.checkpoints = checkpoints
        self.train_data = train_data
        self.stored = stored
        self.advance = advance
        self.n_train = stored.n_train

    def influence(
        self, query: Data | Batch | str, query_task: Task | None, relevance: Relevance = "tracin"
    ) -> np.ndarray:
        """Scores ``(Q, N)`` of every training row on every query.

        Raises:
            ConfigError: a query split without stored features, or a run without the model
                or the training data (the message says how to reopen it).
            DataError: the training data yields another number of rows than featurized.
        """
        if isinstance(query, str) and (query == "train" or query not in self.stored.split_rows):
            raise ConfigError(
                f"query split {query!r}: this run stores no features for it; pass the query "
                "batch itself, or featurize it with queries={...}"
            )
        if self.source is None or self.train_data is None or self.checkpoints is None:
            raise ConfigError(
                "this store holds no training features, so queries stream the training "
                "gradients again: reopen with tracin.open(path, model=..., task=..., "
                "train_data=...), or featurize with keep_features=True or proj_dim=..."
            )
        qtask = self.task if query_task is None else query_task
        if not isinstance(qtask, Task):
            raise ConfigError(
                f"query_task is a {type(qtask).__name__}, not a tracin.Task; pass query_task=..."
            )
        weights = checkpoint_weights(self.stored.lrs, relevance)
        terms = (
            (w, self._checkpoint_scores(c, query, qtask, relevance))
            for w, c in zip(weights, self.checkpoints, strict=True)
        )
        with eval_mode(self.source.model):
            return lr_weighted_sum(terms)

    def neighbors(
        self,
        query: Data | Batch | str,
        k: int,
        query_task: Task | None,
        relevance: Relevance = "tracin",
    ) -> tuple[Neighbors, Neighbors]:
        """The ``k`` highest and lowest scoring rows per query.

        Raises:
            ConfigError: as for `influence`.
        """
        scores = self.influence(query, query_task, relevance)
        return top_k(scores, k, largest=True), top_k(scores, k, largest=False)

    def _checkpoint_scores(
        self, checkpoint: Checkpoint, query: Data | Batch | str, qtask: Task, relevance: Relevance
    ) -> np.ndarray:
        """``<g_c(q), g_c(z)>`` ``(Q, N)`` at one checkpoint, training gradients streamed."""
        source, task = self.source, self.task
        assert source is not None and task is not None
        params = source.weights(checkpoint)
        if isinstance(query, str):  # a stored query split (its features are stored)
            dtype = torch.float64 if self.stored.config.dtype == "float64" else torch.float32
            q = torch.from_numpy(self.stored.read_split(query, checkpoint.id)).to(dtype)
        else:
            q = source.features(params, checkpoint, qtask.query_score, query, "query")[0]
        q = self.stored.normalised(q, relevance, "query")
        out = np.empty((q.shape[0], self.n_train), dtype=np.float64)
        end = 0
        for start, g in _train_batches(source, params, task, self.train_data, checkpoint):
            end = start + g.shape[0]
            if end > self.n_train:
                break
            g = self.stored.normalised(g, relevance, "train")
            out[:, start:end] = products(q.to(g), g).double().cpu().numpy()
            self.advance(f"score {checkpoint.id}", g.shape[0])
        if end != self.n_train:
            raise DataError(
                f"the training data now has {'more' if end > self.n_train else 'fewer'} rows "
                f"than the {self.n_train} featurized; featurize again after changing the data"
            )
        return out


def _train_batches(
    source: GradientSource, weights: dict[str, torch.Tensor], task: Task, data: Any, ckpt: Any
) -> Iterator[tuple[int, torch.Tensor]]:
    start = 0
    for batch in iter_batches(data, source.batch_size):
        g, _ = source.batch_features(weights, task.train_loss, batch, ckpt, start, "train")
        yield start, g
        start += g.shape[0]
