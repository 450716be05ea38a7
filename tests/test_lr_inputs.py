"""Every value type a user may plausibly pass to Checkpoints.from_paths / from_state_dicts /
Checkpoint: accepted with the meaning a user intends, or one tracin error naming the value and a
fix that works when followed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tracin


@pytest.fixture
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.fixture
def states(net):
    return [{k: v + i for k, v in net.state_dict().items()} for i in range(3)]


@pytest.fixture
def files(tmp_path, states):
    paths = []
    for i, state in enumerate(states):  # step_9 < step_10 < step_100 only in natural order
        path = tmp_path / f"step_{[9, 10, 100][i]}.pt"
        torch.save({"model_state_dict": state, "step": [9, 10, 100][i], "lr": 0.1 * (i + 1)}, path)
        paths.append(path)
    return paths


@pytest.mark.parametrize(
    "lr",
    [0.05, np.float32(0.05), np.float64(0.05), torch.tensor(0.05), np.array(0.05), np.int64(2)],
    ids=["float", "np.float32", "np.float64", "tensor0d", "array0d", "np.int64"],
)
def test_one_number_is_every_checkpoints_lr(states, lr):
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=lr)
    want = float(np.asarray(lr.item() if isinstance(lr, torch.Tensor) else lr))
    assert ckpts.lrs == pytest.approx((want,) * 3)
    assert all(type(x) is float for x in ckpts.lrs)


@pytest.mark.parametrize(
    "lr",
    [
        [0.1, 0.2, 0.3],
        (0.1, 0.2, 0.3),
        np.array([0.1, 0.2, 0.3]),
        np.array([0.1, 0.2, 0.3], dtype=np.float32),
        torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
        [np.float32(0.1), torch.tensor(0.2), np.array(0.3)],
        (x / 10 for x in (1, 2, 3)),
    ],
    ids=["list", "tuple", "array", "array32", "tensor", "mixed", "generator"],
)
def test_one_lr_per_checkpoint_in_any_container(states, lr):
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=lr)
    assert ckpts.lrs == pytest.approx((0.1, 0.2, 0.3))


@pytest.mark.parametrize(
    "lr",
    [np.array([0.1, 0.2]), torch.tensor([0.1, 0.2]), (0.1, 0.2), [0.1, 0.2, 0.3, 0.4]],
    ids=["array", "tensor", "tuple", "list-too-long"],
)
def test_wrong_length_names_both_lengths(states, lr):
    n = len(lr)
    with pytest.raises(tracin.ConfigError, match=f"lr has {n} entries for 3 checkpoints"):
        tracin.Checkpoints.from_state_dicts(states, lr=lr)
    # the fix the message names works: one number for all of them
    assert tracin.Checkpoints.from_state_dicts(states, lr=0.01).lrs == (0.01,) * 3


def test_two_dimensional_array_is_refused(states):
    with pytest.raises(tracin.ConfigError, match=r"shape \(3, 1\).*1-d array of 3"):
        tracin.Checkpoints.from_state_dicts(states, lr=np.full((3, 1), 0.1))


@pytest.mark.parametrize(
    "bad",
    [-0.1, float("nan"), float("inf"), np.float32("nan"), True, "0.1", None, [0.1], {1: 0.1}],
    ids=["negative", "nan", "inf", "np-nan", "bool", "str", "None", "list", "int-key"],
)
def test_bad_values_are_refused_naming_the_value(states, bad):
    lrs = [0.1, bad, 0.2]
    with pytest.raises(tracin.CheckpointError, match="learning rate of checkpoint 'ckpt_1'"):
        tracin.Checkpoints.from_state_dicts(states, lr=lrs)


def test_non_finite_array_entry_is_refused(states):
    with pytest.raises(tracin.CheckpointError, match="must be finite and >= 0"):
        tracin.Checkpoints.from_state_dicts(states, lr=np.array([0.1, np.inf, 0.1]))


def test_zero_lr_contributes_nothing_but_all_zero_is_refused(states):
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=[0.1, 0.0, 0.2])
    assert ckpts.lrs == (0.1, 0.0, 0.2)
    with pytest.raises(tracin.ConfigError, match="every checkpoint has lr 0"):
        tracin.Checkpoints.from_state_dicts(states, lr=0.0)


def test_zero_lr_checkpoint_adds_nothing_to_scores(net, states):
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    task = tracin.ClassificationTask()
    two = tracin.Checkpoints.from_state_dicts(states[:2], lr=[0.1, 0.2], steps=[0, 1])
    three = tracin.Checkpoints.from_state_dicts(states, lr=[0.1, 0.2, 0.0], steps=[0, 1, 2])
    a = tracin.featurize(net, task, two, (x, y), engine="functional").self_influence()
    b = tracin.featurize(net, task, three, (x, y), engine="functional").self_influence()
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_callable_and_key_values_of_any_number_type(files):
    ckpts = tracin.Checkpoints.from_paths(files, lr=lambda step: np.float32(1 / step))
    assert ckpts.lrs == pytest.approx((1 / 9, 1 / 10, 1 / 100))
    assert tracin.Checkpoints.from_paths(files, lr="lr").lrs == pytest.approx((0.1, 0.2, 0.3))


def test_tensor_lr_in_file(tmp_path, states):
    path = tmp_path / "a.pt"
    torch.save({"model_state_dict": states[0], "lr": torch.tensor(0.25)}, path)
    assert tracin.Checkpoints.from_paths([path], lr="lr").lrs == (0.25,)


@pytest.mark.parametrize("form", ["str", "path", "tuple", "generator"])
def test_paths_as_any_iterable_of_str_or_path(files, form):
    given = {
        "str": [str(p) for p in files],
        "path": files,
        "tuple": tuple(files),
        "generator": (str(p) for p in files),
    }[form]
    ckpts = tracin.Checkpoints.from_paths(given, lr="lr")
    assert [c.step for c in ckpts] == [9, 10, 100]


def test_a_directory_or_a_glob_pattern_lists_files_in_natural_order(tmp_path, files):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for given in (tmp_path, str(tmp_path), str(tmp_path / "step_*.pt")):
        ckpts = tracin.Checkpoints.from_paths(given, lr=[0.1, 0.2, 0.3], steps=None)
        assert [c.id for c in ckpts] == ["step_9", "step_10", "step_100"]
        assert ckpts.lrs == (0.1, 0.2, 0.3)


def test_a_single_file_is_one_checkpoint(files):
    assert len(tracin.Checkpoints.from_paths(str(files[0]), lr=0.1)) == 1


def test_empty_directory_and_unmatched_pattern(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(tracin.CheckpointError, match="holds no checkpoint files"):
        tracin.Checkpoints.from_paths(tmp_path / "empty", lr=0.1)
    with pytest.raises(tracin.CheckpointError, match="matches no checkpoint files"):
        tracin.Checkpoints.from_paths(str(tmp_path / "nope_*.pt"), lr=0.1)


def test_missing_files_are_named_before_any_work(tmp_path, files):
    given = [*files, tmp_path / "gone.pt", tmp_path / "gone2.pt"]
    with pytest.raises(tracin.CheckpointError, match=r"gone\.pt' does not exist \(2 of 5"):
        tracin.Checkpoints.from_paths(given, lr=[0.1] * 5)


def test_a_directory_where_a_file_belongs(tmp_path, states):
    hf = tmp_path / "checkpoint-500"
    hf.mkdir()
    torch.save(states[0], hf / "pytorch_model.bin")
    with pytest.raises(tracin.CheckpointError, match=r"is a directory.*pytorch_model\.bin"):
        tracin.Checkpoints.from_paths([hf], lr=[0.1])
    ckpts = tracin.Checkpoints.from_paths([hf / "pytorch_model.bin"], lr=[0.1])  # the fix
    assert set(ckpts[0].state_dict()) == set(states[0])


@pytest.mark.parametrize(
    ("paths", "match"),
    [
        ({"a": "x.pt"}, "paths is a dict"),
        (5, "paths is a int"),
        ([{"w": torch.zeros(1)}], "from_state_dicts"),
        ([3], "paths holds a int"),
    ],
)
def test_wrong_path_types(paths, match):
    with pytest.raises(tracin.ConfigError, match=match):
        tracin.Checkpoints.from_paths(paths, lr=0.1)


def test_steps_accept_numpy_and_integral_floats(states):
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=0.1, steps=np.array([30, 10, 20]))
    assert [c.step for c in ckpts] == [10, 20, 30]
    assert all(type(c.step) is int for c in ckpts)
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=0.1, steps=[1.0, np.int32(2), 3])
    assert [c.step for c in ckpts] == [1, 2, 3]


@pytest.mark.parametrize(
    ("steps", "error", "match"),
    [
        ([1, 2.5, 3], tracin.CheckpointError, "step of checkpoint 'ckpt_1' is 2.5"),
        (5, tracin.ConfigError, "give one int per checkpoint"),
        ([1, 2], tracin.ConfigError, "steps has 2 entries for 3 checkpoints"),
        (["a", "b", "c"], tracin.CheckpointError, "must be an int"),
    ],
)
def test_bad_steps(states, steps, error, match):
    with pytest.raises(error, match=match):
        tracin.Checkpoints.from_state_dicts(states, lr=0.1, steps=steps)


def test_from_state_dicts_inputs(net, states):
    assert len(tracin.Checkpoints.from_state_dicts(states[0], lr=0.1)) == 1  # one bare dict
    assert len(tracin.Checkpoints.from_state_dicts(iter(states), lr=0.1)) == 3
    with pytest.raises(tracin.ConfigError, match=r"model\.state_dict\(\)"):
        tracin.Checkpoints.from_state_dicts(net, lr=0.1)
    with pytest.raises(tracin.ConfigError, match=r"model\.state_dict\(\)"):
        tracin.Checkpoints.from_state_dicts([net], lr=0.1)
    with pytest.raises(tracin.ConfigError, match="from_paths"):
        tracin.Checkpoints.from_state_dicts(["a.pt"], lr=0.1)
    with pytest.raises(tracin.ConfigError, match=r"pass a list of state dicts"):
        tracin.Checkpoints.from_state_dicts({"e1": states[0], "e2": states[1]}, lr=0.1)
    # the fix named: a list
    assert len(tracin.Checkpoints.from_state_dicts([states[0], states[1]], lr=0.1)) == 2


def test_checkpoint_values_are_normalised(tmp_path, files, net):
    c = tracin.Checkpoint(id="a", step=np.int64(3), lr=np.float32(0.5), path=str(files[0]))
    assert c.path == files[0] and type(c.step) is int and type(c.lr) is float
    assert c.lr == 0.5
    g = tracin.Checkpoint(id="b", step=1, lr=0.2, state=net.state_dict(),
                          group_lrs={"0.*": 0.1, "2.*": np.float64(0.2)})  # fmt: skip
    assert g.group_lrs == (("0.*", 0.1), ("2.*", 0.2))
    with pytest.raises(tracin.CheckpointError, match=r"group_lrs=\{"):
        tracin.Checkpoint(id="c", step=1, lr={"0.*": 0.1}, state=net.state_dict())  # type: ignore[arg-type]
    with pytest.raises(tracin.ConfigError, match="non-empty string"):
        tracin.Checkpoint(id=3, step=1, lr=0.1, state=net.state_dict())  # type: ignore[arg-type]
    with pytest.raises(tracin.ConfigError, match=r"model\.state_dict\(\)"):
        tracin.Checkpoint(id="d", step=1, lr=0.1, state=net)  # type: ignore[arg-type]
    with pytest.raises(tracin.CheckpointError, match=r"lr=0\.2, as the reference"):
        tracin.Checkpoint(id="e", step=1, lr=0.0, state=net.state_dict(), group_lrs={"*": 0.2})
    with pytest.raises(tracin.ConfigError, match="exactly one of path or state"):
        tracin.Checkpoint(id="f", step=1, lr=0.1)
    with pytest.raises(tracin.ConfigError, match=r"Checkpoints\.from_paths"):
        tracin.Checkpoints([files[0]])  # type: ignore[list-item]


def test_group_lr_patterns(states):
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    spec = {"0.bias": 0.3, "0.*": 0.1, "*": 0.2}  # an exact name wins, then the first pattern
    c = tracin.Checkpoints.from_state_dicts(states[:1], lr=spec)[0]
    assert c.lr == 0.3
    assert c.parameter_lrs(names) == {"0.weight": 0.1, "0.bias": 0.3, "2.weight": 0.2,
                                      "2.bias": 0.2}  # fmt: skip
    partial = tracin.Checkpoints.from_state_dicts(states[:1], lr=[{"0.*": 0.1}])[0]
    with pytest.raises(tracin.CheckpointError, match=r"'2\.weight' is in no learning-rate group"):
        partial.parameter_lrs(names)
    fixed = tracin.Checkpoints.from_state_dicts(states[:1], lr=[{"0.*": 0.1, "*": 0.05}])[0]
    assert fixed.parameter_lrs(names)["2.bias"] == 0.05  # the fix named: '*': lr last
    ddp = tracin.Checkpoints.from_state_dicts(
        states[:1], lr=[[{"params": ["module.0.weight", "module.0.bias"], "lr": 0.1},
                         {"params": ["module.2.weight", "module.2.bias"], "lr": 0.4}]],
    )[0]  # fmt: skip
    assert ddp.parameter_lrs(names) == {"0.weight": 0.1, "0.bias": 0.1, "2.weight": 0.4,
                                        "2.bias": 0.4}  # fmt: skip


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([{"params": [0, 1], "lr": 0.1}], "must be parameter names"),
        ([{"params": ["a"]}], "is not"),
        ({"a": -1.0}, "finite and >= 0"),
        ({"": 0.1}, "must be a parameter name"),
        ({}, "names no parameters"),
    ],
)
def test_bad_group_values(states, value, match):
    with pytest.raises(tracin.CheckpointError, match=match):
        tracin.Checkpoints.from_state_dicts(states[:1], lr=[value])
