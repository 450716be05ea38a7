"""Lightning + Adam: find flipped labels on digits, with and without Adam preconditioning.

A `lightning.LightningModule` (an MLP on scikit-learn's bundled digits, 64 pixel features, 10%
of the training labels flipped with a seeded RNG) is trained with Adam and a linearly decaying
step schedule by a `lightning.Trainer`. `tracin.TracInLightningCallback(save_optimizer=True)`
records log-spaced checkpoints holding the weights, the lr in force and Adam's moments;
`tracin.Checkpoints` reads them back with no hand-written learning rates. The training rows are
then featurized twice, plain and with ``precondition="adam"`` (LESS's ``<Gamma g, g'>``), and
self-influence from each is scored as a detector of the flipped labels (recall at 10% inspected,
AUROC) against the loss baselines (final loss, loss summed over the same checkpoints), summed
over all checkpoints and over those after the first epoch. The top proponents and opponents of
two test images (from 512-dim Gaussian projections) are listed for both. Results and discussion:
docs/text.md, "Adam preconditioning on digits (Lightning)". Runs offline in seconds:

    python examples/lightning_adam.py --out runs/lightning_adam --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tracin
from tracin.analysis import auroc, recall_at

METHODS = (
    "final loss",
    "loss summed over checkpoints",
    "TracIn self-influence",
    "TracIn self-influence + Adam",
    "TracIn, steps >= 1 epoch",
    "TracIn + Adam, steps >= 1 epoch",
)
LR, BATCH = 3e-3, 32


def decay(step: int, total: int) -> float:
    """The schedule's factor after ``step`` updates: linear from 1 to 0.1 at ``total``."""
    return 1.0 - 0.9 * min(step, total) / total


class DigitsMLP(lightning.LightningModule):
    """64 -> width -> 10, cross-entropy, Adam with a step-interval linear decay."""

    def __init__(self, width: int = 32, total_steps: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))
        self.total_steps = total_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 10)``."""
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Mean cross-entropy of the batch (against the noisy labels)."""
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        """Adam, its lr decayed linearly every step."""
        opt = torch.optim.Adam(self.parameters(), lr=LR)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: decay(s, self.total_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def digits(seed: int, n_train: int, n_test: int, noise: float = 0.1) -> dict[str, Any]:
    """A seeded split of the 1797 digits (pixels / 16), ``noise`` of the training labels flipped."""
    data = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.target))
    x = torch.tensor(data.data[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target[order], dtype=torch.long)
    x_train, y_clean = x[:n_train], y[:n_train]
    x_test, y_test = x[n_train : n_train + n_test], y[n_train : n_train + n_test]
    flipped = np.zeros(n_train, dtype=bool)
    flipped[rng.choice(n_train, size=round(noise * n_train), replace=False)] = True
    y_train = y_clean.clone()
    shift = torch.tensor(rng.integers(1, 10, int(flipped.sum())))  # another class, never the same
    y_train[torch.from_numpy(flipped)] = (y_clean[torch.from_numpy(flipped)] + shift) % 10
    return {
        "x_train": x_train,
        "y_train": y_train,
        "y_clean": y_clean,
        "flipped": flipped,
        "x_test": x_test,
        "y_test": y_test,
    }


def train(
    out: Path, d: dict[str, Any], seed: int, epochs: int, width: int, n_checkpoints: int
) -> tuple[DigitsMLP, Any]:
    """Fit with a Lightning Trainer; the callback records the checkpoints under ``out``."""
    lightning.seed_everything(seed, verbose=False)
    n = len(d["y_train"])
    total = epochs * -(-n // BATCH)
    module = DigitsMLP(width, total)
    loader = DataLoader(
        TensorDataset(d["x_train"], d["y_train"]),
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    callback = tracin.TracInLightningCallback(
        out / "checkpoints",
        steps=tracin.log_spaced_steps(total, n_checkpoints),
        save_optimizer=True,
    )
    trainer = lightning.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*number of training batches.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        trainer.fit(module, loader)
    return module, callback


def losses(
    model: nn.Module, ckpts: tracin.Checkpoints, x: torch.Tensor, y: torch.Tensor
) -> np.ndarray:
    """Per-example cross-entropy at every checkpoint, ``(C, N)``."""
    rows = []
    for c in ckpts:
        model.load_state_dict(c.state_dict())
        with torch.no_grad():
            rows.append(nn.functional.cross_entropy(model.eval()(x), y, reduction="none").numpy())
    return np.stack(rows)


def one_seed(
    out: Path,
    seed: int,
    *,
    n_train: int,
    n_test: int,
    epochs: int,
    width: int,
    n_checkpoints: int,
    proj_dim: int,
    queries: Sequence[int],
) -> dict[str, Any]:
    """Train, featurize plain and preconditioned, score the rankings; one seed."""
    d = digits(seed, n_train, n_test)
    trained, callback = train(out, d, seed, epochs, width, n_checkpoints)
    with torch.no_grad():
        train_acc = float((trained.eval()(d["x_train"]).argmax(1) == d["y_train"]).float().mean())
        test_acc = float((trained(d["x_test"]).argmax(1) == d["y_test"]).float().mean())
    # read back from the files: steps and lrs are the ones the callback saved
    ckpts = tracin.Checkpoints.from_paths(callback.paths(), lr="lr", steps="step")
    model = DigitsMLP(width, trained.total_steps)  # architecture only: weights come from ckpts
    task = tracin.ClassificationTask()
    train_set = TensorDataset(d["x_train"], d["y_train"])
    test_set = TensorDataset(d["x_test"][list(queries)], d["y_test"][list(queries)])
    runs = {}
    for name, precondition in (("plain", None), ("adam", "adam")):
        runs[name] = tracin.featurize(
            model,
            task,
            ckpts,
            train_set,
            store=out / name,
            overwrite=True,
            engine="functional",
            proj_dim=proj_dim,
            projection="gaussian",
            seed=seed,
            batch_size=256,
            queries={"test": test_set},
            precondition=precondition,
        )
    loss = losses(model, ckpts, d["x_train"], d["y_train"])
    # the same stored runs, summed only over checkpoints after the first epoch: Adam's second
    # moment at the first few steps is estimated from one to a few batches
    late = np.array([c.step >= -(-n_train // BATCH) for c in ckpts])
    lrs = np.array(ckpts.lrs)[late, None]
    scores = {
        METHODS[0]: loss[-1],
        METHODS[1]: loss.sum(0),
        METHODS[2]: runs["plain"].self_influence(),
        METHODS[3]: runs["adam"].self_influence(),
        METHODS[4]: (lrs * runs["plain"].self_influence_by_checkpoint()[late]).sum(0),
        METHODS[5]: (lrs * runs["adam"].self_influence_by_checkpoint()[late]).sum(0),
    }
    flipped = d["flipped"]
    explained = {}
    for name, run in runs.items():
        props, opps = run.neighbors("test", k=5)
        explained[name] = {"proponents": props.indices.tolist(), "opponents": opps.indices.tolist()}
    return {
        "seed": seed,
        "steps": [c.step for c in ckpts],
        "lrs": list(ckpts.lrs),
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        # share of the total self-influence from checkpoints inside the first epoch
        "first_epoch_share": {
            name: float(1 - scores[METHODS[4 + i]].sum() / scores[METHODS[2 + i]].sum())
            for i, name in enumerate(("plain", "adam"))
        },
        "recall_at_10": {k: float(recall_at(s, flipped, (0.1,))[0]) for k, s in scores.items()},
        "auroc": {k: auroc(s, flipped) for k, s in scores.items()},
        "self_influence": {
            "plain": scores[METHODS[2]].tolist(),
            "adam": scores[METHODS[3]].tolist(),
        },
        "queries": [{"row": int(q), "label": int(d["y_test"][q])} for q in queries],
        "explained": explained,
        "train_labels": d["y_train"].tolist(),
        "flipped": np.flatnonzero(flipped).tolist(),
    }


def main(
    out: Path,
    seeds: Sequence[int] = (0,),
    *,
    n_train: int = 1400,
    n_test: int = 397,
    epochs: int = 15,
    width: int = 32,
    n_checkpoints: int = 20,
    proj_dim: int = 512,
    queries: Sequence[int] = (0, 1),
) -> dict[str, Any]:
    """Every seed under ``out/seed_<s>``; per-seed results and mean ± std over seeds."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    per_seed = [
        one_seed(
            out / f"seed_{s}",
            s,
            n_train=n_train,
            n_test=n_test,
            epochs=epochs,
            width=width,
            n_checkpoints=n_checkpoints,
            proj_dim=proj_dim,
            queries=queries,
        )
        for s in seeds
    ]
    summary = {}
    for metric in ("recall_at_10", "auroc"):
        summary[metric] = {
            m: (float(np.mean(v)), float(np.std(v)))
            for m in METHODS
            for v in [[r[metric][m] for r in per_seed]]
        }
    return {"per_seed": per_seed, "summary": summary, "out": str(out)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lightning_adam"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    result = main(args.out, args.seeds, epochs=args.epochs)
    for r in result["per_seed"]:
        print(
            f"seed {r['seed']}: {len(r['steps'])} checkpoints, steps {r['steps'][0]}-"
            f"{r['steps'][-1]}, lr {r['lrs'][0]:.2e} -> {r['lrs'][-1]:.2e}; train accuracy "
            f"(noisy labels) {r['train_accuracy']:.3f}, test {r['test_accuracy']:.3f}; share of "
            f"self-influence from the first epoch: plain {r['first_epoch_share']['plain']:.2f}"
            f", Adam {r['first_epoch_share']['adam']:.2f}"
        )
    n = len(result["per_seed"])
    print(f"\nflipped-label detection, mean ± std over {n} seed(s) (random: 0.100, 0.500)")
    print(f"{'ranking':<34} {'recall@10%':>15} {'AUROC':>15}")
    for m in METHODS:
        (rm, rs), (am, as_) = result["summary"]["recall_at_10"][m], result["summary"]["auroc"][m]
        print(f"{m:<34} {rm:>7.3f} ± {rs:.3f} {am:>7.3f} ± {as_:.3f}")
    first = result["per_seed"][0]
    labels, flipped = first["train_labels"], set(first["flipped"])
    print(
        f"\nseed {first['seed']}: training rows (given label, * = flipped) that "
        "helped / hurt the test image's loss (512-dim Gaussian projection)"
    )
    for i, q in enumerate(first["queries"]):
        for name in ("plain", "adam"):
            for kind in ("proponents", "opponents"):
                rows = first["explained"][name][kind][i]
                cells = " ".join(f"{j}({labels[j]}{'*' if j in flipped else ''})" for j in rows)
                print(f"  test {q['row']} (label {q['label']}) {name:<5} {kind:<10} {cells}")
