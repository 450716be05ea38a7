"""Where the time goes on a small model: featurize paths against the plain training step.

The model of issue 15: ``Cnn28`` (two 5x5 convolutions with 16 and 32 channels on 28x28
single-channel images, then 512 -> 64 -> 10; 47k parameters), 4,000 rows, 2 checkpoints.
Paths, each timed end to end (``tracin.featurize`` and, where it applies, ``self_influence``):

- ``train_step``: one epoch of plain SGD steps at batch 64 (forward, backward, step);
- ``exact_stream``: exact self-influence, engine ``auto``, no store (streaming squared norms);
- ``kronecker_store``: ``proj_dim=1024, projection="kronecker"`` into a fresh store;
- ``exact_store``: no projection, into a fresh store (squared norms only unless
  ``--keep-features``).

The machine is shared, so every figure is a ratio to the training step measured in the same
process: the paths run interleaved, ``--repeats`` rounds, and each path's best time counts.
With one thread (the default here) the ratios use the process's CPU time
(``time.process_time``), which other processes' load leaves nearly untouched; wall-clock
seconds are saved too. ``os.getloadavg()`` is recorded before and after. ``--profile`` adds a
cProfile of one run of each path (top functions by own time) to the JSON.

    python benchmarks/small_model_profile.py            # -> results/small_model_profile.json
    python benchmarks/small_model_profile.py --profile --tag before --batch-sizes 64,128,256
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

import tracin

sys.path.insert(0, str(Path(__file__).parent))
from selfcheck_cost import Cnn28

RESULTS = Path(__file__).parent / "results"


def _data(n: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=gen)
    return TensorDataset(x, torch.randint(0, 10, (n,), generator=gen))


def _checkpoints(model: torch.nn.Module, data: TensorDataset) -> tracin.Checkpoints:
    """Two checkpoints: the initial weights and after one short epoch of SGD."""
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = data.tensors
    for i in range(0, 1024, 64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
        opt.step()
    states.append({k: v.clone() for k, v in model.state_dict().items()})
    return tracin.Checkpoints.from_state_dicts(states, lr=[0.05, 0.05])


def _train_epoch(model: torch.nn.Module, data: TensorDataset, batch: int) -> None:
    x, y = data.tensors
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()
    for i in range(0, len(x), batch):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + batch]), y[i : i + batch]).backward()
        opt.step()
    model.eval()


def _paths(args: argparse.Namespace, data: TensorDataset) -> dict[str, Callable[[], Any]]:
    model = Cnn28()
    ckpts = _checkpoints(model, data)
    model.eval()
    task = tracin.ClassificationTask()
    keep = "keep_features" in inspect.signature(tracin.featurize).parameters
    root = Path(tempfile.mkdtemp(prefix="tracin_small_"))

    def stored(name: str, **kw: Any) -> Callable[[], Any]:
        def go() -> Any:
            shutil.rmtree(root / name, ignore_errors=True)
            run = tracin.featurize(model, task, ckpts, data, store=root / name,
                                   batch_size=args.batch, **kw)  # fmt: skip
            return run.self_influence()

        return go

    exact_kw: dict[str, Any] = {"keep_features": True} if keep and args.keep_features else {}
    if keep:
        exact_kw["max_store_gb"] = 64.0
    paths: dict[str, Callable[[], Any]] = {
        "train_step": lambda: _train_epoch(Cnn28(), data, 64),
        "exact_stream": lambda: tracin.featurize(
            model, task, ckpts, data, batch_size=args.batch
        ).self_influence(),
        "kronecker_store": stored("kron", proj_dim=1024, projection="kronecker"),
        "exact_store": stored("exact", **exact_kw),
    }
    for size in args.batch_sizes:
        paths[f"exact_stream_b{size}"] = lambda s=size: tracin.featurize(
            model, task, ckpts, data, batch_size=s
        ).self_influence()
        paths[f"kronecker_store_b{size}"] = lambda s=size: _kron(model, task, ckpts, data, s, root)
    return paths


def _kron(model: Any, task: Any, ckpts: Any, data: Any, size: int, root: Path) -> Any:
    shutil.rmtree(root / f"k{size}", ignore_errors=True)
    return tracin.featurize(model, task, ckpts, data, store=root / f"k{size}", batch_size=size,
                            proj_dim=1024, projection="kronecker").self_influence()  # fmt: skip


def _profile(fn: Callable[[], Any], top: int = 25) -> list[dict[str, Any]]:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, name), (_, calls, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}:{name}", "calls": calls,
                     "own_s": round(own, 4), "cum_s": round(cum, 4)})  # fmt: skip
    rows.sort(key=lambda r: -r["own_s"])
    return rows[:top]


def main() -> None:
    """Time every path interleaved, print ratios to the training step, save JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="featurize batch_size")
    parser.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",") if v],
                        default=[], help="exact_stream again at these batch sizes")  # fmt: skip
    parser.add_argument("--keep-features", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("TORCH_NUM_THREADS", 2)))
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = _data(args.rows)
    paths = _paths(args, data)
    load_before = os.getloadavg()
    for fn in paths.values():  # warm-up
        fn()
    wall: dict[str, float] = {name: float("inf") for name in paths}
    cpu = dict(wall)
    for _ in range(args.repeats):
        for name, fn in paths.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
            wall[name] = min(wall[name], time.perf_counter() - start)
    best = cpu if args.threads == 1 else wall
    rows = {}
    train_rate = args.rows / best["train_step"]
    for name, seconds in best.items():
        examples = args.rows * (1 if name == "train_step" else 2)
        rate = examples / seconds
        rows[name] = {"best_s": round(seconds, 4), "wall_s": round(wall[name], 4),
                      "cpu_s": round(cpu[name], 4), "examples_per_s": round(rate, 1),
                      "x_train_step": round(rate / train_rate, 3)}  # fmt: skip
        print(f"{name:24s} {seconds:8.3f} s {rate:10.0f}/s  {rate / train_rate:6.3f}x train "
              f"(wall {wall[name]:.3f} s)", flush=True)  # fmt: skip
    out: dict[str, Any] = {
        "model": "Cnn28 (47k parameters)", "rows": args.rows, "checkpoints": 2,
        "threads": args.threads, "repeats": args.repeats, "batch_size": args.batch,
        "clock": "process_time" if args.threads == 1 else "perf_counter",
        "load_before": load_before, "load_after": os.getloadavg(), "paths": rows,
    }  # fmt: skip
    if args.profile:
        out["profile"] = {name: _profile(fn) for name, fn in paths.items() if name != "train_step"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"small_model_profile{'_' + args.tag if args.tag else ''}.json"
    (RESULTS / name).write_text(json.dumps(out, indent=1))
    print(f"saved {RESULTS / name}; load {load_before} -> {out['load_after']}")


if __name__ == "__main__":
    main()
