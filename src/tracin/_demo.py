"""``tracin demo``: the TracIn story on scikit-learn's bundled handwritten digits.

Flip 10% of the training labels, train a small CNN with SGD and a learning-rate drop (one
checkpoint per epoch, each file holding its lr), featurize, then: rank training examples by
self-influence and count the flipped labels found, against ranking by final loss; and show the
proponents and opponents of a few test images. CLI code: it prints, and seeds its own generators.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tracin
from tracin._errors import ConfigError
from tracin._scoring import top_k

__all__ = ["DemoCNN", "run_demo"]

EPOCHS = 8
LR_DROP_EPOCH = 5
FRACTIONS = (0.05, 0.10, 0.20)


class DemoCNN(nn.Module):
    """A ~9k-parameter CNN for 8x8 digit images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(h.flatten(1))))
        return out


def _data(seed: int) -> dict[str, Any]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError(
            "the demo needs scikit-learn: pip install 'tracin[demo]' (with the torch pin)"
        ) from None
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    train, test = order[:1500], order[1500:]
    y_train = y[train].clone()
    flipped = rng.choice(len(train), size=len(train) // 10, replace=False)
    y_train[flipped] = (y_train[flipped] + torch.tensor(rng.integers(1, 10, len(flipped)))) % 10
    is_flipped = np.zeros(len(train), dtype=bool)
    is_flipped[flipped] = True
    return {
        "x_train": x[train], "y_train": y_train, "y_clean": y[train], "is_flipped": is_flipped,
        "x_test": x[test], "y_test": y[test],
    }  # fmt: skip


def _train(data: dict[str, Any], out: Path, seed: int) -> tuple[nn.Module, list[Path]]:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DemoCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)
    x, y = data["x_train"], data["y_train"]
    paths = []
    out.mkdir(parents=True, exist_ok=True)
    for epoch in range(EPOCHS):
        lr = 0.1 if epoch < LR_DROP_EPOCH else 0.01
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        for idx in torch.split(torch.randperm(len(y), generator=gen), 32):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        path = out / f"epoch_{epoch}.pt"
        torch.save({"model_state_dict": model.state_dict(), "lr": lr, "step": epoch}, path)
        paths.append(path)
    return model, paths


def _recall(scores: np.ndarray, is_flipped: np.ndarray) -> list[float]:
    order = np.argsort(-scores, kind="stable")
    found = []
    for frac in FRACTIONS:
        top = order[: round(frac * len(scores))]
        found.append(float(is_flipped[top].sum() / is_flipped.sum()))
    return found


def run_demo(out_dir: str, seed: int) -> int:
    """Run the demo into ``out_dir``; print a summary. Returns the exit status."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    out = Path(out_dir)
    t0 = time.perf_counter()
    with console.status("training a small CNN on digits with 10% flipped labels"):
        data = _data(seed)
        model, paths = _train(data, out / "checkpoints", seed)
    console.print(f"trained {EPOCHS} epochs, {len(paths)} checkpoints in {out / 'checkpoints'}")
    task = tracin.ClassificationTask()
    ckpts = tracin.Checkpoints.from_paths(paths, lr="lr")
    train = TensorDataset(data["x_train"], data["y_train"])
    with console.status("featurizing: per-example gradients at every checkpoint"):
        run = tracin.featurize(model, task, ckpts, train, batch_size=256)
    self_inf = run.self_influence()
    with torch.no_grad():
        loss = task.train_loss(model.eval(), (data["x_train"], data["y_train"])).numpy()
    table = Table(title="flipped labels found among the top-ranked training examples")
    table.add_column("ranking")
    for frac in FRACTIONS:
        table.add_column(f"top {frac:.0%}", justify="right")
    rows = {"TracIn self-influence": _recall(self_inf, data["is_flipped"]),
            "final loss": _recall(loss, data["is_flipped"])}  # fmt: skip
    for name, found in rows.items():
        table.add_row(name, *(f"{f:.2f}" for f in found))
    console.print(table)

    queries = (data["x_test"][:4], data["y_test"][:4])
    scores = run.influence(queries)  # one pass serves both proponents and opponents
    props, opps = top_k(scores, 3, largest=True), top_k(scores, 3, largest=False)
    explain = Table(title="proponents and opponents of 4 test images (train row: label)")
    for col in ("query label", "proponents", "opponents"):
        explain.add_column(col)
    for q in range(4):
        fmt = [
            ", ".join(f"{i}:{int(data['y_train'][i])}{'*' if data['is_flipped'][i] else ''}"
                      for i in nb.indices[q])
            for nb in (props, opps)
        ]  # fmt: skip
        explain.add_row(str(int(queries[1][q])), *fmt)
    console.print(explain)
    console.print("* = a flipped label")
    summary = {
        "recall": {
            name: dict(zip(map(str, FRACTIONS), v, strict=True)) for name, v in rows.items()
        },
        "proponents": props.indices.tolist(),
        "opponents": opps.indices.tolist(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"done in {summary['seconds']} s; results in {out / 'summary.json'}")
    return 0
