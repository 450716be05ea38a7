"""`featurize` (model + data -> store -> run): the named steps of `tracin.pipeline._featurize`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from tracin._batch import Batch, Data
from tracin._errors import ConfigError
from tracin._run import Run
from tracin._task import Task
from tracin.checkpoints._checkpoints import Checkpoints
from tracin.gradients._params import eval_mode, unwrap_model
from tracin.gradients._source import GradientSource
from tracin.pipeline._featurize import (
    Settings,
    check_first_batch,
    embed,
    gradient_source,
    manifest,
    plan,
    settings,
    split_rows,
    stream_sqnorms,
    write_store,
)
from tracin.store._store import KEEP_DIM, FeatureStore, StorePlan

__all__ = ["KEEP_DIM", "check_model_and_task", "featurize"]


def check_model_and_task(model: Any, task: Any, query_task: Any = None) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model is a {type(model).__name__}, not a torch.nn.Module")
    for name, value in (("task", task), ("query_task", query_task)):
        if not isinstance(value, Task) and not (name == "query_task" and value is None):
            raise ConfigError(
                f"{name} is a {type(value).__name__}, not a tracin.Task; use e.g. "
                "tracin.ClassificationTask() or subclass tracin.Task"
            )


def _validate(model: Any, task: Any, checkpoints: Any, query_task: Any, progress: Any) -> None:
    check_model_and_task(model, task, query_task)
    if not isinstance(checkpoints, Checkpoints):
        raise ConfigError(
            f"checkpoints is a {type(checkpoints).__name__}; build it with "
            "tracin.Checkpoints.from_paths(paths, lr=...) or from_state_dicts"
        )
    if progress is not None and not callable(progress):
        raise ConfigError(
            f"progress={progress!r} must be None or a function progress(stage, advance, total)"
        )


def featurize(
    model: nn.Module,
    task: Task,
    checkpoints: Checkpoints,
    train_data: Data,
    *,
    store: str | Path | None = None,
    layers: Sequence[str] | None = None,
    proj_dim: int | None = None,
    projection: str | None = None,
    seed: int = 0,
    dtype: str = "float32",
    batch_size: int = 64,
    block_rows: int = 4096,
    engine: str = "auto",
    embedding_layer: str | None = None,
    queries: Mapping[str, Data | Batch] | None = None,
    query_task: Task | None = None,
    overwrite: bool = False,
    progress: Any = None,
    precondition: str | None = None,
    keep_features: bool | None = None,
    max_store_gb: float | None = 4.0,
    on_plan: Callable[[StorePlan], None] | None = None,
) -> Run:
    """Take training gradients at every checkpoint and return a `Run` to query.

    With ``store=None`` and no projection, nothing but exact squared norms is kept and query
    passes stream exact gradients. With a store directory (or a projection), features are
    written in blocks; a rerun after a crash computes only the missing blocks, and new rows or
    checkpoints are added without recomputing what is there.

    What a store keeps is what its questions need. Self-influence needs only the exact squared
    norms ``(C, N)``, which every store holds. Influence on a stored query split needs that
    split's features ``(Q, dim)`` per checkpoint plus the training gradients, either stored
    (``N x C x dim`` values: projected runs, and exact runs no wider than `KEEP_DIM`) or
    streamed again through the model (the default for a wider exact run:
    ``run.influence("test")`` works on the returned run, and on ``tracin.open(path,
    model=..., task=..., train_data=...)``). Storing the query-by-train score matrix instead
    would be smaller still for few queries, but it would fix the queries and relevance at
    featurize time. Before writing, featurize states the store's size (``on_plan``) and
    refuses one whose features exceed ``max_store_gb``.

    Args:
        model: the network, architecture only; weights come from each checkpoint. It is left
            exactly as given (mode, parameters, buffers, ``requires_grad``).
        task: per-example training loss and query score.
        checkpoints: the checkpoints with their learning rates.
        train_data: a Dataset, an unshuffled DataLoader, or one in-memory batch.
        store: run directory for the feature store; ``None`` keeps results in memory.
        layers: module or parameter names to differentiate; ``None`` = all trainable.
        proj_dim: project gradients to this many dimensions per checkpoint (TracIn-RP).
        projection: ``"gaussian"`` (default with ``proj_dim``) or ``"rademacher"``.
        seed: base seed of the projection.
        dtype: stored feature dtype, ``"float32"``, ``"float16"`` or ``"float64"``.
        batch_size: rows per gradient batch.
        block_rows: rows per stored block (the unit of resume and of distributed work).
        engine: ``"auto"``, ``"functional"`` (torch.func, any module) or ``"factored"`` (hooks
            on Linear/Conv/Embedding; one batched backward, Kronecker projection).
        embedding_layer: module whose output (at the last checkpoint) is saved as each row's
            embedding, for `Run.embedding_neighbors` (the penultimate layer is the usual choice).
        queries: named query datasets to featurize too (``run.influence("name")`` then needs
            no model).
        query_task: task whose query score is used for ``queries`` (default: ``task``).
        overwrite: replace an existing store made with a different configuration.
        precondition: ``"adam"`` scales every gradient by ``(sqrt(v_hat) + eps)^{-1/2}`` from
            each checkpoint's saved Adam state, so scores are ``sum_c lr_c <Gamma_c g, g'>``
            (LESS); needs checkpoints saved with the optimiser state and the torch.func engine.

    Under ``torch.distributed`` (e.g. ``torchrun``; initialise the process group first), the
    store's blocks are split across ranks (rank ``r`` computes blocks ``r, r + W, ...``); every
    rank returns the complete run, identical to a single-process one.
        progress: optional callback ``progress(stage, advance, total)``: ``advance`` more rows of
            ``total`` are done in ``stage`` (e.g. ``"train 3"`` for checkpoint id 3, ``"test 3"``,
            ``"train embeddings"``), called after every batch (and once for rows a resumed
            store already holds); the CLI draws bars with it. The returned run calls it during
            its scoring passes too (`Run.progress`).
        keep_features: store the training split's features. Default: when projected, or when
            the exact gradient has at most `KEEP_DIM` (4,096) values (e.g. ``layers=["fc.bias"]``);
            a wider exact run stores only squared norms. Query splits always store theirs.
        max_store_gb: refuse to write a store whose features exceed this many GB (10^9 bytes;
            default 4). ``None`` lifts the limit.
        on_plan: called once with the `StorePlan` (rows x checkpoints x dim x bytes per split)
            when the store's configuration has been checked, before any block is written; the
            CLI prints it. (The budget is checked before the store is opened at all.)

    Raises:
        TracInError: for any bad input, with the value and the fix in the message.
    """
    model = unwrap_model(model)  # DataParallel/DDP/torch.compile: the module inside
    _validate(model, task, checkpoints, query_task, progress)
    s = settings(model, task, checkpoints, train_data, store=store, layers=layers,
                 proj_dim=proj_dim, projection=projection, seed=seed, dtype=dtype,
                 batch_size=batch_size, block_rows=block_rows, engine=engine,
                 embedding_layer=embedding_layer, queries=queries, query_task=query_task,
                 overwrite=overwrite, precondition=precondition, keep_features=keep_features,
                 max_store_gb=max_store_gb, on_plan=on_plan)  # fmt: skip
    s, source = gradient_source(s)
    with eval_mode(model):
        n_train = check_first_batch(source, task, checkpoints[0], train_data)
        if s.streaming:
            sq = stream_sqnorms(source, task, checkpoints, train_data, n_train, progress)
            memory = FeatureStore(None)  # embeddings, if any, are kept in memory
            embed(s, source, memory, split_rows(s, n_train), progress=progress)
            return _run(s, source, memory, n_train, progress, sqnorms=sq)
        m = manifest(s, split_rows(s, n_train))
        store_plan = plan(s, source, m)
        store_plan.check(max_store_gb, s.config.projection.exact)  # before any I/O
        feature_store = write_store(s, source, m, store_plan, progress)
    return _run(s, source, feature_store, n_train, progress, split_rows=m.split_rows)


def _run(
    s: Settings,
    source: GradientSource,
    store: FeatureStore,
    n_train: int,
    progress: Any,
    *,
    sqnorms: np.ndarray | None = None,
    split_rows: dict[str, int] | None = None,
) -> Run:
    run = Run(
        config=s.config, ckpt_ids=tuple(c.id for c in s.checkpoints), lrs=s.checkpoints.lrs,
        n_train=n_train, source=source, task=s.task, checkpoints=s.checkpoints,
        train_data=s.train_data, store=store, split_rows=split_rows, sqnorms=sqnorms,
        streaming=sqnorms is not None or not s.config.keep_features,
    )  # fmt: skip
    run.progress = progress
    return run
