"""torchrun: 2 processes on gloo split the store's blocks; the store equals a single process's."""

from __future__ import annotations

import os
import subprocess
import sys

from test_cli import write_spec


def featurize(spec, store, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["featurize", str(spec), "--store", str(store), "--proj-dim", "16",
            "--block-rows", "7", "--batch-size", "4"]  # fmt: skip
    if nproc == 1:
        cmd = [sys.executable, "-m", "tracin", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", "29533", "-m", "tracin", *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def files(store):
    return {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*") if p.is_file()}


def test_torchrun_two_processes_equal_one(tmp_path):
    spec = write_spec(tmp_path, n_train=100, n_query=9, lrs=(0.3, 0.1, 0.05))
    two = featurize(spec, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("featurized 100 training rows x 3 checkpoints") == 1  # rank 0 only
    one = featurize(spec, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    got, want = files(tmp_path / "two"), files(tmp_path / "one")
    assert got.keys() == want.keys() and len(want) > 100
    assert [n for n in want if got[n] != want[n]] == []
