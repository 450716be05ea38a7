"""Bad input and faults: each gives one clear error naming the value and the fix, and loses
nothing already written."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

import tracin
from conftest import checkpoints
from tracin.cli._app import app
from tracin.store import _store
from tracin.store._store import SCHEMA_VERSION


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
    # the first-batch check: a TaskError (the model/task or the data's layout) naming the stage
    with pytest.raises(
        tracin.TracInError, match=r"failed.* on the first train rows.*out of bounds"
    ):
        run_of(mlp_setup, data=TensorDataset(x, y + 7), batch_size=64)
    late = y.clone()
    late[20] = 99  # past the rows the first-batch check sees: named by its batch
    with pytest.raises(tracin.DataError, match=r"failed on train rows 16\.\.29.*out of bounds"):
        run_of(mlp_setup, data=TensorDataset(x, late), batch_size=16)
    with pytest.raises(tracin.TaskError, match="needs integer class indices"):
        run_of(mlp_setup, data=TensorDataset(x, y.double()))


def test_query_of_the_wrong_shape(mlp_setup):
    run = run_of(mlp_setup)
    bad = (torch.randn(3, 7, dtype=torch.float64), torch.tensor([0, 1, 2]))
    with pytest.raises(tracin.TracInError, match=r"failed.* on the first query rows.*shapes") as e:
        run.influence(bad)
    assert "the 3 rows were padded to 64" in str(e.value)  # why the shapes in it say 64


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
        tracin.StoreError,
        match=rf"schema 99 .*tracin 9.0.*reads schema {SCHEMA_VERSION}.*overwrite",
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


# --- featurize's arguments: every reasonable type accepted, the rest refused with a fix that works
def test_numpy_integers_torch_dtypes_and_one_layer_name_are_accepted(mlp_setup, tmp_path):
    query = mlp_setup[2]
    plain = run_of(mlp_setup, store=tmp_path / "a", proj_dim=8, seed=3, batch_size=8,
                   block_rows=16, dtype="float32", layers=["2"])  # fmt: skip
    loose = run_of(mlp_setup, store=str(tmp_path / "b"), proj_dim=np.int64(8), seed=np.uint8(3),
                   batch_size=np.int32(8), block_rows=np.int64(16), dtype=torch.float32,
                   layers="2", projection="Gaussian", overwrite=np.bool_(False))  # fmt: skip
    np.testing.assert_array_equal(loose.influence(query), plain.influence(query))
    config = [json.loads((tmp_path / s / "manifest.json").read_text())["config"] for s in "ab"]
    assert config[0] == config[1] and config[0]["parameters"] == ["2.weight", "2.bias"]


# (arguments, message; an "e.g. name=value" in it must work when followed)
BAD_ARGUMENTS = [
    ({"proj_dim": 8.0}, r"proj_dim=8\.0 \(float\) must be an integer, e\.g\. proj_dim=8$"),
    ({"proj_dim": 0}, r"proj_dim=0 must be a positive integer, e\.g\. proj_dim=1024"),
    ({"proj_dim": -3}, r"proj_dim=-3 must be a positive integer"),
    ({"proj_dim": "8"}, r"proj_dim='8' \(str\) must be an integer"),
    ({"projection": "fast", "proj_dim": 8}, r"projection='fast'; expected one of \['gaussian'"),
    ({"projection": "rademacher"}, r"projection='rademacher' needs proj_dim, e\.g\. proj_dim="),
    ({"projection": 3}, r"projection=3 must be a string"),
    ({"seed": -1, "proj_dim": 8}, r"seed=-1 must be an integer >= 0, e\.g\. seed=0"),
    ({"seed": 0.5, "proj_dim": 8}, r"seed=0\.5 \(float\) must be an integer, e\.g\. seed=0"),
    ({"dtype": "int8"}, r"dtype='int8'; expected one of .*e\.g\. dtype='float32'"),
    ({"dtype": torch.int8}, r"dtype=torch\.int8; expected one of"),
    ({"batch_size": 8.5}, r"batch_size=8\.5 \(float\) must be an integer, e\.g\. batch_size=64"),
    ({"block_rows": 0}, r"block_rows=0 must be a positive integer, e\.g\. block_rows=4096"),
    ({"layers": []}, r"layers=\[\] must name modules or parameters of the model, e\.g\. layers="),
    ({"layers": [0]}, r"layers=\[0\] must name modules or parameters"),
    ({"layers": ["fc9"]}, r"layer 'fc9' matches no parameter of the model; .* \['0', '2'\]"),
    ({"queries": [1]}, r"queries is a list; it must be a dict of split name -> data"),
    ({"queries": {"a/b": 1}}, r"query split name 'a/b' must be a string of letters"),
    ({"queries": {"train": 1}}, r"a query split cannot be named 'train'"),
    ({"embedding_layer": "fc9"}, r"embedding_layer='fc9' is not a module .* \['0', '1', '2'\]"),
    ({"engine": "fast"}, r"engine='fast'; expected one of \['auto'"),
    ({"store": 3}, r"store=3 must be a directory path .*e\.g\. store='runs/mnist'"),
    ({"store": ""}, r"store='' must be a directory path"),
    ({"overwrite": "no"}, r"overwrite='no' must be True or False"),
    ({"progress": 3}, r"progress=3 must be None or a function"),
    ({"query_task": "prediction"}, r"query_task is a str, not a tracin\.Task"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_bad_featurize_arguments_name_the_value_and_a_fix(mlp_setup, tmp_path, monkeypatch,
                                                         kwargs, message):  # fmt: skip
    monkeypatch.chdir(tmp_path)  # a suggested relative store path lands here
    with pytest.raises(tracin.ConfigError, match=message) as caught:
        run_of(mlp_setup, **kwargs)
    hint = re.search(r"e\.g\. (\w+)=(\[[^\]]*\]|'[^']*'|-?\d+)", str(caught.value))
    if hint:  # follow the suggested fix literally: it works
        run_of(mlp_setup, **{**kwargs, hint[1]: ast.literal_eval(hint[2])})


def test_a_store_that_is_a_file(mlp_setup, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(tracin.ConfigError, match=r"store='.*notes\.txt' is a file, not a dir"):
        run_of(mlp_setup, store=tmp_path / "notes.txt", proj_dim=8)
    with pytest.raises(tracin.ConfigError, match=r"is a file, not a directory.*featurize wrote"):
        tracin.open(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only: chmod, and for root (who writes anyway) refuse like the kernel."""
    folders = []
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path):
        return any(Path(os.path.abspath(path)).is_relative_to(f) for f in folders)

    def guarded_open(path, flags, *args, **kwargs):
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writes and inside(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    def make(folder):
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        folders.append(folder.resolve())
        if os.geteuid() == 0:
            monkeypatch.setattr(os, "open", guarded_open)
            monkeypatch.setattr(os, "mkdir", guarded_mkdir)
        return folder

    yield make
    for folder in folders:
        folder.chmod(0o755)


def test_a_read_only_store_is_one_clear_error(mlp_setup, tmp_path, read_only):
    store = read_only(tmp_path / "run")
    with pytest.raises(tracin.StoreError, match=r"cannot write to '.*run' \(Permission denied\)"):
        run_of(mlp_setup, store=store, proj_dim=8)


# --- the command line: every bad input is one line and exit status 2 -------------------------
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A spec (4 query rows, 40 train rows) featurized into a store, shared by the CLI cases."""
    from test_cli import write_spec

    folder = tmp_path_factory.mktemp("cli")
    spec = write_spec(folder)
    res = CliRunner().invoke(app, ["featurize", str(spec), "--store", str(folder / "run")])
    assert res.exit_code == 0, res.output
    flat = folder / "flat.py"  # a render that returns a flat (1-D) image
    flat.write_text(
        spec.read_text().replace('"row": {"x0": float(x[index, 0])}', '"image": x[index]')
    )
    (folder / "notes.txt").write_text("mine")
    return folder


CLI_CASES = [
    (["featurize", "{d}/spec.py", "--store", "{d}/notes.txt"], r"--store '.*notes\.txt' is a file"),
    (["self-influence", "{d}/notes.txt"], r"is a file, not a directory"),
    (["featurize", "{d}/spec.py", "--store", "{d}/run2", "--projection", "fast"], "'fast'"),
    (
        ["featurize", "{d}/spec.py", "--store", "{d}/run2", "--projection", "gaussian"],
        "needs proj_dim",
    ),
    (["featurize", "{d}/spec.py", "--store", "{d}/run2", "--engine", "fast"], "--engine 'fast'"),
    (["featurize", "{d}/spec.py", "--store", "{d}/run2", "--block-rows", "0"], "--block-rows 0"),
    (
        ["featurize", "{d}/spec.py", "--store", "{d}/run", "--query-score", "prediction"],
        r"splits\.test\.task\.settings\.query \('loss' -> 'prediction'\).*--overwrite",
    ),
    (
        ["report", "{d}/run", "--spec", "{d}/spec.py", "--split", "test", "--rows", "0,4"],
        r"--rows: row 4 is outside split 'test', which has rows 0\.\.3",
    ),
    (
        ["report", "{d}/run", "--spec", "{d}/spec.py", "--split", "tests"],
        r"--split 'tests' is not in the store; its query splits are \['test'\]",
    ),
    (
        ["report", "{d}/run", "--spec", "{d}/flat.py"],
        r"render returned an image of shape \(5,\).*reshape it in render",
    ),
    (["report", "{d}/run", "--spec", "{d}/spec.py", "--out", "{d}"], "is a directory"),
    (["explain", "{d}/run", "--split", "test", "--rows", "7"], "row 7 is outside split 'test'"),
    (["cluster", "{d}/run", "--rows", "1,2,40"], "row 40 is outside split 'train'"),
    (["self-influence", "{d}/run", "--top", "-1"], "--top -1"),
    (["self-influence", "{d}/run", "-f", "csv", "-o", "{d}"], "is a folder"),
]


@pytest.mark.parametrize(("args", "message"), CLI_CASES)
def test_cli_bad_inputs_are_one_line_with_status_2(cli_run, args, message):
    res = CliRunner().invoke(app, [a.format(d=cli_run) for a in args])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("tracin: error:"), res.stderr
    assert re.search(message, lines[0]), lines[0]


def test_cli_read_only_folders_are_one_line(cli_run, tmp_path, read_only):
    spec = cli_run / "spec.py"
    locked = read_only(tmp_path / "locked")
    cases = [["featurize", spec, "--store", locked / "run"],
             ["featurize", spec, "--store", locked],
             ["report", cli_run / "run", "--spec", spec, "--out", locked / "index.html"],
             ["self-influence", cli_run / "run", "-f", "csv", "-o", locked / "si.csv"]]  # fmt: skip
    for args in cases:
        res = CliRunner().invoke(app, [str(a) for a in args])
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1, (args, res.output)
        assert "Permission denied" in lines[0] and str(locked) in lines[0], lines[0]
    assert list(locked.iterdir()) == []
