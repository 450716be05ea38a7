"""Explanations, measured: the three tests of Hanawa et al. (ICLR 2021) on superclasses.

On the runs of `tracin.experiments._setup` (ten classes merged in pairs into five superclasses, a
share
of the training labels flipped), every relevance is computed from the same stored features and
scored over the correctly predicted test rows (the queries):

- **identical class**: the top-1 training row has the query's true superclass (and the share of
  the top 10 that do); also by the row's given (possibly flipped) label;
- **identical sub-class**: the top-1 row has the query's hidden class;
- **flipped rows in the top 10** (their share of the data is the chance level);
- **model randomisation**: the same relevance with every checkpoint re-initialised (same lrs and
  steps); the mean over queries of the Spearman correlation of the two relevance rows over the
  training rows, and the overlap of the two top-10 lists. Low means the explanation depends on
  what the model learned; a relevance that ranks by the input and the label alone keeps both high.

Relevances: the raw TracInCP score, the cosine of per-checkpoint gradients with several
checkpoint weightings (lr: the default; lr x steps since the previous checkpoint; unit; the last
half; the last checkpoint alone), RelatIF-style normalisation, each on all layers (projected) and
on the last layer (exact), the default cosine for the class the model predicted (its loss,
`tracin._predicted.PredictedClassTask`; on correctly predicted queries the same ranking as the
label's loss, but a re-initialised model predicts other classes) and for the predicted logit
(``ClassificationTask(query="prediction")``), and the penultimate embedding's cosine (the
baseline).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from tracin._errors import ConfigError
from tracin._run import Run
from tracin._task import ClassificationTask
from tracin.experiments._results import pyplot, save_result
from tracin.experiments._setup import Prepared, SetupConfig, prepare
from tracin.scoring._relevance import unit_rows

__all__ = [
    "DEFAULT",
    "EMBEDDING",
    "LOGIT",
    "PREDICTED",
    "RAW",
    "ExplainResult",
    "evaluate_explain",
    "explain_scores",
]

DEFAULT = "all layers: cosine, lr weights [default]"
RAW = "all layers: tracin (raw dot, lr)"
EMBEDDING = "embedding cosine (baseline)"
PREDICTED = "cosine, lr weights, loss of the predicted class"
LOGIT = "cosine, lr weights, predicted logit (query='prediction')"
COLUMNS = ("top1_same_true_class", "top10_same_true_class", "top1_same_class",
           "top1_same_subclass", "flipped_in_top10", "randomised_spearman",
           "randomised_top10_overlap")  # fmt: skip


def _per_checkpoint(run: Run) -> dict[str, list[np.ndarray]]:
    """Per checkpoint: test x train inner products, feature norms and exact norms."""
    out: dict[str, list[np.ndarray]] = {"dot": [], "qn": [], "tn": [], "qx": [], "tx": []}
    split = run.config.projection.split
    for c in run.ckpt_ids:
        f = run.read_split("train", c).astype(np.float64)
        q = run.read_split("test", c).astype(np.float64)
        if split is not None:  # last-layer factors
            dot = (q[:, :split] @ f[:, :split].T) * (q[:, split:] @ f[:, split:].T)
            fn = np.linalg.norm(f[:, :split], axis=1) * np.linalg.norm(f[:, split:], axis=1)
            qn = np.linalg.norm(q[:, :split], axis=1) * np.linalg.norm(q[:, split:], axis=1)
        else:
            dot, fn, qn = q @ f.T, np.linalg.norm(f, axis=1), np.linalg.norm(q, axis=1)
        out["dot"].append(dot)
        out["qn"].append(qn)
        out["tn"].append(fn)
        out["qx"].append(np.sqrt(_sqnorms(run, "test", c)))
        out["tx"].append(np.sqrt(_sqnorms(run, "train", c)))
    return out


def _sqnorms(run: Run, split: str, ckpt: str) -> np.ndarray:
    """The exact squared gradient norms stored beside the features."""
    blocks = -(-run.split_rows[split] // run.config.block_rows)
    return np.concatenate([run.store.read_block(split, ckpt, k)[1] for k in range(blocks)])


def _safe(d: np.ndarray) -> np.ndarray:
    return np.where(d > 0, d, np.inf)


def relevances(run: Run, prefix: str) -> dict[str, np.ndarray]:
    """Every relevance variant of ``run``'s test split against its training rows, ``(Q, N)``."""
    p = _per_checkpoint(run)
    lrs = np.asarray(run.lrs, dtype=np.float64)
    n = len(lrs)
    if run.checkpoints is None:
        raise ConfigError("relevances need the run's checkpoints (their steps); featurize again")
    steps = np.asarray([c.step for c in run.checkpoints], dtype=np.float64)
    since = np.diff(np.concatenate([[0.0], steps]))
    dots = p["dot"]
    cos = [dots[c] / _safe(p["qn"][c][:, None] * p["tn"][c][None]) for c in range(n)]
    cosx = [dots[c] / _safe(p["qx"][c][:, None] * p["tx"][c][None]) for c in range(n)]

    def mean(weights: np.ndarray, terms: list[np.ndarray]) -> np.ndarray:
        w = weights / weights.sum()
        return sum((w[c] * terms[c] for c in range(n) if w[c]), np.zeros_like(terms[0]))

    raw = sum((lrs[c] * dots[c] for c in range(n)), np.zeros_like(dots[0]))
    si = sum((lrs[c] * p["tx"][c] ** 2 for c in range(n)), np.zeros_like(p["tx"][0]))
    half = np.where(np.arange(n) >= n // 2, lrs, 0.0)
    return {
        f"{prefix}tracin (raw dot, lr)": raw,
        f"{prefix}cosine, lr weights [default]": mean(lrs, cos),
        f"{prefix}cosine, lr weights, exact norms": mean(lrs, cosx),
        f"{prefix}cosine, unit weights": mean(np.ones(n), cos),
        f"{prefix}cosine, lr x steps-since-previous weights": mean(lrs * since, cos),
        f"{prefix}cosine, last half of checkpoints": mean(half, cos),
        f"{prefix}cosine, last checkpoint": cos[-1],
        f"{prefix}relatif per checkpoint": sum(
            (lrs[c] * dots[c] / _safe(p["tn"][c])[None] for c in range(n)), np.zeros_like(raw)
        ),
        f"{prefix}relatif (tracin / sqrt(self-influence))": raw / np.sqrt(_safe(si))[None],
    }


def class_metrics(rel: np.ndarray, data: dict[str, Any], queries: np.ndarray) -> dict[str, float]:
    """Identical class, identical sub-class and flipped rows over the top 10 of ``queries``."""
    top = np.argsort(-rel[queries], axis=1, kind="stable")[:, :10]
    qc, qf = data["y_test"].numpy()[queries], data["fine_test"][queries]
    label, fine, flipped = data["y_train"].numpy(), data["fine_train"], data["flipped"]
    true = fine // 2
    return {
        "top1_same_true_class": float((true[top[:, 0]] == qc).mean()),
        "top10_same_true_class": float((true[top] == qc[:, None]).mean()),
        "top1_same_class": float((label[top[:, 0]] == qc).mean()),
        "top10_same_class": float((label[top] == qc[:, None]).mean()),
        "top1_same_subclass": float((fine[top[:, 0]] == qf).mean()),
        "flipped_in_top10": float(flipped[top].mean()),
    }


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` (ordinal ranks)."""
    ra = np.argsort(np.argsort(a, axis=1, kind="stable"), axis=1).astype(np.float64)
    rb = np.argsort(np.argsort(b, axis=1, kind="stable"), axis=1).astype(np.float64)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    out: np.ndarray = np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1.0), np.nan)
    return out


def randomisation(rel: np.ndarray, rand: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    """Mean Spearman over ``queries`` (over training rows) and top-10 overlap, trained vs random."""
    rho = _spearman_rows(rel[queries], rand[queries])
    top = np.argsort(-rel[queries], axis=1, kind="stable")[:, :10]
    rtop = np.argsort(-rand[queries], axis=1, kind="stable")[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, rtop, strict=True)])
    return {"randomised_spearman": float(np.nanmean(rho)),
            "randomised_top10_overlap": float(overlap)}  # fmt: skip


def _all_relevances(runs: tuple[Run, Run], data: dict[str, Any]) -> dict[str, np.ndarray]:
    allr, lastr = runs
    out = {**relevances(allr, "all layers: "), **relevances(lastr, "last layer: ")}
    # the prediction's score (what the model predicted) instead of the label's loss, by the
    # library's own path: a re-initialised model predicts other classes, so it may change more
    # explaining what the model predicted: the loss of the predicted class (equal to the default
    # on the trained model's correctly predicted queries; a re-initialised model predicts others)
    x = data["x_test"]
    for prefix, run in (("all layers: ", allr), ("last layer: ", lastr)):
        pred = _predictions(run, data["model"], x)
        out[f"{prefix}{PREDICTED}"] = run.influence(TensorDataset(x, pred), relevance="cosine")
        logit = ClassificationTask(query="prediction")
        out[f"{prefix}{LOGIT}"] = run.influence(TensorDataset(x), query_task=logit,
                                                relevance="cosine")  # fmt: skip
    te, tr = unit_rows(allr.embeddings("test")), unit_rows(allr.embeddings("train"))
    out[EMBEDDING] = te @ tr.T
    return out


def _predictions(run: Run, model_class: Any, x: torch.Tensor) -> torch.Tensor:
    """Classes predicted by ``run``'s last checkpoint (trained or re-initialised)."""
    if run.checkpoints is None:
        raise ConfigError("predictions need the run's checkpoints; featurize again")
    model = model_class()
    model.load_state_dict(run.checkpoints[len(run.checkpoints) - 1].state_dict())
    with torch.no_grad():
        pred: torch.Tensor = model.eval()(x).argmax(1)
    return pred


def explain_scores(prep: Prepared) -> dict[str, Any]:
    """The three tests for every relevance on one prepared run (see the module docstring)."""
    rels = _all_relevances(prep.runs["trained"], prep.data)
    rand = _all_relevances(prep.runs["random"], prep.data) if "random" in prep.runs else {}
    q = prep.queries
    # the library's default path ranks as this module's default variant
    lib = prep.runs["trained"][0].proponents("test", k=10).indices[q]
    ref = np.argsort(-rels[DEFAULT][q], axis=1, kind="stable")[:, :10]
    table = {}
    for key, rel in rels.items():
        table[key] = class_metrics(rel, prep.data, q)
        if key in rand:
            table[key].update(randomisation(rel, rand[key], q))
    return {"data": prep.name, "seed": prep.seed, "test_accuracy_superclass": prep.accuracy,
            "queries": len(q), "train_rows": len(prep.data["y_train"]),
            "flipped_share": float(prep.data["flipped"].mean()),
            "library_default_agrees": float((lib == ref).mean()), "relevance": table}  # fmt: skip


@dataclass
class ExplainResult:
    """One entry per data set and seed: see `explain_scores`."""

    config: SetupConfig
    runs: list[dict[str, Any]] = field(default_factory=list)

    def table(self, run: dict[str, Any]) -> list[list[str]]:
        """Rows ``[relevance, *COLUMNS]`` of one run (``"-"`` where not measured)."""
        return [[name, *(f"{m[c]:.3f}" if c in m else "-" for c in COLUMNS)]
                for name, m in run["relevance"].items()]  # fmt: skip

    def title(self, run: dict[str, Any]) -> str:
        """One line naming the run."""
        return (f"{run['data']} seed {run['seed']}: {run['train_rows']} training rows, "
                f"{run['queries']} correctly predicted queries, superclass test accuracy "
                f"{run['test_accuracy_superclass']:.3f}, flipped share "
                f"{run['flipped_share']:.3f}")  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """Everything measured, with the configuration."""
        return {"config": asdict(self.config), "runs": self.runs}

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write ``explain.json`` and the plot ``explain.png`` into ``directory``."""
        return save_result(
            directory, "explain", self.to_json(), lambda path: plot_explain(self, path)
        )


PLOTTED = (RAW, DEFAULT, "all layers: cosine, last checkpoint", "last layer: cosine, lr weights "
           "[default]", EMBEDDING)  # fmt: skip


def plot_explain(result: ExplainResult, path: Path) -> Path:
    """Per run, grouped bars: class, sub-class, flipped, randomisation for the main relevances."""
    plt = pyplot()

    cols = ("top1_same_true_class", "top1_same_subclass", "flipped_in_top10",
            "randomised_spearman", "randomised_top10_overlap")  # fmt: skip
    n = len(result.runs)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 1.5, 4.2), squeeze=False)
    for ax, run in zip(axes[0], result.runs, strict=True):
        names = [p for p in PLOTTED if p in run["relevance"]]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            m = run["relevance"][name]
            ax.bar(np.arange(len(cols)) + i * width, [m.get(c, np.nan) for c in cols], width,
                   label=name)  # fmt: skip
        ax.axhline(run["flipped_share"], ls=":", color="grey")
        ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2)
        ax.set_xticklabels(["top-1\nclass", "top-1\nsub-class", "flipped\nin top 10",
                            "random:\nSpearman", "random:\ntop-10"], fontsize=8)  # fmt: skip
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{run['data']} seed {run['seed']}", fontsize=10)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Hanawa et al.'s tests (higher is better, except flipped and random:)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_explain(
    cfg: SetupConfig, progress: Callable[[str], None] | None = None
) -> ExplainResult:
    """Prepare every data set and seed of ``cfg`` and score its explanations."""
    result = ExplainResult(cfg)
    for name in cfg.data:
        for seed in cfg.seeds:
            if progress is not None:
                progress(f"{name} seed {seed}")
            with tempfile.TemporaryDirectory() as tmp:
                result.runs.append(explain_scores(prepare(name, seed, cfg, Path(tmp))))
    return result
