"""Kill -9 during featurize, rerun, and the store is bitwise equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

WORKER = Path(__file__).with_name("resume_worker.py")


def run_worker(workdir: Path, store: Path, slow: bool) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(workdir), str(store), "1" if slow else "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*") if p.is_file()}


def test_sigkill_then_resume_is_bitwise_equal(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    x, y = torch.randn(150, 6), torch.randint(0, 4, (150,))
    torch.save((x, y), tmp_path / "data.pt")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i, lr in enumerate((0.5, 0.1, 0.02)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        torch.save({"model_state_dict": model.state_dict(), "lr": lr, "step": i},
                   tmp_path / f"ckpt_{i}.pt")  # fmt: skip

    reference = tmp_path / "reference"
    done = run_worker(tmp_path, reference, slow=False)
    assert done.wait(timeout=120) == 0, done.stderr.read() if done.stderr else ""

    store = tmp_path / "killed"
    kills = 0
    for target in (3, 9, 16, 30):  # kill after this many finished blocks (of 57)
        proc = run_worker(tmp_path, store, slow=True)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list(store.rglob("block_*.json"))) >= target:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    assert kills >= 3, "the worker finished before it could be killed"
    partial = len(list(store.rglob("block_*.json")))
    (store / "features/train/ckpt_ckpt_0/.block_0.npy.stale.tmp").write_bytes(b"half a block")
    assert 0 < partial < 57
    finish = run_worker(tmp_path, store, slow=False)
    assert finish.wait(timeout=120) == 0, finish.stderr.read() if finish.stderr else ""

    got, want = files(store), files(reference)
    assert not [name for name in got if name.endswith(".tmp")], "temporary files left behind"
    assert got.keys() == want.keys()
    assert all(got[name] == want[name] for name in want), [n for n in want if got[n] != want[n]]
