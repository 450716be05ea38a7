"""Checking the arguments of `tracin.featurize` and `tracin.open` before any work is done.

Each function returns the value in its one canonical type (a numpy integer becomes an ``int``,
one layer name a one-item list, ``torch.float16`` the string ``"float16"``) or raises
`ConfigError` naming the value, what was expected, and a fix that works as written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tracin._errors import ConfigError
from tracin._validate import integer
from tracin.projection._config import ProjectionConfig

__all__ = [
    "DTYPES",
    "dtype_name",
    "embedding_layer_name",
    "integer",
    "layer_names",
    "projection_config",
    "query_splits",
    "store_path",
]

DTYPES = ("float32", "float16", "float64")
_KINDS = ("gaussian", "rademacher", "kronecker", "last_layer", "identity")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def store_path(store: Any, name: str = "store", create: bool = True) -> Path:
    """The store directory as a `Path`; it may not exist yet, but may not be a file.

    Raises:
        ConfigError: not a path, empty, or an existing file.
    """
    if not isinstance(store, str | os.PathLike) or (isinstance(store, str) and not store.strip()):
        raise ConfigError(
            f"{name}={store!r} must be a directory path (str or pathlib.Path), e.g. "
            f"{name}='runs/mnist'"
        )
    path = Path(store)
    if path.exists() and not path.is_dir():
        fix = (
            f"a new directory path, e.g. {name}={str(path) + '_run'!r}"
            if create
            else "the directory featurize wrote"
        )
        raise ConfigError(
            f"{name}={str(path)!r} is a file, not a directory; a tracin store is a directory "
            f"holding manifest.json and feature blocks: pass {fix}"
        )
    return path


def dtype_name(dtype: Any) -> str:
    """``"float32"``, ``"float16"`` or ``"float64"`` from a string, numpy or torch dtype."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = dtype.strip().lower()
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    if name not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}; expected one of {list(DTYPES)}, e.g. dtype='float32'")
    return name


def projection_config(projection: Any, proj_dim: Any, seed: Any) -> ProjectionConfig:
    """The projection asked for: ``projection`` defaults to ``"gaussian"`` with a ``proj_dim``.

    Raises:
        ConfigError: an unknown kind, a dense kind without ``proj_dim``, or a bad number.
    """
    if projection is not None and not isinstance(projection, str):
        raise ConfigError(f"projection={projection!r} must be a string, one of {list(_KINDS)}")
    kind = None if projection is None else projection.strip().lower()
    dim = None if proj_dim is None else integer("proj_dim", proj_dim, 1, 1024)
    if kind is not None and kind not in _KINDS:
        raise ConfigError(f"projection={projection!r}; expected one of {list(_KINDS)} or None")
    if kind in ("gaussian", "rademacher", "kronecker") and dim is None:
        raise ConfigError(f"projection={kind!r} needs proj_dim, e.g. proj_dim=1024")
    kind = kind or ("gaussian" if dim is not None else "identity")
    return ProjectionConfig(kind, dim, integer("seed", seed, 0, 0))  # type: ignore[arg-type]


def layer_names(layers: Any, model: nn.Module) -> list[str] | None:
    """``None``, or a list of module/parameter names (one name given alone becomes a list).

    Raises:
        ConfigError: not a string or a sequence of strings, or an empty sequence.
    """
    if layers is None:
        return None
    if isinstance(layers, str):
        return [layers]
    is_names = isinstance(layers, Sequence | set | frozenset) and layers
    if is_names and all(isinstance(n, str) for n in layers):
        return list(layers)
    with_params = [n for n, m in model.named_modules() if n and list(m.parameters(recurse=False))]
    example = f"layers={with_params[-1:]!r}, "
    raise ConfigError(
        f"layers={layers!r} must name modules or parameters of the model, e.g. {example}or be "
        "None for every trainable parameter"
    )


def query_splits(queries: Any) -> dict[str, Any]:
    """The named query datasets (``{}`` for ``None``).

    Raises:
        ConfigError: not a mapping, or a name that is not a plain folder name or is ``train``.
    """
    if queries is None:
        return {}
    if not isinstance(queries, Mapping):
        raise ConfigError(
            f"queries is a {type(queries).__name__}; it must be a dict of split name -> data, "
            "e.g. queries={'test': test_dataset}"
        )
    for name in queries:
        if not isinstance(name, str) or not _SPLIT_NAME.fullmatch(name):
            raise ConfigError(
                f"query split name {name!r} must be a string of letters, digits, '_', '-' or '.' "
                "(it names a folder of the store), e.g. 'test'"
            )
        if name == "train":
            raise ConfigError("a query split cannot be named 'train'; call it e.g. 'train_queries'")
    return dict(queries)


def embedding_layer_name(model: nn.Module, layer: Any) -> str | None:
    """``layer`` if it names a module of ``model`` (checked before any gradient is taken).

    Raises:
        ConfigError: not a string, or no such module (the error lists the modules there are).
    """
    if layer is None:
        return None
    names = [n for n, _ in model.named_modules() if n]
    if not isinstance(layer, str) or layer not in dict(model.named_modules()):
        raise ConfigError(
            f"embedding_layer={layer!r} is not a module of the model; its modules are "
            f"{names[:20]}{' ...' if len(names) > 20 else ''} (the penultimate one is the usual "
            "choice)"
        )
    return layer
