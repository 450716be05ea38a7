"""Mislabel detection on Rotten Tomatoes reviews with a BERT trained from scratch: which layers?

For each seed: flip 10% of the training labels, train the text example's BERT with the HF
Trainer (AdamW, linear decay, log-spaced TracInTrainerCallback checkpoints with Adam state),
then rank training reviews by TracIn self-influence computed on different layer choices, with
and without Adam preconditioning, and by the loss baselines. Report recall of flipped labels at
10% inspected and AUROC.

    python benchmarks/text_layers.py --seeds 0 1 --json benchmarks/results/text_layers.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import tracin
from tracin.analysis import auroc, recall_at

EXAMPLE = Path(__file__).parents[1] / "examples" / "text_classification.py"
LAYERS = {
    "classifier": ["classifier"],
    "pooler+classifier": ["bert.pooler", "classifier"],
    "embeddings": ["bert.embeddings"],
    "all": None,
}


def example():
    spec = importlib.util.spec_from_file_location("text_classification", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def losses(tc, model, ckpts, data):
    """Per-row loss of the noisy label at the final model, and summed over the checkpoints."""
    task = tc.BertTask(output="logits")
    batch = {**data.encoded, "labels": data.labels}
    final = task.train_loss(model.eval(), batch).detach().numpy()
    summed = np.zeros(len(data))
    for c in ckpts:
        fn = tracin.gradients.functional_model(model, c.state_dict())
        summed += task.train_loss(fn, batch).detach().numpy()
    return final, summed


def one_seed(tc, seed, args, work):
    train_set, test_set, _, _, vocab = tc.prepare(args.n_train, args.n_test, args.max_len, seed)
    rng = np.random.default_rng(1000 + seed)
    flipped = np.zeros(len(train_set), dtype=bool)
    flipped[rng.choice(len(train_set), round(args.noise * len(train_set)), replace=False)] = True
    train_set.labels[torch.from_numpy(flipped)] = 1 - train_set.labels[torch.from_numpy(flipped)]
    model = tc.make_model(len(vocab), args.max_len, seed)
    t0 = time.perf_counter()
    ckpts = tc.train(model, train_set, work / f"seed{seed}", epochs=args.epochs, lr=args.lr,
                     seed=seed, n_checkpoints=args.checkpoints)  # fmt: skip
    out = {"train_s": time.perf_counter() - t0, "test_accuracy": tc.accuracy(model, test_set),
           "train_accuracy_noisy": tc.accuracy(model, train_set), "lrs": list(ckpts.lrs),
           "steps": [c.step for c in ckpts], "methods": {}}  # fmt: skip
    rankings = dict(zip(("loss (final)", "loss (summed over checkpoints)"),
                        losses(tc, model, ckpts, train_set), strict=True))  # fmt: skip
    task = tc.BertTask(output="logits")
    t0 = time.perf_counter()
    bias = tracin.featurize(model, task, ckpts, train_set, layers=["classifier.bias"],
                            batch_size=32, store=work / f"bias{seed}",
                            embedding_layer="bert.pooler")  # fmt: skip
    for k in (10, 50):
        label = f"contrast k={k}, classifier bias"
        rankings[label] = bias.contrastive_self_influence(k, lr_weighted=False)
        out["methods"].setdefault(label, {})["seconds"] = time.perf_counter() - t0
    rankings["classifier bias"] = bias.self_influence_by_checkpoint().sum(0)
    for name, layers in LAYERS.items():
        for precondition in (None, "adam") if args.adam else (None,):
            label = name + (" + adam" if precondition else "")
            t0 = time.perf_counter()
            run = tracin.featurize(model, task, ckpts, train_set, layers=layers, batch_size=32,
                                   precondition=precondition)  # fmt: skip
            rankings[label] = run.self_influence()
            out["methods"].setdefault(label, {})["seconds"] = time.perf_counter() - t0
            print(f"seed {seed} {label}: {time.perf_counter() - t0:.0f}s", flush=True)
    for label, scores in rankings.items():
        entry = out["methods"].setdefault(label, {})
        entry["recall@10%"] = float(recall_at(scores, flipped, [0.1])[0])
        entry["auroc"] = auroc(scores, flipped)
    return out


def summary(per_seed):
    names = per_seed[0]["methods"]
    table = {}
    for name in names:
        r = np.array([s["methods"][name]["recall@10%"] for s in per_seed])
        a = np.array([s["methods"][name]["auroc"] for s in per_seed])
        table[name] = {"recall@10%": [float(r.mean()), float(r.std())],
                       "auroc": [float(a.mean()), float(a.std())]}  # fmt: skip
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--no-adam",
        dest="adam",
        action="store_false",
        help="skip the Adam-preconditioned variants (the slow torch.func path)",
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/text_layers.json"))
    args = parser.parse_args()
    tc = example()
    with tempfile.TemporaryDirectory() as tmp:
        per_seed = [one_seed(tc, s, args, Path(tmp)) for s in args.seeds]
    table = summary(per_seed)
    print(f"{'method':<36} {'recall@10%':>16} {'AUROC':>16}")
    for name, row in sorted(table.items(), key=lambda kv: -kv[1]["auroc"][0]):
        r, a = row["recall@10%"], row["auroc"]
        print(f"{name:<36} {r[0]:.3f} ± {r[1]:.3f}   {a[0]:.3f} ± {a[1]:.3f}")
    result = {"config": vars(args) | {"json": str(args.json)}, "summary": table,
              "per_seed": per_seed, "torch": torch.__version__,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
