"""TracInCP against TracIn-ideal: how well do a few checkpoints rank what every step did?

Train an MLP (64-64-64-10, ReLU, 8970 parameters) on scikit-learn's digits (1297 training
images) with plain SGD, batch 32, a cosine learning-rate schedule, recording TracIn-ideal
(`tracin.TracInIdeal`, exact, every step) for test queries, and the weights after every step.
Then compute TracInCP with `tracin.featurize` + `run.influence` from C = 1, 3, 5, 10 checkpoints,

- ``even``: after steps round(c T / C), c = 1..C (C = 1 is the final model: gradient dot);
- ``log``: `tracin.log_spaced_steps(T, C)`, dense early;

each weighted by the lr in force after it (TracInCP as defined), and also by lr x the number of
steps since the previous checkpoint (``lr*gap``, a quadrature weight; the same ranking as ``lr``
for even spacing). Reported: Spearman correlation over the training examples between TracInCP
and TracIn-ideal, per query, then mean / std / min over queries. Two references: ``every step``
(TracInCP with all T checkpoints, i.e. the ideal without the batch sampling), and ``ideal,
other batch order`` (TracIn-ideal of a second run that differs only in the batch order).

    python benchmarks/ideal_spearman.py            # about a minute on 2 cores
    python benchmarks/ideal_spearman.py --queries 50 --epochs 10 \
        --json benchmarks/results/ideal_spearman.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_quality import (
    TASK,
    Digits,
    Schedule,
    Trained,
    accuracy,
    checkpoints_at,
    load_digits,
    lr_after,
    make_model,
    query_losses,
    row_pearson,
    row_spearman,
    summary,
    top_overlap,
    train,
)

import tracin

COUNTS = (1, 3, 5, 10)
TOP = 10


def record(
    data: Digits, queries: tuple[torch.Tensor, torch.Tensor], schedule: Schedule, order_seed: int
) -> tuple[Trained, np.ndarray, float]:
    """Train from the fixed init with batches drawn by ``order_seed``; TracIn-ideal per step."""
    model = make_model("mlp", seed=0)
    ideal = tracin.TracInIdeal(
        model, TASK, queries, n_train=len(data.y_train), loss_reduction="mean"
    )
    start = time.perf_counter()
    trained = train(
        model, data.x_train, data.y_train, schedule, order_seed, ideal.step, keep_states=True
    )
    return trained, ideal.scores, time.perf_counter() - start


def first_order_table(data: Digits, queries: Any, epochs: int) -> list[dict[str, float]]:
    """Sum of TracIn-ideal over examples and steps against each query's actual loss decrease.

    First order: exact as the lr shrinks, not at a practical lr late in training, where the
    linear terms keep adding up while the loss has stopped falling (curvature and batch noise).
    """
    out = []
    for lr, n_epochs in ((0.3, epochs), (0.3, 1), (0.03, epochs), (0.003, epochs)):
        model = make_model("mlp", seed=0)
        before = query_losses(model, *queries)
        ideal = tracin.TracInIdeal(
            model, TASK, queries, n_train=len(data.y_train), loss_reduction="mean"
        )
        train(model, data.x_train, data.y_train, Schedule(lr=lr, epochs=n_epochs), 0, ideal.step)
        change = before - query_losses(model, *queries)
        total = ideal.scores.sum(axis=1)
        error = np.linalg.norm(total - change) / np.linalg.norm(change)
        out.append({"lr": lr, "epochs": n_epochs, "mean_decrease": float(change.mean()),
                    "mean_sum_ideal": float(total.mean()),
                    "relative_error": float(error),
                    "pearson": float(np.corrcoef(total, change)[0, 1])})  # fmt: skip
        r = out[-1]
        print(f"  lr {lr:<6} x {n_epochs:>2} epochs: loss decrease {r['mean_decrease']:.4f}, "
              f"sum of ideal {r['mean_sum_ideal']:.4f} (means over queries); relative error "
              f"{r['relative_error']:.3f}, Pearson {r['pearson']:.4f}")  # fmt: skip
    return out


def tracincp(
    trained: Trained, steps: list[int], weights: list[float], data: Digits, queries: Any
) -> np.ndarray:
    ckpts = checkpoints_at(trained, steps, weights)
    run = tracin.featurize(
        make_model("mlp", seed=0), TASK, ckpts, (data.x_train, data.y_train), batch_size=256
    )
    return run.influence(queries)


def compare(scores: np.ndarray, ideal: np.ndarray) -> dict[str, Any]:
    return {
        "spearman": summary(row_spearman(scores, ideal)),
        "pearson": summary(row_pearson(scores, ideal)),
        f"top{TOP}_shared": summary(top_overlap(scores, ideal, TOP)),
    }


def show(name: str, count: str, weighting: str, row: dict[str, Any]) -> None:
    s = row["spearman"]
    print(f"{name:<24} {count:>5} {weighting:<7} {s['mean']:>7.3f} {s['std']:>6.3f} "
          f"{s['min']:>7.3f} {s['median']:>7.3f} {row['pearson']['mean']:>8.3f} "
          f"{row[f'top{TOP}_shared']['mean']:>6.2f}")  # fmt: skip


def spacing(kind: str, total: int, count: int) -> list[int]:
    if kind == "even":
        return sorted({round(c * total / count) for c in range(1, count + 1)})
    return tracin.log_spaced_steps(total, count)


def weights_for(trained: Trained, steps: list[int], kind: str) -> list[float]:
    lrs = [lr_after(trained, s) for s in steps]
    if kind == "lr":
        return lrs
    gaps = np.diff([0, *steps])
    return [float(lr * g) for lr, g in zip(lrs, gaps, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--no-every-step", action="store_true", help="skip the T-checkpoint row")
    parser.add_argument("--json", default="benchmarks/results/ideal_spearman.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits()
    pick = np.random.default_rng(1).choice(len(data.y_test), size=args.queries, replace=False)
    queries = (data.x_test[pick], data.y_test[pick])
    schedule = Schedule(lr=args.lr, epochs=args.epochs)
    trained, ideal, ideal_s = record(data, queries, schedule, order_seed=0)
    total = len(trained.lrs)
    start = time.perf_counter()
    final = trained.model
    print(
        f"MLP on digits: {total} SGD steps, lr {args.lr} cosine to "
        f"{schedule.lr_at(total - 1, total):.4f}, "
        f"train acc {accuracy(final, data.x_train, data.y_train):.3f}, "
        f"test acc {accuracy(final, data.x_test, data.y_test):.3f}; "
        f"TracIn-ideal for {args.queries} queries recorded in {ideal_s:.1f} s (training + ideal)"
    )
    print("Sum of TracIn-ideal over all examples and steps vs the query's actual loss decrease:")
    check = first_order_table(data, queries, args.epochs)
    rows: list[dict[str, Any]] = []

    def add(name: str, steps: list[int], weighting: str, scores: np.ndarray) -> None:
        rows.append({"method": name, "checkpoints": len(steps), "weighting": weighting,
                     "steps": steps, **compare(scores, ideal)})  # fmt: skip
        show(name, str(len(steps)), weighting, rows[-1])

    print(
        f"Spearman(TracInCP, TracIn-ideal) over the {len(data.y_train)} training examples, per "
        f"query, then over the {args.queries} queries; Pearson and top-{TOP} proponents shared, "
        "means over queries"
    )
    print(f"{'checkpoints':<24} {'C':>5} {'weights':<7} {'mean':>7} {'std':>6} {'min':>7} "
          f"{'median':>7} {'pearson':>8} {'top10':>6}")  # fmt: skip
    for kind in ("even", "log"):
        for count in COUNTS:
            steps = spacing(kind, total, count)
            for weighting in ("lr", "lr*gap") if kind == "log" and count > 1 else ("lr",):
                scores = tracincp(trained, steps, weights_for(trained, steps, weighting), data,
                                  queries)  # fmt: skip
                add(f"{kind}", steps, weighting, scores)
    if not args.no_every_step:
        steps = list(range(total))
        scores = tracincp(trained, steps, [trained.lrs[s] for s in steps], data, queries)
        add("every step (s = 0..T-1)", steps, "lr", scores)
    _, other, _ = record(data, queries, schedule, order_seed=1)
    rows.append({"method": "ideal, other batch order", **compare(other, ideal)})
    show("ideal, other batch order", "", "", rows[-1])
    elapsed = time.perf_counter() - start
    print(f"TracInCP rows and references computed in {elapsed:.1f} s")
    out = {
        "setup": {
            "data": "sklearn digits, 1297 train / 500 test, features / 16",
            "model": "MLP 64-64-64-10 ReLU (8970 parameters), float32",
            "optimizer": f"SGD, batch 32, mean loss, {args.epochs} epochs = {total} steps, "
            f"lr {args.lr} cosine to {schedule.floor} x",
            "queries": args.queries,
            "query_score": "cross-entropy loss of the test label",
            "spearman": "per query over the training examples; summarised over queries",
        },
        "train_accuracy": accuracy(final, data.x_train, data.y_train),
        "test_accuracy": accuracy(final, data.x_test, data.y_test),
        "ideal_seconds": ideal_s,
        "ideal_sum_vs_loss_decrease": check,
        "rows": rows,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "command": "python " + " ".join(sys.argv),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
