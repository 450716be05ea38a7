"""The block layout of a split: rows in fixed-size blocks, each written and validated alone."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from tracin._batch import Batch, Data, batch_size, iter_batches, slice_batch
from tracin.store._store import FeatureStore

__all__ = ["block_pieces", "block_sizes", "missing_blocks", "rows_in"]


def missing_blocks(
    store: FeatureStore,
    split: str,
    key: str,
    n_rows: int,
    block_rows: int,
    shard: tuple[int, int] = (0, 1),
) -> list[int]:
    """Blocks of ``split`` under ``key`` that are absent or invalid (those of ``shard`` only)."""
    rank, world = shard
    rows_of = block_sizes(n_rows, block_rows)
    return [
        k
        for k, rows in enumerate(rows_of)
        if k % world == rank and not store.is_valid(split, key, k, rows)
    ]


def rows_in(blocks: list[int], n_rows: int, block_rows: int) -> int:
    """Rows the given blocks hold."""
    return sum(min(block_rows, n_rows - k * block_rows) for k in blocks)


def block_sizes(n_rows: int, block_rows: int) -> list[int]:
    """Rows of each block of a split of ``n_rows`` rows."""
    return [min(block_rows, n_rows - s) for s in range(0, n_rows, block_rows)]


def block_pieces(
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
