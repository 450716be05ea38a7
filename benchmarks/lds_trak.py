"""LDS of tracin's TracInCP and TRAK-style preconditioned score against dattri's TRAK and TracIn.

Counterfactual accuracy, the linear datamodeling score (Park et al. 2023, TRAK), on unseen data,
every method on the SAME checkpoints in the same process. Per data set: an MLP
(in -> 64 -> 64 -> 10, ReLU) trained once on all training rows (plain SGD, batch 32, mean loss,
cosine lr), with the C = 5 checkpoints after epochs evenly spaced (E/5, 2E/5, ..., E), each
weighted by the lr in force after it; S = 50 models retrained from the same initialisation with
the same recipe on random halves of the training set (subset s drawn with seed 1000 + s, batch
order seed s); Q = 100 test queries. For a score tau(z, q) (> 0: z lowers q's loss), the
predicted loss of q under subset S is ``-sum_{z in S} tau(z, q)`` and

    LDS(q) = Spearman over the S subsets of (predicted loss, actual loss of q),

mean over queries (loss and TRAK's margin ``log(p / (1 - p))`` are monotone in p, so the
Spearman is the same for either target). Methods:

- ``tracin TracInCP exact``: `tracin.featurize` without projection, ``run.influence``;
- ``tracin TracIn-RP k``: ``proj_dim=k`` (Gaussian, seed 0), ``run.influence``;
- ``tracin trak_influence k d w``: the same store, ``run.trak_influence(q, damping=d,
  weighting=w)``: ``sum_c w_c phi_c(q)^T (Phi_c^T Phi_c + d tr/k I)^{-1} phi_c(z)``;
- ``tracin margin-kernel k d`` (benchmark-side variant, not a library feature): features of
  TRAK's margin instead of the loss (a `tracin.Task` returning ``-margin``), the same
  ``trak_influence``, times the training row's ``1 - p`` averaged over checkpoints: TRAK's
  estimator exactly, but for the damping;
- ``dattri TRAK k``: ``dattri.algorithm.trak.TRAKAttributor`` (margin, ``1 - p``, proj_dim k,
  its default regularization 0 unless noted), on the same 5 checkpoints;
- ``dattri TracIn exact``: ``TracInAttributor`` without projection, the same lr weights;
- ``random``: Gaussian scores (the zero line).

Settings are chosen on the first data set (``--choose-on``, digits) and reported unchanged on
the others; every configuration run is saved. ``run-to-run`` is the Spearman over subsets between
the subset models' losses and those of a second set trained on the same subsets with other
batch orders: retraining noise, an upper reference.

    python benchmarks/lds_trak.py          # digits + mnist1d at 512 dims: ~11 min on 2 shared cores
    python benchmarks/lds_trak.py --data digits --proj-dims 512 --json /tmp/lds.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_quality import (
    TASK,
    Schedule,
    Trained,
    accuracy,
    checkpoints_at,
    lr_after,
    query_losses,
    row_spearman,
    summary,
    train,
)

import tracin

DAMPINGS = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
DEFAULT_DAMPING = 1.0  # tracin's default for trak_influence
# dattri's regularization is absolute (added to the kernel of its own scaled features)
DATTRI_REGS = (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
WEIGHTINGS: tuple[Literal["mean", "lr"], ...] = ("mean", "lr")
Pair = tuple[torch.Tensor, torch.Tensor]
Recipe = tuple[str, dict[str, Any], Callable[[], np.ndarray]]


@dataclass(frozen=True)
class Data:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    schedule: Schedule


def load(name: str) -> Data:
    """digits (1297 train / 500 test, /16), or MNIST-1D (the package's default config)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data / 16.0, dtype=torch.float32)
        y = torch.tensor(d.target, dtype=torch.long)
        order = np.random.default_rng(0).permutation(len(y))
        tr, te = order[:1297], order[1297:]
        return Data(name, x[tr], y[tr], x[te], y[te], Schedule(lr=0.3, epochs=10))
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())  # 4000 train / 1000 test, generated locally
        mean, std = d["x"].mean(0), d["x"].std(0)
        xs = [torch.tensor((v - mean) / std, dtype=torch.float32) for v in (d["x"], d["x_test"])]
        ys = [torch.tensor(v, dtype=torch.long) for v in (d["y"], d["y_test"])]
        return Data(name, xs[0], ys[0], xs[1], ys[1], Schedule(lr=0.1, epochs=20))
    raise SystemExit(f"unknown data set {name!r}")


class MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
        return out


def make_model(data: Data) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MLP(data.x_train.shape[1])


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TRAK's margin ``log(p / (1 - p))`` of the true class, per row."""
    logp = -F.cross_entropy(logits, y, reduction="none")
    return logp - torch.log1p(-torch.exp(logp).clamp(max=1 - 1e-7))


class MarginTask(tracin.Task):
    """Train and query on ``-margin`` (so tracin's sign convention holds: > 0 raises the margin)."""

    def train_loss(self, model: Any, batch: Any) -> torch.Tensor:
        x, y = batch
        return -_margin(model(x), y)


# --- subsets -----------------------------------------------------------------------------------
def subset_losses(data: Data, queries: Pair, masks: np.ndarray, order_offset: int) -> np.ndarray:
    """(Q, S) query losses of models retrained from the same init on each subset."""
    out = np.empty((len(queries[1]), len(masks)))
    for s, mask in enumerate(masks):
        rows = torch.from_numpy(np.flatnonzero(mask))
        model = make_model(data)
        train(model, data.x_train[rows], data.y_train[rows], data.schedule, s + order_offset)
        out[:, s] = query_losses(model, *queries)
    return out


# --- methods -----------------------------------------------------------------------------------
@dataclass
class Ctx:
    data: Data
    trained: Trained
    steps: list[int]
    lrs: list[float]
    queries: Pair

    @property
    def states(self) -> list[dict[str, torch.Tensor]]:
        return [self.trained.states[s] for s in self.steps]

    def ckpts(self) -> tracin.Checkpoints:
        return checkpoints_at(self.trained, self.steps, self.lrs)


def tracin_methods(ctx: Ctx, proj_dims: list[int], dampings: tuple[float, ...]) -> Iterator[Recipe]:
    train_data = TensorDataset(ctx.data.x_train, ctx.data.y_train)
    model = make_model(ctx.data)
    exact = tracin.featurize(model, TASK, ctx.ckpts(), train_data, batch_size=256)
    yield "tracin TracInCP exact", {"method": "tracincp"}, lambda: exact.influence(ctx.queries)
    for k in proj_dims:
        run = tracin.featurize(model, TASK, ctx.ckpts(), train_data, proj_dim=k, batch_size=256)
        yield f"tracin TracIn-RP {k}", {"proj_dim": k}, partial(run.influence, ctx.queries)
        for w in WEIGHTINGS:
            for d in dampings:
                yield (
                    f"tracin trak_influence {k} damping={d:g} weighting={w}",
                    {"proj_dim": k, "damping": d, "weighting": w},
                    partial(run.trak_influence, ctx.queries, damping=d, weighting=w),
                )
        margin = tracin.featurize(
            model, MarginTask(), ctx.ckpts(), train_data, proj_dim=k, batch_size=256
        )
        q = one_minus_p(ctx)
        for d in dampings:
            yield (
                f"tracin margin-kernel {k} damping={d:g} (x mean 1-p)",
                {"proj_dim": k, "damping": d, "weighting": "mean", "features": "margin"},
                partial(_times, q, partial(margin.trak_influence, ctx.queries, damping=d)),
            )


def _times(column: np.ndarray, scores: Callable[[], np.ndarray]) -> np.ndarray:
    """``scores() * column[None, :]``: per-training-row weights on a (Q, N) score matrix."""
    return np.asarray(scores() * column[None, :])


def one_minus_p(ctx: Ctx) -> np.ndarray:
    """``1 - p(y | x)`` of every training row, averaged over the checkpoints, ``(N,)``."""
    model = make_model(ctx.data)
    out = np.zeros(len(ctx.data.y_train))
    with torch.no_grad():
        for state in ctx.states:
            model.load_state_dict(state)
            p = torch.softmax(model(ctx.data.x_train), 1).gather(1, ctx.data.y_train[:, None])
            out += (1 - p[:, 0].double()).numpy() / len(ctx.states)
    return out


def _quiet(iterable: Any, **_: Any) -> Any:
    return iterable


def _dattri_task(ctx: Ctx, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Any:
    from dattri.task import AttributionTask

    model = make_model(ctx.data).eval()

    def loss_func(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...]) -> Any:
        x, y = data
        return loss(functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0)).sum()

    def load_state(m: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
        m.load_state_dict(state)
        return m.eval()

    task = AttributionTask(
        loss_func=loss_func,
        model=model,
        checkpoints=list(ctx.states),
        checkpoints_load_func=load_state,
    )
    return task, model


def _loaders(ctx: Ctx) -> tuple[DataLoader[Any], DataLoader[Any]]:
    tr = DataLoader(TensorDataset(ctx.data.x_train, ctx.data.y_train), batch_size=64)
    te = DataLoader(TensorDataset(*ctx.queries), batch_size=64)
    return tr, te


def dattri_trak(ctx: Ctx, k: int, regularization: float) -> np.ndarray:
    import dattri.algorithm.trak as trak_module
    from dattri.algorithm.trak import TRAKAttributor

    trak_module.tqdm = _quiet  # a progress bar per batch

    task, model = _dattri_task(ctx, _margin)

    def prob(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = data
        out = functional_call(model, params, (x.unsqueeze(0),))
        return torch.exp(-F.cross_entropy(out, y.unsqueeze(0)))

    # every key given: dattri updates its module-level default dict in place
    kwargs = {"proj_dim": k, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}
    attr = TRAKAttributor(
        task=task,
        correct_probability_func=prob,
        projector_kwargs=kwargs,
        device="cpu",
        regularization=regularization,
    )
    tr, te = _loaders(ctx)
    attr.cache(tr)
    return np.asarray(attr.attribute(te).T.detach().double().numpy())


def dattri_tracin(ctx: Ctx) -> np.ndarray:
    import dattri.algorithm.tracin as tracin_module
    from dattri.algorithm.tracin import TracInAttributor

    tracin_module.tqdm = _quiet

    task, _ = _dattri_task(ctx, lambda out, y: F.cross_entropy(out, y))
    kwargs = {"proj_dim": 512, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}
    attr = TracInAttributor(
        task=task,
        weight_list=torch.tensor(ctx.lrs),
        normalized_grad=False,
        projector_kwargs=kwargs,
        device="cpu",
    )
    attr.projector_kwargs = None  # the only way to turn its projection off: exact gradients
    tr, te = _loaders(ctx)
    return np.asarray(attr.attribute(tr, te).T.detach().double().numpy())


def peer_methods(ctx: Ctx, proj_dims: list[int], regs: tuple[float, ...]) -> Iterator[Recipe]:
    for k in proj_dims:
        for reg in regs:
            yield (
                f"dattri TRAK {k} reg={reg:g}",
                {"proj_dim": k, "regularization": reg},
                partial(dattri_trak, ctx, k, reg),
            )
    yield "dattri TracIn exact", {}, lambda: dattri_tracin(ctx)


# --- evaluation --------------------------------------------------------------------------------
def evaluate(
    data: Data, args: argparse.Namespace, dampings: tuple[float, ...], regs: tuple[float, ...]
) -> dict[str, Any]:
    start = time.perf_counter()
    model = make_model(data)
    trained = train(model, data.x_train, data.y_train, data.schedule, 0, keep_states=True)
    total, epochs = len(trained.lrs), data.schedule.epochs
    steps = [round(total * e / 5) for e in range(1, 6)]  # after epochs E/5, ..., E
    pick = np.random.default_rng(2).choice(len(data.y_test), size=args.queries, replace=False)
    queries = (data.x_test[pick], data.y_test[pick])
    ctx = Ctx(data, trained, steps, [lr_after(trained, s) for s in steps], queries)
    n = len(data.y_train)
    masks = np.stack(
        [np.random.default_rng(1000 + s).permutation(n) < n // 2 for s in range(args.subsets)]
    )
    t0 = time.perf_counter()
    losses = subset_losses(data, queries, masks, 0)
    retrain_s = time.perf_counter() - t0
    again = subset_losses(data, queries, masks, 10_000)
    ceiling = summary(row_spearman(again, losses))
    acc = accuracy(model, data.x_train, data.y_train)
    head = (
        f"{data.name}: {n} train rows, train acc {acc:.3f}, "
        f"test acc {accuracy(model, data.x_test, data.y_test):.3f}, {total} steps ({epochs} "
        f"epochs), checkpoints at steps {steps}; {args.subsets} subset models in "
        f"{retrain_s:.0f} s; run-to-run {ceiling['mean']:.3f}"
    )
    print(head, flush=True)
    print(f"  {'method':<58} {'LDS':>6} {'s.e.':>6} {'vs TracInCP':>11} {'seconds':>8}")
    rows: list[dict[str, Any]] = []
    reference: np.ndarray | None = None
    recipes = [
        *tracin_methods(ctx, args.proj_dims, dampings),
        *peer_methods(ctx, args.proj_dims, regs),
    ]
    rng = np.random.default_rng(7)
    recipes.append(("random", {}, lambda: rng.standard_normal((args.queries, n))))
    for name, config, compute in recipes:
        t0 = time.perf_counter()
        try:
            scores = compute()
        except Exception as exc:  # a peer failing (e.g. a singular kernel) is a result too
            print(f"  {name:<58} failed: {type(exc).__name__}: {exc}"[:200], flush=True)
            rows.append({"method": name, "config": config, "error": f"{type(exc).__name__}: {exc}"})
            continue
        seconds = time.perf_counter() - t0
        per_query = row_spearman(-scores @ masks.T.astype(np.float64), losses)
        reference = per_query if reference is None else reference
        s, diff = summary(per_query), per_query - reference
        se, diff_se = s["std"] / np.sqrt(s["n"]), float(np.nanstd(diff) / np.sqrt(s["n"]))
        rows.append(
            {
                "method": name,
                "config": config,
                "lds": s,
                "stderr": se,
                "vs_tracincp": float(np.nanmean(diff)),
                "vs_tracincp_stderr": diff_se,
                "seconds": seconds,
                "per_query": per_query.tolist(),
            }
        )
        print(
            f"  {name:<58} {s['mean']:>6.3f} {se:>6.3f} {np.nanmean(diff):>+7.3f}"
            f"+-{diff_se:.3f} {seconds:>8.2f}",
            flush=True,
        )
    return {
        "train_rows": n,
        "test_rows": len(data.y_test),
        "train_accuracy": accuracy(model, data.x_train, data.y_train),
        "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "steps": total,
        "checkpoint_steps": steps,
        "checkpoint_lrs": ctx.lrs,
        "schedule": vars(data.schedule) | {"kind": "cosine"},
        "retrain_seconds": retrain_s,
        "run_to_run": ceiling,
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }


def best(result: dict[str, Any], method: str) -> dict[str, Any]:
    """The config of the best-LDS row whose name holds ``method`` on the choosing data set."""
    rows = [r for r in result["rows"] if method in r["method"] and "lds" in r]
    config: dict[str, Any] = max(rows, key=lambda r: r["lds"]["mean"])["config"]
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=["digits", "mnist1d"])
    parser.add_argument(
        "--choose-on",
        default="digits",
        help="data set where every setting is tried; others get the best",
    )
    parser.add_argument("--proj-dims", nargs="+", type=int, default=[512])
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--dampings", nargs="+", type=float, default=list(DAMPINGS))
    parser.add_argument("--dattri-regs", nargs="+", type=float, default=list(DATTRI_REGS))
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--json", default="benchmarks/results/lds_trak.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    results: dict[str, Any] = {}
    dampings, regs = tuple(args.dampings), tuple(args.dattri_regs)
    for name in sorted(args.data, key=lambda name: name != args.choose_on):
        results[name] = evaluate(load(name), args, dampings, regs)
        if name == args.choose_on:
            ours, theirs = best(results[name], "trak_influence"), best(results[name], "dattri TRAK")
            margin = best(results[name], "margin-kernel")
            dampings = tuple(sorted({ours["damping"], margin["damping"], DEFAULT_DAMPING}))
            regs = tuple(sorted({0.0, theirs["regularization"]}))
            results[name]["chosen"] = {
                "trak_influence": ours,
                "margin_kernel": margin,
                "dattri_trak": theirs,
            }
            print(f"chosen on {name}: {results[name]['chosen']}", flush=True)
    out = {
        "setup": {
            "model": "MLP in-64-64-10, ReLU; SGD batch 32, mean cross-entropy, cosine lr",
            "checkpoints": "5, after epochs E/5 .. E; TracIn weights = lr in force after each",
            "subsets": args.subsets,
            "subset_fraction": 0.5,
            "queries": args.queries,
            "target": "cross-entropy loss of the query's label (Spearman-equivalent to margin)",
            "retraining": "same init as the full run; subset s drawn with seed 1000+s, batch "
            "order seed s; same epochs and schedule",
            "choose_on": args.choose_on,
            "dampings_tried": args.dampings,
            "dattri_regularizations_tried": args.dattri_regs,
        },
        "data": results,
        "seconds": time.perf_counter() - start,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "command": "python " + " ".join(sys.argv),
    }
    print(f"total {out['seconds']:.0f} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
