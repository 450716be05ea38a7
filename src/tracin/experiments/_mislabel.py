"""Mislabel detection, measured: flip labels, train with checkpoints, rank, and count.

For each seed: flip a fraction of the training labels of scikit-learn's digits (1500 images as
64 pixel features), train an MLP with a `CheckpointRecorder` (log-spaced steps, dense early),
then rank training rows by TracIn quantities and by the baselines a user would otherwise pick
(final loss, loss summed over the same checkpoints, random, cleanlab's confident learning on
K-fold out-of-sample probabilities). Report recall of flipped labels at 5/10/20/30% inspected and
AUROC, mean and spread over seeds.

TracIn rankings (every one a quantity over the checkpoints' gradients):

- ``TracIn contrast``: self-influence minus the mean influence on the 10 nearest embedding
  neighbors (`Run.contrastive_self_influence`), last-layer bias, unit checkpoint weights;
- ``TracIn self-influence, last-layer bias``: unit checkpoint weights;
- ``TracIn self-influence, all parameters``: lr-weighted, the paper's recipe.

Regimes: ``brief`` (8 epochs, lr drop: the model has not fit the flipped labels) and
``memorise`` (SGD with momentum until >= 99% training accuracy on the noisy labels).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tracin._errors import ConfigError, MissingDependencyError
from tracin._task import ClassificationTask
from tracin.analysis._metrics import auroc, recall_at
from tracin.checkpoints._recorder import CheckpointRecorder, log_spaced_steps
from tracin.experiments._results import pyplot, save_result
from tracin.pipeline._api import featurize

__all__ = ["FRACTIONS", "MislabelConfig", "MislabelResult", "evaluate_mislabel"]

FRACTIONS = (0.05, 0.10, 0.20, 0.30)
Regime = Literal["brief", "memorise"]
CONTRAST = "TracIn contrast (self - neighbor influence), last-layer bias"
BIAS = "TracIn self-influence, last-layer bias"
PAPER = "TracIn self-influence, all parameters, lr-weighted (paper)"


def check_noise_regime_seeds(noise: float, regime: str, seeds: object) -> None:
    """The settings every mislabel experiment shares.

    Raises:
        ConfigError: ``noise`` outside (0, 0.5), an unknown ``regime``, or no seed.
    """
    if not 0 < noise < 0.5:
        raise ConfigError(f"noise={noise} must be between 0 and 0.5")
    if regime not in ("brief", "memorise"):
        raise ConfigError(f"regime={regime!r}; expected 'brief' or 'memorise'")
    if not seeds:
        raise ConfigError("seeds must name at least one seed")


@dataclass(frozen=True)
class MislabelConfig:
    """What to measure.

    Attributes:
        noise: fraction of training labels flipped to another class.
        seeds: one run per seed (split, flips, initialisation, batches).
        regime: ``"brief"`` or ``"memorise"``.
        n_checkpoints: checkpoints recorded, log-spaced from the first step.
        cleanlab_folds: K for cleanlab's out-of-sample probabilities (0 skips cleanlab).
        width: hidden units of the MLP.
        neighbors: k of the TracIn contrast.
        rows: training rows drawn from the 1797 digits.

    Raises:
        ConfigError: an unknown regime, a noise fraction outside (0, 1), or counts below 1.
    """

    noise: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)
    regime: Regime = "brief"
    n_checkpoints: int = 30
    cleanlab_folds: int = 5
    width: int = 64
    neighbors: int = 10
    rows: int = 1500

    def __post_init__(self) -> None:
        check_noise_regime_seeds(self.noise, self.regime, self.seeds)
        if not 100 <= self.rows <= 1797:
            raise ConfigError(f"rows={self.rows} must be between 100 and 1797")
        if self.cleanlab_folds == 1 or self.cleanlab_folds < 0:
            raise ConfigError(f"cleanlab_folds={self.cleanlab_folds}: use 0 (skip) or >= 2")


@dataclass
class MislabelResult:
    """Per method: recall at each fraction and AUROC, one row per seed."""

    config: MislabelConfig
    recall: dict[str, np.ndarray] = field(default_factory=dict)  # (seeds, fractions)
    auroc: dict[str, np.ndarray] = field(default_factory=dict)  # (seeds,)
    train_accuracy: list[float] = field(default_factory=list)

    def methods(self) -> list[str]:
        """Method names, best mean recall at 10% first (AUROC breaks ties)."""
        return sorted(
            self.auroc, key=lambda n: (-float(self.recall[n][:, 1].mean()), -self.auroc[n].mean())
        )

    def table(self) -> list[list[Any]]:
        """Rows ``[method, recall@5% ..., AUROC]`` as 'mean ± std' strings."""
        rows = []
        for name in self.methods():
            r, a = self.recall[name], self.auroc[name]
            cells = [f"{m:.3f}±{s:.3f}" for m, s in zip(r.mean(0), r.std(0), strict=True)]
            rows.append([name, *cells, f"{a.mean():.3f}±{a.std():.3f}"])
        return rows

    def to_json(self) -> dict[str, Any]:
        """Everything measured, per seed, with the configuration."""
        return {
            "config": asdict(self.config),
            "fractions": list(FRACTIONS),
            "train_accuracy": self.train_accuracy,
            "recall": {k: v.tolist() for k, v in self.recall.items()},
            "auroc": {k: v.tolist() for k, v in self.auroc.items()},
        }

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write ``mislabel.json`` and the plot ``mislabel.png`` into ``directory``."""
        return save_result(
            directory, "mislabel", self.to_json(), lambda path: plot_recall(self, path)
        )


def plot_recall(result: MislabelResult, path: Path) -> Path:
    """Recall of flipped labels against the fraction inspected, mean ± std over seeds."""
    plt = pyplot()

    cfg = result.config
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs = np.array([0.0, *FRACTIONS]) * 100
    for name in result.methods():
        r = np.concatenate([np.zeros((len(cfg.seeds), 1)), result.recall[name]], axis=1)
        style = "-" if name.startswith("TracIn") else "--"
        auc = result.auroc[name].mean()
        ax.plot(xs, r.mean(0), style, marker="o", ms=3, label=f"{name} (AUROC {auc:.3f})")
        ax.fill_between(xs, r.mean(0) - r.std(0), r.mean(0) + r.std(0), alpha=0.15)
    ax.set_xlabel("% of training rows inspected (highest score first)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title(
        f"digits, {cfg.noise:.0%} flipped, {cfg.regime} training, "
        f"{len(cfg.seeds)} seeds (mean ± std)"
    )
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class TrainConfig(Protocol):
    """What `_fit` and the cleanlab baseline read from a configuration."""

    @property
    def regime(self) -> Regime: ...
    @property
    def width(self) -> int: ...
    @property
    def cleanlab_folds(self) -> int: ...


def _net(width: int, n_features: int = 64, n_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(n_features, width), nn.ReLU(), nn.Linear(width, n_classes))


def _digits(
    noise: float, seed: int, rows: int = 1500
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))[:rows]
    x = torch.tensor(digits.data[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[order], dtype=torch.long)
    flipped = np.zeros(len(y), dtype=bool)
    flipped[rng.choice(len(y), size=round(noise * len(y)), replace=False)] = True
    shift = torch.tensor(rng.integers(1, 10, int(flipped.sum())))
    y[torch.from_numpy(flipped)] = (y[torch.from_numpy(flipped)] + shift) % 10
    return x, y, flipped


_BATCH = 32
_BRIEF_EPOCHS, _MAX_EPOCHS = 8, 1000


def _fit(
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    seed: int,
    rec: Any,
    n_classes: int | None = None,
) -> nn.Module:
    """SGD; ``brief``: 8 epochs, lr 0.1 then 0.01; ``memorise``: momentum 0.9 until 99%."""
    return train_mlp(x, y, cfg, seed, rec, n_classes=n_classes)[0]


def train_mlp(
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    seed: int,
    rec: Any,
    epochs: int | None = None,
    n_classes: int | None = None,
    max_epochs: int = _MAX_EPOCHS,
) -> tuple[nn.Module, int]:
    """`_fit`, returning the epochs run; ``epochs`` runs exactly that many (no 99% stop).

    ``max_epochs`` caps the ``memorise`` regime when it does not reach 99%.

    ``seed`` fixes the initialisation and the batch order: equal seeds, equal schedules.
    ``n_classes`` defaults to ``max(y) + 1``.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _net(cfg.width, x.shape[1], n_classes or int(y.max()) + 1)
    momentum = 0.9 if cfg.regime == "memorise" else 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    step, epoch = 0, 0
    if epochs is None:
        epochs = _BRIEF_EPOCHS if cfg.regime == "brief" else max_epochs
        stop_at_99 = cfg.regime == "memorise"
    else:
        stop_at_99 = False
    for epoch in range(epochs):
        if cfg.regime == "brief" and epoch == 5:
            for group in opt.param_groups:
                group["lr"] = 0.01
        model.train()
        for idx in torch.split(torch.randperm(len(y), generator=gen), _BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
            opt.step()
            step += 1
            if rec is not None:
                rec.step(model, opt, step)
        if stop_at_99 and _accuracy(model, x, y) >= 0.99:
            break
    if rec is not None and not rec.wants(step):
        rec.save(model, opt, step)
    return model, epoch + 1


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def _horizon(cfg: MislabelConfig) -> int:
    """Steps the log spacing spans: the brief run, or ~150 epochs (memorisation comes later)."""
    return (_BRIEF_EPOCHS if cfg.regime == "brief" else 150) * -(-cfg.rows // _BATCH)


def cleanlab_scores(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, seed: int) -> np.ndarray:
    """Cleanlab's label-quality ranking from out-of-fold probabilities, ``(N,)``, higher = suspect.

    Out-of-fold predicted probabilities from ``cfg.cleanlab_folds`` models trained as `train_mlp`
    trains them, scored by ``cleanlab.rank.get_label_quality_scores`` (Northcutt et al., "Confident
    learning", JAIR 2021) and negated so that a larger value is more suspect.

    Raises:
        MissingDependencyError: cleanlab is not installed.
    """
    try:
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise MissingDependencyError(
            "the cleanlab baseline needs cleanlab: pip install cleanlab (or cleanlab_folds=0)"
        ) from None
    n_classes = int(y.max()) + 1
    probs = np.zeros((len(y), n_classes))
    folds = np.array_split(np.random.default_rng(seed).permutation(len(y)), cfg.cleanlab_folds)
    for k, held in enumerate(folds):
        keep = np.setdiff1d(np.arange(len(y)), held)
        model = _fit(x[keep], y[keep], cfg, seed * 100 + k, None, n_classes)
        with torch.no_grad():
            probs[held] = torch.softmax(model.eval()(x[held]), 1).numpy()
    return -np.asarray(get_label_quality_scores(y.numpy(), probs))  # low quality = suspicious


def _one_seed(cfg: MislabelConfig, seed: int, work: Path) -> tuple[dict[str, np.ndarray], float]:
    x, y, _ = _digits(cfg.noise, seed, cfg.rows)
    rec = CheckpointRecorder(
        work / f"seed_{seed}", steps=log_spaced_steps(_horizon(cfg), cfg.n_checkpoints)
    )
    model = _fit(x, y, cfg, seed, rec)
    ckpts = rec.checkpoints()
    data, task = TensorDataset(x, y), ClassificationTask()
    bias = featurize(model, task, ckpts, data, layers=["2.bias"], batch_size=256,
                     store=work / f"bias_{seed}", embedding_layer="1")  # fmt: skip
    paper = featurize(model, task, ckpts, data, batch_size=256)
    scores: dict[str, np.ndarray] = {
        CONTRAST: bias.contrastive_self_influence(cfg.neighbors, lr_weighted=False),
        BIAS: bias.self_influence_by_checkpoint().sum(0),
        PAPER: paper.self_influence(),
    }
    losses = np.stack([_losses(model, c.state_dict(), x, y) for c in ckpts])
    scores["final loss"] = losses[-1]
    scores["loss summed over the same checkpoints"] = losses.sum(0)
    scores["random"] = np.random.default_rng(seed + 7).random(len(y))
    if cfg.cleanlab_folds:
        scores["cleanlab (out-of-sample confident learning)"] = cleanlab_scores(x, y, cfg, seed)
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
            flags = _digits(cfg.noise, seed, cfg.rows)[2]
            scores, acc = _one_seed(cfg, seed, Path(tmp))
            result.train_accuracy.append(acc)
            for name, s in scores.items():
                rows.setdefault(name, []).append(recall_at(s, flags, FRACTIONS))
                aurocs.setdefault(name, []).append(auroc(s, flags))
    result.recall = {k: np.stack(v) for k, v in rows.items()}
    result.auroc = {k: np.array(v) for k, v in aurocs.items()}
    return result
