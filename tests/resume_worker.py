"""Subprocess for test_resume: featurize a fixed run into a store, optionally slowly."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

import tracin


def main(workdir: str, store: str, slow: str) -> None:
    work = Path(workdir)
    x, y = torch.load(work / "data.pt", weights_only=True)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    ckpts = tracin.Checkpoints.from_paths(sorted(work.glob("ckpt_*.pt")), lr="lr")

    def progress(stage: str, done: int, total: int | None) -> None:
        if slow == "1":
            time.sleep(0.03)

    tracin.featurize(model, tracin.ClassificationTask(), ckpts, TensorDataset(x, y), store=store,
                     proj_dim=16, block_rows=8, batch_size=4, progress=progress)  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:])
