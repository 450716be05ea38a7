"""Batches and data sources.

A batch is a tensor, a tuple/list of tensors, or a dict of tensors (Hugging Face style), nested
freely; every tensor leaf has the examples along its first dimension. Training data is a
`torch.utils.data.Dataset` or an unshuffled `DataLoader`; row ``i`` of every result is the ``i``-th
example in that order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeAlias

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset

from tracin._errors import DataError, TaskError

__all__ = [
    "Batch",
    "Data",
    "MIN_ROWS",
    "Key",
    "batch_size",
    "iter_batches",
    "map_tensors",
    "pad_rows",
    "select",
    "slice_batch",
]

Batch: TypeAlias = Any
"""A tensor, or a tuple, list or dict of batches."""
Key: TypeAlias = int | str
Data: TypeAlias = "Dataset[Any] | DataLoader[Any]"


def map_tensors(fn: Callable[[torch.Tensor], Any], batch: Batch) -> Batch:
    """Apply ``fn`` to every tensor leaf of ``batch``, keeping its structure.

    Raises:
        DataError: a leaf is neither a tensor nor a container of tensors.
    """
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(fn, v) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(map_tensors(fn, v) for v in batch)
    raise DataError(
        f"batch leaf of type {type(batch).__name__} is not a tensor; batches must be tensors, "
        "tuples/lists or dicts of tensors (tokenize text and convert labels to tensors first)"
    )


def _leaves(batch: Batch) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    map_tensors(out.append, batch)
    return out


def batch_size(batch: Batch) -> int:
    """Number of examples in ``batch``: the common first dimension of its tensors.

    Raises:
        DataError: no tensors, a 0-d tensor, or tensors that disagree on the first dimension.
    """
    leaves = _leaves(batch)
    if not leaves:
        raise DataError("batch holds no tensors; expected a tensor, tuple or dict of tensors")
    sizes = {t.shape[0] if t.dim() > 0 else -1 for t in leaves}
    if -1 in sizes:
        raise DataError("batch holds a 0-d tensor; every tensor needs the examples on dim 0")
    if len(sizes) != 1:
        raise DataError(
            f"batch tensors disagree on the number of examples (first dims {sorted(sizes)}); "
            "every tensor in a batch needs the same first dimension"
        )
    return sizes.pop()


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of every tensor in ``batch``."""
    return map_tensors(lambda t: t[start:stop], batch)


MIN_ROWS = 64
"""Batches are computed with at least this many rows, so results do not depend on batch size.

Matrix kernels (BLAS, oneDNN) pick their blocking, and so their order of summation, by the
shapes they see: a row's gradient computed in a batch of 7 can differ in the last bit from the
same row in a batch of 64. Measured here, every batch of 64 or more rows gives bitwise the same
per-row results; smaller batches (and the tail of the data) are padded up to 64 rows by repeating
their last row, and the padding's results are dropped.
"""


def pad_rows(batch: Batch, rows: int = MIN_ROWS) -> tuple[Batch, int]:
    """``batch`` padded to at least ``rows`` rows by repeating its last row; and its own size."""
    n = batch_size(batch)
    if n >= rows or n == 0:
        return batch, n
    return map_tensors(lambda t: torch.cat([t, t[-1:].expand(rows - n, *t.shape[1:])]), batch), n


def select(batch: Batch, key: Key, what: str) -> Any:
    """``batch[key]``, with an error that names the key and the batch's keys.

    Args:
        batch: a tuple/list (``key`` an int) or a dict (``key`` a str).
        key: where the item sits.
        what: the item's role, e.g. ``"labels"``, for the error message.

    Raises:
        TaskError: the key is not in the batch.
    """
    if isinstance(batch, Mapping):
        if isinstance(key, str) and key in batch:
            return batch[key]
        raise TaskError(
            f"{what} key {key!r} not in the batch's keys {sorted(map(str, batch))}; "
            f"pass {what}=<key> to the task"
        )
    if isinstance(batch, tuple | list):
        if isinstance(key, int) and -len(batch) <= key < len(batch):
            return batch[key]
        raise TaskError(
            f"{what} index {key!r} does not fit a batch of {len(batch)} items; "
            f"pass {what}=<index> to the task"
        )
    raise TaskError(
        f"cannot take {what} {key!r} from a batch of type {type(batch).__name__}; "
        "a task with labels needs tuple or dict batches"
    )


def _loader(data: Data, batch_size: int) -> DataLoader[Any]:
    if isinstance(data, DataLoader):
        sampler = data.sampler
        if isinstance(sampler, RandomSampler) or not isinstance(
            sampler, SequentialSampler | type(None)
        ):
            raise DataError(
                f"the DataLoader's sampler is {type(sampler).__name__}; rows must come in a fixed "
                "order so scores can name examples: use shuffle=False (or pass the Dataset)"
            )
        return data
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    raise DataError(
        f"data of type {type(data).__name__} is not a torch Dataset or DataLoader; wrap tensors "
        "in torch.utils.data.TensorDataset"
    )


def iter_batches(data: Data | Batch, batch_size_: int) -> Iterator[Batch]:
    """Yield the batches of a Dataset/DataLoader, or chunks of one in-memory batch.

    Args:
        data: a Dataset, an unshuffled DataLoader, or a single batch.
        batch_size_: rows per batch for a Dataset or an in-memory batch (a DataLoader keeps
            its own).
    """
    if type(data) is TensorDataset:  # slices, not a DataLoader's per-row indexing and collate
        n = len(data)
        for start in range(0, n, batch_size_):
            yield [t[start : start + batch_size_] for t in data.tensors]
        return
    if isinstance(data, Dataset | DataLoader):
        yield from _loader(data, batch_size_)
        return
    n = batch_size(data)
    for start in range(0, n, batch_size_):
        yield slice_batch(data, start, min(start + batch_size_, n))
