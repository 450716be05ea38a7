"""Fixing mislabelled data, measured: the payoff of inspecting the top of each ranking.

The experiment of the TracIn paper (Pruthi et al., 2020, "fixing mislabelled data"), for each
seed and data set:

1. flip a fraction of the training labels to another class (the true labels are kept aside);
2. train with a `CheckpointRecorder` (the training loop of `tracin.experiments._mislabel`), record
the test
   accuracy ("no fix") and the number of epochs run;
3. rank the training rows by each method (below);
4. for each fraction ``f`` inspected, restore the true label of the top ``f`` of each ranking
   (a perfect reviewer: a correct label stays, a flipped one is fixed), retrain from the same
   initialisation, batch order and schedule (the same number of epochs), and record the test
   accuracy. Training on all true labels gives the "all fixed" reference.

Rankings:

- the default TracIn ranking: `tracin.review.rank_scores(run, "auto")`, the function the review
  app ranks its suspects with, on a store featurized as README's "Finding mislabelled data"
  says (final layer's bias, penultimate embeddings);
- the ``tracin self-influence`` command's ranking on the same store (`Run.self_influence`);
- the paper's recipe: lr-weighted self-influence over all parameters;
- final loss, the loss summed over the checkpoints, cleanlab's confident learning on K-fold
  out-of-sample probabilities, random; and the oracle (flipped rows first), an upper bound.

Retraining only depends on which flipped rows are fixed, so runs are shared between rankings
(and with "no fix" / "all fixed") when they fix the same flipped rows.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from tracin._errors import ConfigError, MissingDependencyError
from tracin._task import ClassificationTask
from tracin.checkpoints._recorder import CheckpointRecorder, log_spaced_steps
from tracin.experiments._mislabel import (
    _BATCH,
    _BRIEF_EPOCHS,
    FRACTIONS,
    PAPER,
    Regime,
    _accuracy,
    _losses,
    check_noise_regime_seeds,
    cleanlab_scores,
    train_mlp,
)
from tracin.experiments._results import pyplot, save_result
from tracin.pipeline._api import featurize

__all__ = ["DATASETS", "DEFAULT", "FixConfig", "FixResult", "evaluate_fix"]

Dataset = Literal["digits", "mnist1d"]
DATASETS: dict[str, tuple[int, int, int, int]] = {
    # name: (default training rows, most training rows, rows in all, default width)
    "digits": (1200, 1497, 1797, 64),
    "mnist1d": (1000, 3500, 4000, 128),
}
DEFAULT = "TracIn default (the review app's ranking), last-layer bias"
SELF_INFLUENCE = "TracIn self-influence (`tracin self-influence`), last-layer bias"
ORACLE = "oracle: flipped rows first (upper bound)"
CLEANLAB = "cleanlab (out-of-sample confident learning)"


@dataclass(frozen=True)
class FixConfig:
    """What to measure.

    Attributes:
        data: ``"digits"`` (scikit-learn's 8x8 digits, 64 pixel features) or ``"mnist1d"``
            (the MNIST-1D generator, 40 features); 10 classes each.
        noise: fraction of training labels flipped to another class.
        seeds: one run per seed (split, flips, initialisation, batch order).
        regime: ``"memorise"`` (SGD with momentum until >= 99% training accuracy on the noisy
            labels; retraining runs the same number of epochs) or ``"brief"`` (8 epochs).
        fractions: fractions of the training rows inspected (and fixed), each in (0, 1).
        rows: training rows (``None``: 1200 digits, 1000 MNIST-1D); the other rows are the test
            set.
        n_checkpoints: checkpoints recorded, log-spaced from the first step.
        cleanlab_folds: K for cleanlab's out-of-sample probabilities (0 skips cleanlab).
        width: hidden units of the MLP (``None``: 64 digits, 128 MNIST-1D).
        max_epochs: cap of the ``memorise`` regime when 99% is not reached.

    Raises:
        ConfigError: a value out of range (fractions, noise, rows, max_epochs) or an unknown data
            set.
    """

    data: Dataset = "digits"
    noise: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)
    regime: Regime = "memorise"
    fractions: tuple[float, ...] = FRACTIONS
    rows: int | None = None
    n_checkpoints: int = 30
    cleanlab_folds: int = 5
    width: int | None = None
    max_epochs: int = 300

    def __post_init__(self) -> None:
        if self.data not in DATASETS:
            raise ConfigError(f"data={self.data!r}; expected one of {sorted(DATASETS)}")
        most = DATASETS[self.data][1]
        if self.rows is not None and not 100 <= self.rows <= most:
            raise ConfigError(f"rows={self.rows} must be between 100 and {most} for {self.data}")
        check_noise_regime_seeds(self.noise, self.regime, self.seeds)
        if not self.fractions or not all(0 < f < 1 for f in self.fractions):
            raise ConfigError(f"fractions={self.fractions}: give fractions between 0 and 1")
        if self.cleanlab_folds == 1 or self.cleanlab_folds < 0:
            raise ConfigError(f"cleanlab_folds={self.cleanlab_folds}: use 0 (skip) or >= 2")
        if self.n_checkpoints < 1 or self.max_epochs < 1 or (self.width or 1) < 1:
            raise ConfigError(
                f"n_checkpoints={self.n_checkpoints}, width={self.width}, "
                f"max_epochs={self.max_epochs}: give at least 1"
            )

    @property
    def train_rows(self) -> int:
        """Training rows used (``rows`` or the data set's default)."""
        return self.rows if self.rows is not None else DATASETS[self.data][0]

    @property
    def hidden(self) -> int:
        """Hidden units used (``width`` or the data set's default)."""
        return self.width if self.width is not None else DATASETS[self.data][3]


@dataclass
class FixResult:
    """Test accuracy after fixing the top of each ranking, one row per seed."""

    config: FixConfig
    accuracy: dict[str, np.ndarray] = field(default_factory=dict)  # (seeds, fractions)
    fixed: dict[str, np.ndarray] = field(default_factory=dict)  # share of flips fixed, same
    no_fix: list[float] = field(default_factory=list)  # test accuracy, noisy labels
    clean: list[float] = field(default_factory=list)  # test accuracy, every flip fixed
    epochs: list[int] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)  # on the noisy labels
    retrains: list[int] = field(default_factory=list)  # distinct trainings per seed
    default_recipe: list[str] = field(default_factory=list)  # what DEFAULT was, per seed

    def methods(self) -> list[str]:
        """Method names, best mean test accuracy at the second fraction first."""
        col = min(1, len(self.config.fractions) - 1)
        return sorted(self.accuracy, key=lambda n: -float(self.accuracy[n][:, col].mean()))

    def table(self) -> list[list[Any]]:
        """Rows ``[method, accuracy at each fraction ...]`` as 'mean ± std' strings."""
        rows: list[list[Any]] = []
        for name in self.methods():
            a = self.accuracy[name]
            rows.append(
                [name, *(f"{m:.3f}±{s:.3f}" for m, s in zip(a.mean(0), a.std(0), strict=True))]
            )
        for name, values in (("no fix", self.no_fix), ("all flips fixed", self.clean)):
            v = np.asarray(values)
            rows.append([name, *[f"{v.mean():.3f}±{v.std():.3f}"] * len(self.config.fractions)])
        return rows

    def to_json(self) -> dict[str, Any]:
        """Everything measured, per seed, with the configuration."""
        return {
            "config": asdict(self.config),
            "train_rows": self.config.train_rows,
            "width": self.config.hidden,
            "fractions": list(self.config.fractions),
            "no_fix": self.no_fix,
            "clean": self.clean,
            "epochs": self.epochs,
            "train_accuracy": self.train_accuracy,
            "retrains": self.retrains,
            "default_recipe": self.default_recipe,
            "accuracy": {k: v.tolist() for k, v in self.accuracy.items()},
            "flips_fixed": {k: v.tolist() for k, v in self.fixed.items()},
        }

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write ``fix.json`` and the plot ``fix.png`` into ``directory``."""
        return save_result(directory, "fix", self.to_json(), lambda path: plot_fix(self, path))


def plot_fix(result: FixResult, path: Path) -> Path:
    """Test accuracy against the fraction inspected and fixed, mean ± std over seeds."""
    plt = pyplot()

    cfg = result.config
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs = np.array([0.0, *cfg.fractions]) * 100
    base = np.asarray(result.no_fix)[:, None]
    for name in result.methods():
        a = np.concatenate([base, result.accuracy[name]], axis=1)
        style = ":" if name == ORACLE else "-" if name.startswith("TracIn") else "--"
        ax.plot(xs, a.mean(0), style, marker="o", ms=3, label=name)
        ax.fill_between(xs, a.mean(0) - a.std(0), a.mean(0) + a.std(0), alpha=0.12)
    clean = float(np.mean(result.clean))
    ax.axhline(clean, color="k", lw=0.8, ls="-.", label=f"all flips fixed ({clean:.3f})")
    ax.set_xlabel("% of training rows inspected and fixed (highest score first)")
    ax.set_ylabel("test accuracy after retraining")
    ax.set_title(
        f"{cfg.data} ({cfg.train_rows} rows), {cfg.noise:.0%} flipped, {cfg.regime} training, "
        f"{len(cfg.seeds)} seeds",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass(frozen=True, init=False)
class _Train:
    """The training settings `tracin.experiments._mislabel` reads, data set defaults filled in."""

    regime: Regime
    width: int
    cleanlab_folds: int

    def __init__(self, cfg: FixConfig) -> None:
        object.__setattr__(self, "regime", cfg.regime)
        object.__setattr__(self, "width", cfg.hidden)
        object.__setattr__(self, "cleanlab_folds", cfg.cleanlab_folds)


def load_data(
    cfg: FixConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, noisy labels, true labels, test x, test labels)`` of one seed.

    Shapes: ``x (N, F)`` float32, labels ``(N,)`` int64 with N = ``cfg.train_rows``; the test
    set is every other row of the data set (597 digits, 3000 MNIST-1D by default).
    """
    if cfg.data == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        features, labels = digits.data / 16.0, digits.target
    else:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.seed = DATASETS["mnist1d"][2], seed
        made = make_dataset(args)
        features = np.concatenate([made["x"], made["x_test"]])
        labels = np.concatenate([made["y"], made["y_test"]])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    x_all = torch.tensor(features[order], dtype=torch.float32)
    y_all = torch.tensor(labels[order], dtype=torch.long)
    n = cfg.train_rows
    true = y_all[:n]
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.from_numpy(rng.choice(n, size=round(cfg.noise * n), replace=False))] = True
    noisy = true.clone()
    noisy[flipped] = (
        true[flipped] + torch.from_numpy(rng.integers(1, 10, int(flipped.sum())))
    ) % 10
    return x_all[:n], noisy, true, x_all[n:], y_all[n:]


def _rankings(
    cfg: FixConfig, seed: int, work: Path, x: torch.Tensor, noisy: torch.Tensor, true: torch.Tensor
) -> tuple[dict[str, np.ndarray], Any, int, str]:
    """Scores ``(N,)`` per method (higher = inspect first), the model, epochs, default's name."""
    from tracin.review._data import rank_scores

    steps_per_epoch = -(-len(noisy) // _BATCH)
    horizon = (_BRIEF_EPOCHS if cfg.regime == "brief" else 150) * steps_per_epoch
    rec = CheckpointRecorder(
        work / f"ckpt_{seed}", steps=log_spaced_steps(horizon, cfg.n_checkpoints)
    )
    model, epochs = train_mlp(x, noisy, _Train(cfg), seed, rec, None, 10, cfg.max_epochs)
    ckpts = rec.checkpoints()
    data, task = TensorDataset(x, noisy), ClassificationTask()
    recipe = featurize(model, task, ckpts, data, layers=["2.bias"], batch_size=256,
                       store=work / f"bias_{seed}", embedding_layer="1")  # fmt: skip
    default_name, default_scores = rank_scores(recipe, "auto")
    paper = featurize(model, task, ckpts, data, batch_size=256)
    losses = np.stack([_losses(model, c.state_dict(), x, noisy) for c in ckpts])
    scores: dict[str, np.ndarray] = {
        DEFAULT: default_scores,
        SELF_INFLUENCE: recipe.self_influence(),
        PAPER: paper.self_influence(),
        "final loss": losses[-1],
        "loss summed over the checkpoints": losses.sum(0),
        "random": np.random.default_rng(seed + 7).random(len(noisy)),
        ORACLE: (noisy != true).numpy().astype(np.float64),
    }
    if cfg.cleanlab_folds:
        scores[CLEANLAB] = cleanlab_scores(x, noisy, _Train(cfg), seed)
    return scores, model, epochs, default_name


def _one_seed(
    cfg: FixConfig, seed: int, work: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    x, noisy, true, x_test, y_test = load_data(cfg, seed)
    flipped = (noisy != true).numpy()
    progress(f"{cfg.data} seed {seed}: training on noisy labels and ranking")
    scores, model, epochs, default_name = _rankings(cfg, seed, work, x, noisy, true)
    runs: dict[tuple[int, ...], float] = {(): _accuracy(model, x_test, y_test)}

    def retrain(fix: np.ndarray) -> float:
        """Test accuracy after restoring the true labels of rows ``fix``, same schedule."""
        key = tuple(int(i) for i in np.sort(fix[flipped[fix]]))  # only flipped rows change
        if key not in runs:
            labels = noisy.clone()
            labels[list(key)] = true[list(key)]
            trained, _ = train_mlp(x, labels, _Train(cfg), seed, None, epochs, 10)
            runs[key] = _accuracy(trained, x_test, y_test)
        return runs[key]

    acc: dict[str, list[float]] = {}
    share: dict[str, list[float]] = {}
    for name, s in scores.items():
        order = np.argsort(-s, kind="stable")
        for f in cfg.fractions:
            progress(f"{cfg.data} seed {seed}: {name}, {f:.0%} fixed")
            top = order[: round(f * len(s))]
            acc.setdefault(name, []).append(retrain(top))
            share.setdefault(name, []).append(float(flipped[top].sum() / flipped.sum()))
    clean = retrain(np.flatnonzero(flipped))
    return {"accuracy": acc, "fixed": share, "no_fix": runs[()], "clean": clean,
            "epochs": epochs, "train_accuracy": _accuracy(model, x, noisy),
            "retrains": len(runs), "default_recipe": default_name}  # fmt: skip


def evaluate_fix(cfg: FixConfig, progress: Callable[[str], None] | None = None) -> FixResult:
    """Run the experiment for every seed; see the module docstring.

    Args:
        cfg: what to measure.
        progress: called with a short description of each stage.

    Returns:
        Test accuracy per method, seed and fraction, with the no-fix and all-fixed references.

    Raises:
        ConfigError: cleanlab (or mnist1d) is not installed.
        MissingDependencyError: data='mnist1d' without the mnist1d package (pip install mnist1d), or
            cleanlab_folds > 0 without cleanlab.
    """
    say = progress if progress is not None else (lambda _: None)
    if cfg.data == "mnist1d":
        try:
            import mnist1d  # noqa: F401
        except ImportError:
            raise MissingDependencyError(
                "data='mnist1d' needs the mnist1d package: pip install mnist1d"
            ) from None
    result = FixResult(cfg)
    acc: dict[str, list[list[float]]] = {}
    fixed: dict[str, list[list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in cfg.seeds:
            one = _one_seed(cfg, seed, Path(tmp), say)
            for name in one["accuracy"]:
                acc.setdefault(name, []).append(one["accuracy"][name])
                fixed.setdefault(name, []).append(one["fixed"][name])
            result.no_fix.append(one["no_fix"])
            result.clean.append(one["clean"])
            result.epochs.append(one["epochs"])
            result.train_accuracy.append(one["train_accuracy"])
            result.retrains.append(one["retrains"])
            result.default_recipe.append(one["default_recipe"])
    result.accuracy = {k: np.array(v) for k, v in acc.items()}
    result.fixed = {k: np.array(v) for k, v in fixed.items()}
    return result
