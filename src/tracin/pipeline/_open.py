"""`open`: a store back as a `tracin.Run`, without the model (or with it, for new queries)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tracin._batch import Data
from tracin._errors import ConfigError, StoreError
from tracin._run import Run
from tracin._task import Task
from tracin.checkpoints._checkpoints import Checkpoint, Checkpoints
from tracin.gradients._engines import RunConfig, make_engine
from tracin.gradients._params import unwrap_model
from tracin.gradients._source import GradientSource
from tracin.pipeline._api import check_model_and_task
from tracin.pipeline._args import integer, store_path
from tracin.projection._config import ProjectionConfig
from tracin.store._manifest import Manifest
from tracin.store._store import FeatureStore

__all__ = ["open"]


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
    manifest = Manifest.read(store)
    if manifest is None:
        raise StoreError(f"{root} holds no tracin store (no manifest.json); run featurize first")
    cfg = manifest.config
    proj = ProjectionConfig(**cfg["projection"])
    keep = bool(cfg.get("keep_features", True))
    config = RunConfig(tuple(cfg["parameters"]), proj, cfg["dtype"], cfg["block_rows"], batch_size,
                       engine, cfg.get("precondition"), keep)  # fmt: skip
    entries = manifest.checkpoints
    source = None
    if model is not None:
        if task is None:
            raise ConfigError("tracin.open(..., model=...) needs task=... too")
        check_model_and_task(model, task)
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
        config=config, ckpt_ids=manifest.ckpt_ids, lrs=manifest.lrs,
        n_train=manifest.split_rows["train"], store=store, source=source, task=task,
        checkpoints=checkpoints, train_data=train_data, split_rows=manifest.split_rows,
        streaming=not keep,
    )  # fmt: skip
