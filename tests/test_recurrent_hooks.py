"""nn.RNN / nn.LSTM / nn.GRU on the hooks (an unrolled forward of F.linear calls), against a
float64 per-example backward() loop: features, norms, Kronecker features, and influence through
featurize with distinct learning rates (`check_exact`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tracin
from test_layers_exact import ce, check_exact
from tracin.gradients._factored import FactoredEngine
from tracin.projection._config import ProjectionConfig


class Recurrent(nn.Module):
    def __init__(self, kind="LSTM", batch_first=True, bias=True, h0=False, **kw):
        super().__init__()
        self.batch_first, self.h0 = batch_first, h0
        cls = getattr(nn, kind)
        self.rnn = cls(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first,
                       bias=bias, **kw)  # fmt: skip
        self.kind = kind
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        hx = None
        if self.h0:
            h = torch.tanh(x.sum(-1)[:4] if not self.batch_first else x.sum(-1).T[:4])
            h = h.unsqueeze(-1).expand(4, x.shape[1 if not self.batch_first else 0], 4) * 0.5
            hx = (h, torch.cos(h)) if self.kind == "LSTM" else h
        out, _ = self.rnn(x, hx)
        last = out[-1] if not self.batch_first else out[:, -1]
        return self.head(last)


def _batch(n=5, t=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, t, 3, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen))  # fmt: skip


def _hooked(bias=True):
    return ["head"] + [f"rnn.{k}_l{i}{d}" for i in (0, 1) for d in ("", "_reverse")
                       for k in ("ih", "hh")]  # fmt: skip


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "LSTM"},
        {"kind": "GRU"},
        {"kind": "RNN"},
        {"kind": "RNN", "nonlinearity": "relu"},
        {"kind": "LSTM", "batch_first": False},
        {"kind": "GRU", "bias": False},
        {"kind": "LSTM", "h0": True},
        {"kind": "GRU", "h0": True, "batch_first": False},
    ],
    ids=[
        "lstm",
        "gru",
        "rnn_tanh",
        "rnn_relu",
        "lstm_seq_first",
        "gru_no_bias",
        "lstm_h0",
        "gru_h0_seq_first",
    ],
)
def test_recurrent_layers_are_hooked_and_exact(kwargs):
    torch.manual_seed(0)
    check_exact(Recurrent(**kwargs), ce, _batch(), hooked=_hooked())


class Packed(Recurrent):
    def forward(self, x):
        lengths = [6, 5, 4, 3, 2][: x.shape[0]]
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, True, enforce_sorted=False)
        _, (h, _) = self.rnn(packed)
        return self.head(h[-2:].transpose(0, 1).reshape(x.shape[0], 8))


def test_forward_is_restored_and_packed_sequences_go_to_another_engine():
    torch.manual_seed(0)
    model = Packed().double().eval()
    names = [n for n, _ in model.named_parameters()]
    eng = FactoredEngine(model, names, ProjectionConfig())
    weights = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.raises(tracin.HookError, match="packed sequence"):
        eng.features(weights, ce, _batch(), 0)
    assert "forward" not in vars(model.rnn)
    plain = Recurrent().double().eval()
    FactoredEngine(plain, names, ProjectionConfig()).features(weights, ce, _batch(), 0)
    assert "forward" not in vars(plain.rnn)
    # through featurize, auto computes the packed LSTM with another engine, exactly
    from test_layers_exact import check_influence

    with pytest.warns(tracin.TracInWarning):
        check_influence(model, ce, _batch(), engines=("auto",))


def test_unrolled_outputs_are_contiguous_like_the_kernels():
    class Viewed(Recurrent):
        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out.view(x.shape[0], x.shape[1], 8)[:, -1])  # view needs contiguous

    torch.manual_seed(0)
    check_exact(Viewed(), ce, _batch(), hooked=_hooked())
