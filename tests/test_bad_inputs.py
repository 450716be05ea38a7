"""Bad input and faults: each gives one clear error naming the value and the fix, and loses
nothing already written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import tracin
from conftest import checkpoints
from tracin import _store


def run_of(setup, **kwargs):
    model, train, _, states = setup
    data = kwargs.pop("data", None)
    data = TensorDataset(*train) if data is None else data
    return tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states), data, **kwargs)


def test_empty_dataset(mlp_setup):
    empty = TensorDataset(torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(tracin.DataError, match="the training data is empty"):
        run_of(mlp_setup, data=empty)


class Shrinking(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data, self.n = data, len(data)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.data[i]


def test_dataset_that_changes_length_after_featurize(mlp_setup):
    _, train, query, _ = mlp_setup
    rows = Shrinking(TensorDataset(*train))
    run = run_of(mlp_setup, data=rows)
    rows.n -= 3
    with pytest.raises(tracin.DataError, match="now has fewer rows than the 30 featurized"):
        run.influence(query)


def test_labels_out_of_range_and_of_the_wrong_dtype(mlp_setup):
    x, y = mlp_setup[1]
    with pytest.raises(tracin.DataError, match=r"failed on train rows 0\.\.7.*out of bounds"):
        run_of(mlp_setup, data=TensorDataset(x, y + 7), batch_size=64)  # the first-batch check
    late = y.clone()
    late[20] = 99  # past the rows the first-batch check sees: named by its batch
    with pytest.raises(tracin.DataError, match=r"failed on train rows 16\.\.29.*out of bounds"):
        run_of(mlp_setup, data=TensorDataset(x, late), batch_size=16)
    with pytest.raises(tracin.TaskError, match="needs integer class indices"):
        run_of(mlp_setup, data=TensorDataset(x, y.double()))


def test_query_of_the_wrong_shape(mlp_setup):
    run = run_of(mlp_setup)
    bad = (torch.randn(3, 7, dtype=torch.float64), torch.tensor([0, 1, 2]))
    with pytest.raises(tracin.DataError, match=r"failed on query rows 0\.\.2.*shapes"):
        run.influence(bad)


def test_nan_gradients_name_the_rows(mlp_setup):
    x, y = mlp_setup[1]
    x = x.clone()
    x[[12, 17]] = float("nan")  # past the first-batch check's rows: the gradient pass names them
    with pytest.raises(tracin.DataError, match=r"non-finite gradients for train rows \[12, 17\]"):
        run_of(mlp_setup, data=TensorDataset(x, y))


def test_k_larger_than_n(mlp_setup):
    run = run_of(mlp_setup)
    with pytest.raises(tracin.ConfigError, match="k=31 must be an integer between 1 and the 30"):
        run.proponents(mlp_setup[2], k=31)


def test_store_from_another_version(mlp_setup, tmp_path):
    run_of(mlp_setup, store=tmp_path / "r", proj_dim=8)
    manifest = json.loads((tmp_path / "r/manifest.json").read_text())
    manifest["schema"] = 99
    manifest["tracin_version"] = "9.0"
    (tmp_path / "r/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        tracin.StoreError, match=r"schema 99 .*tracin 9.0.*reads schema 1.*overwrite"
    ):
        tracin.open(tmp_path / "r")
    with pytest.raises(tracin.StoreError, match=r"schema 99 \(written by tracin 9.0\)"):
        run_of(mlp_setup, store=tmp_path / "r", proj_dim=8)


def test_disk_full_mid_run_keeps_the_store_readable_and_resumes(mlp_setup, tmp_path, monkeypatch):
    query = mlp_setup[2]
    reference = run_of(mlp_setup, store=tmp_path / "ref", proj_dim=8, block_rows=4)
    real_write = _store.atomic_write
    calls = {"n": 0}

    def full_disk(path, data):
        calls["n"] += 1
        if calls["n"] > 12:  # the manifest and some blocks fit, then the disk is full
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(_store, "atomic_write", full_disk)
    with pytest.raises(tracin.StoreError, match=r"No space left on device.*run featurize again"):
        run_of(mlp_setup, store=tmp_path / "r", proj_dim=8, block_rows=4)
    monkeypatch.setattr(_store, "atomic_write", real_write)
    assert list((tmp_path / "r").rglob("block_*.json"))  # finished blocks are kept
    done = [m.with_suffix(".npy") for m in (tmp_path / "r").rglob("block_*.json")]
    assert len(done) == 3  # blocks 0-2 complete; block 3's metadata never got written
    before = {p: p.stat().st_mtime_ns for p in done}
    resumed = run_of(mlp_setup, store=tmp_path / "r", proj_dim=8, block_rows=4)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # not recomputed
    np.testing.assert_array_equal(resumed.influence(query), reference.influence(query))


@pytest.mark.parametrize("store", [False, True])
def test_nan_gradients_after_the_first_batch_name_the_rows(mlp_setup, tmp_path, store):
    x, y = mlp_setup[1]
    x = x.clone()
    x[[17, 21]] = float("inf")
    kwargs = {"store": tmp_path / "r", "proj_dim": 8} if store else {}
    with pytest.raises(tracin.DataError, match=r"non-finite gradients for train rows \[17, 21\]"):
        run_of(mlp_setup, data=TensorDataset(x, y), batch_size=8, **kwargs)
