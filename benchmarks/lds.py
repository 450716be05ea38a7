"""Linear datamodeling score (LDS) of tracin's attributions on scikit-learn's digits.

For a model kind (an MLP 64-64-64-10, and multinomial logistic regression): train once on all
1297 training images (plain SGD, batch 32, mean loss, cosine lr; the "full run", whose weights
after every step are kept), then retrain from the same initialisation on S random halves of the
training set (subset s drawn with seed 1000 + s, batch order seed s, the same epochs and
schedule; ``--vary-init``: each from its own random initialisation instead) and record each
subset model's loss on Q test queries.

An attribution method gives a score tau(z, q) for every training example z and query q. With
tracin's sign convention (influence > 0: the example helped, it LOWERED the query's loss), the
predicted loss of query q for subset S is ``-sum_{z in S} tau(z, q)`` (up to a constant), and

    LDS(q) = Spearman over the S subsets of (predicted loss, actual loss),

reported as mean / std / standard error over queries (Park et al. 2023, TRAK), and the paired
difference from the first method (same queries and subsets) with its standard error. Methods, all
from the full run with `tracin.featurize` + `run.influence`:

- ``tracincp exact``: all parameters, the C checkpoints after epochs evenly spaced (C = 5:
  after epochs 2, 4, 6, 8, 10), each weighted by the lr in force after it;
  ``tracincp exact log10``: 10 log-spaced checkpoints (`tracin.log_spaced_steps`);
- ``tracin-rp d``: the same 5 checkpoints, gradients projected to d = 64, 256, 1024 dims
  (``proj_dim=d``, Gaussian; seed 0);
- ``last layer``: the same 5 checkpoints, final Linear layer only (exact);
- ``grad dot`` / ``grad cos``: the final model alone, inner product / cosine of the gradients;
- ``tracin-ideal``: `tracin.TracInIdeal`, recorded at every step of the full run;
- ``random``: Gaussian scores (the zero line).

Two references: ``run-to-run``, the Spearman, over subsets, between the query losses of the
subset models and of a second set trained on the same subsets with another batch order (and
init, with ``--vary-init``): retraining noise. A predictor of the expected loss that were
perfect would reach about its square root (each set is the expectation plus independent noise);
and dattri's reported LDS of TracIn, about
0.15 on an MNIST MLP and 0.33 on MNIST logistic regression (a different data set and setup).

    python benchmarks/lds.py                       # both models, 50 subsets: ~2 min on 2 cores
    python benchmarks/lds.py --vary-init --json benchmarks/results/lds_vary_init.json
    python benchmarks/lds.py --kinds mlp --subsets 20 --json /tmp/lds.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_quality import (
    TASK,
    Digits,
    Schedule,
    Trained,
    accuracy,
    checkpoints_at,
    last_layer,
    load_digits,
    lr_after,
    make_model,
    query_losses,
    row_spearman,
    summary,
    train,
)

import tracin

SCHEDULES = {"mlp": Schedule(lr=0.3, epochs=10), "logreg": Schedule(lr=0.5, epochs=10)}
PROJ_DIMS = (64, 256, 1024)
Pair = tuple[torch.Tensor, torch.Tensor]


def full_run(kind: str, data: Digits, queries: Pair) -> tuple[Trained, np.ndarray]:
    """Train on every training example; TracIn-ideal recorded at each step."""
    model = make_model(kind, seed=0)
    ideal = tracin.TracInIdeal(model, TASK, queries, n_train=len(data.y_train),
                               loss_reduction="mean")  # fmt: skip
    trained = train(model, data.x_train, data.y_train, SCHEDULES[kind], 0, ideal.step, True)
    return trained, ideal.scores


def subset_losses(
    kind: str, data: Digits, queries: Pair, masks: np.ndarray, order_offset: int, vary_init: bool
) -> np.ndarray:
    """(Q, S) query losses of models retrained on each subset."""
    out = np.empty((len(queries[1]), len(masks)))
    for s, mask in enumerate(masks):
        rows = torch.from_numpy(np.flatnonzero(mask))
        model = make_model(kind, seed=1 + s + order_offset if vary_init else 0)
        train(model, data.x_train[rows], data.y_train[rows], SCHEDULES[kind], s + order_offset)
        out[:, s] = query_losses(model, *queries)
    return out


def influence(
    kind: str, trained: Trained, steps: list[int], weights: list[float], data: Digits,
    queries: Pair, **options: Any,
) -> np.ndarray:  # fmt: skip
    ckpts = checkpoints_at(trained, steps, weights)
    train_data = (data.x_train, data.y_train)
    run = tracin.featurize(make_model(kind, 0), TASK, ckpts, train_data, batch_size=256, **options)
    return run.influence(queries)


def grad_cos(kind: str, trained: Trained, data: Digits, queries: Pair) -> np.ndarray:
    """Cosine of final-model gradients: dot / (||g_train|| ||g_query||)."""
    final = [len(trained.lrs)]
    ckpts = checkpoints_at(trained, final, [1.0])
    model: nn.Module = make_model(kind, 0)
    run = tracin.featurize(model, TASK, ckpts, (data.x_train, data.y_train), batch_size=256)
    dot = run.influence(queries)
    q_norm = tracin.featurize(model, TASK, ckpts, queries, batch_size=256).self_influence()
    return np.asarray(dot / np.sqrt(np.outer(q_norm, run.self_influence())))


def methods(kind: str, trained: Trained, data: Digits, queries: Pair, ideal: np.ndarray) -> Any:
    """Yield ``(name, seconds, scores)`` for every attribution method."""
    total = len(trained.lrs)
    per_epoch = total // SCHEDULES[kind].epochs
    even = [e * per_epoch for e in (2, 4, 6, 8)] + [total]
    lrs = [lr_after(trained, s) for s in even]
    log10 = tracin.log_spaced_steps(total, 10)
    recipes: list[tuple[str, Any]] = [
        ("tracincp exact (5 ckpts)", lambda: influence(kind, trained, even, lrs, data, queries)),
        ("tracincp exact log10", lambda: influence(
            kind, trained, log10, [lr_after(trained, s) for s in log10], data, queries)),
        *[(f"tracin-rp {d} (5 ckpts)", lambda d=d: influence(
            kind, trained, even, lrs, data, queries, proj_dim=d)) for d in PROJ_DIMS],
        ("last layer (5 ckpts)", lambda: influence(
            kind, trained, even, lrs, data, queries, layers=[last_layer(kind)])),
        ("grad dot (final)", lambda: influence(kind, trained, [total], [1.0], data, queries)),
        ("grad cos (final)", lambda: grad_cos(kind, trained, data, queries)),
    ]  # fmt: skip
    for name, compute in recipes:
        start = time.perf_counter()
        scores = compute()
        yield name, time.perf_counter() - start, scores
    yield "tracin-ideal (every step)", float("nan"), ideal
    rng = np.random.default_rng(7)
    yield "random", 0.0, rng.standard_normal(ideal.shape)


def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Per query: Spearman over subsets of the predicted loss ``-scores @ mask`` and the loss."""
    predicted = -scores @ masks.T.astype(np.float64)
    return row_spearman(predicted, losses)


def evaluate(
    kind: str, data: Digits, queries: Pair, n_subsets: int, vary_init: bool
) -> dict[str, Any]:
    start = time.perf_counter()
    trained, ideal = full_run(kind, data, queries)
    full_s = time.perf_counter() - start
    masks = np.stack([
        np.random.default_rng(1000 + s).permutation(len(data.y_train)) < len(data.y_train) // 2
        for s in range(n_subsets)
    ])  # fmt: skip
    start = time.perf_counter()
    losses = subset_losses(kind, data, queries, masks, 0, vary_init)
    retrain_s = time.perf_counter() - start
    again = subset_losses(kind, data, queries, masks, 10_000, vary_init)
    ceiling = summary(row_spearman(again, losses))  # run-to-run agreement
    model = trained.model
    head = (f"{kind}: train acc {accuracy(model, data.x_train, data.y_train):.3f}, test acc "
            f"{accuracy(model, data.x_test, data.y_test):.3f}, {len(trained.lrs)} steps; "
            f"{n_subsets} subset models in {retrain_s:.1f} s; run-to-run Spearman "
            f"{ceiling['mean']:.3f} +- {ceiling['std']:.3f}")  # fmt: skip
    print(head)
    print(f"  {'method':<28} {'LDS':>7} {'std':>6} {'s.e.':>6} {'vs exact':>9} {'s.e.':>6} "
          f"{'seconds':>8}")  # fmt: skip
    rows = []
    reference = None
    for name, seconds, scores in methods(kind, trained, data, queries, ideal):
        per_query = lds(scores, masks, losses)
        reference = per_query if reference is None else reference
        s, diff = summary(per_query), per_query - reference  # paired: same queries and subsets
        se, diff_se = s["std"] / np.sqrt(s["n"]), np.nanstd(diff) / np.sqrt(s["n"])
        rows.append({"method": name, "lds": s, "stderr": se, "vs_exact": float(np.nanmean(diff)),
                     "vs_exact_stderr": float(diff_se), "seconds": seconds,
                     "per_query": per_query.tolist()})  # fmt: skip
        print(f"  {name:<28} {s['mean']:>7.3f} {s['std']:>6.3f} {se:>6.3f} "
              f"{np.nanmean(diff):>+9.3f} {diff_se:>6.3f} {seconds:>8.2f}")  # fmt: skip
    return {
        "train_accuracy": accuracy(model, data.x_train, data.y_train),
        "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "steps": len(trained.lrs), "schedule": vars(SCHEDULES[kind]) | {"kind": "cosine"},
        "full_run_seconds": full_s, "retrain_seconds": retrain_s,
        "run_to_run": ceiling, "rows": rows,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["mlp", "logreg"])
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--vary-init", action="store_true",
                        help="retrain each subset model from its own random init")  # fmt: skip
    parser.add_argument("--json", default="benchmarks/results/lds.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_digits()
    pick = np.random.default_rng(2).choice(len(data.y_test), size=args.queries, replace=False)
    queries = (data.x_test[pick], data.y_test[pick])
    print(f"LDS on digits: {args.subsets} subsets of 50% of {len(data.y_train)} training images, "
          f"{args.queries} test queries (loss); predicted loss = -sum of influence over the "
          "subset")  # fmt: skip
    results = {kind: evaluate(kind, data, queries, args.subsets, args.vary_init)
               for kind in args.kinds}  # fmt: skip
    out = {
        "setup": {
            "data": "sklearn digits, 1297 train / 500 test, features / 16",
            "subsets": args.subsets, "subset_fraction": 0.5, "queries": args.queries,
            "target": "cross-entropy loss of the query's label",
            "sign": "influence > 0 lowers the loss; predicted loss = -sum over the subset",
            "retraining": ("init seed 1+s" if args.vary_init else "same init as the full run")
                          + "; subset s drawn with seed 1000+s, batch order seed s; same epochs "
                          "and schedule",
        },
        "models": results,
        "anchors": {"dattri TracIn MNIST MLP": 0.15,
                    "dattri TracIn MNIST logistic regression": 0.33},
        "seconds": time.perf_counter() - start,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "command": "python " + " ".join(sys.argv),
    }  # fmt: skip
    print(f"total {out['seconds']:.0f} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
