"""What scorers and analyses read from a run: the `StoredRun` protocol (`tracin.Run` implements it).

Scoring and analysis sit below `tracin.Run` in the layout; they depend on this protocol, not on the
class, so a function such as `tracin.analysis.mislabel_scores` takes any object with these members.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

from tracin._batch import Batch, Data
from tracin._task import Task
from tracin.gradients._engines import RunConfig
from tracin.scoring._relevance import Relevance
from tracin.store._store import FeatureStore

__all__ = ["StoredRun"]


class StoredRun(Protocol):
    """A featurized run as scorers see it (shapes: N training rows, C checkpoints).

    Attributes:
        config: what the run computes (parameters, projection, block rows, dtype).
        ckpt_ids: the checkpoint keys, in training order, length C.
        lrs: one learning rate per checkpoint, length C.
        n_train: N.
        store: the feature store the run reads.
        streaming: True when features are computed on the fly rather than read from the store.
        progress: ``progress(stage, rows, total)`` after each block of a scoring pass, or None.
    """

    config: RunConfig
    ckpt_ids: tuple[str, ...]
    lrs: tuple[float, ...]
    n_train: int
    store: FeatureStore
    streaming: bool
    progress: Callable[[str, int, int], None] | None

    def query_features(
        self, query: Data | Batch | str, query_task: Task | None = None
    ) -> list[torch.Tensor]:
        """Per checkpoint, the queries' features ``(Q, dim)``."""

    def self_influence(self) -> np.ndarray:
        """``(N,)`` lr-weighted exact self-influence."""

    def self_influence_by_checkpoint(self) -> np.ndarray:
        """``(C, N)`` exact squared gradient norms."""

    def read_split(self, split: str, key: str) -> np.ndarray:
        """All stored rows of ``split`` under checkpoint key ``key``."""

    def embeddings(self, split: str = "train") -> np.ndarray:
        """``(rows, E)`` stored penultimate-layer embeddings of ``split``."""

    def folded_blocks(
        self, weights: Sequence[float] | None = None, *, relevance: Relevance = "tracin"
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(start row, (rows, D) folded training vectors)`` block by block."""

    def folded_queries(
        self,
        query: Data | Batch | str,
        *,
        query_task: Task | None = None,
        relevance: Relevance = "tracin",
    ) -> np.ndarray:
        """``(Q, D)`` folded query vectors, comparable with `folded_blocks`."""
