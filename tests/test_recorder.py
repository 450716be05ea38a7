"""CheckpointRecorder: a plain training loop records checkpoints that Checkpoints reads with
the right learning rates (from a scheduler), steps, and optionally optimiser state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tracin


def test_records_state_step_and_scheduled_lr(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    rec = tracin.CheckpointRecorder(tmp_path, steps=tracin.log_spaced_steps(20, 6))
    expected = {}
    for step in range(1, 21):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        if rec.step(model, opt, step) is not None:
            expected[step] = (
                opt.param_groups[0]["lr"],
                {k: v.clone() for k, v in model.state_dict().items()},
            )
    ckpts = rec.checkpoints()
    assert [c.step for c in ckpts] == sorted(expected) == tracin.log_spaced_steps(20, 6)
    assert ckpts.lrs == tuple(expected[s][0] for s in sorted(expected))
    assert len(set(ckpts.lrs)) > 1  # the schedule shows
    for c in ckpts:
        state = c.state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected[c.step][1].items())
    run = tracin.featurize(model, tracin.ClassificationTask(), ckpts, TensorDataset(x, y))
    assert np.isfinite(run.self_influence()).all()
    assert not list(tmp_path.glob(".*.tmp"))


def test_every_and_optimizer_state(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rec = tracin.CheckpointRecorder(tmp_path, every=2, save_optimizer=True)
    for step in range(1, 6):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        rec.step(model, opt, step)
    assert [c.step for c in rec.checkpoints()] == [2, 4]
    payload = torch.load(rec.paths()[0], weights_only=True)
    assert "exp_avg_sq" in payload["optimizer_state_dict"]["state"][0]


def test_recorder_errors(tmp_path):
    with pytest.raises(tracin.ConfigError, match="exactly one of steps"):
        tracin.CheckpointRecorder(tmp_path)
    with pytest.raises(tracin.ConfigError, match="no checkpoints recorded"):
        tracin.CheckpointRecorder(tmp_path, every=1).checkpoints()
    with pytest.raises(tracin.ConfigError, match="must be >= 1"):
        tracin.log_spaced_steps(0, 5)
