"""The feature store: equal to streaming, reopen without the model, config checks, checksums,
incremental rows and checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tracin
from conftest import checkpoints, train_states


def featurize(setup, store, **kwargs):
    model, train, _, states = setup
    kwargs.setdefault("dtype", "float64")
    kwargs.setdefault("block_rows", 7)
    ckpts = kwargs.pop("ckpts", None) or checkpoints(states)
    data = kwargs.pop("data", None) or TensorDataset(*train)
    return tracin.featurize(
        model, tracin.ClassificationTask(), ckpts, data, store=store, batch_size=4, **kwargs
    )


def test_stored_exact_features_equal_streaming(mlp_setup, tmp_path):
    query = mlp_setup[2]
    stream = featurize(mlp_setup, None)
    stored = featurize(mlp_setup, tmp_path / "run")
    expected = stream.influence(query)
    np.testing.assert_allclose(stored.influence(query), expected, rtol=1e-10)
    np.testing.assert_allclose(stored.self_influence(), stream.self_influence(), rtol=1e-12)
    for got, want in zip(stored.neighbors(query, k=9), stream.neighbors(query, k=9), strict=True):
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-10)
    files = sorted(p.name for p in (tmp_path / "run/features/train").rglob("block_*.npy"))
    assert len(files) == 3 * 5  # 30 rows in blocks of 7: 5 blocks per checkpoint


def test_open_without_model_scores_stored_splits(mlp_setup, tmp_path):
    train, query = mlp_setup[1], mlp_setup[2]
    run = featurize(mlp_setup, tmp_path / "run", queries={"test": TensorDataset(*query)})
    reopened = tracin.open(tmp_path / "run")
    assert reopened.model is None
    np.testing.assert_array_equal(reopened.self_influence(), run.self_influence())
    np.testing.assert_allclose(reopened.influence("test"), run.influence(query), rtol=1e-10)
    np.testing.assert_array_equal(
        reopened.proponents("test", k=3).indices, run.proponents(query, k=3).indices
    )
    with pytest.raises(tracin.ConfigError, match="needs the model"):
        reopened.influence(query)
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert [c["lr"] for c in manifest["checkpoints"]] == [0.5, 0.1, 0.02]
    assert manifest["splits"]["train"]["n_rows"] == len(train[0])
    assert all(len(c["sha256"]) == 64 for c in manifest["checkpoints"])


def test_reopen_with_other_config_names_the_keys(mlp_setup, tmp_path):
    featurize(mlp_setup, tmp_path / "run", proj_dim=16, dtype="float32")
    with pytest.raises(
        tracin.StoreError, match=r"config\.projection\.dim \(16 -> 32\).*overwrite=True"
    ):
        featurize(mlp_setup, tmp_path / "run", proj_dim=32, dtype="float32")
    run = featurize(mlp_setup, tmp_path / "run", proj_dim=32, dtype="float32", overwrite=True)
    assert run.config.projection.dim == 32
    with pytest.raises(tracin.StoreError, match="different data"):
        other = (mlp_setup[1][0] + 1, mlp_setup[1][1])
        featurize(mlp_setup, tmp_path / "run", proj_dim=32, dtype="float32",
                  data=TensorDataset(*other))  # fmt: skip


def test_corrupted_and_truncated_blocks_are_named_and_recomputed(mlp_setup, tmp_path):
    query = mlp_setup[2]
    run = featurize(mlp_setup, tmp_path / "run")
    expected = run.influence(query)
    block = tmp_path / "run/features/train/ckpt_ckpt_1/block_2.npy"
    raw = bytearray(block.read_bytes())
    raw[-5] ^= 0xFF
    block.write_bytes(bytes(raw))
    with pytest.raises(tracin.StoreError, match=r"block_2\.npy is corrupted or truncated"):
        tracin.open(tmp_path / "run").influence("train")
    norms = tmp_path / "run/features/train/ckpt_ckpt_0/sqnorm_4.npy"
    norms.write_bytes(norms.read_bytes()[:-8])
    with pytest.raises(tracin.StoreError, match=r"sqnorm_4\.npy is corrupted or truncated"):
        tracin.open(tmp_path / "run").self_influence()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*.npy")}
    rerun = featurize(mlp_setup, tmp_path / "run")
    changed = {p.name for p in before if p.stat().st_mtime_ns != before[p]}
    assert changed == {"block_2.npy", "sqnorm_2.npy", "block_4.npy", "sqnorm_4.npy"}
    np.testing.assert_allclose(rerun.influence(query), expected, rtol=1e-12)


def test_new_rows_are_added_without_recomputing(mlp_setup, tmp_path):
    train, query = mlp_setup[1], mlp_setup[2]
    first = TensorDataset(train[0][:20], train[1][:20])
    featurize(mlp_setup, tmp_path / "run", data=first)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*.npy")}
    grown = featurize(mlp_setup, tmp_path / "run")  # all 30 rows
    rewritten = {p.name for p in before if p.stat().st_mtime_ns != before[p]}
    # blocks 0 and 1 (rows 0-13) are kept; block 2 (rows 14-19, partial) is redone
    assert rewritten == {"block_2.npy", "sqnorm_2.npy"}
    fresh = featurize(mlp_setup, tmp_path / "fresh")
    np.testing.assert_allclose(grown.influence(query), fresh.influence(query), rtol=1e-12)


def test_new_checkpoint_is_added_without_recomputing(mlp_setup, tmp_path):
    states = mlp_setup[3]
    query = mlp_setup[2]
    two = tracin.Checkpoints.from_state_dicts(states[:2], lr=[0.5, 0.1])
    featurize(mlp_setup, tmp_path / "run", ckpts=two)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*.npy")}
    run = featurize(mlp_setup, tmp_path / "run")
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert len(list((tmp_path / "run/features/train/ckpt_ckpt_2").glob("block_*.npy"))) == 5
    np.testing.assert_allclose(
        run.influence(query), featurize(mlp_setup, None).influence(query), rtol=1e-10
    )


def test_float16_features_accumulate_in_float32(mlp_setup, tmp_path):
    query = mlp_setup[2]
    exact = featurize(mlp_setup, None).influence(query)
    half = featurize(mlp_setup, tmp_path / "half", dtype="float16")
    stored = np.load(tmp_path / "half/features/train/ckpt_ckpt_0/block_0.npy")
    assert stored.dtype == np.float16
    got = half.influence(query)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, exact, rtol=0, atol=2e-3 * np.abs(exact).max())


def test_in_memory_projected_run(mlp_setup):
    query = mlp_setup[2]
    run = featurize(mlp_setup, None, proj_dim=2048, dtype="float32")
    exact = featurize(mlp_setup, None)
    np.testing.assert_allclose(run.self_influence(), exact.self_influence(), rtol=1e-12)
    err = np.abs(run.influence(query) - exact.influence(query)).max()
    assert err < 0.15 * np.abs(exact.influence(query)).max()


def test_stored_cnn_with_dataloader_pieces(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    x = torch.randn(23, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (23,))
    states = train_states(model, lambda m: nn.functional.cross_entropy(m(x), y))
    loader = torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=5)
    task = tracin.ClassificationTask()
    stored = tracin.featurize(model, task, checkpoints(states), loader, store=tmp_path / "r",
                              dtype="float64", block_rows=4)  # fmt: skip
    stream = tracin.featurize(model, task, checkpoints(states), loader)
    np.testing.assert_allclose(stored.influence((x, y)), stream.influence((x, y)), rtol=1e-10)


def test_data_fingerprint_takes_every_dtype():
    """bfloat16 inputs (no NumPy dtype) fingerprint like any other; float32 bytes are unchanged."""
    import hashlib

    from tracin.pipeline._featurize import data_fingerprint

    x = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    want = hashlib.sha256(x.numpy().tobytes()).hexdigest()
    assert data_fingerprint((x,), 4) == want  # stores written before keep their fingerprint
    bf = x.to(torch.bfloat16)
    assert data_fingerprint((bf,), 4) == data_fingerprint((bf.clone(),), 4)
    assert data_fingerprint((bf,), 4) != data_fingerprint((bf + 1,), 4)
