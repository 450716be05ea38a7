"""The factored engine's layer maths against a float64 per-example backward() loop.

Every case: exact features, squared norms (exact and Kronecker paths) of engine="factored", and
self-influence and influence through `tracin.featurize` with engine="factored" and "auto" and
distinct non-unit learning rates. Cases cover what hooks can silently get wrong: tied weights,
parametrized weights, overridden forwards, user forward hooks, in-place ops after a layer,
Hugging Face Conv1D (GPT-2), EmbeddingBag, half precision, and the layers left to torch.func.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import tracin
from conftest import brute_force_grads, brute_force_influence
from tracin.gradients._bare import BareParameter as Bare
from tracin.gradients._factored import FactoredEngine
from tracin.gradients._layers import shared_parameters, supported_layers
from tracin.projection._config import ProjectionConfig

LRS = (0.3, 1.7)


class FnTask(tracin.Task):
    def __init__(self, fn):
        self.fn = fn

    def train_loss(self, model, batch):
        return self.fn(model, batch)


def rows(batch):
    if isinstance(batch, dict):
        n = next(iter(batch.values())).shape[0]
        return [{k: v[i : i + 1] for k, v in batch.items()} for i in range(n)]
    return [tuple(t[i : i + 1] for t in batch) for i in range(batch[0].shape[0])]


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def lm_loss(model, batch):
    """Next-token cross-entropy summed over each example's unmasked tokens: ``(B,)``."""
    out = model(batch["ids"]) if "mask" not in batch else model(batch["ids"], batch["mask"])
    logits = getattr(out, "logits", out)
    per_token = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["ids"][:, 1:], reduction="none"
    )
    mask = batch.get("mask")
    return (per_token * (1.0 if mask is None else mask[:, 1:])).sum(1)


def states_of(model, scale=0.2, seed=0):
    """Two checkpoints: the model's weights and a perturbed copy (buffers kept)."""
    gen = torch.Generator().manual_seed(seed)
    first = {k: v.detach().clone() for k, v in model.state_dict().items()}
    second = {
        k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype)
        if v.is_floating_point() and "running" not in k else v.clone()
        for k, v in first.items()
    }  # fmt: skip
    for name, param in model.named_parameters(remove_duplicate=False):  # keep ties tied
        first_name = _first_name(model, param)
        second[name] = second[first_name]
    return [first, second]


def _first_name(model, param):
    return next(n for n, p in model.named_parameters() if p is param)


def weights_of(model):
    """Checkpoint weights keyed as `tracin.gradients._params.fit_state` keys them (ties named
    once).
    """
    named = [*model.named_parameters(), *model.named_buffers()]
    return {k: v.detach() for k, v in named}


def check_exact(model, score, batch, hooked=None, rtol=1e-9):
    """Factored features and norms equal the oracle; featurize equals brute-force influence."""
    model = model.double().eval()
    names = [n for n, _ in model.named_parameters()]
    data = rows(batch)
    oracle = brute_force_grads(model, model.state_dict(), score, data)
    eng = FactoredEngine(model, names, ProjectionConfig())
    if hooked is not None:
        assert sorted(layer.name for layer in eng.layers) == sorted(hooked)
    weights = weights_of(model)
    feats, sq = eng.features(weights, score, batch, 0)
    atol = 1e-12 * max(1.0, float(np.abs(oracle).max()))
    np.testing.assert_allclose(feats.numpy(), oracle, rtol=rtol, atol=atol)
    truth = (oracle**2).sum(1)
    np.testing.assert_allclose(sq.numpy(), truth, rtol=rtol)
    np.testing.assert_allclose(eng.sqnorms(weights, score, batch).numpy(), truth, rtol=rtol)
    kron = FactoredEngine(model, names, ProjectionConfig("kronecker", 9, seed=1))
    kfeats, ksq = kron.features(weights, score, batch, 3)
    assert kfeats.shape == (len(data), kron.dim())
    np.testing.assert_allclose(ksq.numpy(), truth, rtol=rtol)
    want = kronecker_blocks(kron, model, names, torch.from_numpy(oracle), 3)
    np.testing.assert_allclose(kfeats[:, : want.shape[1]].numpy(), want.numpy(), rtol=rtol,
                               atol=atol)  # fmt: skip
    check_influence(model, score, batch)
    return eng


def kronecker_blocks(eng, model, names, exact, checkpoint):
    """The hooked layers' Kronecker features from exact gradients: ``P_out^T G P_in``, with
    ``G`` the ``(out, in)`` gradient of each layer (bias as a last input column)."""
    params = dict(model.named_parameters())
    offsets = np.cumsum([0] + [params[n].numel() for n in names])
    start = dict(zip(names, offsets[:-1], strict=True))
    blocks, b, seen = [], exact.shape[0], set()
    for layer in eng.layers:
        if layer.index in seen:  # a tied weight's uses share one block: its whole gradient
            continue
        seen.add(layer.index)
        w = params[layer.weight]
        g = exact[:, start[layer.weight] : start[layer.weight] + w.numel()]
        module = layer.module
        if layer.bias_only or isinstance(
            module, nn.LayerNorm | nn.BatchNorm1d | nn.BatchNorm2d | nn.PReLU | Bare
        ):
            parts = [g] + ([exact[:, start[layer.bias] :][:, : w.numel()]] if layer.bias else [])
            blocks.append(torch.cat(parts, 1))
            continue
        transposed = isinstance(module, nn.Embedding | nn.EmbeddingBag) or layer.tied
        if transposed or type(module).__name__ == "Conv1D":
            g = g.reshape(b, *w.shape).transpose(1, 2)  # weight stored (in, out)
        else:
            g = g.reshape(b, w.shape[0], -1)
        if layer.bias:
            first = start[layer.bias] + layer.bias_start  # a third of a packed bias
            g = torch.cat([g, exact[:, first:][:, : g.shape[1], None]], 2)
        (k_out, k_in), (n_out, n_in) = eng._sides(layer), g.shape[1:]
        p_out = eng._matrix(checkpoint, layer.index, 1, n_out).double() if k_out < n_out else None
        p_in = eng._matrix(checkpoint, layer.index, 0, n_in).double() if k_in < n_in else None
        g = g if p_out is None else torch.einsum("bij,ik->bkj", g, p_out)
        g = g if p_in is None else g @ p_in
        blocks.append(g.reshape(b, -1))
    return torch.cat(blocks, 1)


def check_influence(model, score, batch, engines=("factored", "auto")):
    states = states_of(model)
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=list(LRS))
    data = rows(batch)
    want = brute_force_influence(model, states, LRS, score, data, score, data)
    for engine in engines:
        run = tracin.featurize(model, FnTask(score), ckpts, batch, engine=engine, batch_size=4)
        np.testing.assert_allclose(run.self_influence(), np.diag(want), rtol=1e-8)
        np.testing.assert_allclose(run.influence(batch), want, rtol=1e-8, atol=1e-12)


def _ids(n=5, t=6, vocab=11, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


# ---- 1. shared (tied) and computed weights -------------------------------------------------


class TiedLM(nn.Module):
    """Bigram LM with the output head tied to the embedding (GPT-2, BERT MLM, T5)."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def test_tied_embedding_and_head_are_hooked_in_both_modules():
    """The tied weight's gradient is the sum of its Embedding and Linear uses: exact, no rest."""
    torch.manual_seed(0)
    model = TiedLM()
    assert shared_parameters(model) == {id(model.emb.weight)}
    eng = check_exact(model, lm_loss, {"ids": _ids()}, hooked=["emb", "head", "mid"])
    assert eng.rest is None


class TiedAcrossLinears(nn.Module):
    """One Linear's weight reused by a second Linear on another path."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.a(x)) + torch.sin(self.b(x)))


def test_weight_shared_between_two_linears():
    torch.manual_seed(1)
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    check_exact(TiedAcrossLinears(), ce, (x, y), hooked=["out"])


class Aliased(nn.Module):
    """A module registered under two names (T5's ``shared`` is ``encoder.embed_tokens``): not a
    tie, every call of it is hooked; ``rest`` adds a bare parameter (hooked as one, and checked
    through torch.func too)."""

    def __init__(self, rest=False):
        super().__init__()
        self.twice = nn.Linear(4, 4)
        self.again = self.twice
        self.out = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(4)) if rest else None

    def forward(self, x):
        h = torch.tanh(self.twice(x))
        h = h * self.scale if self.scale is not None else h
        return self.out(self.again(h))


def _unchanged(model, params):
    after = list(model.parameters())
    assert len(after) == len(params) and all(p is q for p, q in zip(params, after, strict=True))
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in after)


def test_module_registered_under_two_names_is_hooked_and_left_as_it_was():
    torch.manual_seed(12)
    model = Aliased().double().eval()
    params = list(model.parameters())
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    names = [n for n, _ in model.named_parameters()]
    eng = FactoredEngine(model, names, ProjectionConfig())
    assert [layer.name for layer in eng.layers] == ["twice", "out"]
    feats, sq = eng.features(weights_of(model), ce, (x, y), 0)
    _unchanged(model, params)
    oracle = brute_force_grads(model, model.state_dict(), ce, rows((x, y)))
    np.testing.assert_allclose(feats.numpy(), oracle, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(sq.numpy(), (oracle**2).sum(1), rtol=1e-10)


@pytest.mark.parametrize("rest", [False, True])
def test_module_registered_under_two_names_through_featurize(rest):
    torch.manual_seed(12)
    model = Aliased(rest).double().eval()
    params = list(model.parameters())
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    check_exact(model, ce, (x, y), hooked=["twice", "out"] + (["scale"] if rest else []))
    _unchanged(model, params)
    check_influence(model, ce, (x, y), engines=("functional",))
    _unchanged(model, params)


class Computed(nn.Module):
    """Weights computed from parameters by parametrizations (weight_norm, orthogonal)."""

    def __init__(self):
        super().__init__()
        self.new = nn.utils.parametrizations.weight_norm(nn.Linear(4, 5))
        self.old = nn.Linear(5, 5)
        self.orth = nn.utils.parametrizations.orthogonal(nn.Linear(5, 5))
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.orth(torch.tanh(self.old(torch.tanh(self.new(x)))))))


def test_parametrized_weights_are_left_to_torch_func():
    torch.manual_seed(2)
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    check_exact(Computed(), ce, (x, y), hooked=["old", "out"])
    model = Computed()
    with pytest.warns(FutureWarning):  # old-style: weight_g, weight_v and a pre-hook
        nn.utils.weight_norm(model.old)
    layers, rest = supported_layers(model, [n for n, _ in model.named_parameters()])
    assert [layer.name for layer in layers] == ["out"]
    assert {"old.weight_g", "old.weight_v", "old.bias", "new.bias"} <= set(rest)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, 2.0 * self.weight, self.bias)


def _patched_forward(self, x):
    return nn.Linear.forward(self, x) + 0.1 * x.pow(2)


class Overrides(nn.Module):
    """A subclass with its own forward; a module whose output a user forward hook rescales, and
    one whose forward is replaced on the instance."""

    def __init__(self):
        super().__init__()
        self.scaled = ScaledLinear(4, 5)
        self.hooked = nn.Linear(5, 5)
        self.hooked.register_forward_hook(lambda m, a, out: 3.0 * out)
        self.patched = nn.Linear(5, 5)
        self.patched.forward = types.MethodType(_patched_forward, self.patched)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.hooked(torch.tanh(self.scaled(x))))
        return self.out(torch.tanh(self.patched(h)))


def test_overridden_forward_is_left_to_torch_func_and_user_hooks_are_accounted_for():
    torch.manual_seed(3)
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    check_exact(Overrides(), ce, (x, y), hooked=["hooked", "out"])


def test_exclude_keeps_a_layer_off_the_hooks():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    names = [n for n, _ in model.named_parameters()]
    layers, rest = supported_layers(model, names, exclude=["0.bias"])
    assert [layer.name for layer in layers] == ["2"] and rest == ["0.weight", "0.bias"]
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    eng = FactoredEngine(model, names, ProjectionConfig(), exclude=["0.weight"])
    feats, sq = eng.features(weights_of(model), ce, (x, y), 0)
    oracle = brute_force_grads(model, model.state_dict(), ce, rows((x, y)))
    np.testing.assert_allclose(feats.numpy(), oracle, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(sq.numpy(), (oracle**2).sum(1), rtol=1e-10)


# ---- 5. layers hooked today, in the shapes that can go wrong -----------------------------


class InPlace(nn.Module):
    """In-place ops on layers' outputs: ``+=`` and ReLU(inplace=True) (as in ResNets)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.lin = nn.Linear(3 * 4 * 4, 5)
        self.relu = nn.ReLU(inplace=True)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = self.bn(self.conv(x))
        h += 0.5 * h.detach() ** 2
        h = self.relu(h).flatten(1)
        return self.out(self.relu(self.lin(h)))


def test_in_place_changes_after_a_layer():
    torch.manual_seed(5)
    model = InPlace()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    eng = check_exact(model, ce, (x, y), hooked=["conv", "bn", "lin", "out"])
    assert {layer.name for layer in eng.layers if layer.clone} == {"bn", "lin"}


class Shapes(nn.Module):
    """Linear on (B, H, T, in) called with input=..., Embedding with padding_idx, a Conv2d with
    stride, dilation and unequal padding, a Conv1d, BatchNorm1d in eval, LayerNorm without bias."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4, padding_idx=2)
        self.lin = nn.Linear(4, 4)
        self.conv = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(2, 0))
        self.conv1 = nn.Conv1d(3, 2, 2, stride=2, dilation=2)
        self.bn = nn.BatchNorm1d(2)
        self.norm = nn.LayerNorm(4, bias=False)
        self.out = nn.Linear(4 + 4, 3)

    def forward(self, ids):
        e = self.emb(ids).reshape(ids.shape[0], 2, 3, 4)  # (B, H=2, T=3, 4)
        h = torch.tanh(self.lin(input=e))
        c = torch.tanh(self.conv(h))  # (B, 3, 3, 2)
        c = self.bn(self.conv1(c.flatten(2)))  # (B, 2, 2)
        return self.out(torch.cat([self.norm(h).mean((1, 2)), c.flatten(1)], 1))


def test_hooked_layers_in_awkward_shapes():
    torch.manual_seed(6)
    model = Shapes()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    ids = _ids(5, 6, 9, seed=1)
    ids[::2, :3] = 2  # padding rows: no gradient into row 2
    y = torch.randint(0, 3, (5,))
    eng = check_exact(model, ce, (ids, y))
    assert eng.rest is None


class NotHooked(nn.Module):
    """Grouped and depthwise convs, ConvTranspose, GroupNorm: all left to torch.func."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 4, 3, groups=2, padding=1)
        self.depthwise = nn.Conv1d(4, 4, 3, groups=4)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.gn = nn.GroupNorm(2, 4)
        self.same = nn.Conv2d(4, 4, 3, padding="same")
        self.out = nn.Linear(2 * 4 * 4 + 4 * 2, 3)

    def forward(self, x):
        h = self.gn(torch.tanh(self.same(torch.tanh(self.grouped(x)))))  # (B, 4, 2, 2)
        u = torch.tanh(self.up(h)).flatten(1)  # (B, 2*4*4)
        d = torch.tanh(self.depthwise(h.flatten(2))).flatten(1)  # (B, 4*2)
        return self.out(torch.cat([u, d], 1))


def test_grouped_transposed_and_groupnorm_are_exact_through_torch_func():
    torch.manual_seed(7)
    x = torch.randn(5, 4, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    eng = check_exact(NotHooked(), ce, (x, y), hooked=["out"])
    assert eng.rest is not None and len(eng.rest.names) == 10


# ---- 3. EmbeddingBag -------------------------------------------------------------------


class Bags(nn.Module):
    """EmbeddingBags on 2-D input (with per-sample weights) and on flat indices with offsets
    built from the batch (variable lengths), in sum and mean mode, with padding_idx."""

    def __init__(self, mode="mean", padding_idx=None, last_offset=False):
        super().__init__()
        self.rect = nn.EmbeddingBag(13, 4, mode="sum")
        self.flat = nn.EmbeddingBag(
            13, 4, mode=mode, padding_idx=padding_idx, include_last_offset=last_offset
        )
        self.out = nn.Linear(8, 3)

    def forward(self, ids, lengths, weights):
        a = self.rect(ids, per_sample_weights=weights)
        keep = torch.arange(ids.shape[1]) < lengths[:, None]
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        if not self.flat.include_last_offset:
            offsets = offsets[:-1]
        b = self.flat(ids[keep], offsets)
        return self.out(torch.tanh(torch.cat([a, b], 1)))


@pytest.mark.parametrize(
    "mode,padding_idx,last_offset",
    [("sum", None, False), ("mean", None, True), ("mean", 3, False), ("sum", 3, True)],
)
def test_embedding_bag(mode, padding_idx, last_offset):
    torch.manual_seed(8)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 13, (5, 6), generator=gen)
    ids[:, 0] = 3  # padding members (when padding_idx=3), one bag all padding
    ids[1, :2] = 3
    lengths = torch.tensor([6, 2, 0, 4, 3])  # an empty bag too
    weights = torch.rand(5, 6, generator=gen, dtype=torch.float64) + 0.5
    y = torch.randint(0, 3, (5,), generator=gen)
    batch = {"ids": ids, "lengths": lengths, "weights": weights, "labels": y}

    def score(model, b):
        logits = model(b["ids"], b["lengths"], b["weights"])
        return F.cross_entropy(logits, b["labels"], reduction="none")

    model = Bags(mode, padding_idx, last_offset)
    check_exact(model, score, batch, hooked=["rect", "flat", "out"])


def test_embedding_bag_max_mode_is_left_to_torch_func():
    torch.manual_seed(9)
    model = nn.Sequential(nn.EmbeddingBag(13, 4, mode="max"), nn.Linear(4, 3))
    ids = _ids(5, 4, 13, seed=2)
    check_exact(model, ce, (ids, torch.randint(0, 3, (5,))), hooked=["1"])


def test_embedding_bags_that_are_not_examples_are_refused():
    class TwoBagsEach(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(13, 4)
            self.out = nn.Linear(8, 3)

        def forward(self, ids):
            offsets = torch.arange(0, ids.numel(), 3)  # two bags per example of 6 ids
            return self.out(self.bag(ids.flatten(), offsets).reshape(ids.shape[0], 8))

    model = TwoBagsEach().double().eval()
    names = [n for n, _ in model.named_parameters()]
    eng = FactoredEngine(model, names, ProjectionConfig())
    with pytest.raises(tracin.TaskError, match="an EmbeddingBag needs one bag per example"):
        eng.features(weights_of(model), ce, (_ids(4, 6, 13), torch.zeros(4, dtype=torch.long)), 0)


# ---- 2. Hugging Face Conv1D (GPT-2) ---------------------------------------------------------


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(10)
    config = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
        attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double().eval()


@pytest.mark.parametrize("padded", [False, True])
def test_gpt2_conv1d_and_tied_head(padded):
    model = _gpt2()
    ids = _ids(4, 7, 50, seed=4)
    batch = {"ids": ids}
    if padded:
        mask = torch.ones(4, 7, dtype=torch.float64)
        mask[1, 4:] = 0
        mask[3, 2:] = 0
        batch = {"ids": ids, "mask": mask}

    def score(m, b):
        out = m(input_ids=b["ids"], attention_mask=b.get("mask"))
        per_token = F.cross_entropy(out.logits[:, :-1].transpose(1, 2), b["ids"][:, 1:],
                                    reduction="none")  # fmt: skip
        mask = b.get("mask")
        return (per_token * (1.0 if mask is None else mask[:, 1:])).sum(1)

    hooked = ["transformer.wte", "lm_head", "transformer.wpe", "transformer.ln_f"] + [
        f"transformer.h.0.{n}" for n in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2",
                                         "mlp.c_fc", "mlp.c_proj")
    ]  # fmt: skip
    eng = check_exact(model, score, batch, hooked=hooked)
    assert eng.rest is None  # the tied wte / lm_head weight is hooked in both modules


def test_conv1d_kronecker_features_are_the_projected_transposed_gradient():
    """Kronecker features of a Conv1D equal P_out^T G P_in with G = (grad of W)^T, (out, in)."""
    model = _gpt2()
    names = ["transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias"]
    batch = {"ids": _ids(3, 5, 50, seed=5)}
    weights = weights_of(model)
    exact, _ = FactoredEngine(model, names, ProjectionConfig()).features(weights, lm_loss, batch, 2)
    eng = FactoredEngine(model, names, ProjectionConfig("kronecker", 16, seed=6))
    feats, sq = eng.features(weights, lm_loss, batch, 2)
    torch.testing.assert_close(sq, exact.pow(2).sum(1), rtol=1e-12, atol=0)
    w = exact[:, : 16 * 64].reshape(3, 16, 64).transpose(1, 2)  # (B, out, in)
    g = torch.cat([w, exact[:, 16 * 64 :, None]], 2)  # bias column
    p_in, p_out = eng._matrix(2, 0, 0, 17).double(), eng._matrix(2, 0, 1, 64).double()
    want = torch.einsum("bij,ik,jl->bkl", g, p_out, p_in).reshape(3, -1)
    torch.testing.assert_close(feats, want, rtol=1e-10, atol=1e-12)


# ---- 4. half precision -------------------------------------------------------------------


class HalfNet(nn.Module):
    """Linear, Conv1d, LayerNorm and a free parameter; outputs in the hundreds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.norm = nn.LayerNorm(16)
        self.lin = nn.Linear(16, 32)
        self.gain = nn.Parameter(torch.full((32,), 2.0))
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)  # (B, 16)
        return self.out(torch.tanh(self.lin(self.norm(h))) * self.gain)


def square_loss(model, batch):
    return model(batch[0]).float().pow(2).sum(1).to(batch[0].dtype)


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_half_precision_sums_do_not_overflow(dtype, rtol):
    torch.manual_seed(11)
    model = HalfNet()
    with torch.no_grad():
        model.out.weight.mul_(60.0)
        model.out.bias.fill_(20.0)
    half = copy.deepcopy(model).to(dtype).eval()
    x = torch.randn(6, 2, 6, generator=torch.Generator().manual_seed(5)).to(dtype)
    batch = (x,)
    state = {k: v.double() if v.is_floating_point() else v for k, v in half.state_dict().items()}
    oracle = brute_force_grads(half, state, lambda m, b: m(b[0]).pow(2).sum(1), rows((x.double(),)))
    truth = (oracle**2).sum(1)
    assert 100 < np.abs(oracle).max() < 60000  # fp16 entries finite, squares are not
    names = [n for n, _ in half.named_parameters()]
    weights = weights_of(half)
    for projection in (ProjectionConfig(), ProjectionConfig("kronecker", 16)):
        eng = FactoredEngine(half, names, projection)
        feats, sq = eng.features(weights, square_loss, batch, 0)
        assert torch.isfinite(feats).all()
        np.testing.assert_allclose(sq.numpy(), truth, rtol=rtol)
        np.testing.assert_allclose(eng.sqnorms(weights, square_loss, batch).numpy(), truth,
                                   rtol=rtol)  # fmt: skip
    exact, _ = FactoredEngine(half, names, ProjectionConfig()).features(
        weights, square_loss, batch, 0
    )
    scale = np.abs(oracle).max()
    np.testing.assert_allclose(exact.double().numpy(), oracle, rtol=0, atol=rtol * scale)
    ckpts = tracin.Checkpoints.from_state_dicts([half.state_dict()], lr=[0.7])
    for engine in ("factored", "auto"):
        run = tracin.featurize(half, FnTask(square_loss), ckpts, batch, engine=engine)
        np.testing.assert_allclose(run.self_influence(), 0.7 * truth, rtol=rtol)
