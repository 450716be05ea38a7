"""The entry points: `featurize` (model + data -> run) and `open` (store -> run)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import tracin
from tracin._args import (
    dtype_name,
    embedding_layer_name,
    integer,
    layer_names,
    projection_config,
    query_splits,
    store_path,
)
from tracin._batch import Batch, Data, batch_size, iter_batches, map_tensors, slice_batch
from tracin._checkpoints import Checkpoint, Checkpoints
from tracin._engine import functional_model
from tracin._errors import ConfigError, DataError
from tracin._featurize import (
    RunConfig,
    count_rows,
    data_fingerprint,
    device_of,
    effective_projection,
    make_engine,
    model_fingerprint,
)
from tracin._hooks import FactoredEngine
from tracin._lock import StoreLock
from tracin._manifest import check_schema, ckpt_entry, reconcile, task_fingerprint
from tracin._params import eval_mode, select_parameters, unwrap_model
from tracin._projection import ProjectionConfig
from tracin._run import Run
from tracin._source import GradientSource, model_errors
from tracin._store import (
    KEEP_DIM,
    SCHEMA_VERSION,
    FeatureStore,
    StoreError,
    StorePlan,
    check_store_args,
    resolve_keep_features,
)
from tracin._task import Task, check_task

__all__ = ["KEEP_DIM", "featurize", "open"]


def _check_model_and_task(model: Any, task: Any, query_task: Any = None) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model is a {type(model).__name__}, not a torch.nn.Module")
    for name, value in (("task", task), ("query_task", query_task)):
        if not isinstance(value, Task) and not (name == "query_task" and value is None):
            raise ConfigError(
                f"{name} is a {type(value).__name__}, not a tracin.Task; use e.g. "
                "tracin.ClassificationTask() or subclass tracin.Task"
            )


def _validate(model: Any, task: Any, checkpoints: Any, query_task: Any, progress: Any) -> None:
    _check_model_and_task(model, task, query_task)
    if not isinstance(checkpoints, Checkpoints):
        raise ConfigError(
            f"checkpoints is a {type(checkpoints).__name__}; build it with "
            "tracin.Checkpoints.from_paths(paths, lr=...) or from_state_dicts"
        )
    if progress is not None and not callable(progress):
        raise ConfigError(
            f"progress={progress!r} must be None or a function progress(stage, advance, total)"
        )


def _writer_lock(root: Path | None, shard: tuple[int, int]) -> Any:
    """The store's writer lock, held by rank 0 for its whole job (nothing in memory)."""
    if root is None or shard[0] != 0:
        return contextlib.nullcontext()
    return StoreLock(root)


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
    root = None if store is None else store_path(store)
    dtype = dtype_name(dtype)
    batch_size = integer("batch_size", batch_size, 1, 64)
    block_rows = integer("block_rows", block_rows, 1, 4096)
    proj = projection_config(projection, proj_dim, seed)
    names = tuple(select_parameters(model, layer_names(layers, model)))
    embedding_layer = embedding_layer_name(model, embedding_layer)
    queries = query_splits(queries)
    if not isinstance(overwrite, bool | np.bool_):
        raise ConfigError(f"overwrite={overwrite!r} must be True or False")
    proj = effective_projection(model, names, proj)
    check_store_args(keep_features, max_store_gb, on_plan)
    config = RunConfig(names, proj, dtype, block_rows, batch_size, engine, precondition)
    feature_engine = make_engine(model, config, checkpoints=checkpoints)
    keep = resolve_keep_features(keep_features, proj.kind, feature_engine.dim())
    config = dataclasses.replace(config, keep_features=keep)
    if isinstance(feature_engine, FactoredEngine) and proj.kind == "last_layer":
        proj = dataclasses.replace(proj, split=feature_engine.split())
        config = dataclasses.replace(config, projection=proj)
    source = GradientSource(model, feature_engine, batch_size, config)
    with eval_mode(model):
        n_train = _check_first_batch(source, task, checkpoints[0], train_data)
        common: dict[str, Any] = dict(
            config=config, ckpt_ids=tuple(c.id for c in checkpoints), lrs=checkpoints.lrs,
            n_train=n_train, source=source, task=task, checkpoints=checkpoints,
            train_data=train_data,
        )  # fmt: skip
        feature_store = FeatureStore(root)
        splits = {"train": (train_data, task.train_loss)}
        qtask = query_task or task
        for name, data in queries.items():
            splits[name] = (data, qtask.query_score)
        if root is None and proj.kind == "identity":
            sq = _stream_sqnorms(source, task, checkpoints, train_data, n_train, progress)
            _embed(source, feature_store, splits, checkpoints, embedding_layer, config,
                   progress=progress)  # fmt: skip
            run = Run(store=feature_store, streaming=True, sqnorms=sq, **common)
            run.progress = progress
            return run
        manifest: dict[str, Any] = {
            "schema": SCHEMA_VERSION, "tracin_version": tracin.__version__,
            "config": config.to_json(), "model": model_fingerprint(model),
            "embedding_layer": embedding_layer,
            "checkpoints": [ckpt_entry(c) for c in checkpoints],
            "splits": {name: {"n_rows": count_rows(d, batch_size),
                              "fingerprint": data_fingerprint(d, batch_size),
                              "task": task_fingerprint(task if name == "train" else qtask,
                                                       "train" if name == "train" else "query")}
                       for name, (d, _) in splits.items()},
        }  # fmt: skip
        shard = _shard()
        plan = _plan(manifest, source, len(checkpoints), config)
        plan.check(max_store_gb, proj.kind == "identity")  # before the store is touched
        with _writer_lock(root, shard):  # one featurize job per store; released on any exit
            reconcile(feature_store, manifest, overwrite, owner=shard[0] == 0)
            if on_plan is not None and shard[0] == 0 and root is not None:
                on_plan(plan)
            _barrier(shard)  # every rank has checked the store before rank 0 changes it
            if shard[0] == 0:
                feature_store.remove_temp_files()
                feature_store.write_manifest(manifest)
            _barrier(shard)
            for name, (data, score) in splits.items():
                n_rows = int(manifest["splits"][name]["n_rows"])
                source.fill(feature_store, name, checkpoints, score, data, n_rows, config,
                            progress, shard)  # fmt: skip
            _embed(source, feature_store, splits, checkpoints, embedding_layer, config, shard,
                   progress)  # fmt: skip
            _barrier(shard)  # the store is complete on every rank
    split_rows = {k: int(v["n_rows"]) for k, v in manifest["splits"].items()}
    run = Run(store=feature_store, split_rows=split_rows, streaming=not keep, **common)
    run.progress = progress
    return run


def _plan(
    manifest: dict[str, Any], source: GradientSource, n_ckpts: int, config: RunConfig
) -> StorePlan:
    """What the store will hold: each split's rows, and its feature dim (0: norms only)."""
    dim = source.engine.dim()
    splits = tuple(
        (name, int(info["n_rows"]), dim if config.keep_features or name != "train" else 0)
        for name, info in manifest["splits"].items()
    )
    return StorePlan(splits, n_ckpts, np.dtype(config.dtype).itemsize)


def _embed(
    source: GradientSource,
    store: FeatureStore,
    splits: dict[str, Any],
    checkpoints: Checkpoints,
    layer: str | None,
    config: RunConfig,
    shard: tuple[int, int] = (0, 1),
    progress: Any = None,
) -> None:
    """Store every split's ``layer`` activations at the last checkpoint (the final model)."""
    if layer is None:
        return
    for name, (data, score) in splits.items():
        n_rows = count_rows(data, config.batch_size)
        source.embed(store, name, checkpoints[-1], layer, score, data, n_rows, config, shard,
                     progress)  # fmt: skip


def _shard() -> tuple[int, int]:
    """``(rank, world_size)`` under ``torch.distributed`` (e.g. torchrun), else ``(0, 1)``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(shard: tuple[int, int]) -> None:
    if shard[1] > 1:
        torch.distributed.barrier()


_CHECK_ROWS = 8


def _check_first_batch(
    source: GradientSource, task: Task, first_ckpt: Checkpoint, data: Data | Batch
) -> int:
    batch = next(iter(iter_batches(data, source.batch_size)), None)
    if batch is None:
        raise DataError("the training data is empty; featurize needs at least one row")
    # a few rows tell a per-example loss from a batch-mean one; a whole batch costs more
    batch = slice_batch(batch, 0, min(batch_size(batch), _CHECK_ROWS))
    batch = map_tensors(lambda t: t.to(device_of(source.model)), batch)
    model = functional_model(source.model, source.weights(first_ckpt))
    with model_errors("train", 0, batch_size(batch), first_ckpt.id, source.model):
        check_task(task, model, batch, ("train_loss",))
    return count_rows(data, source.batch_size)


def _stream_sqnorms(
    source: GradientSource, task: Task, checkpoints: Checkpoints, data: Any, n: int, progress: Any
) -> np.ndarray:
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


def open(
    path: str | Path,
    *,
    model: nn.Module | None = None,
    task: Task | None = None,
    checkpoints: Checkpoints | None = None,
    batch_size: int = 64,
    engine: str = "auto",
    train_data: Data | None = None,
) -> Run:
    """Reopen a store written by `featurize`.

    Without a model, everything stored is available: self-influence, and influence,
    proponents and opponents of stored query splits. With ``model`` and ``task`` (and
    ``checkpoints`` when the store's checkpoints were in memory), new query batches work too.
    A store without training features (an exact run, ``keep_features=False``) answers
    self-influence alone; its queries stream the training gradients again and need
    ``model``, ``task`` and ``train_data`` (the data featurized).

    Args:
        path: the store directory given to `featurize` as ``store``.
        model: the network (architecture only), for new query batches; needs ``task``.
        task: the task the store was featurized with.
        checkpoints: the checkpoints, when the store's were in memory (no paths recorded).
        batch_size: rows per gradient batch of new queries.
        engine: ``"auto"``, ``"functional"`` or ``"factored"``, as for `featurize`.
        train_data: the featurized training data, for a store without training features.

    Raises:
        StoreError: ``path`` holds no tracin store, or one of another schema version.
        ConfigError: a bad argument: ``model`` without ``task``, in-memory checkpoints not
            passed, a ``model`` or ``task`` of the wrong type.
    """
    model = None if model is None else unwrap_model(model)
    root = store_path(path, "path", create=False)
    batch_size = integer("batch_size", batch_size, 1, 64)
    store = FeatureStore(root)
    manifest = store.read_manifest()
    if manifest is None:
        raise StoreError(f"{root} holds no tracin store (no manifest.json); run featurize first")
    check_schema(root, manifest, writing=False)
    cfg = manifest["config"]
    proj = ProjectionConfig(**cfg["projection"])
    keep = bool(cfg.get("keep_features", True))
    config = RunConfig(tuple(cfg["parameters"]), proj, cfg["dtype"], cfg["block_rows"], batch_size,
                       engine, cfg.get("precondition"), keep)  # fmt: skip
    entries = manifest["checkpoints"]
    source = None
    if model is not None:
        if task is None:
            raise ConfigError("tracin.open(..., model=...) needs task=... too")
        _check_model_and_task(model, task)
        if checkpoints is None:
            if any(e["path"] is None for e in entries):
                raise ConfigError("the store's checkpoints were in memory: pass checkpoints=...")
            checkpoints = Checkpoints(
                Checkpoint(
                    id=e["id"],
                    step=e["step"],
                    lr=e["lr"],
                    path=Path(e["path"]),
                    group_lrs=tuple((n, lr) for n, lr in e.get("group_lrs", ())),
                )
                for e in entries
            )
        engine_ = make_engine(model, config, checkpoints=checkpoints)
        source = GradientSource(model, engine_, config.batch_size, config)
    return Run(
        config=config, ckpt_ids=tuple(e["id"] for e in entries),
        lrs=tuple(float(e["lr"]) for e in entries), n_train=manifest["splits"]["train"]["n_rows"],
        store=store, source=source, task=task, checkpoints=checkpoints, train_data=train_data,
        split_rows={k: int(v["n_rows"]) for k, v in manifest["splits"].items()}, streaming=not keep,
    )  # fmt: skip
