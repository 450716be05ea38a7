"""The setup shared by ``tracin eval explain`` and ``tracin eval cluster``: superclasses.

Per data set and seed: merge the ten classes in pairs into five superclasses (classes ``2s`` and
``2s + 1`` form superclass ``s``; the class is the hidden *sub-class*), flip a share of the
training superclass labels to another superclass, train a small CNN with SGD (lr 0.1, then 0.01
for the last third) while a `CheckpointRecorder` saves log-spaced checkpoints, and featurize the
training rows and the test rows (all layers with the Kronecker projection, and the last layer
exactly), once with the trained checkpoints and, for model randomisation, once with every
checkpoint's weights re-initialised (same lrs and steps).

Data sets that ship in packages: ``"digits"`` (scikit-learn, 8x8 images, a 2-D CNN) and
``"mnist1d"`` (``mnist1d.make_dataset``, 40-sample signals, a 1-D CNN).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tracin._errors import ConfigError, MissingDependencyError
from tracin._run import Run
from tracin._task import ClassificationTask
from tracin.checkpoints._checkpoints import Checkpoints
from tracin.checkpoints._recorder import CheckpointRecorder, log_spaced_steps
from tracin.pipeline._api import featurize

__all__ = ["DATA_SETS", "Prepared", "SetupConfig", "prepare"]

DATA_SETS = ("digits", "mnist1d")
_ROWS = {"digits": 1300, "mnist1d": 2000}
_EPOCHS = {"digits": 20, "mnist1d": 30}
_MAX_ROWS = {"digits": 1700, "mnist1d": 2000}


@dataclass(frozen=True)
class SetupConfig:
    """How each run is made.

    Attributes:
        data: data sets, each of `DATA_SETS`.
        seeds: one run per data set and seed (split, flips, initialisation, batches).
        noise: share of training superclass labels flipped.
        rows: training rows (``None``: digits 1300, mnist1d 2000); the rest are queries.
        test_rows: at most this many test rows (``None``: all).
        epochs: training epochs (``None``: digits 20, mnist1d 30).
        n_checkpoints: log-spaced checkpoints recorded.
        proj_dim: Kronecker projection dimension per checkpoint of the all-layer features.
        randomise: also featurize re-initialised checkpoints (model randomisation).

    Raises:
        ConfigError: an unknown data set, or counts below 1.
    """

    data: tuple[str, ...] = DATA_SETS
    seeds: tuple[int, ...] = (0, 1)
    noise: float = 0.1
    rows: int | None = None
    test_rows: int | None = None
    epochs: int | None = None
    n_checkpoints: int = 10
    proj_dim: int = 512
    randomise: bool = True

    def __post_init__(self) -> None:
        bad = [d for d in self.data if d not in DATA_SETS]
        if bad or not self.data:
            raise ConfigError(f"data={list(self.data)}; choose from {list(DATA_SETS)}")
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed")
        if not 0 <= self.noise < 0.5:
            raise ConfigError(f"noise={self.noise} must be in [0, 0.5)")
        most = min(_MAX_ROWS[d] for d in self.data)
        if self.rows is not None and not 100 <= self.rows <= most:
            raise ConfigError(f"rows={self.rows} must be between 100 and {most} (or None)")
        if self.n_checkpoints < 1 or self.proj_dim < 1:
            raise ConfigError(
                f"n_checkpoints={self.n_checkpoints}, proj_dim={self.proj_dim}: give >= 1"
            )


class CNN2d(nn.Module):
    """The demo's CNN for 8x8 images, 5 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(h.flatten(1))))
        return out


class CNN1d(nn.Module):
    """A small 1-D CNN for MNIST-1D's 40-sample signals, 5 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, 16, 5, padding=2)
        self.conv2 = nn.Conv1d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 10, 64)
        self.fc2 = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool1d(torch.relu(self.conv1(x)), 2)
        h = nn.functional.max_pool1d(torch.relu(self.conv2(h)), 2)
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(h.flatten(1))))
        return out


def load(name: str, seed: int, cfg: SetupConfig) -> dict[str, Any]:
    """Inputs, fine classes, superclass labels with ``cfg.noise`` flipped, split by ``seed``."""
    rng = np.random.default_rng(seed)
    rows = cfg.rows or _ROWS[name]
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images / 16.0).astype(np.float32)[:, None]
        order = rng.permutation(len(d.target))
        train, test = order[:rows], order[rows:]
        xtr, xte, ftr, fte = x[train], x[test], d.target[train], d.target[test]
        model: type[nn.Module] = CNN2d
    else:
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError:
            raise MissingDependencyError(
                "data 'mnist1d' needs the mnist1d package: pip install mnist1d"
            ) from None
        args = get_dataset_args()
        args.num_samples, args.seed = 2500, seed
        d = make_dataset(args)
        xtr, xte = d["x"].astype(np.float32)[:rows, None], d["x_test"].astype(np.float32)[:, None]
        ftr, fte = np.asarray(d["y"])[:rows], np.asarray(d["y_test"])
        model = CNN1d
    if cfg.test_rows is not None:
        xte, fte = xte[: cfg.test_rows], fte[: cfg.test_rows]
    sup = ftr // 2
    flipped = rng.random(len(sup)) < cfg.noise
    noisy = np.where(flipped, (sup + rng.integers(1, 5, len(sup))) % 5, sup)
    return {"x_train": torch.tensor(xtr), "y_train": torch.tensor(noisy), "fine_train": ftr,
            "flipped": flipped, "x_test": torch.tensor(xte), "y_test": torch.tensor(fte // 2),
            "fine_test": fte, "model": model}  # fmt: skip


def train(data: dict[str, Any], out: Path, seed: int, epochs: int, n_ckpts: int) -> Any:
    """SGD, batch 32, lr 0.1 then 0.01 for the last third; returns (model, checkpoints)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = data["model"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data["x_train"], data["y_train"]
    total = epochs * -(-len(y) // 32)
    rec = CheckpointRecorder(out, steps=log_spaced_steps(total, n_ckpts))
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        for idx in torch.split(torch.randperm(len(y), generator=gen), 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
            opt.step()
            step += 1
            for group in opt.param_groups:
                group["lr"] = 0.1 if step < total * 2 // 3 else 0.01
            rec.step(model, opt, step)
    return model, rec.checkpoints()


def random_checkpoints(data: dict[str, Any], ckpts: Checkpoints, seed: int) -> Checkpoints:
    """The same lrs and steps, every checkpoint's weights re-initialised (model randomisation)."""
    states = []
    with torch.random.fork_rng():
        for c in range(len(ckpts)):
            torch.manual_seed(10_000 + 100 * seed + c)
            states.append(data["model"]().state_dict())
    steps = [c.step for c in ckpts]
    return Checkpoints.from_state_dicts(states, lr=list(ckpts.lrs), steps=steps)


@dataclass
class Prepared:
    """One data set and seed, trained and featurized.

    Attributes:
        name, seed: what was run.
        data: see `load`.
        queries: correctly predicted test rows (the ones explained).
        accuracy: superclass test accuracy.
        runs: ``{"trained": (all layers, last layer), "random": (...)}``.
    """

    name: str
    seed: int
    data: dict[str, Any]
    queries: np.ndarray
    accuracy: float
    runs: dict[str, tuple[Run, Run]]


def prepare(name: str, seed: int, cfg: SetupConfig, work: Path) -> Prepared:
    """Load, train and featurize one run into ``work`` (see the module docstring)."""
    data = load(name, seed, cfg)
    model, ckpts = train(data, work / "ckpt", seed, cfg.epochs or _EPOCHS[name], cfg.n_checkpoints)
    with torch.no_grad():
        pred = model.eval()(data["x_test"]).argmax(1)
    correct = (pred == data["y_test"]).numpy()
    task = ClassificationTask()
    train_ds = TensorDataset(data["x_train"], data["y_train"])
    common: dict[str, Any] = {"queries": {"test": TensorDataset(data["x_test"], data["y_test"])},
                              "embedding_layer": "fc1", "batch_size": 256}  # fmt: skip
    runs = {}
    tags = [("trained", ckpts)]
    if cfg.randomise:
        tags.append(("random", random_checkpoints(data, ckpts, seed)))
    for tag, cks in tags:
        runs[tag] = (
            featurize(model, task, cks, train_ds, store=work / f"all-{tag}",
                      proj_dim=cfg.proj_dim, projection="kronecker", **common),
            featurize(model, task, cks, train_ds, store=work / f"last-{tag}",
                      layers=["fc2"], projection="last_layer", **common),
        )  # fmt: skip
    return Prepared(name, seed, data, np.flatnonzero(correct), float(correct.mean()), runs)
