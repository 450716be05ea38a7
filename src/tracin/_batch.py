"""Batches and data sources.

A batch is a tensor, a tuple/list of tensors, or a dict of tensors (Hugging Face style), nested
freely; every tensor leaf has the examples along its first dimension. A NumPy array leaf is taken
as ``torch.as_tensor(array)`` (dtype kept, as a DataLoader's collate makes of NumPy rows).
Training data is a `torch.utils.data.Dataset` or an unshuffled `DataLoader`; row ``i`` of every
result is the ``i``-th example in that order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeAlias

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from tracin._errors import DataError, TaskError

__all__ = [
    "products",
    "Batch",
    "Data",
    "MIN_ROWS",
    "Key",
    "batch_size",
    "describe",
    "iter_batches",
    "map_tensors",
    "pad_rows",
    "select",
    "slice_batch",
    "tensors",
]

Batch: TypeAlias = Any
"""A tensor (or NumPy array), or a tuple, list or dict of batches."""
Key: TypeAlias = int | str
Data: TypeAlias = "Dataset[Any] | DataLoader[Any]"


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    """``torch.as_tensor(array)``: the same dtype and values.

    A read-only, non-native byte order or negatively strided array (which torch cannot share) is
    copied first.

    Raises:
        DataError: a dtype torch has no tensor for (object, strings, ...).
    """
    if not array.flags.writeable or not array.dtype.isnative or any(s < 0 for s in array.strides):
        array = np.array(array, dtype=array.dtype.newbyteorder("="), copy=True)
    try:
        return torch.as_tensor(array)
    except (TypeError, ValueError, RuntimeError):
        raise DataError(
            f"batch leaf is a NumPy array of dtype {array.dtype}, which torch cannot hold; "
            "convert it to numbers first (e.g. labels to integer codes, text to token ids), "
            "then pass torch.as_tensor(array)"
        ) from None


def map_tensors(fn: Callable[[torch.Tensor], Any], batch: Batch) -> Batch:
    """Apply ``fn`` to every tensor leaf of ``batch``, keeping its structure.

    A NumPy array leaf is first made a tensor with ``torch.as_tensor`` (dtype kept).

    Raises:
        DataError: a leaf is neither a tensor, a NumPy array of numbers, nor a container of them.
    """
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, np.ndarray):
        return fn(_from_numpy(batch))
    if isinstance(batch, Mapping):
        return {k: map_tensors(fn, v) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(map_tensors(fn, v) for v in batch)
    raise DataError(
        f"batch leaf of type {type(batch).__name__} is not a tensor; batches must be tensors, "
        "tuples/lists or dicts of tensors (tokenize text and convert labels to tensors first)"
    )


def _has_numpy(batch: Batch) -> bool:
    if isinstance(batch, np.ndarray):
        return True
    if isinstance(batch, Mapping):
        return any(_has_numpy(v) for v in batch.values())
    if isinstance(batch, tuple | list):
        return any(_has_numpy(v) for v in batch)
    return False


def tensors(data: Any) -> Any:
    """``data`` with every NumPy array leaf made a tensor (``torch.as_tensor``, dtype kept).

    Anything without a NumPy leaf (a tensor batch, a Dataset, a DataLoader, a split name) is
    returned as it is, so a tensor batch keeps its identity and container type.

    Raises:
        DataError: a NumPy leaf whose dtype torch cannot hold.
    """
    if isinstance(data, Dataset | DataLoader | str) or not _has_numpy(data):
        return data
    return map_tensors(lambda t: t, data)


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


def describe(batch: Batch) -> str:
    """A batch's items for error messages, e.g. ``(Tensor(6, 3) float64, Tensor(6,) int64)``."""
    if isinstance(batch, torch.Tensor):
        return f"Tensor{tuple(batch.shape)} {str(batch.dtype).removeprefix('torch.')}"
    if isinstance(batch, np.ndarray):
        return f"ndarray{tuple(batch.shape)} {batch.dtype}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, tuple | list):
        return "(" + ", ".join(describe(v) for v in batch) + ")"
    return type(batch).__name__


def select(batch: Batch, key: Key, what: str, place: str = "batch") -> Any:
    """``batch[key]``, with an error that names the key and the batch's keys.

    Args:
        batch: a tuple/list (``key`` an int) or a dict (``key`` a str).
        key: where the item sits.
        what: the item's role, e.g. ``"labels"``, for the error message.
        place: what ``batch`` is, for the error message (``"batch"``, ``"model output"``).

    Raises:
        TaskError: the key is not in the batch.
    """
    if isinstance(batch, Mapping):
        if isinstance(key, str) and key in batch:
            return batch[key]
        raise TaskError(
            f"{what} key {key!r} not in the {place}'s keys {sorted(map(str, batch))}; "
            f"pass {what}=<key> to the task"
        )
    if isinstance(batch, tuple | list):
        if isinstance(key, int) and -len(batch) <= key < len(batch):
            return batch[key]
        raise TaskError(
            f"{what} index {key!r} does not fit the {place} of {len(batch)} items "
            f"{describe(batch)}; pass {what}=<index> to the task (0..{len(batch) - 1})"
        )
    raise TaskError(
        f"cannot take {what} {key!r} from a {place} of type {type(batch).__name__}; "
        f"{what}=... picks an item of a tuple or dict"
    )


_RANDOM = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
_ORDER_FIX = (
    "results name rows by their position in the dataset, so rows must come in dataset order: "
    "pass the Dataset itself (tracin batches it in order), or a DataLoader with shuffle=False "
    "and no sampler/batch_sampler (a SequentialSampler; keep your collate_fn)"
)


def _first_out_of_order(indices: Iterable[Any], n: int | None) -> str | None:
    """Where ``indices`` stop being 0, 1, ..., n - 1 (``None`` if they never do)."""
    count = 0
    for count, index in enumerate(indices, start=1):
        if index != count - 1:
            return f"position {count - 1} holds row {index!r}"
    if n is not None and count != n:
        return f"it yields {count} rows of the dataset's {n}"
    return None


def _check_order(loader: DataLoader[Any]) -> None:
    """Refuse a DataLoader whose sampler or batch_sampler does not yield rows 0..N-1 in order.

    Raises:
        DataError: naming the sampler, the first row out of place, and the fix.
    """
    if isinstance(loader.dataset, IterableDataset):
        return  # no sampler: the dataset's own order
    try:
        n: int | None = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        n = None
    batches = loader.batch_sampler
    plain = batches is None or type(batches) is BatchSampler
    sampler = loader.sampler if batches is None else getattr(batches, "sampler", None)
    if plain and isinstance(sampler, SequentialSampler):
        return
    what = f"sampler {type(sampler).__name__}"
    if not plain:
        what = f"batch_sampler {type(batches).__name__}"
    elif isinstance(sampler, _RANDOM):
        raise DataError(f"the DataLoader's {what} shuffles the rows; {_ORDER_FIX}")
    if plain:
        where = _first_out_of_order(iter(sampler), n)  # type: ignore[arg-type]
    else:
        where = _first_out_of_order((i for b in batches for i in b), n)  # type: ignore[union-attr]
    if where is not None:
        raise DataError(
            f"the DataLoader's {what} does not yield rows in order ({where}); {_ORDER_FIX}"
        )


def _loader(data: Data, batch_size: int) -> DataLoader[Any]:
    if isinstance(data, DataLoader):
        _check_order(data)
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
    data = tensors(data)  # NumPy leaves once, not once per slice
    n = batch_size(data)
    for start in range(0, n, batch_size_):
        yield slice_batch(data, start, min(start + batch_size_, n))


def products(q: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``q @ f.T`` over ``f`` padded with zero rows to a multiple of `MIN_ROWS` (then dropped).

    Like the gradients (see `MIN_ROWS`), the product kernel's summation order
    depends on the shapes (a lone edge column is summed differently): padding keeps every score
    bitwise the same whatever the batch size.
    """
    n = f.shape[0]
    if n % MIN_ROWS:
        f = torch.cat([f, f.new_zeros(MIN_ROWS - n % MIN_ROWS, *f.shape[1:])])
    return (q @ f.T)[:, :n]
