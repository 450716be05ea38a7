"""Checkpoints: layouts, learning-rate sources, ordering, safety, and fit to the model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tracin


@pytest.fixture
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def save(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_common_layouts_load_without_glue(tmp_path, net):
    state = net.state_dict()
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    layouts = {
        "bare.pt": state,
        "msd.pt": {"model_state_dict": state, "optimizer_state_dict": opt.state_dict(), "lr": 0.3},
        "sd.pt": {"state_dict": state, "lr": 0.3, "epoch": 2},
        "model.pt": {"model": state, "lr": 0.3},
    }
    paths = [save(tmp_path, n, obj) for n, obj in layouts.items()]
    ckpts = tracin.Checkpoints.from_paths(paths, lr=[0.3] * 4)
    for ckpt in ckpts:
        loaded = ckpt.state_dict()
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_lr_from_list_callable_key_and_dotted_key(tmp_path, net):
    opt = torch.optim.SGD(net.parameters(), lr=0.25)
    paths = [
        save(
            tmp_path,
            f"c{i}.pt",
            {
                "model_state_dict": net.state_dict(),
                "lr": 0.1 * (i + 1),
                "optimizer": opt.state_dict(),
                "step": 10 * i,
            },
        )
        for i in range(3)
    ]
    assert tracin.Checkpoints.from_paths(paths, lr=[0.5, 0.1, 0.02]).lrs == (0.5, 0.1, 0.02)
    assert tracin.Checkpoints.from_paths(paths, lr="lr").lrs == pytest.approx((0.1, 0.2, 0.3))
    nested = tracin.Checkpoints.from_paths(paths, lr="optimizer.param_groups.0.lr")
    assert nested.lrs == (0.25, 0.25, 0.25)

    def cosine(step):
        return 0.5 * (1 + math.cos(math.pi * step / 40))

    from_schedule = tracin.Checkpoints.from_paths(paths, lr=cosine)
    assert [c.step for c in from_schedule] == [0, 10, 20]  # read from the files
    assert from_schedule.lrs == pytest.approx(tuple(cosine(s) for s in (0, 10, 20)))


def test_missing_lr_is_an_error_never_one(tmp_path, net):
    path = save(tmp_path, "a.pt", net.state_dict())
    with pytest.raises(tracin.CheckpointError, match=r"no learning rate given: pass lr="):
        tracin.Checkpoints.from_paths([path])
    with pytest.raises(
        tracin.CheckpointError, match=r"has no lr under key 'lr'; give lr=\[\.\.\.\]"
    ):
        tracin.Checkpoints.from_paths([path], lr="lr")


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), None, "0.1"])
def test_bad_lr_values(net, bad):
    with pytest.raises(tracin.CheckpointError, match="learning rate of checkpoint"):
        tracin.Checkpoints.from_state_dicts([net.state_dict()], lr=[bad])


def test_lr_list_length_must_match(net):
    with pytest.raises(tracin.ConfigError, match="lr has 2 entries for 1 checkpoints"):
        tracin.Checkpoints.from_state_dicts([net.state_dict()], lr=[0.1, 0.2])


def test_sorted_by_step(net):
    states = [net.state_dict()] * 3
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=[0.1, 0.2, 0.3], steps=[30, 10, 20])
    assert [c.step for c in ckpts] == [10, 20, 30]
    assert ckpts.lrs == (0.2, 0.3, 0.1)
    with pytest.raises(tracin.ConfigError, match="steps must be unique"):
        tracin.Checkpoints.from_state_dicts(states, lr=[0.1] * 3, steps=[1, 1, 2])


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickles_are_refused_unless_opted_in(tmp_path, net):
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": net.state_dict(), "lr": 0.1, "extra": Evil()}, path)
    with pytest.raises(tracin.CheckpointError, match=r"refuses to unpickle.*allow_pickle=True"):
        tracin.Checkpoints.from_paths([path], lr="lr")
    ckpts = tracin.Checkpoints.from_paths([path], lr="lr", allow_pickle=True)
    assert ckpts.lrs == (0.1,)


def test_missing_file_and_garbage_file(tmp_path):
    with pytest.raises(tracin.CheckpointError, match="does not exist"):
        tracin.Checkpoints.from_paths([tmp_path / "nope.pt"], lr="lr")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(tracin.CheckpointError, match=r"junk\.pt"):
        tracin.Checkpoints.from_paths([junk], lr="lr")
    plain = save(tmp_path, "plain.pt", {"a": 1, "b": [2, 3]})
    with pytest.raises(tracin.CheckpointError, match="neither a bare state dict"):
        tracin.Checkpoints.from_paths([plain], lr=[0.1])[0].state_dict()


def test_data_parallel_prefix_is_stripped(net):
    wrapped = {f"module.{k}": v for k, v in net.state_dict().items()}
    ckpts = tracin.Checkpoints.from_state_dicts([wrapped], lr=[0.1])
    x = torch.randn(4, 3)
    run = tracin.featurize(
        net,
        tracin.ClassificationTask(),
        ckpts,
        torch.utils.data.TensorDataset(x, torch.tensor([0, 1, 0, 1])),
    )
    assert run.self_influence().shape == (4,)


def test_checkpoint_of_another_architecture_names_keys(net):
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5))
    data = torch.utils.data.TensorDataset(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    ckpts = tracin.Checkpoints.from_state_dicts([other.state_dict()], lr=[0.1])
    with pytest.raises(
        tracin.CheckpointError,
        match=r"'2.weight' has shape \(5, 4\) in the checkpoint, \(4, 2\)|\(2, 4\)",
    ):
        tracin.featurize(net, tracin.ClassificationTask(), ckpts, data)
    renamed = {k.replace("2.", "out."): v for k, v in net.state_dict().items()}
    ckpts = tracin.Checkpoints.from_state_dicts([renamed], lr=[0.1])
    with pytest.raises(tracin.CheckpointError, match=r"missing keys \['2.weight', '2.bias'\]"):
        tracin.featurize(net, tracin.ClassificationTask(), ckpts, data)
