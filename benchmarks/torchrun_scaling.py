"""Featurize throughput: 1 process vs 2 processes under torchrun (gloo) on this machine.

Writes a spec for the demo CNN on scikit-learn's digits (repeated to --rows rows, 3 checkpoints),
then times `tracin featurize` into a fresh store: one process with 2 threads, one process with
1 thread, and `torchrun --nproc_per_node 2` with 1 thread each. Prints the table and saves JSON.

    python benchmarks/torchrun_scaling.py --rows 12000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "torchrun_scaling.json"

SPEC = """
from pathlib import Path
import torch
from torch.utils.data import TensorDataset
import tracin
from tracin.experiments import DemoCNN

here = Path(__file__).parent
x, y = torch.load(here / "data.pt", weights_only=True)
model = DemoCNN
task = tracin.ClassificationTask()
checkpoints = tracin.Checkpoints.from_paths(sorted(here.glob("ckpt_*.pt")), lr="lr")
train = TensorDataset(x, y)
"""


def setup(work: Path, rows: int) -> Path:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    from tracin.experiments import DemoCNN

    digits = load_digits()
    reps = -(-rows // len(digits.target))
    x = torch.tensor(np.tile(digits.images, (reps, 1, 1))[:rows] / 16.0, dtype=torch.float32)
    y = torch.tensor(np.tile(digits.target, reps)[:rows])
    torch.save((x.unsqueeze(1), y), work / "data.pt")
    torch.manual_seed(0)
    net = DemoCNN()
    for i, lr in enumerate((0.1, 0.1, 0.01)):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        torch.save({"model_state_dict": net.state_dict(), "lr": lr}, work / f"ckpt_{i}.pt")
    (work / "spec.py").write_text(textwrap.dedent(SPEC))
    return work / "spec.py"


def timed(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12000)
    parser.add_argument("--block-rows", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = setup(work, args.rows)
        base = ["featurize", str(spec), "--proj-dim", "1024", "--projection", "kronecker",
                "--batch-size", "256", "--block-rows", str(args.block_rows)]  # fmt: skip
        runs = {
            "1 process, 2 threads": ([sys.executable, "-m", "tracin"], 2),
            "1 process, 1 thread": ([sys.executable, "-m", "tracin"], 1),
            "torchrun 2 processes, 1 thread each": (
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node",
                    "2",
                    "--master_port",
                    "29544",
                    "-m",
                    "tracin",
                ],
                1,
            ),
        }
        results = {}
        for name, (prefix, threads) in runs.items():
            stores = [str(work / f"s{i}_{threads}_{len(prefix)}") for i in range(2)]
            best = min(timed([*prefix, *base, "--store", s], threads) for s in stores)
            results[name] = {"seconds": round(best, 2),
                             "rows_per_s": round(3 * args.rows / best)}  # fmt: skip
    ref = results["1 process, 2 threads"]["seconds"]
    for name, r in results.items():
        r["speedup_vs_1_process_2_threads"] = round(ref / r["seconds"], 2)
        print(
            f"{name:40s} {r['seconds']:7.2f} s  {r['rows_per_s']:7d} ckpt-rows/s  "
            f"x{r['speedup_vs_1_process_2_threads']}"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps({"rows": args.rows, "checkpoints": 3, "results": results}, indent=1)
    )


if __name__ == "__main__":
    main()
