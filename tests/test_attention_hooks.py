"""nn.MultiheadAttention's packed projections on the hooks, against a float64 per-example loop.

The hooks record ``F.linear`` calls inside the attention module (`tracin.gradients._attention`):
self- and cross-attention (row blocks of the packed weight), batch-first or not, masks, no
bias, ``need_weights`` either way, and nn.TransformerEncoder. Each case is checked by
`check_exact` (features, squared norms, Kronecker features, influence through featurize with
distinct learning rates) and must hook the projections, not leave them to torch.func.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from test_layers_exact import ce, check_exact
from tracin.gradients._factored import FactoredEngine
from tracin.projection._config import ProjectionConfig


class Attend(nn.Module):
    def __init__(self, cross=False, batch_first=True, bias=True, need_weights=True, mask=False):
        super().__init__()
        self.cross, self.batch_first, self.need, self.mask = cross, batch_first, need_weights, mask
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, bias=bias)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        kv = torch.sin(h) if self.cross else h
        pad = None
        if self.mask:
            pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
            pad[:, -2:] = x[:, -2:, 0] > 0  # some keys masked, differently per example
        if not self.batch_first:
            h, kv = h.transpose(0, 1), kv.transpose(0, 1)
            kv = h if not self.cross else kv
        else:
            kv = h if not self.cross else kv
        out, _ = self.attn(h, kv, kv, key_padding_mask=pad, need_weights=self.need)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out.mean(1))


def _batch(n=5, t=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, t, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen))  # fmt: skip


HOOKED = ["inp", "attn.in_proj", "attn.out_proj", "head"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"batch_first": False},
        {"cross": True},
        {"cross": True, "batch_first": False},
        {"bias": False},
        {"need_weights": False, "mask": True},
        {"mask": True, "cross": True},
    ],
    ids=["self", "seq_first", "cross", "cross_seq_first", "no_bias", "sdpa_mask", "cross_mask"],
)
def test_attention_projections_are_hooked_and_exact(kwargs):
    torch.manual_seed(0)
    check_exact(Attend(**kwargs), ce, _batch(), hooked=HOOKED)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        pad = ids == 0
        return self.head(self.enc(self.emb(ids), src_key_padding_mask=pad).mean(1))


def test_transformer_encoder_has_nothing_left_to_torch_func():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 11, (5, 7), generator=gen)
    ids[:2, -3:] = 0
    batch = (ids, torch.randint(0, 3, (5,), generator=gen))
    eng = check_exact(Encoder(), ce, batch)
    assert eng.rest is None
    assert {layer.name for layer in eng.layers} >= {
        f"enc.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("in_proj", "out_proj")
    }


def test_linear_is_restored_after_a_pass_and_after_an_error():
    model = Attend().double().eval()
    names = [n for n, _ in model.named_parameters()]
    eng = FactoredEngine(model, names, ProjectionConfig())
    weights = {k: v.detach() for k, v in model.named_parameters()}
    linear = F.linear
    eng.features(weights, ce, _batch(), 0)
    assert F.linear is linear

    def broken(model, batch):
        model(batch[0])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        eng.features(weights, broken, _batch(), 0)
    assert F.linear is linear


class KdimVdim(nn.Module):
    """Separate q/k/v projection weights sharing one packed in_proj_bias."""

    def __init__(self, bias=True):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, kdim=3, vdim=5, batch_first=True, bias=bias)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        out, _ = self.attn(h, torch.sin(x[..., :3]), torch.cos(x[..., :5].repeat(1, 1, 2)[..., :5]))
        return self.head(out.mean(1))


@pytest.mark.parametrize("bias", [True, False])
def test_separate_projection_weights_with_a_packed_bias(bias):
    torch.manual_seed(0)
    x, y = _batch()
    x = torch.cat([x, x[..., :1]], -1)  # 5 features
    model = KdimVdim(bias)
    model.inp = nn.Linear(5, 8)
    hooked = ["inp", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "head"]
    check_exact(model, ce, (x, y), hooked=hooked)
