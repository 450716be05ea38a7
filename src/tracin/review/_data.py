"""What the review app shows: the ranked suspects, their labels and predictions, examples.

Everything heavy is computed once when the app starts (the ranking from the store, the final
checkpoint's predictions when the spec gives a model); a page is then a slice of arrays and a
few renders, cached.
"""

from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tracin._errors import ConfigError, StoreError, TracInError
from tracin._run import Run
from tracin.analysis._suspects import CONTRAST_MAX_ROWS as CONTRAST_MAX_ROWS
from tracin.report._html import Example
from tracin.scoring._maths import Neighbors, top_k
from tracin.store._store import EMBEDDING

__all__ = ["Predictions", "ReviewData", "default_relevance", "predictions_from_spec"]

Renderer = Callable[[str, int], Mapping[str, Any]]


@dataclass
class Predictions:
    """Given labels and the final model's predictions, each ``(N,)``; ``None`` if unknown.

    Attributes:
        given: integer given label per row.
        predicted: predicted class per row.
        confidence: probability of the predicted class.
        n_classes: number of classes (0 if unknown).
        note: why something is missing, shown on the page.
    """

    given: np.ndarray | None = None
    predicted: np.ndarray | None = None
    confidence: np.ndarray | None = None
    n_classes: int = 0
    note: str = ""


def _probabilities(logits: torch.Tensor) -> torch.Tensor | None:
    if logits.ndim == 2 and logits.shape[1] > 1:
        return torch.softmax(logits.double(), dim=1)
    if logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
        p = torch.sigmoid(logits.double().reshape(-1))
        return torch.stack([1 - p, p], dim=1)
    return None


def predictions_from_spec(spec: Any, n_rows: int, batch_size: int = 256) -> Predictions:
    """Given labels and the last checkpoint's predictions on the spec's training data.

    Uses ``task.targets`` and ``task.predict`` (the built-in tasks); a task without them, or a
    model whose output is not class logits, gives what it can with a note saying why.
    """
    from tracin._batch import iter_batches

    task, model = spec.task, spec.model
    if not hasattr(task, "targets"):
        return Predictions(note="the spec's task has no targets(): given labels unknown")
    given: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    note = ""
    can_predict = hasattr(task, "predict") and len(spec.checkpoints) > 0
    if can_predict:
        model.load_state_dict(spec.checkpoints[-1].state_dict())
        model.eval()
    with torch.no_grad():
        for batch in iter_batches(spec.train, batch_size):
            given.append(task.targets(batch).detach().cpu().numpy().reshape(-1))
            if can_predict:
                p = _probabilities(task.predict(model, batch).detach().cpu())
                if p is None:
                    can_predict, note = False, "the model's output is not class logits"
                else:
                    probs.append(p.numpy())
    labels = np.concatenate(given) if given else np.zeros(0, np.int64)
    if len(labels) != n_rows or not np.issubdtype(labels.dtype, np.integer):
        return Predictions(note=f"the spec's training labels ({labels.shape}, {labels.dtype}) "
                           f"are not one class per row for the store's {n_rows} rows")  # fmt: skip
    if not can_predict or not probs:
        n = int(labels.max()) + 1 if len(labels) else 0
        return Predictions(labels.astype(np.int64), n_classes=n,
                           note=note or "no model predictions")  # fmt: skip
    prob = np.concatenate(probs)
    n_classes = max(prob.shape[1], int(labels.max()) + 1)
    return Predictions(labels.astype(np.int64), prob.argmax(1).astype(np.int64), prob.max(1),
                       n_classes, "predictions of the last checkpoint")  # fmt: skip


def default_relevance() -> str:
    """The relevance `Run.neighbors` uses by default (the library's choice, read, not copied)."""
    default = inspect.signature(Run.neighbors).parameters["relevance"].default
    return str(default)


def rank_scores(run: Run, score: str) -> tuple[str, np.ndarray]:
    """``(name, scores (N,))`` of the mislabel ranking ``score`` (``auto`` chooses).

    ``auto``: `tracin.analysis._suspects.mislabel_scores` with its default recipe (the contrastive
    self-influence, measured best, docs/quality.md), which falls back to self-influence when
    the store lacks embeddings or has more than 50,000 rows; ``contrastive``: that recipe or
    an error; ``self-influence``: the lr-weighted self-influence (the paper's).

    Raises:
        ConfigError: an unknown ``score``, or ``contrastive`` without stored embeddings.
    """
    from tracin.analysis._suspects import mislabel_scores

    if score not in ("auto", "contrastive", "self-influence"):
        raise ConfigError(f"--score {score!r}; expected auto, contrastive or self-influence")
    recipe = "paper" if score == "self-influence" else "contrast"
    result = mislabel_scores(run, recipe, strict=score == "contrastive")
    names = {"contrast": "contrastive self-influence", "paper": "self-influence"}
    return names.get(result.recipe, "self-influence (unit weights)"), result.scores


def _has_embeddings(run: Run) -> bool:
    try:
        run.store.read_block("train", EMBEDDING, 0)
    except (StoreError, OSError):
        return False
    return True


@dataclass
class ReviewData:
    """The ranked suspects and the means to show any stored row.

    Attributes:
        run: the opened store.
        render: the spec's ``render(split, index)``, or ``None`` (rows shown by number).
        score_name: name of the ranking.
        scores: ``(N,)`` ranking scores, higher = more suspect.
        order: ``(N,)`` training rows by descending score.
        preds: given labels and predictions.
    """

    run: Run
    render: Renderer | None
    score_name: str
    scores: np.ndarray
    preds: Predictions
    order: np.ndarray = field(init=False)
    rank_of: np.ndarray = field(init=False)
    _cache: OrderedDict[tuple[str, int], Example] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _clusters: Any = None
    _embeddings: bool | None = None

    def __post_init__(self) -> None:
        self.order = np.argsort(-self.scores, kind="stable")
        self.rank_of = np.empty_like(self.order)
        self.rank_of[self.order] = np.arange(len(self.order))

    @property
    def n_rows(self) -> int:
        """Training rows."""
        return int(self.run.n_train)

    def label_text(self, split: str, row: int) -> str:
        """The label as rendered, or the given class index."""
        return self.example(split, row).label

    def example(self, split: str, row: int) -> Example:
        """Row ``row`` of ``split`` as the report's `Example` (rendered once, then cached)."""
        key = (split, row)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        ex = self._render(split, row)
        with self._lock:
            self._cache[key] = ex
            if len(self._cache) > 4096:
                self._cache.popitem(last=False)
        return ex

    def _render(self, split: str, row: int) -> Example:
        from tracin.report._compose import example

        if self.render is None:
            given = self.preds.given
            label = str(given[row]) if split == "train" and given is not None else "?"
            return Example(index=row, label=label, text=f"{split} row {row}")
        return example(self.render, split, row)

    def check_row(self, split: str, row: int) -> None:
        """Refuse a split the store lacks or a row outside it (request input, checked).

        Raises:
            ConfigError: naming the split or row.
        """
        if split not in self.run.split_rows:
            raise ConfigError(f"split {split!r} is not in the store")
        if not 0 <= row < self.run.split_rows[split]:
            raise ConfigError(f"row {row} is outside split {split!r}")

    def _row_features(self, split: str, row: int, key: str) -> np.ndarray:
        block, offset = divmod(row, self.run.config.block_rows)
        feats = np.asarray(self.run.store.read_block(split, key, block)[0])
        return np.array(feats[offset : offset + 1])

    def neighbors(
        self, split: str, row: int, k: int, relevance: str
    ) -> tuple[Neighbors, Neighbors]:
        """Proponents and opponents ``(1, k)`` of one stored row (itself left out if train).

        One pass over the stored blocks; the row's ``(N,)`` scores are held whole (8 bytes a
        training row), then sorted.
        """
        q = [torch.from_numpy(self._row_features(split, row, c)) for c in self.run.ckpt_ids]
        scores = np.empty(self.n_rows, dtype=np.float64)
        for start, block in self.run.score_blocks(q, relevance):  # type: ignore[arg-type]
            scores[start : start + block.shape[1]] = block[0]
        extra = 1 if split == "train" else 0
        kk = min(k + extra, self.n_rows)
        best = top_k(scores[None, :], kk, largest=True)
        worst = top_k(scores[None, :], kk, largest=False)
        return _without(best, row, k, extra), _without(worst, row, k, extra)

    def embedding_neighbors(self, split: str, row: int, k: int) -> Neighbors | None:
        """Nearest training rows by embedding cosine, or ``None`` without embeddings."""
        if self._embeddings is None:
            self._embeddings = _has_embeddings(self.run)
        if not self._embeddings:
            return None
        q = self._row_features(split, row, EMBEDDING)
        extra = 1 if split == "train" else 0
        near, _ = self.run.embedding_neighbors(q, min(k + extra, self.n_rows))
        return _without(near, row, k, extra)

    def cluster_of(self, row: int, n: int) -> tuple[int, int, list[int]] | None:
        """``(cluster, size, typical member rows)`` of a training row (k-means, computed once)."""
        with self._lock:
            if self._clusters is None:
                try:
                    self._clusters = self.run.clusters(min(8, self.n_rows))
                except (TracInError, ValueError):
                    self._clusters = False
            found = self._clusters
        if found is False:
            return None
        c = int(found.labels[row])
        typical = [int(r) for r in found.typical(c, n + 1) if int(r) != row][:n]
        return c, int((found.labels == c).sum()), typical


def _without(nb: Neighbors, row: int, k: int, extra: int) -> Neighbors:
    idx, sc = nb.indices[0], nb.scores[0]
    if extra:
        keep = idx != row
        idx, sc = idx[keep], sc[keep]
    return Neighbors(idx[None, :k], sc[None, :k])
