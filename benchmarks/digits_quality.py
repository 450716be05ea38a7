"""Shared pieces of the score-quality benchmarks (ideal_spearman.py, lds.py).

scikit-learn's digits (8x8 images flattened to 64 features in [0, 1]), a fixed train/test split,
two small models (an MLP and multinomial logistic regression), and a plain-SGD training loop
with a per-step learning-rate schedule that hands every step to a callback before
``optimizer.step()`` (where `tracin.TracInIdeal.step` goes) and keeps the weights after each step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

import tracin

TASK = tracin.ClassificationTask()


@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(seed: int = 0, n_train: int = 1297) -> Digits:
    from sklearn.datasets import load_digits as sk_load

    data = sk_load()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = np.random.default_rng(seed).permutation(len(y))
    train, test = order[:n_train], order[n_train:]
    return Digits(x[train], y[train], x[test], y[test])


class MLP(nn.Module):
    """64 -> hidden -> hidden -> 10, ReLU."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
        return out


class LogReg(nn.Module):
    """Multinomial logistic regression: one Linear layer, 64 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)
        return out


def make_model(kind: str, seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLP() if kind == "mlp" else LogReg()


def last_layer(kind: str) -> str:
    return "fc3" if kind == "mlp" else "fc"


@dataclass(frozen=True)
class Schedule:
    """Cosine decay from ``lr`` to ``lr * floor`` over ``epochs`` epochs of ``batch`` rows."""

    lr: float
    epochs: int
    batch: int = 32
    floor: float = 0.02

    def steps(self, n: int) -> int:
        return self.epochs * math.ceil(n / self.batch)

    def lr_at(self, step: int, total: int) -> float:
        """The lr used by step ``step`` (0-based) of ``total``."""
        cos = 0.5 * (1 + math.cos(math.pi * step / max(total - 1, 1)))
        return self.lr * (self.floor + (1 - self.floor) * cos)


StepHook = Callable[[tuple[torch.Tensor, torch.Tensor], np.ndarray, torch.optim.Optimizer], None]


@dataclass
class Trained:
    model: nn.Module
    states: list[dict[str, torch.Tensor]]  # states[s] = weights after s steps (s = 0..T)
    lrs: list[float]  # lrs[s] = lr used by step s+1 (the one taking states[s] to states[s+1])


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    schedule: Schedule,
    seed: int,
    on_step: StepHook | None = None,
    keep_states: bool = False,
) -> Trained:
    """Plain SGD on the mean cross-entropy, shuffled batches drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=schedule.lr)
    total = schedule.steps(len(y))
    states = [_snapshot(model)] if keep_states else []
    lrs: list[float] = []
    step = 0
    for _ in range(schedule.epochs):
        for idx in torch.split(torch.randperm(len(y), generator=gen), schedule.batch):
            lr = schedule.lr_at(step, total)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = (x[idx], y[idx])
            loss = TASK.train_loss(model, batch).mean()
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            if on_step is not None:
                on_step(batch, idx.numpy(), opt)
            opt.step()
            lrs.append(lr)
            step += 1
            if keep_states:
                states.append(_snapshot(model))
    return Trained(model, states, lrs)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def query_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return TASK.train_loss(model, (x, y)).numpy().astype(np.float64)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def checkpoints_at(trained: Trained, steps: list[int], weights: list[float]) -> tracin.Checkpoints:
    """`tracin.Checkpoints` of the weights after each of ``steps``, weighted by ``weights``."""
    return tracin.Checkpoints.from_state_dicts(
        [trained.states[s] for s in steps], lr=weights, steps=steps
    )


def lr_after(trained: Trained, step: int) -> float:
    """The lr in force after the checkpoint at ``step`` (the lr of the next step)."""
    return trained.lrs[min(step, len(trained.lrs) - 1)]


def row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b``."""
    return np.array([float(spearmanr(u, v).statistic) for u, v in zip(a, b, strict=True)])


def row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b``."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return np.asarray((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1)))


def top_overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per row: the share of ``b``'s ``k`` largest entries among ``a``'s ``k`` largest."""
    top_a = np.argsort(-a, axis=1)[:, :k]
    top_b = np.argsort(-b, axis=1)[:, :k]
    return np.array([len(set(u) & set(v)) / k for u, v in zip(top_a, top_b, strict=True)])


def summary(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(np.nanmean(v)),
        "std": float(np.nanstd(v)),
        "median": float(np.nanmedian(v)),
        "min": float(np.nanmin(v)),
        "max": float(np.nanmax(v)),
        "n": int(np.sum(np.isfinite(v))),
    }
