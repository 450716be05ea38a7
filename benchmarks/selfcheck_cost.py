"""Cost of the engine self-check (`tracin.gradients.verify_engine`) against the featurize it guards.

For each model: ``tracin.featurize(...)`` (engine ``auto``, no store: streaming exact squared
norms) then ``self_influence()`` on N rows x 2 checkpoints, best of 2 runs, and the self-check
alone (``verify_engine`` on the first batch, as featurize calls it), best of 3. Printed and saved
to ``benchmarks/results/selfcheck_cost.json`` with the machine's load.

    python benchmarks/selfcheck_cost.py            # democnn, cnn28 (47k params), mlp, gpt2 tiny
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

import tracin
from tracin.experiments import DemoCNN
from tracin.gradients import EngineChoice, RunConfig, eval_mode, make_engine, verify_engine
from tracin.projection import ProjectionConfig

OUT = Path(__file__).parent / "results" / "selfcheck_cost.json"


class Cnn28(nn.Module):
    """Two 5x5 convolutions (16, 32 channels) on 28x28, then 512 -> 64 -> 10 (~47k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 5)
        self.c2 = nn.Conv2d(16, 32, 5)
        self.f1 = nn.Linear(512, 64)
        self.f2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        h = nn.functional.max_pool2d(torch.relu(self.c2(h)), 2)
        out: torch.Tensor = self.f2(torch.relu(self.f1(h.flatten(1))))
        return out


def _images(n: int, size: int, gen: torch.Generator) -> TensorDataset:
    return TensorDataset(torch.randn(n, 1, size, size, generator=gen),
                         torch.randint(0, 10, (n,), generator=gen))  # fmt: skip


def _cases(gen: torch.Generator) -> dict[str, tuple[nn.Module, TensorDataset, int]]:
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    x = torch.randn(4096, 64, generator=gen)
    return {
        "democnn": (DemoCNN(), _images(4096, 8, gen), 4096),
        "cnn28": (Cnn28(), _images(2048, 28, gen), 2048),
        "mlp": (mlp, TensorDataset(x, torch.randint(0, 10, (4096,), generator=gen)), 4096),
    }


def _best(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(name: str, model: nn.Module, data: TensorDataset, n: int) -> dict[str, Any]:
    """Featurize time and self-check time for one model."""
    model.eval()
    states = [{k: v.clone() for k, v in model.state_dict().items()} for _ in range(2)]
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=[0.1, 0.01])
    task = tracin.ClassificationTask()

    def featurize() -> None:
        tracin.featurize(model, task, ckpts, data, batch_size=64).self_influence()

    featurize()  # warm-up
    total = _best(featurize, 2)
    names = tuple(n for n, _ in model.named_parameters())
    config = RunConfig(names, ProjectionConfig(), "float32", 4096, 64, "auto")
    weights = {k: v for k, v in states[0].items()}
    batch = list(data[:64])  # 64 rows: a full batch, no padding needed

    def build(choice: EngineChoice, exact: bool) -> Any:
        return make_engine(model, config, choice)

    def check() -> None:
        with eval_mode(model):
            verify_engine(model, "auto", names, build, weights, task.train_loss, batch)

    check()
    cost = _best(check, 3)
    row = {"model": name, "rows": n, "checkpoints": 2, "featurize_s": round(total, 4),
           "selfcheck_s": round(cost, 4), "fraction": round(cost / total, 4)}  # fmt: skip
    print(row, flush=True)
    return row


def main() -> None:
    """Measure every case; print and save the figures."""
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    rows = [measure(name, *case) for name, case in _cases(gen).items()]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"load": os.getloadavg(), "threads": 2, "results": rows}, indent=1))
    print(f"saved {OUT}")


if __name__ == "__main__":
    main()
