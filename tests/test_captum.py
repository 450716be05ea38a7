"""tracin's exact TracInCP against Captum 0.9's ``captum.influence.TracInCP``.

Both are run on the same float64 MLP, the same three checkpoint files (real SGD steps with
learning rates 0.5, 0.1 and 0.02, each file holding ``{"model_state_dict", "lr", "step"}``) and
the same training and query data. What this file pins down:

- Where Captum is given the right learning rates (a custom ``checkpoints_load_func`` that returns
  the lr stored in the file), tracin and Captum agree to float64 precision: the full influence
  matrix, self-influence, the top-k proponents and opponents, and influence restricted to one
  layer, for Captum's sample-wise trick (``reduction="sum"`` / ``"mean"``) and its
  per-example-loss path (``reduction="none"``, ``sample_wise_grads_per_batch=False``).
- Two Captum traps, where Captum disagrees with the truth (tracin, itself checked against a
  per-example ``backward()`` oracle):
  a. Captum's default loader (``_load_flexible_state_dict``) reads the lr from a
     ``"learning_rate"`` key and otherwise returns 1.0 without a word, so on plain state-dict
     files Captum computes ``sum_c <g, g'>``: tracin with lr = [1, 1, 1], not the true scores.
     It cannot read a stored lr at all: a file that holds one fails its strict
     ``load_state_dict``.
  b. ``compute_intermediate_quantities`` multiplies each checkpoint's gradient block by lr_c
     (not sqrt(lr_c)), so dot products of its vectors are ``sum_c lr_c^2 <g, g'>``: tracin with
     lr_c^2 as the learning rates, not the true scores.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tracin

captum_tracincp = pytest.importorskip("captum.influence._core.tracincp")
TracInCP = captum_tracincp.TracInCP

# Captum's per-example path (sample_wise_grads_per_batch=False) warns about its own inputs.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Input Tensor 0 did not already require gradients:UserWarning"
)

LRS = (0.5, 0.1, 0.02)
N_TRAIN = 40
N_QUERY = 5
N_CLASSES = 4
CAPTUM_BATCH = 16  # 40 rows: batches of 16, 16 and 8
TRACIN_BATCH = 7  # a different split, so batching cannot line the two up by accident
RTOL = 1e-7
ATOL = 1e-12


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, N_CLASSES)).double()


@dataclass(frozen=True)
class Setup:
    """One model, its checkpoints on disk, and the data, shared by every test."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    states: tuple[dict[str, torch.Tensor], ...]
    paths: tuple[str, ...]  # {"model_state_dict": ..., "lr": ..., "step": ...}
    plain_paths: tuple[str, ...]  # bare state dicts, no lr anywhere

    @property
    def train_dataset(self) -> TensorDataset:
        return TensorDataset(self.x, self.y)

    @property
    def query(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.xq, self.yq)


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """Tiny matrices: intra-op threads only spin (10x slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    gen = torch.Generator().manual_seed(20240611)
    x = torch.randn(N_TRAIN, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (N_TRAIN,), generator=gen)
    xq = torch.randn(N_QUERY, 6, generator=gen, dtype=torch.float64)
    yq = torch.randint(0, N_CLASSES, (N_QUERY,), generator=gen)
    torch.manual_seed(7)
    model = _mlp()

    net = copy.deepcopy(model).train()
    opt = torch.optim.SGD(net.parameters(), lr=LRS[0])
    root = tmp_path_factory.mktemp("captum_ckpts")
    states, paths, plain_paths = [], [], []
    step = 0
    for lr in LRS:
        for group in opt.param_groups:
            group["lr"] = lr
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            step += 1
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        path = root / f"ckpt_{step:03d}.pt"
        torch.save({"model_state_dict": state, "lr": lr, "step": step}, path)
        plain = root / f"plain_{step:03d}.pt"
        torch.save(state, plain)
        states.append(state)
        paths.append(str(path))
        plain_paths.append(str(plain))
    return Setup(model, x, y, xq, yq, tuple(states), tuple(paths), tuple(plain_paths))


def _load_with_lr(model: nn.Module, path: str) -> float:
    """Captum ``checkpoints_load_func``: load the weights in place, return the stored lr."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model_state_dict"])
    return float(payload["lr"])


def _captum(
    s: Setup,
    *,
    reduction: str = "sum",
    sample_wise: bool = True,
    layers: list[str] | None = None,
    default_loader: bool = False,
) -> TracInCP:
    kwargs = {} if default_loader else {"checkpoints_load_func": _load_with_lr}
    return TracInCP(
        copy.deepcopy(s.model),  # Captum loads each checkpoint into it in place
        s.train_dataset,
        checkpoints=list(s.plain_paths if default_loader else s.paths),
        loss_fn=nn.CrossEntropyLoss(reduction=reduction),
        batch_size=CAPTUM_BATCH,
        sample_wise_grads_per_batch=sample_wise,
        layers=layers,
        **kwargs,
    )


def _run(
    s: Setup,
    lrs: tuple[float, ...] | str = "lr",
    layers: list[str] | None = None,
    plain: bool = False,
) -> tracin.Run:
    paths = s.plain_paths if plain else s.paths
    ckpts = tracin.Checkpoints.from_paths(paths, lr=lrs if isinstance(lrs, str) else list(lrs))
    return tracin.featurize(
        s.model,
        tracin.ClassificationTask(),
        ckpts,
        s.train_dataset,
        layers=layers,
        batch_size=TRACIN_BATCH,
    )


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def _assert_far(actual: np.ndarray, expected: np.ndarray) -> None:
    """Differ by far more than rounding: a relative gap of at least 1% of the scale."""
    gap = np.abs(actual - expected).max()
    assert gap > 1e-2 * np.abs(expected).max(), gap


def _brute_force_influence(
    s: Setup, lrs: tuple[float, ...], layer_prefix: str | None = None
) -> np.ndarray:
    """sum_c lr_c <g_c(z'), g_c(z)>, one ``backward()`` per example: the independent oracle."""
    net = copy.deepcopy(s.model).eval()

    def grads(state: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor) -> np.ndarray:
        net.load_state_dict(state)
        params = [
            p
            for n, p in net.named_parameters()
            if layer_prefix is None or n.startswith(layer_prefix + ".")
        ]
        rows = []
        for i in range(xs.shape[0]):
            loss = nn.functional.cross_entropy(net(xs[i : i + 1]), ys[i : i + 1])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        return torch.stack(rows).numpy()

    total = np.zeros((N_QUERY, N_TRAIN))
    for lr, state in zip(lrs, s.states, strict=True):
        total += lr * grads(state, s.xq, s.yq) @ grads(state, s.x, s.y).T
    return total


# --- the setup itself --------------------------------------------------------------------------
def test_checkpoints_differ_and_tracin_matches_the_oracle(case: Setup) -> None:
    """The checkpoints are distinct, and tracin's scores are the per-example backward() truth."""
    for a, b in zip(case.states, case.states[1:], strict=False):
        assert not torch.equal(a["2.weight"], b["2.weight"])
    run = _run(case)
    assert run.checkpoints.lrs == LRS
    _assert_close(run.influence(case.query), _brute_force_influence(case, LRS))


# --- 1. the influence matrix ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reduction", "sample_wise"),
    [("sum", True), ("mean", True), ("none", False)],
    ids=["sum-samplewise", "mean-samplewise", "none-per-example"],
)
def test_influence_matrix_matches_captum(case: Setup, reduction: str, sample_wise: bool) -> None:
    ours = _run(case).influence(case.query)
    theirs = _captum(case, reduction=reduction, sample_wise=sample_wise).influence(
        case.query, k=None
    )
    assert ours.shape == (N_QUERY, N_TRAIN)
    assert theirs.dtype == torch.float64
    _assert_close(ours, _np(theirs))


def test_captum_leaves_tracins_model_alone(case: Setup) -> None:
    """Captum works on its own copy; tracin's model keeps its initial weights throughout."""
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    _captum(case).influence(case.query, k=None)
    _run(case).influence(case.query)
    after = case.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in case.model.parameters())


# --- 2. self-influence ------------------------------------------------------------------------
@pytest.mark.parametrize("outer_loop_by_checkpoints", [False, True])
def test_self_influence_matches_captum(case: Setup, outer_loop_by_checkpoints: bool) -> None:
    ours = _run(case).self_influence()
    theirs = _captum(case).self_influence(None, outer_loop_by_checkpoints=outer_loop_by_checkpoints)
    assert ours.shape == (N_TRAIN,)
    assert np.all(ours > 0)
    _assert_close(ours, _np(theirs))


def test_self_influence_is_the_diagonal_of_train_on_train(case: Setup) -> None:
    """Both libraries' self-influence equals their own influence of the train set on itself."""
    run = _run(case)
    train_on_train = run.influence((case.x, case.y))
    _assert_close(np.diag(train_on_train), run.self_influence())
    theirs = _captum(case).influence((case.x, case.y), k=None)
    _assert_close(train_on_train, _np(theirs))


# --- 3. proponents and opponents --------------------------------------------------------------
@pytest.mark.parametrize("proponents", [True, False], ids=["proponents", "opponents"])
def test_top_k_matches_captum(case: Setup, proponents: bool) -> None:
    k = 5
    run = _run(case)
    full = run.influence(case.query)
    # Index equality is only meaningful without near-ties at or above the k-th place.
    ordered = np.sort(full, axis=1)
    if proponents:
        ordered = ordered[:, ::-1]
    gaps = np.abs(np.diff(ordered[:, : k + 1], axis=1))
    assert gaps.min() > 1e-9 * np.abs(full).max(), "near-tie in the top k: change the seed"

    side = run.proponents if proponents else run.opponents
    ours = side(case.query, k=k, relevance="tracin")  # Captum ranks by the raw TracInCP score
    theirs = _captum(case).influence(case.query, k=k, proponents=proponents)
    t_idx, t_scores = _np(theirs[0]), _np(theirs[1])
    assert ours.indices.shape == t_idx.shape == (N_QUERY, k)
    np.testing.assert_array_equal(ours.indices, t_idx)
    _assert_close(ours.scores, t_scores)
    # and both are the true top k of the full matrix, best first
    _assert_close(ours.scores, ordered[:, :k])
    if proponents:
        assert np.all(ours.scores[:, 0] > 0)
    else:
        assert np.all(ours.scores[:, 0] < 0)


# --- 4a. Captum's default loader: lr silently 1.0 ---------------------------------------------
def test_captum_default_loader_silently_uses_lr_one(case: Setup) -> None:
    theirs = _np(_captum(case, default_loader=True).influence(case.query, k=None))
    lr_one = _run(case, lrs=(1.0, 1.0, 1.0), plain=True).influence(case.query)
    truth = _run(case, lrs=LRS, plain=True).influence(case.query)
    _assert_close(truth, _brute_force_influence(case, LRS))
    _assert_close(theirs, lr_one)
    _assert_far(theirs, truth)
    # self-influence has the same flaw
    theirs_self = _np(_captum(case, default_loader=True).self_influence(None))
    _assert_close(theirs_self, _run(case, lrs=(1.0, 1.0, 1.0), plain=True).self_influence())
    _assert_far(theirs_self, _run(case, lrs=LRS, plain=True).self_influence())


def test_captum_default_loader_returns_one_and_cannot_read_a_stored_lr(
    case: Setup, tmp_path: Path
) -> None:
    load = captum_tracincp._load_flexible_state_dict
    net = copy.deepcopy(case.model)
    assert load(net, case.plain_paths[-1]) == 1.0  # not the 0.02 this checkpoint trained with
    assert torch.equal(net.state_dict()["2.weight"], case.states[-1]["2.weight"])
    # The only lr it looks for sits next to the weights, which strict load_state_dict rejects;
    # and tracin's layout (weights under "model_state_dict") is rejected too.
    with_lr = tmp_path / "with_lr.pt"
    torch.save({**case.states[-1], "learning_rate": LRS[-1]}, with_lr)
    with pytest.raises(RuntimeError, match="learning_rate"):
        load(copy.deepcopy(case.model), str(with_lr))
    with pytest.raises(RuntimeError, match="model_state_dict"):
        load(copy.deepcopy(case.model), case.paths[-1])


def test_tracin_refuses_plain_files_without_an_lr(case: Setup) -> None:
    """Where Captum falls back to 1.0, tracin asks for the learning rate."""
    with pytest.raises(tracin.CheckpointError, match="lr"):
        tracin.Checkpoints.from_paths(case.plain_paths, lr="lr")
    with pytest.raises(tracin.CheckpointError, match="learning rate"):
        tracin.Checkpoints.from_paths(case.plain_paths)


# --- 4b. compute_intermediate_quantities: lr, not sqrt(lr) ------------------------------------
def test_captum_intermediate_quantities_weight_by_lr_squared(case: Setup) -> None:
    captum = _captum(case)
    train_vecs = captum.compute_intermediate_quantities(
        DataLoader(case.train_dataset, batch_size=CAPTUM_BATCH)
    )
    query_vecs = captum.compute_intermediate_quantities(case.query)
    n_params = sum(p.numel() for p in case.model.parameters())
    assert tuple(train_vecs.shape) == (N_TRAIN, len(LRS) * n_params)
    assert tuple(query_vecs.shape) == (N_QUERY, len(LRS) * n_params)
    dots = _np(query_vecs @ train_vecs.T)

    lr_squared = tuple(lr**2 for lr in LRS)
    truth = _run(case).influence(case.query)
    _assert_close(dots, _run(case, lrs=lr_squared).influence(case.query))
    _assert_close(dots, _brute_force_influence(case, lr_squared))
    _assert_far(dots, truth)
    # while Captum's own influence() is right: the two Captum paths disagree with each other
    _assert_close(_np(captum.influence(case.query, k=None)), truth)

    # The fix: scale by sqrt(lr_c) instead, i.e. divide block c by sqrt(lr_c).
    blocks = (
        np.split(_np(query_vecs), len(LRS), axis=1),
        np.split(_np(train_vecs), len(LRS), axis=1),
    )
    fixed = sum(
        (q / np.sqrt(lr)) @ (t / np.sqrt(lr)).T
        for lr, q, t in zip(LRS, blocks[0], blocks[1], strict=True)
    )
    _assert_close(fixed, truth)


# --- 5. one layer only ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reduction", "sample_wise"),
    [("sum", True), ("none", False)],
    ids=["sum-samplewise", "none-per-example"],
)
def test_last_layer_influence_matches_captum(
    case: Setup, reduction: str, sample_wise: bool
) -> None:
    assert dict(case.model.named_children())["2"] is case.model[2]  # Captum's name for it
    run = _run(case, layers=["2"])
    assert run.config.parameters == ("2.weight", "2.bias")
    ours = run.influence(case.query)
    captum = _captum(case, reduction=reduction, sample_wise=sample_wise, layers=["2"])
    _assert_close(ours, _np(captum.influence(case.query, k=None)))
    _assert_close(run.self_influence(), _np(captum.self_influence(None)))
    _assert_close(ours, _brute_force_influence(case, LRS, layer_prefix="2"))
    # the restriction matters: the last layer alone is not the whole model
    _assert_far(ours, _run(case).influence(case.query))
