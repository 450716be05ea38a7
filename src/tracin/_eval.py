"""Mislabel detection, measured: flip labels, train with checkpoints, rank, and count.

For each seed: flip a fraction of the training labels of scikit-learn's digits, train the demo
CNN with a `CheckpointRecorder` (log-spaced steps, dense early), then rank training rows by
TracIn self-influence in several recipes and by the baselines a user would otherwise pick (final
loss, loss summed over the same checkpoints, random, cleanlab's confident learning on K-fold
out-of-sample probabilities). Report recall of flipped labels at 5/10/20/30% inspected and AUROC,
mean and spread over seeds.

Regimes: ``brief`` (a few epochs, lr drop: the model has not fit the flipped labels) and
``memorise`` (trained until >= 99% training accuracy on the noisy labels).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tracin._api import featurize
from tracin._errors import ConfigError
from tracin._recorder import CheckpointRecorder, log_spaced_steps
from tracin._task import ClassificationTask

__all__ = ["FRACTIONS", "MislabelConfig", "MislabelResult", "evaluate_mislabel", "recall_at"]

FRACTIONS = (0.05, 0.10, 0.20, 0.30)
Regime = Literal["brief", "memorise"]


@dataclass(frozen=True)
class MislabelConfig:
    """What to measure.

    Attributes:
        noise: fraction of training labels flipped to another class.
        seeds: one run per seed (split, flips, initialisation, batches).
        regime: ``"brief"`` or ``"memorise"``.
        n_checkpoints: checkpoints recorded, log-spaced from the first step.
        cleanlab_folds: K for cleanlab's out-of-sample probabilities (0 skips cleanlab).
        width: channel multiplier of the CNN (1 = the demo's).
    """

    noise: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)
    regime: Regime = "brief"
    n_checkpoints: int = 20
    cleanlab_folds: int = 0
    width: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.noise < 0.5:
            raise ConfigError(f"noise={self.noise} must be between 0 and 0.5")
        if self.regime not in ("brief", "memorise"):
            raise ConfigError(f"regime={self.regime!r}; expected 'brief' or 'memorise'")
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed")


@dataclass
class MislabelResult:
    """Per method: recall at each fraction and AUROC, one row per seed."""

    config: MislabelConfig
    recall: dict[str, np.ndarray] = field(default_factory=dict)  # (seeds, fractions)
    auroc: dict[str, np.ndarray] = field(default_factory=dict)  # (seeds,)
    train_accuracy: list[float] = field(default_factory=list)

    def table(self) -> list[list[Any]]:
        """Rows ``[method, recall@5% ..., AUROC]`` as 'mean ± std' strings, best AUROC first."""
        rows = []
        for name in sorted(self.auroc, key=lambda n: -float(self.auroc[n].mean())):
            r, a = self.recall[name], self.auroc[name]
            cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(r.mean(0), r.std(0), strict=True)]
            rows.append([name, *cells, f"{a.mean():.3f} ± {a.std():.3f}"])
        return rows


def recall_at(
    scores: np.ndarray, flagged: np.ndarray, fractions: Sequence[float] = FRACTIONS
) -> np.ndarray:
    """Fraction of flagged rows among the top ``f`` of rows ranked by descending score."""
    order = np.argsort(-scores, kind="stable")
    return np.array(
        [flagged[order[: round(f * len(scores))]].sum() / flagged.sum() for f in fractions]
    )


def _auroc(scores: np.ndarray, flagged: np.ndarray) -> float:
    """Probability that a flagged row outranks an unflagged one (ties count half)."""
    ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable") + 1.0
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]  # average ranks for ties
    pos, neg = int(flagged.sum()), int((~flagged).sum())
    return float((ranks[flagged].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _net(width: int) -> nn.Module:
    w = width
    return nn.Sequential(
        nn.Conv2d(1, 8 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(8 * w, 16 * w, 3, padding=1),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * w * 16, 32 * w), nn.ReLU(),
        nn.Linear(32 * w, 10),
    )  # fmt: skip


def _digits(noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))[:1500]
    x = torch.tensor(digits.images[order] / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target[order], dtype=torch.long)
    flipped = np.zeros(len(y), dtype=bool)
    flipped[rng.choice(len(y), size=round(noise * len(y)), replace=False)] = True
    shift = torch.tensor(rng.integers(1, 10, int(flipped.sum())))
    y[torch.from_numpy(flipped)] = (y[torch.from_numpy(flipped)] + shift) % 10
    return x, y, flipped


def _fit(x: torch.Tensor, y: torch.Tensor, cfg: MislabelConfig, seed: int, rec: Any) -> nn.Module:
    """Train with SGD; ``brief``: 8 epochs with an lr drop; ``memorise``: until 99% accuracy."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _net(cfg.width)
    lr, momentum = (0.05, 0.9) if cfg.regime == "memorise" else (0.1, 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    epochs = 8 if cfg.regime == "brief" else 300
    step = 0
    for epoch in range(epochs):
        if cfg.regime == "brief" and epoch == 5:
            for group in opt.param_groups:
                group["lr"] = 0.01
        model.train()
        for idx in torch.split(torch.randperm(len(y), generator=gen), 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
            opt.step()
            step += 1
            if rec is not None:
                rec.step(model, opt, step)
        if cfg.regime == "memorise" and _accuracy(model, x, y) >= 0.99:
            break
    if rec is not None:
        rec.save(model, opt, step)
    return model


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def _steps_per_run(cfg: MislabelConfig) -> int:
    return (8 if cfg.regime == "brief" else 120) * 47  # log spacing horizon (1500 / 32 batches)


def _cleanlab_scores(
    x: torch.Tensor, y: torch.Tensor, cfg: MislabelConfig, seed: int
) -> np.ndarray:
    try:
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise ConfigError("the cleanlab baseline needs cleanlab: pip install cleanlab") from None
    probs = np.zeros((len(y), 10))
    folds = np.array_split(np.random.default_rng(seed).permutation(len(y)), cfg.cleanlab_folds)
    for k, held in enumerate(folds):
        keep = np.setdiff1d(np.arange(len(y)), held)
        model = _fit(x[keep], y[keep], cfg, seed * 100 + k, None)
        with torch.no_grad():
            probs[held] = torch.softmax(model.eval()(x[held]), 1).numpy()
    return -np.asarray(get_label_quality_scores(y.numpy(), probs))  # low quality = suspicious


def _one_seed(cfg: MislabelConfig, seed: int, work: Path) -> tuple[dict[str, np.ndarray], float]:
    x, y, _ = _digits(cfg.noise, seed)
    rec = CheckpointRecorder(
        work / f"seed_{seed}", steps=log_spaced_steps(_steps_per_run(cfg), cfg.n_checkpoints)
    )
    model = _fit(x, y, cfg, seed, rec)
    ckpts = rec.checkpoints()
    data, task = TensorDataset(x, y), ClassificationTask()
    scores: dict[str, np.ndarray] = {}
    for name, layers in (
        ("all parameters", None),
        ("last layer", ["8"]),
        ("last-layer bias", ["8.bias"]),
    ):
        run = featurize(model, task, ckpts, data, layers=layers, batch_size=256)
        per_ckpt = run.self_influence_by_checkpoint()
        scores[f"TracIn self-influence, {name}, lr-weighted"] = run.self_influence()
        scores[f"TracIn self-influence, {name}, unit weights"] = per_ckpt.sum(0)
    losses = np.stack([_losses(model, c.state_dict(), x, y) for c in ckpts])
    scores["final loss"] = losses[-1]
    scores["loss summed over checkpoints"] = losses.sum(0)
    scores["random"] = np.random.default_rng(seed + 7).random(len(y))
    if cfg.cleanlab_folds:
        scores["cleanlab (confident learning)"] = _cleanlab_scores(x, y, cfg, seed)
    return scores, _accuracy(model, x, y)


def _losses(
    model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> np.ndarray:
    net = copy.deepcopy(model)
    net.load_state_dict(state)
    with torch.no_grad():
        return nn.functional.cross_entropy(net.eval()(x), y, reduction="none").numpy()


def evaluate_mislabel(
    cfg: MislabelConfig, progress: Callable[[str], None] | None = None
) -> MislabelResult:
    """Run the measurement for every seed; see the module docstring."""
    result = MislabelResult(cfg)
    rows: dict[str, list[np.ndarray]] = {}
    aurocs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in cfg.seeds:
            if progress is not None:
                progress(f"seed {seed}")
            x_flags = _digits(cfg.noise, seed)[2]
            scores, acc = _one_seed(cfg, seed, Path(tmp))
            result.train_accuracy.append(acc)
            for name, s in scores.items():
                rows.setdefault(name, []).append(recall_at(s, x_flags))
                aurocs.setdefault(name, []).append(_auroc(s, x_flags))
    result.recall = {k: np.stack(v) for k, v in rows.items()}
    result.auroc = {k: np.array(v) for k, v in aurocs.items()}
    return result
