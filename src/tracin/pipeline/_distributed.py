"""The distributed start-up: which share of a store's blocks this process writes, and when to wait.

Under ``torch.distributed`` (e.g. ``torchrun``; the user initialises the process group), rank ``r``
of ``W`` computes blocks ``r, r + W, ...`` of every split; rank 0 alone holds the store's writer
lock, checks and writes the manifest; barriers order the ranks around it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from tracin.store._lock import StoreLock

__all__ = ["barrier", "shard", "writer_lock"]


def shard() -> tuple[int, int]:
    """``(rank, world_size)`` under ``torch.distributed`` (e.g. torchrun), else ``(0, 1)``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier(part: tuple[int, int]) -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if part[1] > 1:
        torch.distributed.barrier()


def writer_lock(root: Path | None, part: tuple[int, int]) -> Any:
    """The store's writer lock, held by rank 0 for its whole job (nothing in memory)."""
    if root is None or part[0] != 0:
        return contextlib.nullcontext()
    return StoreLock(root)
