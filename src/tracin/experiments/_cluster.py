"""Clusters, measured: recovering hidden sub-classes (adjusted Rand index).

On the runs of `tracin.experiments._setup`, each superclass's training rows (by given label) are
split
in two and compared with the hidden classes by the adjusted Rand index, averaged over the five
superclasses: spherical k-means on TracIn similarity (`Run.clusters`, all layers projected and
the last layer), average linkage on the N x N TracIn distance (the former default), and k-means
and spherical k-means on the penultimate embeddings (the baselines). Also the balance of the
TracIn clusters (smaller / larger).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tracin.analysis._cluster import array_source, spherical_kmeans
from tracin.experiments._results import pyplot, save_result
from tracin.experiments._setup import Prepared, SetupConfig, prepare
from tracin.scoring._relevance import unit_rows

__all__ = ["TRACIN", "ClusterResult", "cluster_scores", "evaluate_cluster", "timing"]

TRACIN = "TracIn spherical k-means (all layers, projected)"
LAST = "TracIn spherical k-means (last layer)"
LINKAGE = "TracIn average linkage (former default)"
KMEANS = "embedding k-means"
SPHERICAL = "embedding spherical k-means"
BALANCE = "TracIn cluster size ratio (min/max), mean"
METHODS = (TRACIN, LAST, LINKAGE, KMEANS, SPHERICAL)


def cluster_scores(prep: Prepared, linkage: bool = True) -> dict[str, Any]:
    """Mean ARI over superclasses (2 clusters each) against the hidden sub-classes, per method."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    allr, lastr = prep.runs["trained"]
    label, fine = prep.data["y_train"].numpy(), prep.data["fine_train"]
    emb = allr.embeddings("train")
    scores: dict[str, list[float]] = {}
    sizes: list[float] = []
    for s in np.unique(label):
        rows = np.flatnonzero(label == s)
        truth = fine[rows]
        found = allr.clusters(2, rows, seed=prep.seed).labels
        got = {TRACIN: found, LAST: lastr.clusters(2, rows, seed=prep.seed).labels,
               KMEANS: KMeans(2, n_init=4, random_state=prep.seed).fit_predict(emb[rows]),
               SPHERICAL: spherical_kmeans(array_source(unit_rows(emb[rows])), len(rows), 2,
                                           seed=prep.seed).labels}  # fmt: skip
        if linkage:
            got[LINKAGE] = allr.cluster(2, rows, method="agglomerative")
        for name, labels in got.items():
            scores.setdefault(name, []).append(float(adjusted_rand_score(truth, labels)))
        counts = np.bincount(found, minlength=2)
        sizes.append(float(counts.min() / counts.max()))
    ari = {k: float(np.mean(scores[k])) for k in METHODS if k in scores}
    return {"data": prep.name, "seed": prep.seed, "train_rows": len(label),
            "ari": ari, "per_superclass": scores, BALANCE: float(np.mean(sizes))}  # fmt: skip


def timing(n: int = 100_000, dim: int = 256, k: int = 10) -> dict[str, float]:
    """Spherical k-means on ``n`` synthetic unit vectors around ``k`` planted directions."""
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    centres = unit_rows(rng.normal(size=(k, dim)))
    truth = rng.integers(k, size=n)
    x = unit_rows(centres[truth] + rng.normal(scale=0.08, size=(n, dim)), np.float32)
    t0 = time.perf_counter()
    found = spherical_kmeans(array_source(x, 8192), n, k, seed=0)
    seconds = time.perf_counter() - t0
    return {"rows": n, "dim": dim, "clusters": k, "seconds": round(seconds, 2),
            "ari_planted": float(adjusted_rand_score(truth, found.labels))}  # fmt: skip


@dataclass
class ClusterResult:
    """One entry per data set and seed: see `cluster_scores`."""

    config: SetupConfig
    runs: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> list[list[str]]:
        """Rows ``[method, ARI per run..., mean]``, plus the TracIn clusters' balance."""
        out = []
        for name in METHODS:
            vals = [r["ari"][name] for r in self.runs if name in r["ari"]]
            if len(vals) == len(self.runs):
                out.append([name, *(f"{v:.3f}" for v in vals), f"{np.mean(vals):.3f}"])
        bal = [r[BALANCE] for r in self.runs]
        out.append([BALANCE, *(f"{v:.3f}" for v in bal), f"{np.mean(bal):.3f}"])
        return out

    def header(self) -> list[str]:
        """Column names of `table`."""
        return ["method", *(f"{r['data']} {r['seed']}" for r in self.runs), "mean"]

    def to_json(self) -> dict[str, Any]:
        """Everything measured, with the configuration."""
        return {"config": asdict(self.config), "runs": self.runs}

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write ``cluster.json`` and the plot ``cluster.png`` into ``directory``."""
        return save_result(
            directory, "cluster", self.to_json(), lambda path: plot_cluster(self, path)
        )


def plot_cluster(result: ClusterResult, path: Path) -> Path:
    """Grouped bars: ARI per method, one group per run."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(2.2 * len(result.runs) + 4, 4.2))
    names = [m for m in METHODS if all(m in r["ari"] for r in result.runs)]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [r["ari"][name] for r in result.runs]
        ax.bar(np.arange(len(result.runs)) + i * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(result.runs)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{r['data']} seed {r['seed']}" for r in result.runs], fontsize=8)
    ax.set_ylabel("ARI against hidden sub-classes (mean over superclasses)")
    ax.set_title("Sub-class recovery: each superclass split in two")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_cluster(
    cfg: SetupConfig, progress: Callable[[str], None] | None = None, linkage: bool = True
) -> ClusterResult:
    """Prepare every data set and seed of ``cfg`` (trained checkpoints only) and cluster it."""
    cfg_trained = SetupConfig(**{**asdict(cfg), "randomise": False})
    result = ClusterResult(cfg)
    for name in cfg.data:
        for seed in cfg.seeds:
            if progress is not None:
                progress(f"{name} seed {seed}")
            with tempfile.TemporaryDirectory() as tmp:
                prep = prepare(name, seed, cfg_trained, Path(tmp))
                result.runs.append(cluster_scores(prep, linkage))
    return result
