"""Engine conformance: every engine's exact features equal a per-example backward() in float64,
for every supported layer type, weight sharing, masked positions and the torch.func fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tracin
from conftest import brute_force_grads
from tracin.gradients._factored import FactoredEngine
from tracin.gradients._functional import FunctionalEngine, FunctionalFeatures
from tracin.projection._config import ProjectionConfig
from tracin.projection._dense import IdentityProjector

ENGINES = ("functional", "factored")


class SeqLinear(nn.Module):
    """Linear on a sequence (B, T, in) with masked mean pooling."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 6, padding_idx=0)
        self.lin = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, ids, mask):
        h = torch.tanh(self.lin(self.emb(ids))) * mask[..., None]
        return self.out(h.sum(1) / mask.sum(1, keepdim=True))


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(1, 4, 3, dilation=2, padding=2, bias=False)
        self.fc = nn.Linear(3 * 4 + 4 * 5 * 5, 2)

    def forward(self, x1, x2):
        h1 = torch.relu(self.c1(x1)).flatten(1)
        h2 = torch.relu(self.c2(x2)).flatten(1)
        return self.fc(torch.cat([h1, h2], 1))


class Shared(nn.Module):
    """One Linear used twice in the forward pass (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class WithNorm(nn.Module):
    """LayerNorm and BatchNorm (eval) are hooked; a free parameter too (gradients/_bare.py)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.bn = nn.BatchNorm1d(6)
        self.scale = nn.Parameter(torch.ones(6))
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.bn(self.norm(self.lin(x))) * self.scale)


class NormSeq(nn.Module):
    """LayerNorm over a sequence, LayerNorm without bias, BatchNorm2d after a convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.norm = nn.LayerNorm(3, bias=False)
        self.norm2 = nn.LayerNorm((4, 3))
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))  # (B, 3, 4, 4)
        h = self.norm2(self.norm(h.permute(0, 2, 3, 1)).flatten(1, 2)[:, :4])  # (B, 4, 3)
        return self.out(h.mean(1))


def cases():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 13, (6, 7), generator=g)
    mask = torch.ones(6, 7, dtype=torch.float64)
    ids[::2, 5:] = 0
    mask[::2, 5:] = 0
    y3 = torch.randint(0, 3, (6,), generator=g)
    y2 = torch.randint(0, 2, (6,), generator=g)
    x1 = torch.randn(6, 2, 8, generator=g, dtype=torch.float64)
    x2 = torch.randn(6, 1, 5, 5, generator=g, dtype=torch.float64)
    x4 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    return {
        "embedding+sequence": (SeqLinear, {"ids": ids, "mask": mask, "labels": y3}),
        "conv1d+conv2d": (Convs, {"x1": x1, "x2": x2, "labels": y2}),
        "shared": (Shared, (x4, y2)),
        "fallback": (WithNorm, (x4, y2)),
        "norms": (NormSeq, (torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64), y2)),
    }


def ce(model, batch):
    if isinstance(batch, dict):
        logits = model(*[v for k, v in batch.items() if k != "labels"])
        return nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def rows(batch):
    n = 6
    if isinstance(batch, dict):
        return [{k: v[i : i + 1] for k, v in batch.items()} for i in range(n)]
    return [tuple(t[i : i + 1] for t in batch) for i in range(n)]


def engine(kind, model, names):
    if kind == "functional":
        return FunctionalFeatures(FunctionalEngine(model, names), IdentityProjector(), 0)
    return FactoredEngine(model, names, ProjectionConfig())


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("case", list(cases()))
def test_exact_features_equal_backward_oracle(kind, case):
    torch.manual_seed(1)
    cls, batch = cases()[case]
    model = cls().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():  # BatchNorm's running statistics, not 0 and 1
            if name.endswith(("running_mean", "running_var")):
                b.uniform_(0.5, 2.0)
    names = [n for n, _ in model.named_parameters()]
    weights = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    weights = {k: v.detach() for k, v in weights.items()}
    eng = engine(kind, model, names)
    feats, sq = eng.features(weights, ce, batch, 0)
    oracle = brute_force_grads(model, model.state_dict(), ce, rows(batch))
    np.testing.assert_allclose(feats.numpy(), oracle, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(sq.numpy(), (oracle**2).sum(1), rtol=1e-10)
    np.testing.assert_allclose(eng.sqnorms(weights, ce, batch).numpy(), sq.numpy(), rtol=1e-10)
    if kind == "factored":  # only what no hook can capture goes to torch.func
        rest = [] if eng.rest is None else list(eng.rest.names)
        assert rest == []


@pytest.mark.parametrize("case", ["conv1d+conv2d", "norms"])
def test_kronecker_convolutions_and_norms(case):
    """Conv inputs projected by a convolution with P_in equal (P_out x P_in) on the exact
    gradient; norm layers stay exact; squared norms stay exact."""
    torch.manual_seed(7)
    cls, batch = cases()[case]
    model = cls().double().eval()
    names = [n for n, _ in model.named_parameters()]
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    eng = FactoredEngine(model, names, ProjectionConfig("kronecker", 4, seed=2))
    feats, sq = eng.features(weights, ce, batch, ckpt_key=5)
    exact, _ = FactoredEngine(model, names, ProjectionConfig()).features(weights, ce, batch, 5)
    torch.testing.assert_close(sq, exact.pow(2).sum(1), rtol=1e-12, atol=0)
    assert feats.shape == (6, eng.dim())
    offset, col = 0, 0
    params = dict(model.named_parameters())
    for layer in eng.layers:
        w = params[layer.weight]
        n_b = 0 if layer.bias is None else params[layer.bias].numel()
        g = exact[:, offset : offset + w.numel()]
        if isinstance(layer.module, nn.Conv1d | nn.Conv2d | nn.Linear):
            g = g.reshape(6, w.shape[0], -1)
            if n_b:
                b = exact[:, offset + w.numel() : offset + w.numel() + n_b]
                g = torch.cat([g, b[:, :, None]], 2)
            (k_out, k_in), (n_out, n_in) = eng._sides(layer), g.shape[1:]
            eye = torch.eye(max(n_out, n_in), dtype=torch.float64)
            p_in = (
                eng._matrix(5, layer.index, 0, n_in).double() if k_in < n_in else eye[:n_in, :n_in]
            )
            p_out = (
                eng._matrix(5, layer.index, 1, n_out).double()
                if k_out < n_out
                else eye[:n_out, :n_out]
            )
            want = torch.einsum("bij,ik,jl->bkl", g, p_out, p_in).reshape(6, -1)
        else:  # norm layers stay exact
            want = exact[:, offset : offset + w.numel() + n_b]
        torch.testing.assert_close(
            feats[:, col : col + want.shape[1]], want, rtol=1e-10, atol=1e-12
        )
        offset += w.numel() + n_b
        col += want.shape[1]
    assert col == eng.dim()


def test_padding_positions_do_not_count():
    torch.manual_seed(2)
    model = SeqLinear().double().eval()
    batch = cases()["embedding+sequence"][1]
    names = [n for n, _ in model.named_parameters()]
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    feats, _ = FactoredEngine(model, names, ProjectionConfig()).features(weights, ce, batch, 0)
    changed = dict(batch)
    changed["ids"] = batch["ids"].clone()
    changed["ids"][::2, 5:] = 7  # other tokens under the mask: gradients must not move
    again, _ = FactoredEngine(model, names, ProjectionConfig()).features(weights, ce, changed, 0)
    torch.testing.assert_close(feats, again, rtol=1e-12, atol=1e-14)
    # and the padding row of the embedding gets no gradient
    emb = feats[:, : 13 * 6].reshape(6, 13, 6)
    assert torch.equal(emb[:, 0], torch.zeros_like(emb[:, 0]))


def test_kronecker_projection_is_the_kronecker_product_of_the_exact_gradient():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    names = [n for n, _ in model.named_parameters()]
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    eng = FactoredEngine(model, names, ProjectionConfig("kronecker", 16, seed=4))
    feats, sq = eng.features(weights, ce, (x, y), ckpt_key=9)
    exact, _ = FactoredEngine(model, names, ProjectionConfig()).features(weights, ce, (x, y), 9)
    # layer 0: weight (7 x 5) then bias (7): G_aug = [W | b] is 7 x 6
    g0 = torch.cat([exact[:, :35].reshape(6, 7, 5), exact[:, 35:42].reshape(6, 7, 1)], 2)
    p_in, p_out = eng._matrix(9, 0, 0, 6).double(), eng._matrix(9, 0, 1, 7).double()
    expected = torch.einsum("bij,ik,jl->bkl", g0, p_out, p_in).reshape(6, -1)
    torch.testing.assert_close(feats[:, :16], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sq, exact.pow(2).sum(1), rtol=1e-12, atol=0)
    # layer 2 has 3 outputs (< 4): its output side stays exact, only its 8 inputs are projected
    assert eng.dim() == 16 + 3 * 4 and feats.shape == (6, 28)
    g2 = torch.cat([exact[:, 42:63].reshape(6, 3, 7), exact[:, 63:66].reshape(6, 3, 1)], 2)
    p_in2 = eng._matrix(9, 1, 0, 8).double()
    torch.testing.assert_close(feats[:, 16:], (g2 @ p_in2).reshape(6, -1), rtol=1e-10, atol=1e-12)


def test_kronecker_inner_products_converge():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(40, 60), nn.Tanh(), nn.Linear(60, 10)).double().eval()
    x = torch.randn(20, 40, dtype=torch.float64)
    y = torch.randint(0, 10, (20,))
    names = [n for n, _ in model.named_parameters()]
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    exact, _ = FactoredEngine(model, names, ProjectionConfig()).features(weights, ce, (x, y), 0)
    truth = exact @ exact.T
    errors = []
    for dim in (16, 144, 1600):
        f, _ = FactoredEngine(model, names, ProjectionConfig("kronecker", dim)).features(
            weights, ce, (x, y), 0
        )
        errors.append(
            float(((f @ f.T - truth).abs() / truth.diag().sqrt().outer(truth.diag().sqrt())).mean())
        )
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.1, errors


@pytest.mark.parametrize("kind", ENGINES)
def test_engines_agree_through_featurize(kind, mlp_setup):
    model, train, query, states = mlp_setup
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=[0.5, 0.1, 0.02])
    data = torch.utils.data.TensorDataset(*train)
    task = tracin.ClassificationTask()
    run = tracin.featurize(model, task, ckpts, data, engine=kind)
    ref = tracin.featurize(model, task, ckpts, data, engine="functional")
    np.testing.assert_allclose(run.influence(query), ref.influence(query), rtol=1e-10)
    np.testing.assert_allclose(run.self_influence(), ref.self_influence(), rtol=1e-10)


def test_kronecker_projects_unhooked_parameters_densely():
    """Parameters no hook sees get one Gaussian projection to `dim` more features, seeded apart
    from the layers' matrices; the hooked layers' features are unchanged."""
    torch.manual_seed(8)
    cls, batch = cases()["fallback"]
    model = cls().double().eval()
    names = [n for n, _ in model.named_parameters()]
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    off = ["scale"]  # left to torch.func
    eng = FactoredEngine(model, names, ProjectionConfig("kronecker", 4, seed=3), exclude=off)
    feats, sq = eng.features(weights, ce, batch, ckpt_key=4)
    exact, exact_sq = FactoredEngine(model, names, ProjectionConfig(), exclude=off).features(
        weights, ce, batch, 4
    )
    torch.testing.assert_close(sq, exact_sq, rtol=1e-12, atol=0)
    assert eng.dim() == feats.shape[1] and eng.rest_projector is not None
    scale = exact[:, _offset(model, "scale") :][:, :6]
    p_rest = eng.rest_projector.matrix_block(4, 0, 0, 6).double()
    torch.testing.assert_close(feats[:, -4:], scale @ p_rest, rtol=1e-10, atol=1e-12)
    hooked_only = [n for n in names if n != "scale"]
    part = FactoredEngine(model, hooked_only, ProjectionConfig("kronecker", 4, seed=3))
    torch.testing.assert_close(feats[:, :-4], part.features(weights, ce, batch, 4)[0])
    # no wider than dim: the unhooked parameters keep their exact gradients, not a projection
    wide = FactoredEngine(model, names, ProjectionConfig("kronecker", 16, seed=3), exclude=off)
    wide_feats, _ = wide.features(weights, ce, batch, ckpt_key=4)
    assert wide.rest_projector is None and wide.dim() == wide_feats.shape[1]
    torch.testing.assert_close(wide_feats[:, -6:], scale, rtol=1e-12, atol=0)
    assert not torch.allclose(p_rest[0, :2].float() * 2, eng._matrix(4, 0, 0, 5)[0, :2] * 2**0.5)


def _offset(model, name):
    offset = 0
    for n, p in model.named_parameters():
        if n == name:
            return offset
        offset += p.numel()
    raise KeyError(name)


def test_last_layer_path_is_exact(mlp_setup, tmp_path):
    model, train, query, states = mlp_setup
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=[0.5, 0.1, 0.02])
    data = torch.utils.data.TensorDataset(*train)
    task = tracin.ClassificationTask()
    exact = tracin.featurize(model, task, ckpts, data, layers=["2"], engine="functional")
    fast = tracin.featurize(model, task, ckpts, data, layers=["2"], projection="last_layer",
                            store=tmp_path / "ll", dtype="float64")  # fmt: skip
    assert fast.config.projection.split == 11  # 10 inputs + the bias column
    stored = np.load(tmp_path / "ll/features/train/ckpt_ckpt_0/block_0.npy")
    assert stored.shape == (30, 11 + 4)  # a and d, not the 44-entry gradient
    np.testing.assert_allclose(fast.influence(query), exact.influence(query), rtol=1e-10)
    np.testing.assert_allclose(fast.self_influence(), exact.self_influence(), rtol=1e-10)
    props = fast.proponents(query, k=5)
    np.testing.assert_array_equal(props.indices, exact.proponents(query, k=5).indices)
    u = np.concatenate([b for _, b in fast.folded_blocks()])
    np.testing.assert_allclose(fast.folded_queries(query) @ u.T, exact.influence(query), rtol=1e-4)
    with pytest.raises(tracin.ConfigError, match="exactly one Linear"):
        tracin.featurize(model, task, ckpts, data, projection="last_layer")


def test_transformer_encoder_is_all_on_the_hooks():
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(8 * 3, 2)).double().eval()
    x = torch.randn(4, 3, 8, dtype=torch.float64)
    y = torch.randint(0, 2, (4,))
    names = [n for n, _ in model.named_parameters()]
    eng = FactoredEngine(model, names, ProjectionConfig())
    assert eng.rest is None  # MHA's projections are hooked through its F.linear calls
    assert {"0.self_attn.in_proj", "0.self_attn.out_proj"} <= {la.name for la in eng.layers}
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    feats, sq = eng.features(weights, ce, (x, y), 0)
    oracle = brute_force_grads(model, model.state_dict(), ce, rows((x, y))[:4])
    np.testing.assert_allclose(feats.numpy(), oracle, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sq.numpy(), (oracle**2).sum(1), rtol=1e-9)
