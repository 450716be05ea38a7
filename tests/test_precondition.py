"""Adam-preconditioned TracIn against a brute-force float64 oracle: per-example backward, divide
by sqrt(v_hat) + eps, dot, sum over checkpoints with their learning rates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tracin


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (20,), generator=gen)


def _train(tmp_path, reorder_groups=False, amsgrad=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    params = list(model.parameters())
    groups = [{"params": params[2:]}, {"params": params[:2], "weight_decay": 0.0}] if (
        reorder_groups) else [{"params": params}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=0.05, betas=(0.9, 0.99), eps=1e-6, amsgrad=amsgrad)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    rec = tracin.CheckpointRecorder(tmp_path / "ck", steps=[2, 5, 9], save_optimizer=True)
    x, y = _data()
    for step in range(1, 10):
        opt.zero_grad()
        idx = torch.arange(step % 4, 20, 2)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        sched.step()
        rec.step(model, opt, step)
    return model, rec.checkpoints()


def _oracle(model, ckpts, xs, ys, xq, yq, names):
    """(Q, N) preconditioned influence and (N,) self-influence, one backward per example."""
    infl, self_inf = np.zeros((len(xq), len(xs))), np.zeros(len(xs))
    for c in ckpts:
        m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        m.load_state_dict(c.state_dict())
        payload = c.payload()
        opt_state = payload["optimizer_state_dict"]
        order = payload["optimizer_param_names"]
        denom = {}
        for group in opt_state["param_groups"]:
            for i in group["params"]:
                st = opt_state["state"][i]
                v = st["max_exp_avg_sq"] if group["amsgrad"] else st["exp_avg_sq"]
                v_hat = v / (1 - group["betas"][1] ** float(st["step"]))
                denom[order[i]] = v_hat.sqrt() + group["eps"]

        def grads(x, y, m=m, denom=denom):
            m.zero_grad()
            nn.functional.cross_entropy(m(x[None]), y[None]).backward()
            p = dict(m.named_parameters())
            return [p[n].grad.clone() for n in names], [denom[n] for n in names]

        train = [grads(xs[i], ys[i]) for i in range(len(xs))]
        query = [grads(xq[j], yq[j]) for j in range(len(xq))]
        for i, (g, d) in enumerate(train):
            self_inf[i] += c.lr * sum(float((a * a / b).sum()) for a, b in zip(g, d, strict=True))
            for j, (h, _) in enumerate(query):
                infl[j, i] += c.lr * sum(
                    float((a / b * e).sum()) for a, b, e in zip(g, d, h, strict=True))  # fmt: skip
    return infl, self_inf


@pytest.mark.parametrize(("reorder", "amsgrad", "layers", "store"),
                         [(False, False, None, False), (True, True, ["2"], True)])  # fmt: skip
def test_matches_bruteforce_oracle(tmp_path, reorder, amsgrad, layers, store):
    model, ckpts = _train(tmp_path, reorder, amsgrad)
    x, y = _data()
    xq, yq = x[:3] + 0.1, y[:3]
    run = tracin.featurize(
        model, tracin.ClassificationTask(), ckpts, TensorDataset(x, y),
        store=tmp_path / "store" if store else None, dtype="float64", layers=layers,
        batch_size=7, precondition="adam",
    )  # fmt: skip
    names = tracin.gradients._params.select_parameters(model, layers)
    infl, self_inf = _oracle(model, ckpts, x, y, xq, yq, names)
    np.testing.assert_allclose(run.self_influence(), self_inf, rtol=1e-9)
    np.testing.assert_allclose(run.influence((xq, yq)), infl, rtol=1e-8, atol=1e-12)
    plain = tracin.featurize(model, tracin.ClassificationTask(), ckpts, TensorDataset(x, y),
                             dtype="float64", layers=layers, engine="functional")  # fmt: skip
    assert not np.allclose(plain.self_influence(), self_inf)  # the preconditioner matters
    if store:
        reopened = tracin.open(tmp_path / "store", model=model, task=tracin.ClassificationTask())
        np.testing.assert_allclose(reopened.influence((xq, yq)), infl, rtol=1e-8, atol=1e-12)
        with pytest.raises(tracin.StoreError, match="precondition"):
            tracin.featurize(model, tracin.ClassificationTask(), ckpts, TensorDataset(x, y),
                             store=tmp_path / "store", dtype="float64", layers=layers)  # fmt: skip


def test_projected_preconditioned_features_are_unbiased(tmp_path):
    model, ckpts = _train(tmp_path)
    x, y = _data()
    exact = tracin.featurize(model, tracin.ClassificationTask(), ckpts, TensorDataset(x, y),
                             dtype="float64", precondition="adam")  # fmt: skip
    proj = tracin.featurize(model, tracin.ClassificationTask(), ckpts, TensorDataset(x, y),
                            dtype="float64", precondition="adam", proj_dim=2000)  # fmt: skip
    np.testing.assert_allclose(proj.self_influence(), exact.self_influence(), rtol=1e-9)
    a, b = exact.influence((x[:4], y[:4])), proj.influence((x[:4], y[:4]))
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_errors_name_the_fix(tmp_path):
    model, ckpts = _train(tmp_path)
    x, y = _data()
    data, task = TensorDataset(x, y), tracin.ClassificationTask()
    with pytest.raises(tracin.ConfigError, match="engine='functional'"):
        tracin.featurize(model, task, ckpts, data, precondition="adam", engine="factored")
    with pytest.raises(tracin.ConfigError, match="a \\(x\\) d"):
        tracin.featurize(model, task, ckpts, data, precondition="adam", projection="kronecker",
                         proj_dim=16)  # fmt: skip
    with pytest.raises(tracin.ConfigError, match="precondition='sgd'"):
        tracin.featurize(model, task, ckpts, data, precondition="sgd")
    bare = tracin.Checkpoints.from_state_dicts([c.state_dict() for c in ckpts], lr=ckpts.lrs)
    with pytest.raises(tracin.CheckpointError, match=r"'ckpt_0'.*save_optimizer=True"):
        tracin.featurize(model, task, bare, data, precondition="adam")
    # no saved names, and an optimiser built in another order: sizes do not match
    payloads = []
    for c in ckpts:
        p = dict(c.payload())
        del p["optimizer_param_names"]
        state = p["optimizer_state_dict"]
        state["param_groups"][0]["params"] = state["param_groups"][0]["params"][::-1]
        payloads.append(p)
    for i, p in enumerate(payloads):
        torch.save(p, tmp_path / f"p{i}.pt")
    shuffled = tracin.Checkpoints.from_paths(sorted(tmp_path.glob("p*.pt")), lr="lr",
                                             steps="step")  # fmt: skip
    with pytest.raises(tracin.CheckpointError, match="parameter order differs"):
        tracin.featurize(model, task, shuffled, data, precondition="adam")
