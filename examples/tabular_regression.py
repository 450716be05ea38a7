"""Regression on tabular data: an MLP on scikit-learn's bundled diabetes data, explained by TracIn.

Trains with a CheckpointRecorder (log-spaced checkpoints, lr read from the optimiser), featurizes
with RegressionTask, then for a few test patients shows the training rows that pushed the
prediction up (proponents of the prediction score) and down (opponents), and writes a report
whose examples are table rows. Runs offline in seconds:

    python examples/tabular_regression.py --out runs/diabetes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from torch import nn
from torch.utils.data import TensorDataset

import tracin
from tracin.report import compose_report, write_report


def main(out: Path, epochs: int = 60, seed: int = 0) -> dict:
    """Train, featurize, explain three test predictions, write the report; returns a summary."""
    data = load_diabetes()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.target))
    x = torch.tensor(data.data[order], dtype=torch.float32)
    y = torch.tensor(
        (data.target[order] - data.target.mean()) / data.target.std(), dtype=torch.float32
    )
    x_train, y_train, x_test, y_test = x[:380], y[:380], x[380:], y[380:]
    x_mean, x_std = x_train.mean(0), x_train.std(0)
    x_train, x_test = (x_train - x_mean) / x_std, (x_test - x_mean) / x_std

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # T_max one past the end: the lr never reaches 0 (a checkpoint with lr 0 after it is refused)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * 12 + 1)
    rec = tracin.CheckpointRecorder(
        out / "checkpoints", steps=tracin.log_spaced_steps(epochs * 12, 15)
    )
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        for idx in torch.split(torch.randperm(len(y_train), generator=gen), 32):
            opt.zero_grad()
            nn.functional.mse_loss(model(x_train[idx]).squeeze(1), y_train[idx]).backward()
            opt.step()
            sched.step()
            step += 1
            rec.step(model, opt, step)

    task = tracin.RegressionTask()
    run = tracin.featurize(
        model, task, rec.checkpoints(), TensorDataset(x_train, y_train),
        store=out / "store",
        dtype="float64", embedding_layer="1", overwrite=True,
        queries={"test": TensorDataset(x_test)},
        query_task=tracin.RegressionTask(query="prediction"),
    )  # fmt: skip
    props, opps = run.neighbors("test", k=5)
    with torch.no_grad():
        pred = model(x_test).squeeze(1)
    names = data.feature_names

    def render(split: str, i: int) -> dict:
        xs, ys = (x_train, y_train) if split == "train" else (x_test, y_test)
        row = {n: f"{float(v):+.2f}" for n, v in zip(names, xs[i], strict=True)}
        return {"label": f"target {float(ys[i]):+.2f}", "row": row}

    report = compose_report(
        run, render, title="tracin: diabetes regression (MLP)",
        subtitle="proponents raised the test prediction, opponents lowered it (prediction score)",
        query_split="test", query_rows=[0, 1, 2],
        query_captions=[f"predicted {float(pred[i]):+.2f}, true {float(y_test[i]):+.2f}"
                        for i in range(3)],
        k=5, gallery=12,
    )  # fmt: skip
    path = write_report(report, out / "report" / "index.html")
    return {"proponents": props.indices[:3].tolist(), "opponents": opps.indices[:3].tolist(),
            "report": str(path), "n_checkpoints": len(run.lrs)}  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/diabetes"))
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    result = main(args.out, args.epochs)
    print(f"proponents of test row 0: {result['proponents'][0]}")
    print(f"opponents of test row 0: {result['opponents'][0]}")
    print(f"report: {result['report']}")
