"""torchrun: 2 processes on gloo split the store's blocks; the store equals a single process's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def children(pid):
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_a_rank_killed_midway_then_rerun_completes_the_store(tmp_path):
    spec = write_spec(tmp_path, n_train=1500, n_query=9, lrs=(0.3, 0.1, 0.05))
    store = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["featurize", str(spec), "--store", str(store), "--proj-dim", "16",
            "--block-rows", "7", "--batch-size", "4"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29534", "-m", "tracin", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    killed = False
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list(store.rglob("block_*.json"))) >= 40:
            ranks = children(proc.pid)
            if ranks:
                os.kill(ranks[0], signal.SIGKILL)
                killed = True
                break
        time.sleep(0.01)
    proc.communicate(timeout=120)
    assert killed and proc.returncode != 0, "torchrun finished before a rank could be killed"
    partial = {p: p.stat().st_mtime_ns for p in store.rglob("block_*.json")}
    assert 0 < len(partial) < 3 * (215 + 2)  # 215 train and 2 query blocks per checkpoint
    again = featurize(spec, store, 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in partial.items())  # finished blocks kept
    one = featurize(spec, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    got, want = files(store), files(tmp_path / "one")
    assert got.keys() == want.keys()
    assert [n for n in want if got[n] != want[n]] == []
