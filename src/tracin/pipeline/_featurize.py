"""Featurize as named steps: the only part of tracin that touches the model and the data.

1. `settings`: check every argument once, before any work (a `Settings` value);
2. `gradient_source`: the engine (`tracin.gradients.make_engine`) and the source of features;
3. `check_first_batch`: the task's contract on a few rows, and the number of training rows;
4. streaming (no store, no projection): `stream_sqnorms`, the exact squared norms only; or
5. `manifest` and `plan`: what the store will hold, checked against the size budget; then
6. `write_store`: under the writer lock, reconcile with what is on disk, write the manifest and
   each missing block of every (split, checkpoint), so an interrupted run resumes; under
   ``torchrun`` each rank writes its share of the blocks (`tracin.pipeline._distributed`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tracin._batch import Batch, Data, batch_size, iter_batches, map_tensors, slice_batch
from tracin._errors import ConfigError, DataError
from tracin._task import Task, check_task
from tracin.checkpoints._checkpoints import Checkpoint, Checkpoints
from tracin.gradients._embeddings import EmbeddingCapture
from tracin.gradients._engines import RunConfig, device_of, effective_projection, make_engine
from tracin.gradients._factored import FactoredEngine
from tracin.gradients._functional import functional_model
from tracin.gradients._params import select_parameters
from tracin.gradients._source import GradientSource, model_errors
from tracin.pipeline._args import (
    dtype_name,
    embedding_layer_name,
    integer,
    layer_names,
    projection_config,
    query_splits,
    store_path,
)
from tracin.pipeline._distributed import barrier, shard, writer_lock
from tracin.store._manifest import Manifest, ckpt_entry, reconcile, task_fingerprint
from tracin.store._store import FeatureStore, StorePlan, check_store_args, resolve_keep_features

__all__ = [
    "Settings",
    "check_first_batch",
    "count_rows",
    "data_fingerprint",
    "gradient_source",
    "manifest",
    "model_fingerprint",
    "plan",
    "split_rows",
    "settings",
    "stream_sqnorms",
    "write_store",
]

Split = tuple[Any, Callable[..., Any]]
"""A split's data (a Dataset, DataLoader or batch) and the score differentiated for it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every argument of `tracin.featurize`, checked and normalised (step 1).

    Attributes:
        model: the network (unwrapped from DataParallel/DDP/torch.compile by the caller).
        task: the training task; ``query_task`` scores the query splits (default ``task``).
        checkpoints: the checkpoints with their learning rates.
        train_data: the training rows, in dataset order.
        root: the store directory, or None to keep results in memory.
        config: the `RunConfig` (parameters, projection, dtype, block rows, batch size, engine).
        embedding_layer: the module whose output is stored as each row's embedding, or None.
        queries: named query splits.
        overwrite, keep_features, max_store_gb, on_plan: as given to `tracin.featurize`.
    """

    model: nn.Module
    task: Task
    query_task: Task
    checkpoints: Checkpoints
    train_data: Data
    root: Path | None
    config: RunConfig
    embedding_layer: str | None
    queries: dict[str, Data | Batch]
    overwrite: bool
    keep_features: bool | None
    max_store_gb: float | None
    on_plan: Callable[[StorePlan], None] | None

    @property
    def streaming(self) -> bool:
        """No store and no projection: keep exact squared norms only, stream query passes."""
        return self.root is None and self.config.projection.exact

    def splits(self) -> dict[str, Split]:
        """``{"train": (data, train_loss), <query split>: (data, query_score), ...}``."""
        out: dict[str, Split] = {"train": (self.train_data, self.task.train_loss)}
        for name, data in self.queries.items():
            out[name] = (data, self.query_task.query_score)
        return out


def settings(
    model: nn.Module,
    task: Task,
    checkpoints: Checkpoints,
    train_data: Data,
    *,
    store: str | Path | None,
    layers: Sequence[str] | None,
    proj_dim: int | None,
    projection: str | None,
    seed: int,
    dtype: str,
    batch_size: int,
    block_rows: int,
    engine: str,
    embedding_layer: str | None,
    queries: Mapping[str, Data | Batch] | None,
    query_task: Task | None,
    overwrite: bool,
    precondition: str | None,
    keep_features: bool | None,
    max_store_gb: float | None,
    on_plan: Callable[[StorePlan], None] | None,
) -> Settings:
    """Step 1: check every argument; the first bad one raises, naming the value and the fix.

    Raises:
        ConfigError: a bad value (the message names it and a value that works).
    """
    root = None if store is None else store_path(store)
    proj = projection_config(projection, proj_dim, seed)
    names = tuple(select_parameters(model, layer_names(layers, model)))
    if not isinstance(overwrite, bool | np.bool_):
        raise ConfigError(f"overwrite={overwrite!r} must be True or False")
    check_store_args(keep_features, max_store_gb, on_plan)
    config = RunConfig(
        names,
        effective_projection(model, names, proj),
        dtype_name(dtype),
        integer("block_rows", block_rows, 1, 4096),
        integer("batch_size", batch_size, 1, 64),
        engine,
        precondition,
    )
    return Settings(
        model=model, task=task, query_task=query_task or task, checkpoints=checkpoints,
        train_data=train_data, root=root, config=config,
        embedding_layer=embedding_layer_name(model, embedding_layer),
        queries=query_splits(queries), overwrite=bool(overwrite), keep_features=keep_features,
        max_store_gb=max_store_gb, on_plan=on_plan,
    )  # fmt: skip


def gradient_source(s: Settings) -> tuple[Settings, GradientSource]:
    """Step 2: the engine and the gradient source; settings completed with what the engine decides.

    The engine fixes the feature width, hence whether the training features are kept
    (``keep_features``), and for a last-layer projection the split of its factors.
    """
    engine = make_engine(s.model, s.config, checkpoints=s.checkpoints)
    keep = resolve_keep_features(s.keep_features, s.config.projection.kind, engine.dim())
    config = dataclasses.replace(s.config, keep_features=keep)
    if isinstance(engine, FactoredEngine) and config.projection.kind == "last_layer":
        projection = dataclasses.replace(config.projection, split=engine.split())
        config = dataclasses.replace(config, projection=projection)
    s = dataclasses.replace(s, config=config)
    source = GradientSource(s.model, engine, config.batch_size, config)
    if s.embedding_layer is not None:  # the last checkpoint's pass keeps them (EmbeddingCapture)
        source.capture = EmbeddingCapture(s.model, s.embedding_layer, s.checkpoints[-1].id)
    return s, source


CHECK_ROWS = 8


def check_first_batch(
    source: GradientSource, task: Task, first_ckpt: Checkpoint, data: Data | Batch
) -> int:
    """Step 3: the task's contract on the first rows; returns the number of training rows.

    Raises:
        DataError: the training data is empty.
        TaskError: the task breaks its contract (e.g. a batch-mean loss).
    """
    batch = next(iter(iter_batches(data, source.batch_size)), None)
    if batch is None:
        raise DataError("the training data is empty; featurize needs at least one row")
    # a few rows tell a per-example loss from a batch-mean one; a whole batch costs more
    batch = slice_batch(batch, 0, min(batch_size(batch), CHECK_ROWS))
    batch = map_tensors(lambda t: t.to(device_of(source.model)), batch)
    model = functional_model(source.model, source.weights(first_ckpt))
    with model_errors("train", 0, batch_size(batch), first_ckpt.id, source.model):
        check_task(task, model, batch, ("train_loss",))
    return count_rows(data, source.batch_size)


def split_rows(s: Settings, n_train: int) -> dict[str, int]:
    """Rows of every split: ``n_train`` (counted by `check_first_batch`) and each query split."""
    rows = {name: count_rows(data, s.config.batch_size) for name, data in s.queries.items()}
    return {"train": n_train, **rows}


def manifest(s: Settings, n_rows: Mapping[str, int]) -> Manifest:
    """Step 5: the manifest: configuration, model, checkpoints; per split rows, data, task."""
    size = s.config.batch_size
    splits = {
        name: {
            "n_rows": n_rows[name],
            "fingerprint": data_fingerprint(data, size),
            "task": task_fingerprint(
                s.task if name == "train" else s.query_task,
                "train" if name == "train" else "query",
            ),
        }
        for name, (data, _) in s.splits().items()
    }
    return Manifest(
        config=s.config.to_json(),
        model=model_fingerprint(s.model),
        embedding_layer=s.embedding_layer,
        checkpoints=[ckpt_entry(c) for c in s.checkpoints],
        splits=splits,
    )


def plan(s: Settings, source: GradientSource, m: Manifest) -> StorePlan:
    """Step 5: what the store will hold: each split's rows and feature dim (0: norms only)."""
    dim = source.engine.dim()
    splits = tuple(
        (name, rows, dim if s.config.keep_features or name != "train" else 0)
        for name, rows in m.split_rows.items()
    )
    return StorePlan(splits, len(s.checkpoints), np.dtype(s.config.dtype).itemsize)


def write_store(
    s: Settings, source: GradientSource, m: Manifest, store_plan: StorePlan, progress: Any
) -> FeatureStore:
    """Step 6: under the writer lock, reconcile, write the manifest, then every missing block.

    Raises:
        StoreError: the store was made differently (and ``overwrite`` is off), or is locked.
    """
    store = FeatureStore(s.root)
    part = shard()
    with writer_lock(s.root, part):  # one featurize job per store; released on any exit
        reconcile(store, m, s.overwrite, owner=part[0] == 0)
        if s.on_plan is not None and part[0] == 0 and s.root is not None:
            s.on_plan(store_plan)
        barrier(part)  # every rank has checked the store before rank 0 changes it
        if part[0] == 0:
            store.remove_temp_files()
            store.write_manifest(m.to_json())
        barrier(part)
        rows = m.split_rows
        for name, (data, score) in s.splits().items():
            source.fill(store, name, s.checkpoints, score, data, rows[name], s.config,
                        progress, part)  # fmt: skip
        embed(s, source, store, rows, part, progress)
        barrier(part)  # the store is complete on every rank
    return store


def embed(
    s: Settings,
    source: GradientSource,
    store: FeatureStore,
    rows: Mapping[str, int],
    part: tuple[int, int] = (0, 1),
    progress: Any = None,
) -> None:
    """Store every split's embedding-layer activations at the last checkpoint (the final model)."""
    if s.embedding_layer is None:
        return
    for name, (data, score) in s.splits().items():
        source.embed(store, name, s.checkpoints[-1], s.embedding_layer, score, data, rows[name],
                     s.config, part, progress)  # fmt: skip
    source.capture = None  # later passes (queries) keep nothing


def stream_sqnorms(
    source: GradientSource, task: Task, checkpoints: Checkpoints, data: Any, n: int, progress: Any
) -> np.ndarray:
    """Step 4 (streaming): exact squared norms ``(C, N)``, nothing else kept.

    Raises:
        DataError: the data yielded another number of rows than counted.
    """
    norms = []
    for checkpoint in checkpoints:
        weights = source.weights(checkpoint)
        rows, start = [], 0
        for batch in iter_batches(data, source.batch_size):
            sq = source.batch_sqnorms(weights, task.train_loss, batch, checkpoint, start)
            rows.append(sq)
            start += len(sq)
            if progress is not None:
                progress(f"train {checkpoint.id}", len(sq), n)
        if start != n:
            raise DataError(f"the training data yielded {start} rows, expected {n}")
        norms.append(np.concatenate(rows))
    return np.stack(norms)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's state-dict names, shapes and dtypes (its architecture)."""
    spec = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    return hashlib.sha256(repr(spec).encode()).hexdigest()


def _raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes, for every dtype (bfloat16 has no NumPy type; same bytes otherwise)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())


def data_fingerprint(data: Data | Batch, size: int) -> str:
    """sha256 of the first batch's tensors: catches a different dataset on reopen, cheaply."""
    digest = hashlib.sha256()
    first = next(iter(iter_batches(data, size)), None)
    if first is not None:
        map_tensors(lambda t: digest.update(_raw_bytes(t)), first)
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
