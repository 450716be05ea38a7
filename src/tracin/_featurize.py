"""Featurize: the only step that touches the model and the data.

For each checkpoint (loaded once per pass) and each missing block of rows, take per-example
gradients, project them, and write features plus exact squared norms to the store. A block that
is already complete is skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from tracin._batch import Batch, Data, batch_size, iter_batches, map_tensors, slice_batch
from tracin._checkpoints import Checkpoint, Checkpoints
from tracin._engine import FunctionalEngine, ScoreFn
from tracin._errors import DataError
from tracin._params import fit_state
from tracin._projection import ProjectionConfig, Projector, checkpoint_key
from tracin._store import FeatureStore

__all__ = [
    "GradientSource",
    "RunConfig",
    "count_rows",
    "data_fingerprint",
    "device_of",
    "model_fingerprint",
]


@dataclass(frozen=True)
class RunConfig:
    """What a run computes, and how; saved in the manifest and compared on reopen.

    Attributes:
        parameters: names of the differentiated parameters, in model order.
        projection: kind, dim and seed of the random projection.
        dtype: feature dtype on disk, ``"float32"`` or ``"float16"``.
        block_rows: rows per stored block.
        batch_size: rows per gradient batch.
    """

    parameters: tuple[str, ...]
    projection: ProjectionConfig
    dtype: str
    block_rows: int
    batch_size: int

    def to_json(self) -> dict[str, Any]:
        """The comparable part of the configuration (batch size does not change results)."""
        out = asdict(self)
        out["parameters"] = list(self.parameters)
        del out["batch_size"]
        return out


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU if it has none)."""
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's state-dict names, shapes and dtypes (its architecture)."""
    spec = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    return hashlib.sha256(repr(spec).encode()).hexdigest()


def data_fingerprint(data: Data | Batch, size: int) -> str:
    """sha256 of the first batch's tensors: catches a different dataset on reopen, cheaply."""
    digest = hashlib.sha256()
    first = next(iter(iter_batches(data, size)), None)
    if first is not None:
        map_tensors(lambda t: digest.update(t.detach().cpu().contiguous().numpy().tobytes()), first)
    return digest.hexdigest()


def count_rows(data: Data | Batch, size: int) -> int:
    """Number of rows ``data`` yields (refusing a DataLoader that drops rows)."""
    if isinstance(data, DataLoader):
        if data.drop_last:
            raise DataError(
                "the DataLoader has drop_last=True, so some training rows would never be scored; "
                "use drop_last=False"
            )
        source: Any = data.dataset
    elif isinstance(data, Dataset):
        source = data
    else:
        return batch_size(data)
    try:
        return len(source)
    except TypeError:  # an iterable dataset: count what it yields
        return sum(batch_size(b) for b in iter_batches(data, size))


class GradientSource:
    """Per-example gradients and features of a model at its checkpoints.

    Args:
        model: the network (eval mode is the caller's business).
        engine: computes ``(B, P)`` gradients.
        projector: maps gradients to features.
        batch_size: rows per gradient batch.
    """

    def __init__(
        self, model: nn.Module, engine: FunctionalEngine, projector: Projector, batch_size: int
    ) -> None:
        self.model = model
        self.engine = engine
        self.projector = projector
        self.batch_size = batch_size

    def weights(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors, fitted to the model."""
        return fit_state(self.model, checkpoint.state_dict(), repr(checkpoint.id))

    def grads(
        self, weights: dict[str, torch.Tensor], score: ScoreFn, batch: Batch, start: int, stage: str
    ) -> torch.Tensor:
        """``(B, P)`` gradients of one batch; non-finite rows are an error naming them."""
        batch = map_tensors(lambda t: t.to(device_of(self.model)), batch)
        grads = self.engine.gradients(weights, score, batch)
        bad = ~torch.isfinite(grads).all(dim=1)
        if bool(bad.any()):
            rows = (torch.nonzero(bad).flatten() + start).tolist()
            raise DataError(
                f"non-finite gradients for {stage} rows {rows[:10]}; check those examples "
                "(NaN/inf inputs or labels) or the checkpoint's weights"
            )
        return grads

    def features(
        self,
        weights: dict[str, torch.Tensor],
        checkpoint: Checkpoint,
        score: ScoreFn,
        data: Data | Batch,
        stage: str,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Features ``(Q, dim)`` and exact squared norms ``(Q,)`` of every row of ``data``."""
        feats, norms, start = [], [], 0
        for batch in iter_batches(data, self.batch_size):
            g = self.grads(weights, score, batch, start, stage)
            feats.append(self.projector.project(g, checkpoint_key(checkpoint.id)))
            norms.append(g.double().pow(2).sum(dim=1).cpu().numpy())
            start += g.shape[0]
        if not feats:
            raise DataError(f"the {stage} data is empty")
        return torch.cat(feats), np.concatenate(norms)

    def fill(
        self,
        store: FeatureStore,
        split: str,
        checkpoints: Checkpoints,
        score: ScoreFn,
        data: Data | Batch,
        n_rows: int,
        config: RunConfig,
        progress: Any = None,
    ) -> None:
        """Compute every missing block of ``split`` for every checkpoint and write it."""
        rows_of = _block_sizes(n_rows, config.block_rows)
        dtype = np.dtype(config.dtype)
        for checkpoint in checkpoints:
            todo = [
                k
                for k, rows in enumerate(rows_of)
                if not store.is_valid(split, checkpoint.id, k, rows)
            ]
            if not todo:
                continue
            weights = self.weights(checkpoint)
            key = checkpoint_key(checkpoint.id)
            for k, pieces in _block_pieces(data, todo, config.block_rows, n_rows, self.batch_size):
                feats, norms = [], []
                start = k * config.block_rows
                for piece in pieces:
                    g = self.grads(weights, score, piece, start, split)
                    feats.append(
                        self.projector.project(g, key).detach().cpu().numpy().astype(dtype)
                    )
                    norms.append(g.double().pow(2).sum(dim=1).cpu().numpy())
                    start += g.shape[0]
                block = np.concatenate(feats).astype(dtype)
                if len(block) != rows_of[k]:
                    raise DataError(
                        f"{split} block {k} has {len(block)} rows, expected {rows_of[k]}: the data "
                        "changed length while featurizing"
                    )
                store.write_block(split, checkpoint.id, k, block, np.concatenate(norms))
                if progress is not None:
                    progress(f"{split} {checkpoint.id}", len(block), n_rows)


def _block_sizes(n_rows: int, block_rows: int) -> list[int]:
    return [min(block_rows, n_rows - s) for s in range(0, n_rows, block_rows)]


def _block_pieces(
    data: Data | Batch, todo: list[int], block_rows: int, n_rows: int, size: int
) -> Iterator[tuple[int, Iterator[Batch]]]:
    """``(block, batches of its rows)`` for each block in ``todo``, in order.

    A map-style Dataset is read only for the missing blocks; a DataLoader or in-memory batch is
    iterated once, and pieces outside missing blocks are skipped without computing anything.
    """
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        for k in todo:
            rows = range(k * block_rows, min((k + 1) * block_rows, n_rows))
            yield k, iter(DataLoader(Subset(data, rows), batch_size=size, shuffle=False))
        return
    wanted = set(todo)
    current: int | None = None
    buffer: list[Batch] = []
    offset = 0
    for batch in iter_batches(data, size):
        n = batch_size(batch)
        pos = 0
        while pos < n:
            k = (offset + pos) // block_rows
            stop = min(n, (k + 1) * block_rows - offset)
            if k != current:
                if current is not None and buffer:
                    yield current, iter(buffer)
                current, buffer = k, []
            if k in wanted:
                buffer.append(slice_batch(batch, pos, stop))
            pos = stop
        offset += n
    if current is not None and buffer:
        yield current, iter(buffer)
