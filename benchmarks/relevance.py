"""Explanations and clusters, measured: the tests of Hanawa et al. (ICLR 2021) and sub-class ARI.

Setup per data set and seed: merge the ten classes in pairs into five superclasses (hidden
sub-classes: classes 2s and 2s+1 form superclass s), flip 10% of the training superclass labels
to another superclass, train a small CNN with SGD (lr 0.1, then 0.01) while a
`CheckpointRecorder` saves 10 log-spaced checkpoints, featurize (all layers, Kronecker
projection to 512 dims per checkpoint; and the last layer exactly), and explain the correctly
predicted test images.

Relevances (all from the same stored features): raw TracInCP (lr-weighted dot product), the
cosine of per-checkpoint gradients (lr weights; feature norms or the exact stored norms; unit
weights; last checkpoint only), RelatIF-style normalisation of the training side (per checkpoint,
or by sqrt(self-influence)), the same on the last layer alone, and the penultimate embedding's
cosine (baseline). Metrics over the queries: the top-1 training row has the query's class
(given label), the share of the top 10 with it, the top-1 has the query's hidden sub-class, the
share of flipped rows in the top 10 (10% is their share of the data), and model randomisation
(mean Spearman over queries between the relevance with the trained checkpoints and with freshly
initialised ones, and the top-10 overlap: low means the explanation depends on the training).

Clusters: each superclass's training rows split in two, adjusted Rand index against the hidden
sub-classes, mean over the five superclasses: spherical k-means on TracIn similarity
(`Run.clusters`), average linkage (the former default), k-means on the embeddings. Plus the
time of spherical k-means on 10^5 synthetic unit vectors.

The measurement lives in the library (`tracin.experiments.prepare`, `explain_scores`,
`cluster_scores`; `tracin eval explain` and `tracin eval cluster` run the same code);
this
script runs both on one featurization per data set and seed and writes one JSON.

Settings were chosen on digits (seed 0) and reported on every data set and seed:

    OMP_NUM_THREADS=1 python benchmarks/relevance.py   # 4 runs of ~4-5 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from tracin.experiments import EXPLAIN_COLUMNS as COLUMNS
from tracin.experiments import SetupConfig, cluster_scores, explain_scores, prepare
from tracin.experiments import cluster_timing as timing


def one(name: str, seed: int, cfg: SetupConfig) -> dict[str, Any]:
    """Explanations and clusters of one data set and seed, from one featurization."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        prep = prepare(name, seed, cfg, Path(tmp))
        out = explain_scores(prep)
        out["clusters"] = cluster_scores(prep)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def show(r: dict[str, Any]) -> None:
    """Print one run's tables."""
    print(f"\n== {r['data']} seed {r['seed']}: superclass test accuracy "
          f"{r['test_accuracy_superclass']:.3f}, {r['queries']} queries, flipped share "
          f"{r['flipped_share']:.3f}, library default agrees "
          f"{r['library_default_agrees']:.3f}")  # fmt: skip
    print(f"{'relevance':57s} " + " ".join(c[:9].rjust(9) for c in COLUMNS))
    for key, m in r["relevance"].items():
        print(f"{key:57s} " + " ".join(f"{m.get(c, float('nan')):9.3f}" for c in COLUMNS))
    for key, v in r["clusters"]["ari"].items():
        print(f"  ARI {key:56s} {v:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["digits", "mnist1d"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--json", default="benchmarks/results/relevance.json")
    args = parser.parse_args()
    cfg = SetupConfig(data=tuple(args.data), seeds=tuple(args.seeds))
    results = []
    for d in args.data:
        for s in args.seeds:
            results.append(one(d, s, cfg))
            show(results[-1])
    out = {"runs": results, "timing": timing()}
    print(f"\ntiming: {out['timing']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
