"""No store larger than the question: squared norms without features, the size stated before
writing, and a budget that refuses a store too large, naming the fixes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tracin
from conftest import checkpoints, train_states
from tracin.pipeline._api import KEEP_DIM
from tracin.store._store import StorePlan


def featurize(setup, store, **kwargs):
    model, train, query, states = setup
    kwargs.setdefault("dtype", "float64")
    kwargs.setdefault("block_rows", 7)
    kwargs.setdefault("queries", {"test": TensorDataset(*query)})
    return tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states),
                            TensorDataset(*train), store=store, batch_size=4, **kwargs)  # fmt: skip


def _feature_widths(root):
    return {p.parent.parent.name: np.load(p, mmap_mode="r").shape[1]
            for p in (root / "features").rglob("block_*.npy")}  # fmt: skip


def test_norms_only_store_answers_self_influence_and_stored_queries(mlp_setup, tmp_path):
    query = mlp_setup[2]
    full = featurize(mlp_setup, tmp_path / "full", keep_features=True)
    lean = featurize(mlp_setup, tmp_path / "lean", keep_features=False)
    widths = _feature_widths(tmp_path / "lean")
    assert widths["train"] == 0 and widths["test"] > 0
    assert _feature_widths(tmp_path / "full")["train"] > 0
    np.testing.assert_allclose(lean.self_influence(), full.self_influence(), rtol=1e-12)
    expected = full.influence(query)
    np.testing.assert_allclose(lean.influence("test"), expected, rtol=1e-10)
    np.testing.assert_allclose(lean.influence(query), expected, rtol=1e-10)
    for got, want in zip(lean.neighbors("test", k=4), full.neighbors("test", k=4), strict=True):
        np.testing.assert_array_equal(got.indices, want.indices)
    cfg = json.loads((tmp_path / "lean/manifest.json").read_text())["config"]
    assert cfg["keep_features"] is False
    full_cfg = json.loads((tmp_path / "full/manifest.json").read_text())["config"]
    assert "keep_features" not in full_cfg  # as before keep_features existed


def test_reopened_norms_only_store(mlp_setup, tmp_path):
    model, train, query, states = mlp_setup
    run = featurize(mlp_setup, tmp_path / "r", keep_features=False)
    reopened = tracin.open(tmp_path / "r")
    np.testing.assert_array_equal(reopened.self_influence(), run.self_influence())
    with pytest.raises(tracin.ConfigError, match=r"train_data=.*keep_features=True"):
        reopened.influence("test")
    with pytest.raises(tracin.ConfigError, match=r"stored features.*keep_features=True"):
        reopened.clusters(2)
    kept = featurize(mlp_setup, tmp_path / "kept", keep_features=True)  # the fix it names
    assert kept.clusters(2).labels.shape == (len(train[0]),)
    again = tracin.open(tmp_path / "r", model=model, task=tracin.ClassificationTask(),
                        checkpoints=checkpoints(states),
                        train_data=TensorDataset(*train))  # fmt: skip
    np.testing.assert_allclose(again.influence("test"), run.influence(query), rtol=1e-10)
    with pytest.raises(tracin.TracInError, match=r"config.keep_features.*overwrite=True"):
        featurize(mlp_setup, tmp_path / "r", keep_features=True)  # another configuration


def test_wide_exact_run_keeps_only_norms_by_default(tmp_path, gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(80, 60), nn.Tanh(), nn.Linear(60, 3)).double()
    x = torch.randn(12, 80, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    states = train_states(model, lambda m: nn.functional.cross_entropy(m(x), y))
    setup = (model, (x, y), (x[:2], y[:2]), states)
    assert sum(p.numel() for p in model.parameters()) > KEEP_DIM
    featurize(setup, tmp_path / "exact")
    assert _feature_widths(tmp_path / "exact")["train"] == 0
    featurize(setup, tmp_path / "kron", proj_dim=64, projection="kronecker")
    assert _feature_widths(tmp_path / "kron")["train"] > 0
    featurize(setup, tmp_path / "bias", layers=["2.bias"])  # 3 values a row: kept
    assert _feature_widths(tmp_path / "bias")["train"] == 3


def test_plan_is_stated_before_writing(mlp_setup, tmp_path):
    plans = []
    run = featurize(mlp_setup, tmp_path / "r", keep_features=True, on_plan=plans.append)
    (plan,) = plans
    dim = sum(p.numel() for p in mlp_setup[0].parameters())
    assert plan.splits == (("train", 30, dim), ("test", 5, dim))
    assert plan.checkpoints == len(run.lrs) == 3 and plan.itemsize == 8
    assert plan.feature_bytes == (30 + 5) * 3 * dim * 8
    assert plan.total_bytes == plan.feature_bytes + (30 + 5) * 3 * 8
    on_disk = sum(np.load(p, mmap_mode="r").nbytes for p in (tmp_path / "r").rglob("block_*.npy"))
    assert on_disk == plan.feature_bytes
    assert f"train 30 rows x 3 checkpoints x {dim:,} dims x 8 B" in plan.describe()
    plans.clear()
    featurize(mlp_setup, tmp_path / "n", keep_features=False, on_plan=plans.append)
    assert plans[0].splits[0] == ("train", 30, 0) and "norms only" in plans[0].describe()


@pytest.mark.parametrize("keep", [True, False])
def test_budget_refuses_and_names_the_fixes(mlp_setup, tmp_path, keep):
    kwargs = {"keep_features": True} if keep else {"proj_dim": 16}
    with pytest.raises(tracin.ConfigError) as info:
        featurize(mlp_setup, tmp_path / "r", max_store_gb=1e-7, **kwargs)
    text = str(info.value)
    for fix in ("proj_dim=1024", 'projection="kronecker"', "max_store_gb=", "of features"):
        assert fix in text
    assert ("keep_features=False" in text) == keep
    assert not (tmp_path / "r" / "manifest.json").exists()  # refused before writing
    featurize(mlp_setup, tmp_path / "r", max_store_gb=None, **kwargs)  # the limit lifted


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_features": "yes"}, "keep_features='yes'"),
        ({"max_store_gb": 0}, "max_store_gb=0"),
        ({"max_store_gb": "4"}, "max_store_gb='4'"),
        ({"on_plan": 3}, "on_plan=3"),
    ],
)
def test_bad_store_arguments(mlp_setup, tmp_path, kwargs, match):
    with pytest.raises(tracin.ConfigError, match=match):
        featurize(mlp_setup, tmp_path / "r", **kwargs)


def test_plan_check_is_exact_at_the_limit():
    plan = StorePlan((("train", 1000, 250),), 2, 4)  # 2,000,000 bytes
    plan.check(0.002, exact=True)
    with pytest.raises(tracin.ConfigError, match=r"2\.00 MB of features"):
        plan.check(0.0019, exact=True)


def test_budget_suggests_a_proj_dim_that_fits():
    """The suggested proj_dim is below the gradient's width and, followed, fits the budget."""
    from tracin.store import StorePlan

    plan = StorePlan((("train", 1000, 547), ("test", 10, 547)), 5, 4)
    with pytest.raises(tracin.ConfigError) as info:
        plan.check(max_store_gb=0.001, exact=True)
    k = int(re.search(r"proj_dim=(\d+)", str(info.value)).group(1))
    assert k < 547
    StorePlan((("train", 1000, k), ("test", 10, k)), 5, 4).check(max_store_gb=0.001, exact=False)
