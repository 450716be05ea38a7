"""What a store was made with, and the check that a rerun would make the same features.

The manifest records the configuration, the model's architecture, the checkpoints (sha256 of
each), and per split its row count, a fingerprint of its data and the task that scored it. A
featurize on an existing store compares all of these with what is on disk; any difference is
refused, naming the keys, since resuming would mix features of two different runs.

A task is recorded as its class (``module.qualname``), its settings (dataclass fields, or the
public instance attributes of another class) and, for a task defined outside tracin, a sha256 of
its source code (every class of its MRO outside tracin; the qualname when the source cannot be
read), so editing a task's loss invalidates the features it made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tracin._errors import StoreError
from tracin._task import Task
from tracin._version import __version__
from tracin.checkpoints._checkpoints import Checkpoint
from tracin.store._store import SCHEMA_VERSION, FeatureStore

__all__ = ["Manifest", "check_schema", "ckpt_entry", "reconcile", "task_fingerprint"]

_READABLE = (1, SCHEMA_VERSION)
"""Schemas `tracin.open` reads: version 1 differs only in not recording the task."""
_QUERY_ONLY = ("query", "query_class")
"""Settings of the built-in tasks that change the query score only, not the training loss."""


def ckpt_entry(c: Checkpoint) -> dict[str, Any]:
    """A checkpoint as the manifest records it."""
    entry = {"id": c.id, "step": c.step, "lr": c.lr, "sha256": c.sha256(),
             "path": None if c.path is None else str(c.path)}  # fmt: skip
    if c.group_lrs:  # baked into the stored features (the single lr is applied at scoring)
        entry["group_lrs"] = [[name, lr] for name, lr in c.group_lrs]
    return entry


def _builtin(cls: type) -> bool:
    return cls.__module__.split(".")[0] in ("tracin", "builtins", "abc", "typing")


def _source_sha256(obj: Any) -> str:
    """sha256 of the source of a function, or of every non-tracin class in a class's MRO."""
    parts = []
    for item in [c for c in obj.__mro__ if not _builtin(c)] if isinstance(obj, type) else [obj]:
        try:
            parts.append(inspect.getsource(item))
        except (OSError, TypeError):  # defined in a REPL, or compiled: the name is all there is
            parts.append(getattr(item, "__qualname__", type(item).__qualname__))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _value(value: Any) -> Any:
    """A task setting as a JSON value that is equal across processes when the setting is."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, list | tuple):
        return [_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _value(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor | np.ndarray):
        t = torch.as_tensor(value).detach().cpu().contiguous().flatten()
        digest = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()
        return f"{type(value).__name__} {tuple(value.shape)} {value.dtype} sha256:{digest}"
    if isinstance(value, nn.Module):
        return repr(value)  # the architecture and its settings (e.g. a loss module's reduction)
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__} sha256:{_source_sha256(value)}"
    text = repr(value)
    return type(value).__qualname__ if " at 0x" in text else text


def task_fingerprint(task: Task, role: str) -> dict[str, Any]:
    """What identifies ``task`` as the scorer of a ``role`` split (``"train"`` or ``"query"``).

    Returns:
        ``{"class", "settings"}`` plus ``"source_sha256"`` for a task class defined outside
        tracin, in JSON types (so it compares equal to the manifest read back).
    """
    cls = type(task)
    if dataclasses.is_dataclass(task):
        items = {f.name: getattr(task, f.name) for f in dataclasses.fields(task)}
    else:
        items = {k: v for k, v in getattr(task, "__dict__", {}).items() if not k.startswith("_")}
    if role == "train" and _builtin(cls):
        items = {k: v for k, v in items.items() if k not in _QUERY_ONLY}
    out: dict[str, Any] = {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "settings": {k: _value(v) for k, v in sorted(items.items())},
    }
    if not _builtin(cls):
        out["source_sha256"] = _source_sha256(cls)
    loaded: dict[str, Any] = json.loads(json.dumps(out))
    return loaded


def check_schema(root: Path | None, manifest: Mapping[str, Any], writing: bool) -> None:
    """Refuse a store of another schema (for ``writing``, also the older readable one).

    Raises:
        StoreError: the store was written with a schema this version cannot read.
    """
    schema = manifest.get("schema")
    if schema == SCHEMA_VERSION or (schema in _READABLE and not writing):
        return
    written = f"schema {schema!r} (written by tracin {manifest.get('tracin_version')})"
    if schema in _READABLE:
        raise StoreError(
            f"store {root} has {written}, which did not record the task its features were "
            "computed with, so they cannot be checked against this run: featurize again with "
            "overwrite=True (--overwrite), or choose another store directory"
        )
    raise StoreError(
        f"store {root} has {written}; this tracin {__version__} reads schema "
        f"{SCHEMA_VERSION}: featurize again with overwrite=True (--overwrite), or choose "
        "another store directory"
    )


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    if old == new:
        return []
    if prefix.endswith("source_sha256."):
        return [f"{prefix.rstrip('.')} (the task's code changed)"]
    return [f"{prefix.rstrip('.')} ({old!r} -> {new!r})"]


def _split_diffs(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    diffs = []
    for split, info in new.items():
        before = old.get(split)
        if not before:
            continue
        if before["fingerprint"] != info["fingerprint"]:
            diffs.append(f"splits.{split}.fingerprint (different data)")
        elif info["n_rows"] < before["n_rows"]:
            diffs.append(f"splits.{split}.n_rows ({before['n_rows']} -> {info['n_rows']})")
        diffs += _diff(before.get("task"), info.get("task"), f"splits.{split}.task.")
    return diffs


@dataclasses.dataclass
class Manifest:
    """A store's ``manifest.json`` as a typed value (schema `SCHEMA_VERSION`; same JSON on disk).

    Attributes:
        config: the run's `tracin.gradients.RunConfig` as JSON (parameters, projection, dtype,
            block rows, engine, precondition, keep_features).
        model: sha256 of the model's state-dict names, shapes and dtypes.
        embedding_layer: the module whose outputs are stored as embeddings, or None.
        checkpoints: one entry per checkpoint (`ckpt_entry`: id, step, lr, sha256, path).
        splits: per split, ``{"n_rows", "fingerprint", "task"}``.
        schema: the store layout's version.
        tracin_version: the tracin that wrote it.
    """

    config: dict[str, Any]
    model: str
    embedding_layer: str | None
    checkpoints: list[dict[str, Any]]
    splits: dict[str, dict[str, Any]]
    schema: int = SCHEMA_VERSION
    tracin_version: str = __version__

    @classmethod
    def read(cls, store: FeatureStore, writing: bool = False) -> Manifest | None:
        """The store's manifest, or None when it has none.

        Raises:
            StoreError: unreadable JSON, or a schema this version cannot read (for ``writing``,
                also the older readable one).
        """
        data = store.read_manifest()
        if data is None:
            return None
        check_schema(store.root, data, writing)
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``manifest.json``."""
        return dataclasses.asdict(self)

    @property
    def split_rows(self) -> dict[str, int]:
        """Rows of each split, ``{"train": N, <query split>: Q, ...}``."""
        return {name: int(info["n_rows"]) for name, info in self.splits.items()}

    @property
    def ckpt_ids(self) -> tuple[str, ...]:
        """The checkpoint ids, in training order."""
        return tuple(str(e["id"]) for e in self.checkpoints)

    @property
    def lrs(self) -> tuple[float, ...]:
        """One learning rate per checkpoint."""
        return tuple(float(e["lr"]) for e in self.checkpoints)

    def diff(self, old: Manifest) -> list[str]:
        """What differs from ``old`` such that resuming would mix two runs' features."""
        keys = ("config", "model", "embedding_layer")
        diffs = _diff({k: getattr(old, k) for k in keys}, {k: getattr(self, k) for k in keys})
        before = {c["id"]: c for c in old.checkpoints}
        for c in self.checkpoints:
            prior = before.get(c["id"], c)
            if prior["sha256"] != c["sha256"]:
                diffs.append(f"checkpoint {c['id']} sha256 (the file changed)")
            if prior.get("group_lrs") != c.get("group_lrs"):
                diffs.append(f"checkpoint {c['id']} group_lrs ({prior.get('group_lrs')!r} -> "
                             f"{c.get('group_lrs')!r})")  # fmt: skip
        return diffs + _split_diffs(old.splits, self.splits)


def reconcile(store: FeatureStore, manifest: Manifest, overwrite: bool, owner: bool = True) -> None:
    """Check a new manifest against the one on disk; raise naming what differs.

    With ``overwrite``, the ``owner`` (rank 0) empties the store's features and embeddings
    instead, whatever state its manifest is in. Splits on disk that this run does not featurize
    are carried into ``manifest``.

    Raises:
        StoreError: the store was made with another configuration, model, checkpoint file,
            data or task, or by an incompatible tracin.
    """
    if overwrite:
        if owner and store.manifest_path is not None and store.manifest_path.exists():
            for folder in ("features", "embeddings"):
                shutil.rmtree(store.manifest_path.parent / folder, ignore_errors=True)
        return
    old = Manifest.read(store, writing=True)
    if old is None:
        return
    diffs = manifest.diff(old)
    if diffs:
        raise StoreError(
            f"store {store.root} was made differently: {'; '.join(diffs)}. Pass overwrite=True "
            "(--overwrite on the command line) to replace it, or choose another store directory"
        )
    for split, info in old.splits.items():
        manifest.splits.setdefault(split, info)
