"""The store's integrity: its features are tied to the task that made them, one featurize
writes it at a time (a second one is refused, a dead one's lock taken over), and its files get
the user's umask."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

import tracin
from conftest import checkpoints
from resume_worker import main as resume_worker_main
from test_cli import write_spec
from tracin.cli._app import app
from tracin.store import _lock
from tracin.store._lock import StoreLock
from tracin.store._manifest import task_fingerprint
from tracin.store._store import SCHEMA_VERSION


def featurize(setup, store, task=None, **kwargs):
    model, train, _, states = setup
    kwargs.setdefault("dtype", "float64")
    kwargs.setdefault("block_rows", 7)
    return tracin.featurize(model, task or tracin.ClassificationTask(), checkpoints(states),
                            TensorDataset(*train), store=store, batch_size=4, **kwargs)  # fmt: skip


def mtimes(store):
    return {p: p.stat().st_mtime_ns for p in store.rglob("*.npy")}


class Scaled(tracin.Task):
    """A user task with a setting: the cross-entropy times ``scale``."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def train_loss(self, model, batch):
        x, y = batch
        return self.scale * F.cross_entropy(model(x), y, reduction="none")


# --- the task is part of what a store is checked against ------------------------------------
def test_another_query_score_is_refused_then_overwritten(mlp_setup, tmp_path):
    query = mlp_setup[2]
    prediction = tracin.ClassificationTask(query="prediction")
    splits = {"test": TensorDataset(*query)}
    by_loss = featurize(mlp_setup, tmp_path / "run", queries=splits).influence("test")
    with pytest.raises(
        tracin.StoreError,
        match=r"splits\.test\.task\.settings\.query \('loss' -> 'prediction'\).*overwrite=True",
    ):
        featurize(mlp_setup, tmp_path / "run", queries=splits, query_task=prediction)
    by_prediction = featurize(mlp_setup, tmp_path / "run", queries=splits, query_task=prediction,
                              overwrite=True)  # fmt: skip
    streamed = featurize(mlp_setup, None).influence(query, query_task=prediction)  # the oracle
    np.testing.assert_allclose(by_prediction.influence("test"), streamed, rtol=1e-10)
    assert not np.allclose(by_loss, streamed)
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["splits"]["test"]["task"]["settings"]["query"] == "prediction"
    assert manifest["splits"]["train"]["task"]["class"] == "tracin._task.ClassificationTask"


def test_query_settings_alone_keep_the_train_features(mlp_setup, tmp_path):
    featurize(mlp_setup, tmp_path / "run")
    before = mtimes(tmp_path / "run")
    featurize(mlp_setup, tmp_path / "run", task=tracin.ClassificationTask(query="prediction"))
    assert mtimes(tmp_path / "run") == before  # the training loss did not change: resumed


def test_a_user_tasks_settings_are_checked(mlp_setup, tmp_path):
    once = featurize(mlp_setup, tmp_path / "run", task=Scaled(1.0)).self_influence()
    with pytest.raises(
        tracin.StoreError, match=r"splits\.train\.task\.settings\.scale \(1\.0 -> 3\.0\)"
    ):
        featurize(mlp_setup, tmp_path / "run", task=Scaled(3.0))
    thrice = featurize(mlp_setup, tmp_path / "run", task=Scaled(3.0), overwrite=True)
    # a loss scaled by 3 scales every gradient by 3, so self-influence by 9
    np.testing.assert_allclose(thrice.self_influence(), 9 * once, rtol=1e-10)


TASK = """
import torch.nn.functional as F

class Weighted(tracin.Task):
    def train_loss(self, model, batch):
        x, y = batch
        return WEIGHT * F.cross_entropy(model(x), y, reduction="none")

task = Weighted()
"""


def test_editing_a_spec_tasks_code_is_refused_on_the_command_line(tmp_path):
    spec = write_spec(tmp_path)
    source = spec.read_text().replace("task = tracin.ClassificationTask()\n", "")
    spec.write_text(source + TASK.replace("WEIGHT", "1.0"))
    store = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["featurize", str(spec), "--store", str(store)]).exit_code == 0
    before = tracin.open(store).self_influence()
    spec.write_text(source + TASK.replace("WEIGHT", "2.00"))  # the loss doubles
    res = runner.invoke(app, ["featurize", str(spec), "--store", str(store)])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "splits.train.task.source_sha256 (the task's code changed)" in lines[0]
    assert "--overwrite" in lines[0]
    res = runner.invoke(app, ["featurize", str(spec), "--store", str(store), "--overwrite"])
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(tracin.open(store).self_influence(), 4 * before, rtol=1e-5)


def test_task_fingerprint():
    fp = task_fingerprint(tracin.ClassificationTask(labels="y", query="prediction"), "query")
    assert fp == {"class": "tracin._task.ClassificationTask",
                  "settings": {"inputs": None, "labels": "y", "output": None,
                               "query": "prediction", "query_class": None}}  # fmt: skip
    train = task_fingerprint(tracin.ClassificationTask(labels="y", query="prediction"), "train")
    assert train["settings"] == {"inputs": None, "labels": "y", "output": None}
    user = task_fingerprint(Scaled(np.float32(0.5)), "train")
    assert user["class"] == "test_store_integrity.Scaled" and user["settings"] == {"scale": 0.5}
    assert len(user["source_sha256"]) == 64
    weighted = Scaled(1.0)
    weighted.weights = torch.tensor([1.0, 2.0])  # a tensor setting is compared by content
    again = Scaled(1.0)
    again.weights = torch.tensor([1.0, 2.0])
    assert task_fingerprint(weighted, "train") == task_fingerprint(again, "train")
    again.weights = torch.tensor([1.0, 3.0])
    assert task_fingerprint(weighted, "train") != task_fingerprint(again, "train")
    made = type("Made", (Scaled,), {})(1.0)  # no source to read: its name stands in
    assert task_fingerprint(made, "train")["source_sha256"] != user["source_sha256"]


def test_a_schema_1_store_is_read_but_not_resumed(mlp_setup, tmp_path):
    run = featurize(mlp_setup, tmp_path / "run", proj_dim=8, dtype="float32")
    path = tmp_path / "run/manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema"] = 1
    for info in manifest["splits"].values():
        del info["task"]
    path.write_text(json.dumps(manifest))
    np.testing.assert_array_equal(tracin.open(tmp_path / "run").self_influence(),
                                  run.self_influence())  # fmt: skip
    with pytest.raises(
        tracin.StoreError,
        match=r"schema 1 \(written by tracin .*did not record the task.*overwrite",
    ):
        featurize(mlp_setup, tmp_path / "run", proj_dim=8, dtype="float32")
    featurize(mlp_setup, tmp_path / "run", proj_dim=8, dtype="float32", overwrite=True)
    assert json.loads(path.read_text())["schema"] == SCHEMA_VERSION


# --- one writer at a time ----------------------------------------------------------------------
def make_worker_inputs(tmp_path):
    """The data and checkpoints `resume_worker` featurizes (150 rows, 3 checkpoints)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4))
    x, y = torch.randn(150, 6), torch.randint(0, 4, (150,))
    torch.save((x, y), tmp_path / "data.pt")
    for i, lr in enumerate((0.5, 0.1, 0.02)):
        torch.save({"model_state_dict": model.state_dict(), "lr": lr, "step": i},
                   tmp_path / f"ckpt_{i}.pt")  # fmt: skip


SLOW_WORKER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import resume_worker
pause = time.sleep
resume_worker.time = type("Slow", (), {"sleep": staticmethod(lambda s: pause(0.2))})
resume_worker.main(sys.argv[2], sys.argv[3], "1")
"""


def test_a_second_writer_is_refused_and_a_killed_ones_lock_taken_over(tmp_path):
    make_worker_inputs(tmp_path)
    store = tmp_path / "run"
    tests = str(Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WORKER, tests, str(tmp_path), str(store)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(list(store.rglob("block_*.json"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the worker finished before a second writer could start"
        pattern = (rf"is being written by process {proc.pid} on host "
                   rf"'{socket.gethostname()}' since 20\d\d-.*UTC.*Wait for it to finish.*"
                   r"delete the lock file")  # fmt: skip
        with pytest.raises(tracin.StoreError, match=pattern):
            resume_worker_main(str(tmp_path), str(store), "0")
        os.kill(proc.pid, 9)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert (store / ".lock").exists()  # left by the killed writer
    done = mtimes(store)
    resume_worker_main(str(tmp_path), str(store), "0")  # takes the lock over and resumes
    assert not (store / ".lock").exists()
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())
    resume_worker_main(str(tmp_path), str(tmp_path / "fresh"), "0")
    np.testing.assert_array_equal(tracin.open(store).self_influence(),
                                  tracin.open(tmp_path / "fresh").self_influence())  # fmt: skip


def test_the_lock_is_released_when_featurize_fails_and_a_rerun_resumes(mlp_setup, tmp_path):
    model, (x, y), query, states = mlp_setup
    bad = x.clone()
    bad[20] = float("nan")

    def run(data, store="run"):
        return tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states), data,
                                store=tmp_path / store, block_rows=8, batch_size=4)  # fmt: skip

    with pytest.raises(tracin.DataError, match=r"non-finite gradients for train rows \[20\]"):
        run(TensorDataset(bad, y))
    assert not (tmp_path / "run/.lock").exists()
    kept = mtimes(tmp_path / "run")
    assert len(kept) == 2 * 2  # blocks 0 and 1 (rows 0-15) of checkpoint 0, features and norms
    resumed = run(TensorDataset(x, y))  # the row mended: the rerun computes only what is missing
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    fresh = run(TensorDataset(x, y), "fresh")
    np.testing.assert_array_equal(resumed.influence(query), fresh.influence(query))


def test_two_locks_in_one_process_exclude_each_other(tmp_path):
    busy = pytest.raises(tracin.StoreError, match=rf"process {os.getpid()} on host")
    with StoreLock(tmp_path / "run"), busy:
        StoreLock(tmp_path / "run").__enter__()
    with StoreLock(tmp_path / "run"):  # released: free again
        pass


def write_lock(path, pid, host):
    path.mkdir(parents=True, exist_ok=True)
    (path / ".lock").write_text(json.dumps({"pid": pid, "host": host, "since": "2026-01-01"}))


def test_without_flock_a_dead_holder_on_this_host_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(_lock, "fcntl", None)  # e.g. a file system without flock
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    write_lock(tmp_path / "dead", int(ended.stdout), socket.gethostname())
    with StoreLock(tmp_path / "dead") as lock:
        assert lock.holder()["pid"] == os.getpid()
    assert not (tmp_path / "dead/.lock").exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "alive", sleeper.pid, socket.gethostname())
        with pytest.raises(tracin.StoreError, match=rf"process {sleeper.pid} on host .*since 2026"):
            StoreLock(tmp_path / "alive").__enter__()
    finally:
        sleeper.kill()
        sleeper.wait()
    write_lock(tmp_path / "remote", 1, "another-host")  # cannot be told dead from here
    with pytest.raises(tracin.StoreError, match=r"on host 'another-host'.*delete the lock file"):
        StoreLock(tmp_path / "remote").__enter__()


# --- file permissions ----------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_are_made_with_the_users_umask(mlp_setup, tmp_path, umask):
    before = os.umask(umask)
    try:
        featurize(mlp_setup, tmp_path / "run", proj_dim=8, embedding_layer="1",
                  queries={"test": TensorDataset(*mlp_setup[2])})  # fmt: skip
    finally:
        os.umask(before)
    made = list((tmp_path / "run").rglob("*"))
    assert len(made) > 20
    for path in made:
        full = 0o777 if path.is_dir() else 0o666
        assert stat.S_IMODE(path.stat().st_mode) == full & ~umask, path
