"""``tracin demo``: the TracIn story on scikit-learn's bundled handwritten digits.

Flip 10% of the training labels, train a small CNN with SGD and a learning-rate drop while a
`CheckpointRecorder` saves log-spaced checkpoints (dense early, each file holding its lr),
featurize, then: rank training examples by TracIn's contrastive self-influence on the final
layer (the recipe measured best in docs/quality.md) and by self-influence on all layers, count
the flipped labels found against ranking by loss; and show the proponents and opponents of a few
test images, each for the class the model predicted (its loss at every checkpoint: a
misclassified "1" predicted as "8" is explained by what pushed it to "8"), by the default
cosine relevance with the raw TracInCP score beside it for the first. CLI code: it prints, and
seeds its own generators.
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

from tracin._errors import MissingDependencyError
from tracin._task import ClassificationTask
from tracin.analysis._metrics import recall_at
from tracin.checkpoints import CheckpointRecorder, Checkpoints, log_spaced_steps
from tracin.pipeline import featurize

__all__ = ["DemoCNN", "run_demo"]

EPOCHS = 8
LR_DROP_EPOCH = 5
N_CHECKPOINTS = 15
BATCH = 32
FRACTIONS = (0.05, 0.10, 0.20)
CONTRAST = "TracIn contrastive self-influence, final bias"


class DemoCNN(nn.Module):
    """A ~9k-parameter CNN for 8x8 digit images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 10)`` of images ``(B, 1, 8, 8)``."""
        h = torch.relu(self.conv1(x))
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(h.flatten(1))))
        return out


def _data(seed: int) -> dict[str, Any]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingDependencyError(
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


def _train(data: dict[str, Any], out: Path, seed: int) -> tuple[nn.Module, Checkpoints]:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DemoCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)
    x, y = data["x_train"], data["y_train"]
    steps_per_epoch = -(-len(y) // BATCH)
    for stale in out.glob("step_*.pt"):  # a rerun into the same directory starts afresh
        stale.unlink()
    rec = CheckpointRecorder(out, steps=log_spaced_steps(EPOCHS * steps_per_epoch, N_CHECKPOINTS))
    step = 0
    for _ in range(EPOCHS):
        model.train()
        for idx in torch.split(torch.randperm(len(y), generator=gen), BATCH):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            step += 1
            for group in opt.param_groups:  # the lr of the next updates: saved with a checkpoint
                group["lr"] = 0.1 if step < LR_DROP_EPOCH * steps_per_epoch else 0.01
            rec.step(model, opt, step)
    return model, rec.checkpoints()


def _losses(ckpts: Checkpoints, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-example training loss at every checkpoint, shape ``(C, N)`` (baselines)."""
    out = []
    net = DemoCNN().eval()
    for checkpoint in ckpts:
        net.load_state_dict(checkpoint.state_dict())
        with torch.no_grad():
            out.append(nn.functional.cross_entropy(net(x), y, reduction="none").numpy())
    return np.stack(out)


def _progress_bar(progress: Any) -> Any:
    tasks: dict[str, Any] = {}

    def update(stage: str, advance: int, total: int | None) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(f"featurize {stage}", total=total)
        progress.advance(tasks[stage], advance)

    return update


def _pick_queries(model: nn.Module, data: dict[str, Any]) -> tuple[list[int], list[str]]:
    with torch.no_grad():
        pred = model.eval()(data["x_test"]).argmax(1)
    truth = data["y_test"]
    right = torch.nonzero(pred == truth).flatten().tolist()[:3]
    wrong = torch.nonzero(pred != truth).flatten().tolist()[:3]
    rows = right + wrong
    captions = [f"{'correct' if pred[i] == truth[i] else 'MISCLASSIFIED'}: predicted "
                f"{int(pred[i])}, label {int(truth[i])}" for i in rows]  # fmt: skip
    return rows, captions


def run_demo(out_dir: str, seed: int) -> int:
    """Run the demo into ``out_dir``; print a summary and the report's path. Returns 0."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from tracin.report._compose import compose_report
    from tracin.report._html import write_report

    console = Console()
    out = Path(out_dir)
    t0 = time.perf_counter()
    with console.status("training a small CNN on digits with 10% flipped labels"):
        data = _data(seed)
        model, ckpts = _train(data, out / "checkpoints", seed)
    console.print(f"trained {EPOCHS} epochs: {len(ckpts)} log-spaced checkpoints with their lr "
                  f"in {out / 'checkpoints'}")  # fmt: skip
    task = ClassificationTask()
    train = TensorDataset(data["x_train"], data["y_train"])
    with torch.no_grad():  # each test image is explained for the class the model predicted
        predicted = model.eval()(data["x_test"]).argmax(1)
    explained = TensorDataset(data["x_test"], predicted)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
               "{task.total}"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True) as bars:
        run = featurize(
            model, task, ckpts, train, store=out / "store", proj_dim=1024,
            projection="kronecker", dtype="float16", embedding_layer="fc1",
            queries={"test": explained}, batch_size=256, overwrite=True,
            progress=_progress_bar(bars),
        )  # fmt: skip
        bias = featurize(
            model, task, ckpts, train, store=out / "store-bias", layers=["fc2.bias"],
            embedding_layer="fc1", batch_size=256, overwrite=True,
            progress=_progress_bar(bars),
        )  # fmt: skip
    contrast = (
        bias.mislabel_scores().scores
    )  # the default mislabel recipe (tracin.analysis._suspects)
    losses = _losses(ckpts, data["x_train"], data["y_train"])
    rankings = {
        CONTRAST: contrast,
        "TracIn self-influence, all layers": run.self_influence(),
        "final loss": losses[-1],
        "loss summed over checkpoints": losses.sum(0),
    }
    recall = {
        name: [float(r) for r in recall_at(scores, data["is_flipped"], FRACTIONS)]
        for name, scores in rankings.items()
    }
    table = Table(title="flipped labels found among the top-ranked training examples")
    table.add_column("ranking")
    for frac in FRACTIONS:
        table.add_column(f"top {frac:.0%}", justify="right")
    for name, found in recall.items():
        table.add_row(name, *(f"{f:.2f}" for f in found))
    console.print(table)

    rows, captions = _pick_queries(model, data)
    flipped = data["is_flipped"]

    def render(split: str, i: int) -> dict[str, Any]:
        x, y = (
            (data["x_train"], data["y_train"])
            if split == "train"
            else (data["x_test"], data["y_test"])
        )
        return {"label": f"label {int(y[i])}", "image": x[i, 0].numpy()}

    def flag(i: int) -> str:
        return f"flipped (true {int(data['y_clean'][i])})" if flipped[i] else ""

    cls = 8
    baselines = {k: v for k, v in rankings.items() if k != CONTRAST}
    with console.status("writing the report"):
        report = compose_report(
            run, render, title="tracin demo: digits with 10% flipped labels",
            subtitle=f"{len(train)} training images, {len(ckpts)} log-spaced checkpoints (lr "
            "0.1, then 0.01), TracIn-RP features (Kronecker, per layer) for explanations, each "
            "explained for the class the model predicted; suspects ranked by TracIn contrast "
            "on the final layer's bias",
            query_split="test", query_rows=rows, query_captions=captions, k=6, gallery=30,
            flipped=flipped, flag=flag, baselines=baselines,
            cluster_rows=np.flatnonzero(data["y_train"].numpy() == cls).tolist(),
            n_clusters="auto",
            cluster_title=f"Training images labelled {cls}, clustered by TracIn similarity",
            summary=[["ranking", *(f"top {f:.0%}" for f in FRACTIONS)],
                     *([name, *(f"{v:.2f}" for v in found)] for name, found in recall.items())],
            ranking=(CONTRAST, contrast),
        )  # fmt: skip
        path = write_report(report, out / "report" / "index.html")
    seconds = round(time.perf_counter() - t0, 1)
    summary = {"recall": {name: dict(zip(map(str, FRACTIONS), v, strict=True))
                          for name, v in recall.items()},
               "queries": rows, "seconds": seconds, "report": str(path)}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"done in {seconds} s. Report: {path.resolve()}")
    return 0
