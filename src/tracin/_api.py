"""The entry points: `featurize` (model + data -> run) and `open` (store -> run)."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import tracin
from tracin._batch import Batch, Data, batch_size, iter_batches, map_tensors, slice_batch
from tracin._checkpoints import Checkpoint, Checkpoints
from tracin._engine import functional_model
from tracin._errors import ConfigError, DataError
from tracin._featurize import (
    GradientSource,
    RunConfig,
    count_rows,
    data_fingerprint,
    device_of,
    make_engine,
    model_errors,
    model_fingerprint,
)
from tracin._hooks import FactoredEngine
from tracin._params import eval_mode, select_parameters
from tracin._projection import ProjectionConfig
from tracin._run import Run
from tracin._store import SCHEMA_VERSION, FeatureStore, StoreError
from tracin._task import Task, check_task

__all__ = ["featurize", "open"]

_DTYPES = ("float32", "float16", "float64")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")
    return value


def _validate(model: Any, task: Any, checkpoints: Any, dtype: str) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model is a {type(model).__name__}, not a torch.nn.Module")
    if not isinstance(task, Task):
        raise ConfigError(f"task is a {type(task).__name__}, not a tracin.Task")
    if not isinstance(checkpoints, Checkpoints):
        raise ConfigError(
            f"checkpoints is a {type(checkpoints).__name__}; build it with "
            "tracin.Checkpoints.from_paths(paths, lr=...) or from_state_dicts"
        )
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r}; expected one of {list(_DTYPES)}")


def _ckpt_entry(c: Checkpoint) -> dict[str, Any]:
    return {"id": c.id, "step": c.step, "lr": c.lr, "sha256": c.sha256(),
            "path": None if c.path is None else str(c.path)}  # fmt: skip


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')} ({old!r} -> {new!r})"]


def _check_schema(root: Path | None, manifest: Mapping[str, Any]) -> None:
    if manifest.get("schema") != SCHEMA_VERSION:
        raise StoreError(
            f"store {root} has schema {manifest.get('schema')!r} (written by tracin "
            f"{manifest.get('tracin_version')}); this tracin {tracin.__version__} reads schema "
            f"{SCHEMA_VERSION}: featurize again with overwrite=True"
        )


def _reconcile(store: FeatureStore, manifest: dict[str, Any], overwrite: bool) -> None:
    """Check a new manifest against the one on disk; raise naming what differs."""
    old = store.read_manifest()
    if old is None:
        return
    root = store.root
    if overwrite:
        assert root is not None
        shutil.rmtree(root / "features", ignore_errors=True)
        return
    _check_schema(root, old)
    keys = ("config", "model", "embedding_layer")
    diffs = _diff({k: old.get(k) for k in keys}, {k: manifest[k] for k in keys})
    hashes = {c["id"]: c["sha256"] for c in old.get("checkpoints", [])}
    for c in manifest["checkpoints"]:
        if hashes.get(c["id"], c["sha256"]) != c["sha256"]:
            diffs.append(f"checkpoint {c['id']} sha256 (the file changed)")
    for split, info in manifest["splits"].items():
        before = old.get("splits", {}).get(split)
        if before and before["fingerprint"] != info["fingerprint"]:
            diffs.append(f"splits.{split}.fingerprint (different data)")
        elif before and info["n_rows"] < before["n_rows"]:
            diffs.append(f"splits.{split}.n_rows ({before['n_rows']} -> {info['n_rows']})")
    if diffs:
        raise StoreError(
            f"store {root} was made differently: {'; '.join(diffs)}. Pass overwrite=True to "
            "replace it, or choose another store directory"
        )
    for split, info in old.get("splits", {}).items():
        manifest["splits"].setdefault(split, info)


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
) -> Run:
    """Take training gradients at every checkpoint and return a `Run` to query.

    With ``store=None`` and no projection, nothing but exact squared norms is kept and query
    passes stream exact gradients. With a store directory (or a projection), features are
    written in blocks; a rerun after a crash computes only the missing blocks, and new rows or
    checkpoints are added without recomputing what is there.

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
            ``total`` are done in ``stage`` (e.g. ``"train ckpt_3"``); the CLI draws bars with it.

    Raises:
        TracInError: for any bad input, with the value and the fix in the message.
    """
    _validate(model, task, checkpoints, dtype)
    _positive_int("batch_size", batch_size)
    _positive_int("block_rows", block_rows)
    kind = projection or ("gaussian" if proj_dim is not None else "identity")
    proj = ProjectionConfig(kind, proj_dim, seed)  # type: ignore[arg-type]
    names = tuple(select_parameters(model, layers))
    config = RunConfig(names, proj, dtype, block_rows, batch_size, engine, precondition)
    feature_engine = make_engine(model, config)
    if isinstance(feature_engine, FactoredEngine) and proj.kind == "last_layer":
        proj = dataclasses.replace(proj, split=feature_engine.split())
        config = dataclasses.replace(config, projection=proj)
    source = GradientSource(model, feature_engine, batch_size)
    with eval_mode(model):
        n_train = _check_first_batch(source, task, checkpoints[0], train_data)
        common: dict[str, Any] = dict(
            config=config, ckpt_ids=tuple(c.id for c in checkpoints), lrs=checkpoints.lrs,
            n_train=n_train, source=source, task=task, checkpoints=checkpoints,
            train_data=train_data,
        )  # fmt: skip
        feature_store = FeatureStore(None if store is None else Path(store))
        splits = {"train": (train_data, task.train_loss)}
        qtask = query_task or task
        for name, data in (queries or {}).items():
            if name == "train":
                raise ConfigError("a query split cannot be named 'train'")
            splits[name] = (data, qtask.query_score)
        if store is None and proj.kind == "identity":
            sq = _stream_sqnorms(source, task, checkpoints, train_data, n_train, progress)
            _embed(source, feature_store, splits, checkpoints, embedding_layer, config)
            return Run(store=feature_store, streaming=True, sqnorms=sq, **common)
        manifest: dict[str, Any] = {
            "schema": SCHEMA_VERSION, "tracin_version": tracin.__version__,
            "config": config.to_json(), "model": model_fingerprint(model),
            "embedding_layer": embedding_layer,
            "checkpoints": [_ckpt_entry(c) for c in checkpoints],
            "splits": {name: {"n_rows": count_rows(d, batch_size),
                              "fingerprint": data_fingerprint(d, batch_size)}
                       for name, (d, _) in splits.items()},
        }  # fmt: skip
        shard = _shard()
        _reconcile(feature_store, manifest, overwrite and shard[0] == 0)
        _barrier(shard)  # every rank has checked the store before rank 0 changes it
        if shard[0] == 0:
            feature_store.remove_temp_files()
            feature_store.write_manifest(manifest)
        _barrier(shard)
        for name, (data, score) in splits.items():
            n_rows = int(manifest["splits"][name]["n_rows"])
            source.fill(feature_store, name, checkpoints, score, data, n_rows, config, progress,
                        shard)  # fmt: skip
        _embed(source, feature_store, splits, checkpoints, embedding_layer, config, shard)
        _barrier(shard)  # the store is complete on every rank
    split_rows = {k: int(v["n_rows"]) for k, v in manifest["splits"].items()}
    return Run(store=feature_store, split_rows=split_rows, **common)


def _embed(
    source: GradientSource,
    store: FeatureStore,
    splits: dict[str, Any],
    checkpoints: Checkpoints,
    layer: str | None,
    config: RunConfig,
    shard: tuple[int, int] = (0, 1),
) -> None:
    """Store every split's ``layer`` activations at the last checkpoint (the final model)."""
    if layer is None:
        return
    for name, (data, score) in splits.items():
        n_rows = count_rows(data, config.batch_size)
        source.embed(store, name, checkpoints[-1], layer, score, data, n_rows, config, shard)


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
    with model_errors("train", 0, batch_size(batch), first_ckpt.id):
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
) -> Run:
    """Reopen a store written by `featurize`.

    Without a model, everything stored is available: self-influence, and influence,
    proponents and opponents of stored query splits. With ``model`` and ``task`` (and
    ``checkpoints`` when the store's checkpoints were in memory), new query batches work too.
    """
    root = Path(path)
    store = FeatureStore(root)
    manifest = store.read_manifest()
    if manifest is None:
        raise StoreError(f"{root} holds no tracin store (no manifest.json); run featurize first")
    _check_schema(root, manifest)
    cfg = manifest["config"]
    proj = ProjectionConfig(**cfg["projection"])
    config = RunConfig(tuple(cfg["parameters"]), proj, cfg["dtype"], cfg["block_rows"], batch_size,
                       engine, cfg.get("precondition"))  # fmt: skip
    entries = manifest["checkpoints"]
    source = None
    if model is not None:
        if task is None:
            raise ConfigError("tracin.open(..., model=...) needs task=... too")
        if checkpoints is None:
            if any(e["path"] is None for e in entries):
                raise ConfigError("the store's checkpoints were in memory: pass checkpoints=...")
            checkpoints = Checkpoints(
                Checkpoint(id=e["id"], step=e["step"], lr=e["lr"], path=Path(e["path"]))
                for e in entries
            )
        source = GradientSource(model, make_engine(model, config), config.batch_size)
    return Run(
        config=config, ckpt_ids=tuple(e["id"] for e in entries),
        lrs=tuple(float(e["lr"]) for e in entries), n_train=manifest["splits"]["train"]["n_rows"],
        store=store, source=source, task=task, checkpoints=checkpoints,
        split_rows={k: int(v["n_rows"]) for k, v in manifest["splits"].items()},
    )  # fmt: skip
