"""A zoo of tiny models for the engine conformance suite (`tests/test_zoo.py`).

Each `Case` builds a small model (float64 unless it is a half-precision variant), a train and a
query batch, the tracin task, and an independent per-example loss for the oracle. `oracle`
computes self-influence and train x query influence with one ``backward()`` per example in
float64; `compute` runs tracin with a chosen engine on the same checkpoints.

``python tests/zoo.py [engine ...]`` prints the (model x engine) table: relative error, or the
exception an engine raised.
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.utils import parametrizations

import tracin

LRS = (0.3, 0.07)
ENGINES = ("functional", "factored", "auto", "loop")
N_TRAIN, N_QUERY, BATCH = 10, 3, 6
VOCAB, SEQ = 12, 6

Batch = Any
LossFn = Callable[[Any, Batch], torch.Tensor]


# ---------------------------------------------------------------- per-example losses (oracle side)


def ce(model: Any, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def sq_err(model: Any, batch: Batch) -> torch.Tensor:
    pred = model(batch[0])
    return (pred - batch[1].to(pred.dtype)).pow(2).flatten(1).sum(1)


def bce(model: Any, batch: Batch) -> torch.Tensor:
    logits = model(batch[0]).reshape(-1)
    return F.binary_cross_entropy_with_logits(logits, batch[1].to(logits.dtype), reduction="none")


def ce_dict(model: Any, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0])["logits"], batch[1], reduction="none")


def ce_two(model: Any, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0], batch[1]), batch[2], reduction="none")


def ce_hf(model: Any, batch: Batch) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(out.logits, batch["labels"], reduction="none")


class MaskedLMTask(tracin.Task):
    """Sum over positions of the token cross-entropy; label -100 marks an unscored position."""

    def train_loss(self, model: Any, batch: Batch) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        tokens = F.cross_entropy(
            out.logits.transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none"
        )
        return tokens.sum(1)


class CausalLMTask(tracin.Task):
    """Next-token cross-entropy summed over the non-padding positions of each example."""

    def train_loss(self, model: Any, batch: Batch) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        tokens = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return (tokens * mask[:, 1:].to(tokens.dtype)).sum(1)


# ---------------------------------------------------------------------------------------- models


class ResCNN(nn.Module):
    """Conv-BN-ReLU and a residual Conv-BN block, average pool, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(h + self.bn2(self.conv2(h)))
        return self.fc(F.adaptive_avg_pool2d(h, 2).flatten(1))


class Recurrent(nn.Module):
    """Two-layer bidirectional LSTM/GRU/RNN, regression head on the last step."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class BagOffsets(nn.Module):
    """EmbeddingBag fed flat tokens and offsets built inside forward from a padded (B, T) batch."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, 8, mode="mean")
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x != 0
        lengths = mask.sum(1)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
        return self.fc(self.bag(x[mask], offsets))


class Bag2D(nn.Module):
    """EmbeddingBag in 2-D input mode (one bag per row), padding index excluded."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, 8, mode="sum", padding_idx=0)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.bag(x)))


class Encoder(nn.Module):
    """Embedding + positions, two-layer nn.TransformerEncoder with a padding mask, mean pool."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.pos = nn.Parameter(torch.randn(SEQ, 8) * 0.1)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = x == 0
        h = self.encoder(self.emb(x) + self.pos, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.fc((h * keep).sum(1) / keep.sum(1))


class TiedBigram(nn.Module):
    """Next-token toy LM whose output layer is the embedding matrix (head.weight = emb.weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(x)))


class FLinearShared(nn.Module):
    """The embedding matrix is reused as the output layer through F.linear, outside its module."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.mix = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(x).mean(1)))
        return F.linear(h, self.emb.weight)


class GatedTiedHead(nn.Module):
    """The embedding matrix is also an output layer, but only for rows whose first token is > 6.

    The zoo puts three gate-off rows first, so a check on the first rows cannot see the tie.
    """

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(x).mean(1)))
        gate = (x[:, :1] > 6).to(h.dtype)
        return self.head(h) + gate * F.linear(h, self.emb.weight)


class ReZeroTiedHead(nn.Module):
    """ReZero-style gate ``alpha`` (0 at the first checkpoint) on a tied F.linear output path."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, VOCAB)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(x).mean(1)))
        return self.head(h) + self.alpha * F.linear(h, self.emb.weight)


class DictOut(nn.Module):
    """Returns a dict; the task picks ``"logits"``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.body(x))
        return {"logits": self.fc(h), "hidden": h}


class PaddedBag(nn.Module):
    """Embedding with padding_idx=0, summed over all positions (padding included)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.emb(x).sum(1)))


class TwoInputs(nn.Module):
    """``forward(x1, x2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(3, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.a(x1) + self.b(x2)))


class SeqFirst(nn.Module):
    """Linear layers on a (T, B, D) sequence-first tensor, with T equal to the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x.transpose(0, 1)))  # (T, B, 8)
        return self.fc(h.mean(0))


class Reused(nn.Module):
    """One Linear applied twice in a forward pass (weight sharing by module reuse)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class CrossAttention(nn.Module):
    """nn.MultiheadAttention with kdim/vdim != embed_dim (separate q/k/v projection weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, kdim=3, vdim=3, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(self.proj(x), x, x, need_weights=False)
        return self.fc(out.mean(1))


class BilinearPReLU(nn.Module):
    """nn.Bilinear and a PReLU slope: parameters outside Linear/Conv/Embedding/norm layers."""

    def __init__(self) -> None:
        super().__init__()
        self.bil = nn.Bilinear(5, 5, 6)
        self.act = nn.PReLU(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.bil(x, x.flip(1))))


class UnusedLayer(nn.Module):
    """A Linear the forward pass never calls (its gradient is zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.spare = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.body(x)))


class FreqBag(nn.Module):
    """Embedding with scale_grad_by_freq: gradients scaled by in-batch token counts."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8, scale_grad_by_freq=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.emb(x).mean(1)))


def conv3d() -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(24, 3))


def mlp_frozen() -> nn.Module:
    net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
    net[2].requires_grad_(False)
    return net


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def grouped_conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(),  # depthwise
        nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.Flatten(), nn.Linear(24, 3),
    )  # fmt: skip


def conv_pad_modes() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding="same"), nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), nn.Tanh(),
        nn.Conv2d(4, 4, 3, dilation=2), nn.Flatten(), nn.Linear(36, 3),
    )  # fmt: skip


def conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(),
        nn.Conv1d(6, 4, 3, stride=2), nn.Flatten(), nn.Linear(16, 2),
    )  # fmt: skip


def conv_transpose() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Tanh(), nn.ConvTranspose2d(3, 2, 3, stride=2),
        nn.Flatten(), nn.Linear(98, 3),
    )  # fmt: skip


def group_norm() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Flatten(), nn.Linear(100, 3),
    )  # fmt: skip


def layer_norm() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(),
        nn.Linear(8, 8), nn.LayerNorm(8, bias=False), nn.Linear(8, 3),
    )  # fmt: skip


def weight_norm() -> nn.Module:
    return nn.Sequential(
        parametrizations.weight_norm(nn.Linear(5, 8)), nn.Tanh(), nn.Linear(8, 1)
    )  # binary logits (B, 1)


def _bert_config(**extra: Any) -> Any:
    import transformers

    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **extra,
    )  # fmt: skip


def bert_cls() -> nn.Module:
    import transformers

    return transformers.BertForSequenceClassification(_bert_config(num_labels=3))


def bert_mlm() -> nn.Module:
    import transformers

    return transformers.BertForMaskedLM(_bert_config())


def gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


# ------------------------------------------------------------------------------------------ data


def dense(*shape: int, classes: int = 3) -> Callable[[torch.Generator, int], Batch]:
    def make(gen: torch.Generator, n: int) -> Batch:
        x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
        return x, torch.randint(0, classes, (n,), generator=gen)

    return make


def targets(*shape: int, out: int = 1) -> Callable[[torch.Generator, int], Batch]:
    def make(gen: torch.Generator, n: int) -> Batch:
        x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
        return x, torch.randn(n, out, generator=gen, dtype=torch.float64)

    return make


def padded_tokens(gen: torch.Generator, n: int) -> torch.Tensor:
    """``(n, SEQ)`` token ids in ``1..VOCAB-1``, right-padded with 0 after 2..SEQ tokens."""
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=gen)
    lengths = torch.randint(2, SEQ + 1, (n,), generator=gen)
    return ids * (torch.arange(SEQ) < lengths[:, None])


def tokens(gen: torch.Generator, n: int) -> Batch:
    return padded_tokens(gen, n), torch.randint(0, 3, (n,), generator=gen)


def gate_off_first(gen: torch.Generator, n: int) -> Batch:
    """`tokens` with the first three rows starting with token 1 (the gate of GatedTiedHead off)."""
    x = padded_tokens(gen, n)
    x[:3, 0] = 1
    return x, torch.randint(0, VOCAB, (n,), generator=gen)


def bigrams(gen: torch.Generator, n: int) -> Batch:
    ids = torch.randint(0, VOCAB, (2, n), generator=gen)
    return ids[0], ids[1]


def two_inputs(gen: torch.Generator, n: int) -> Batch:
    x1 = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    x2 = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x1, x2, torch.randint(0, 3, (n,), generator=gen)


def text_cls(gen: torch.Generator, n: int) -> Batch:
    ids = padded_tokens(gen, n)
    return {"input_ids": ids, "attention_mask": (ids != 0).long(),
            "labels": torch.randint(0, 3, (n,), generator=gen)}  # fmt: skip


def text_mlm(gen: torch.Generator, n: int) -> Batch:
    """Labels -100 except two real (non-padding) positions per row."""
    ids = padded_tokens(gen, n)
    labels = torch.full_like(ids, -100)
    for i in range(n):
        real = int((ids[i] != 0).sum())
        pick = torch.randperm(real, generator=gen)[:2]
        labels[i, pick] = torch.randint(1, VOCAB, (len(pick),), generator=gen)
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}


def text_lm(gen: torch.Generator, n: int) -> Batch:
    ids = padded_tokens(gen, n)
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


# ----------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One zoo model and how to score it.

    Attributes:
        name: the test id.
        build: returns the model (float64 is applied after; ``dtype`` for half variants).
        data: ``(generator, n) -> batch`` of ``n`` rows.
        task: the tracin task.
        loss: the per-example loss ``(model, batch) -> (B,)`` the oracle differentiates.
        dtype: the model's and the inputs' floating dtype.
        tol: largest accepted relative error (max abs error / max abs expected value).
        needs: a package to import first (skipped without it).
    """

    name: str
    build: Callable[[], nn.Module]
    data: Callable[[torch.Generator, int], Batch]
    task: Callable[[], tracin.Task]
    loss: LossFn
    dtype: torch.dtype = torch.float64
    tol: float = 1e-6
    needs: str | None = None


CLS, REG, HF = tracin.ClassificationTask, tracin.RegressionTask, "transformers"

CASES = [
    Case("mlp_frozen", mlp_frozen, dense(5), CLS, ce),
    Case("cnn_bn_residual", ResCNN, dense(2, 6, 6), CLS, ce),
    Case("conv_grouped_depthwise", grouped_conv, dense(4, 6, 6), CLS, ce),
    Case("conv_pad_modes", conv_pad_modes, dense(2, 7, 7), CLS, ce),
    Case("conv1d_bn1d", conv1d, targets(3, 9, out=2), REG, sq_err),
    Case("conv_transpose2d", conv_transpose, dense(2, 5, 5), CLS, ce),
    Case("group_norm", group_norm, dense(2, 5, 5), CLS, ce),
    Case("layer_norm", layer_norm, dense(5), CLS, ce),
    Case("conv3d", conv3d, dense(2, 3, 3, 3), CLS, ce),
    Case("lstm", functools.partial(Recurrent, "LSTM"), targets(5, 3), REG, sq_err),
    Case("gru", functools.partial(Recurrent, "GRU"), targets(5, 3), REG, sq_err),
    Case("rnn", functools.partial(Recurrent, "RNN"), targets(5, 3), REG, sq_err),
    Case("embbag_offsets", BagOffsets, tokens, CLS, ce),
    Case("embbag_2d", Bag2D, tokens, CLS, ce),
    Case("embedding_padding_idx", PaddedBag, tokens, CLS, ce),
    Case("transformer_encoder", Encoder, tokens, CLS, ce),
    Case("embedding_scale_grad_by_freq", FreqBag, tokens, CLS, ce),
    Case("mha_kdim_vdim", CrossAttention, dense(4, 3), CLS, ce),
    Case("tied_bigram", TiedBigram, bigrams, CLS, ce),
    Case("flinear_shared_weight", FLinearShared, tokens, CLS, ce),
    Case("gated_tied_head_late_rows", GatedTiedHead, gate_off_first, CLS, ce),
    Case("rezero_tied_head", ReZeroTiedHead, tokens, CLS, ce),
    Case("seq_first_linear", SeqFirst, dense(BATCH, 4), CLS, ce),  # T = batch size
    Case("seq_first_linear_t3", SeqFirst, dense(3, 4), CLS, ce),  # T = rows of the self-check
    Case("reused_linear", Reused, dense(6), CLS, ce),
    Case("unused_layer", UnusedLayer, dense(5), CLS, ce),
    Case("bilinear_prelu", BilinearPReLU, dense(5), CLS, ce),
    Case("weight_norm_binary", weight_norm, dense(5, classes=2), CLS, bce),
    Case("dict_output", DictOut, dense(5), lambda: CLS(output="logits"), ce_dict),
    Case("two_inputs", TwoInputs, two_inputs, lambda: CLS(inputs=(0, 1), labels=2), ce_two),  # type: ignore[arg-type]
    Case("two_inputs_default", TwoInputs, two_inputs, lambda: CLS(labels=2), ce_two),
    Case("mlp_float16", mlp, dense(5), CLS, ce, dtype=torch.float16, tol=2e-2),
    Case("mlp_bfloat16", mlp, dense(5), CLS, ce, dtype=torch.bfloat16, tol=2e-2),
    Case("bert_cls", bert_cls, text_cls, lambda: CLS(output="logits"), ce_hf, needs=HF),
    Case("bert_mlm_tied", bert_mlm, text_mlm, MaskedLMTask, MaskedLMTask().train_loss, needs=HF),
    Case("gpt2_causal_lm", gpt2, text_lm, CausalLMTask, CausalLMTask().train_loss, needs=HF),
]
BY_NAME = {c.name: c for c in CASES}


# ---------------------------------------------------------------------------------------- oracle


def _cast(batch: Batch, dtype: torch.dtype) -> Batch:
    """Floating tensors of a batch (or state dict) cast to ``dtype``."""
    if isinstance(batch, dict):
        return {k: _cast(v, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return tuple(_cast(v, dtype) for v in batch)
    return batch.to(dtype) if batch.is_floating_point() else batch


def _take(batch: Batch, rows: slice) -> Batch:
    if isinstance(batch, dict):
        return {k: v[rows] for k, v in batch.items()}
    return tuple(v[rows] for v in batch)


def _randomise_buffers(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial running statistics for every batch-norm layer."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            assert m.running_var is not None
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class Setup:
    """A built case: model, two checkpoints' weights, data, and the oracle's answers."""

    model: nn.Module
    states: list[dict[str, torch.Tensor]]
    train: Batch
    query: Batch
    self_influence: np.ndarray
    influence: np.ndarray


@functools.cache
def setup(name: str) -> Setup:
    """Build case ``name`` (deterministically) and compute its float64 oracle once."""
    case = BY_NAME[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(sum(map(ord, name)))
        model = case.build().double().eval()
        _randomise_buffers(model, gen)
        first = _state(model)
        for p in model.parameters():  # tied weights are one parameter: perturbed once
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        _randomise_buffers(model, gen)  # the second checkpoint has its own statistics
        states = [first, _state(model)]
        model.load_state_dict(first)
    model = model.to(case.dtype)
    states = [{k: v.to(case.dtype) if v.is_floating_point() else v for k, v in s.items()}
              for s in states]  # fmt: skip
    data = _cast(case.data(gen, N_TRAIN + N_QUERY), case.dtype)
    train, query = _take(data, slice(0, N_TRAIN)), _take(data, slice(N_TRAIN, None))
    self_inf, infl = oracle(model, case.loss, states, LRS, train, query)
    return Setup(model, states, train, query, self_inf, infl)


def _grads(net: nn.Module, loss: LossFn, batch: Batch, names: Sequence[str]) -> np.ndarray:
    params = dict(net.named_parameters())
    rows = []
    n = len(next(iter(batch.values())) if isinstance(batch, dict) else batch[0])
    for i in range(n):
        net.zero_grad(set_to_none=True)
        value = loss(net, _take(batch, slice(i, i + 1)))
        assert value.shape == (1,), value.shape
        value[0].backward()
        grads = [params[k].grad for k in names]
        rows.append(torch.cat([
            torch.zeros(params[k].numel(), dtype=torch.float64) if g is None else g.reshape(-1)
            for k, g in zip(names, grads, strict=True)
        ]).numpy())  # fmt: skip
    return np.stack(rows)


def oracle(
    model: nn.Module,
    loss: LossFn,
    states: Sequence[dict[str, torch.Tensor]],
    lrs: Sequence[float],
    train: Batch,
    query: Batch,
) -> tuple[np.ndarray, np.ndarray]:
    """Self-influence ``(N,)`` and influence ``(Q, N)`` from one backward() per example, float64.

    Differentiates the trainable parameters of ``model.named_parameters()`` (tied weights once),
    with each state upcast to float64.
    """
    net = copy.deepcopy(model).double().eval()
    names = [k for k, p in net.named_parameters() if p.requires_grad]
    train, query = _cast(train, torch.float64), _cast(query, torch.float64)
    self_inf, infl = 0.0, 0.0
    for lr, state in zip(lrs, states, strict=True):
        net.load_state_dict(_cast(state, torch.float64))
        g_train = _grads(net, loss, train, names)
        g_query = _grads(net, loss, query, names)
        self_inf = self_inf + lr * (g_train**2).sum(1)
        infl = infl + lr * g_query @ g_train.T
    return np.asarray(self_inf), np.asarray(infl)


# ---------------------------------------------------------------------------------------- tracin


def compute(name: str, engine: str, **options: Any) -> tuple[np.ndarray, np.ndarray]:
    """tracin's self-influence ``(N,)`` and influence of the query rows ``(Q, N)``."""
    case, built = BY_NAME[name], setup(name)
    ckpts = tracin.Checkpoints.from_state_dicts(built.states, lr=list(LRS))
    model = copy.deepcopy(built.model)
    run = tracin.featurize(
        model, case.task(), ckpts, built.train, engine=engine, batch_size=BATCH, **options
    )
    return np.asarray(run.self_influence()), np.asarray(run.influence(built.query))


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (inf for a shape mismatch or non-finite value)."""
    if actual.shape != expected.shape or not np.isfinite(actual).all():
        return float("inf")
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def cell(name: str, engine: str) -> str:
    """One table entry: ``ok 3e-15``, ``WRONG 0.4``, or the exception's type and first line."""
    try:
        built = setup(name)
        si, inf = compute(name, engine)
    except Exception as exc:  # the table reports every failure
        first = (str(exc).strip().splitlines() or [""])[0][:110]
        kind = "refused" if isinstance(exc, tracin.TracInError) else "CRASH"
        return f"{kind} {type(exc).__name__}: {first}"
    err = max(rel_error(si, built.self_influence), rel_error(inf, built.influence))
    return f"{'ok' if err <= BY_NAME[name].tol else 'WRONG'} {err:.1e}"


def main(engines: Sequence[str]) -> None:
    """Print the (model x engine) table, then the message of every refusal or crash."""
    torch.set_num_threads(1)
    print(f"{'model':30s}" + "".join(f"{e:24s}" for e in engines))
    notes = []
    for case in CASES:
        cells = [cell(case.name, engine) for engine in engines]
        print(f"{case.name:30s}" + "".join(f"{c.split(':')[0]:24s}" for c in cells), flush=True)
        notes += [
            f"  {case.name} / {e}: {c}" for e, c in zip(engines, cells, strict=True) if ":" in c
        ]
    print("\n".join(notes))


if __name__ == "__main__":
    main(sys.argv[1:] or ENGINES)
