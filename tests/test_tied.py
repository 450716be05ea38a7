"""Tied input/output embeddings on the factored engine: the uses' gradients add, exactly.

A weight shared by one ``nn.Embedding`` and a bias-free ``nn.Linear`` (GPT-2's ``wte`` and
``lm_head``) is hooked in both modules; its per-example gradient is the sum of the two uses'.
Oracle: one ``backward()`` per example in float64 (`tests/zoo.py`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tracin.gradients import supported_layers
from tracin.gradients._layers import tie_cross
from zoo import BY_NAME, compute, rel_error, setup


def test_tied_weight_is_hooked_in_both_modules() -> None:
    model = BY_NAME["tied_bigram"].build()
    names = [n for n, _ in model.named_parameters()]
    layers, rest = supported_layers(model, names)
    assert rest == []
    assert sorted(layer.name for layer in layers) == ["emb", "head"]
    assert {layer.weight for layer in layers} == {"emb.weight"}
    assert len({layer.index for layer in layers}) == 1  # one seed group: projections add


@pytest.mark.parametrize(
    "options", [{}, {"proj_dim": 10**6, "projection": "kronecker", "dtype": "float64"}]
)
def test_tied_bigram_matches_the_oracle(options: dict[str, object]) -> None:
    """Exact features, and a Kronecker projection wide enough to be exact (sides <= sqrt(k))."""
    built = setup("tied_bigram")
    si, inf = compute("tied_bigram", "factored", **options)
    assert rel_error(si, built.self_influence) < 1e-8
    assert rel_error(inf, built.influence) < 1e-8


def test_kronecker_self_influence_keeps_the_cross_term() -> None:
    """A projected run's squared norms are exact: ||G_emb + G_head||^2 with its cross term."""
    built = setup("tied_bigram")
    si, _ = compute("tied_bigram", "factored", proj_dim=16, projection="kronecker")
    assert rel_error(si, built.self_influence) < 1e-8


def test_tie_cross_matches_materialised_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    b, t, s, v, dim = 3, 4, 5, 7, 6
    tok = torch.randint(0, v, (b, t), generator=gen)
    d_emb = torch.randn(b, t, dim, generator=gen, dtype=torch.float64)
    a_lin = torch.randn(b, s, dim, generator=gen, dtype=torch.float64)
    d_lin = torch.randn(b, s, v, generator=gen, dtype=torch.float64)
    g_emb = torch.zeros(b, v, dim, dtype=torch.float64).scatter_add_(
        1, tok[..., None].expand(-1, -1, dim), d_emb
    )
    g_lin = torch.bmm(d_lin.transpose(1, 2), a_lin)  # (B, V, D) weight layout
    want = 2 * (g_emb * g_lin).sum((1, 2))
    got = tie_cross([(tok, d_emb, v), (a_lin, d_lin, None)])
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12)


def test_a_partly_hooked_tie_is_not_hooked() -> None:
    """Excluding one use of a tied weight leaves the other unhooked too (never half a sum)."""
    model = BY_NAME["tied_bigram"].build()
    layers, rest = supported_layers(model, ["emb.weight"], exclude=["emb.weight"])
    assert layers == [] and rest == ["emb.weight"]


def test_a_linear_with_bias_tied_to_an_embedding_is_a_tie_and_a_bias() -> None:
    class Biased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5)
            self.head.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(x))

    layers, rest = supported_layers(Biased(), ["emb.weight", "head.bias"])
    assert [layer.name for layer in layers] == ["emb", "head", "head"] and rest == []
    assert [layer.bias_only for layer in layers] == [False, False, True]
    assert layers[0].index == layers[1].index != layers[2].index  # the tie's uses share a block


class MLMHead(nn.Module):
    """BERT-MLM's layout: the decoder's weight is the word embedding; its bias is also held by
    the head module (``decoder.bias = self.bias``), as Hugging Face does."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.bias = nn.Parameter(torch.randn(11) * 0.1)
        self.decoder = nn.Linear(6, 11)
        self.decoder.weight = self.emb.weight
        self.decoder.bias = self.bias

    def forward(self, ids):
        return self.decoder(torch.tanh(self.mid(self.emb(ids))))


def test_a_tied_head_with_its_own_bias_is_hooked_whole():
    from test_layers_exact import check_exact, lm_loss

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    batch = {"ids": torch.randint(0, 11, (5, 6), generator=gen)}
    eng = check_exact(MLMHead(), lm_loss, batch, hooked=["emb", "mid", "decoder", "decoder"])
    assert eng.rest is None and sum(la.bias_only for la in eng.layers) == 1
