"""Zoo engines: tracin's paths against the training step and Captum on every fast-path model.

Models: every model of the engine conformance zoo (`tests/zoo.py`) that ``engine="factored"``
computes (the fast path; the others are listed with the refusal), run in float32 (the
half-precision variants in their dtype) on 8192 random rows shaped like the zoo's; plus

- ``cnn47k``: two 5x5 convolutions (16 and 32 channels) on 28x28 single-channel images, then
  512 -> 64 -> 10 (46,730 parameters), on scikit-learn's digits upsampled to 28x28;
- ``rescnn``: a ResNet-style CNN with BatchNorm (stem, three residual blocks 16/32/64 channels,
  1x1 projection shortcuts, global average pool) on the same 28x28 digits;
- ``gpt2``: ``transformers.GPT2LMHeadModel`` from a small config (vocab 1000, 2 layers, width
  128, 4 heads, 32 positions), next-token loss summed over the non-padding positions;
- ``gpt2_eager``: the same with ``attn_implementation="eager"`` (the default "sdpa" builds its
  mask with a data-dependent check that torch.func cannot vmap, so tracin falls back to its
  per-example loop there);
- ``bert``: ``transformers.BertForSequenceClassification`` from a small config (vocab 1000,
  2 layers, width 128, 4 heads, intermediate 512, 4 labels); both on random token rows,
  lengths 8..32, right-padded. Built from configs: nothing is downloaded.

Paths timed per model (3 checkpoints, lr 0.1, 0.1, 0.01, files ``{"model_state_dict", "lr"}``
of random perturbations of the model; rates in checkpoint-examples per second, the training
step and the forward pass in examples per second):

- ``train``: forward + backward + SGD step, batch 64 (the floor of every ratio);
- ``forward``: eval, no grad, batch 256 (what a last-layer method is bound by);
- ``exact``: ``tracin.featurize(..., engine="auto")`` then ``run.self_influence()`` (no store,
  exact streamed squared norms);
- ``stream_q64``: ``run.influence(queries)`` of 64 queries on such a run (the run built
  untimed): every exact training gradient recomputed and multiplied by the queries';
- ``kron_store``: ``featurize(store=dir, proj_dim=1024, projection="kronecker")``, features
  written to a fresh store directory;
- ``last_layer``: ``featurize(layers=[final], projection="last_layer")`` + self-influence;
- ``captum_fast_last``: Captum ``TracInCPFast(final_fc_layer=final)``, batch 64;
- ``captum_samplewise``: Captum ``TracInCP(sample_wise_grads_per_batch=True)``, sum loss, b64;
- ``captum_loop``, ``captum_loop_b64``: Captum ``TracInCP`` per-example loop
  (``reduction="none"``), batch 1 and 64 (in a batch, Captum runs one backward through the
  whole batch's graph per example: faster on tiny models, far slower on large ones).

Correctness: each Captum self-influence is compared with tracin's exact one on the rows both
computed (max elementwise relative error); a Captum configuration is "correct" below 1e-3 (2e-2
for the half-precision models); TracInCPFast (which drops the bias) is compared with tracin
``layers=[final + ".weight"]``. Captum's fastest correct configuration is the fastest of the
three TracInCP ones that are correct. ``exact vs loop err``: tracin exact against Captum's
batch-1 loop (plain autograd, one example at a time).

tracin's batch size: 512 (zoo models, cnn47k), 128 (rescnn), 64 (gpt2, bert); the training
step always uses 64. Checkpoints tie weights as the model does (a tied tensor is perturbed once).

Timing: a warm-up on 8 rows that guesses the size, sizing runs until one takes ~``--budget``
seconds (zoo 0.25, CNNs 1.0, transformers 1.2) or uses every row available (zoo 8192, cnn47k
4096, rescnn 2048, transformers 512), then the best of two runs at that size (``--quick``:
the warm-up, then one run on 64 rows, 16 for the transformers). The training step and tracin's
paths keep runs of at least 4 of their batches (at most 512 rows): on a 1 s budget a transformer
run of 70 rows measured mostly its fixed cost (engine self-check, checkpoint loading, store
creation); the 8-row warm-up's seconds are saved as ``warmup_s``. ``others`` is the CPU cores
other processes used during the kept run (``/proc/stat`` minus this process's CPU time).

Memory (Linux): before each path the process gives freed heap back (``malloc_trim``) and
resets its peak resident set (``5`` into ``/proc/self/clear_refs``); after the path's runs
``VmHWM`` is read: ``peak MB`` is that process-wide peak resident set (interpreter, torch,
Captum, data and model included; the train row's is the baseline), ``+MB`` the peak above the
resident set when the path started. torch on the CPU allocates through malloc, so tensors the
path creates are in it; memory-mapped store pages it reads back count while resident.

Each model runs in its own process (``--threads`` intra-op threads). Before each one the driver
waits (up to ``--max-wait`` s) until other processes use under ``--quiet-cores`` cores over 2 s
and the 1-minute load average is under ``--max-load``, and records both before and after.

    python benchmarks/zoo_engines.py                       # all models, 2 threads, ~10 min
    python benchmarks/zoo_engines.py --quick --threads 1   # smoke run
    python benchmarks/zoo_engines.py --models cnn47k gpt2  # a subset
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import tracin

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT.parent / "tests"))
from engines import _cpu_snapshot as _cpu  # noqa: E402  (the same /proc readers)
from engines import _status_kb, _version, mem_reset  # noqa: E402

import zoo  # type: ignore[import-not-found]  # noqa: E402  (the zoo: models, data, tasks, losses)

LRS = (0.1, 0.1, 0.01)
TRAIN_BATCH = 64
CAPTUM_BATCH = 64
QUERIES = 64
CAPTUM_TCP = ("captum_samplewise", "captum_loop", "captum_loop_b64")  # TracInCP configurations
CORRECT = 1e-3  # max relative error for a "correct" Captum configuration (float32)
Batch = Any
PerExample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- the extra models ---------------------------------------------------------------------------
class Cnn47k(nn.Module):
    """Two 5x5 convolutions (16, 32 channels) on 28x28x1, max-pooled, then 512 -> 64 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(512, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.relu(self.conv1(x)), 2)  # (B, 16, 12, 12)
        h = F.max_pool2d(torch.relu(self.conv2(h)), 2)  # (B, 32, 4, 4)
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(h.flatten(1))))
        return out


class ResBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN plus a shortcut (1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResCnn(nn.Module):
    """Stem 3x3 conv (16) + BN, residual blocks 16 -> 32 (/2) -> 64 (/2), average pool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(ResBlock(16, 16, 1), ResBlock(16, 32, 2), ResBlock(32, 64, 2))
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(torch.relu(self.bn(self.stem(x))))
        out: torch.Tensor = self.fc(h.mean((2, 3)))
        return out


HF_VOCAB, HF_SEQ = 1000, 32


def gpt2_small(attention: str = "sdpa") -> nn.Module:
    """GPT-2 from a small config; ``attention`` is transformers' ``attn_implementation``.

    With "sdpa" (the default) transformers 5 builds the causal mask through a data-dependent
    ``padding_mask.all()``, which torch.func cannot vmap; "eager" can be vmapped.
    """
    import transformers

    config = transformers.GPT2Config(  # type: ignore[call-arg]
        vocab_size=HF_VOCAB, n_positions=HF_SEQ, n_embd=128, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1,
        attn_implementation=attention,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def bert_small() -> nn.Module:
    import transformers

    config = transformers.BertConfig(  # type: ignore[call-arg]
        vocab_size=HF_VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=HF_SEQ, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=4,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


@functools.cache
def _digits28() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return x, torch.tensor(data.target, dtype=torch.long)


def digits28(gen: torch.Generator, n: int) -> Batch:
    """``n`` rows of the 1797 digits upsampled to 28x28 (repeated, shuffled by ``gen``)."""
    x, y = _digits28()
    idx = torch.randint(0, len(y), (n,), generator=gen)
    return x[idx].contiguous(), y[idx].contiguous()


def hf_tokens(gen: torch.Generator, n: int, labels: int | None) -> Batch:
    """Random ids ``(n, 32)`` in 1..999, lengths 8..32, right-padded with 0; mask; labels."""
    ids = torch.randint(1, HF_VOCAB, (n, HF_SEQ), generator=gen)
    lengths = torch.randint(8, HF_SEQ + 1, (n,), generator=gen)
    ids = ids * (torch.arange(HF_SEQ) < lengths[:, None])
    out = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    if labels:
        out["labels"] = torch.randint(0, labels, (n,), generator=gen)
    return out


# --- what a model needs: tracin side and Captum side --------------------------------------------
@dataclass(frozen=True)
class Spec:
    """One benchmark model.

    Attributes:
        name, title: key and description.
        build: the model (float32 unless ``dtype``).
        data: ``(generator, n) -> batch``.
        task: the tracin task.
        loss: per-example training loss ``(model, batch) -> (B,)``.
        captum: ``batch -> (inputs..., target)`` tensors for Captum's dataset.
        forward: ``(net, *inputs) -> output`` Captum's model calls.
        captum_loss: per-example loss ``(output, target) -> (B,)`` on Captum's side.
        final: the final Linear (tracin ``layers=[final]``, Captum ``final_fc_layer``).
        rows, quick_rows: training rows available (full, ``--quick``).
        batch: tracin's batch size.
        budget: seconds per timed run.
        dtype: floating dtype of model and inputs.
        tol: relative error below which a Captum result counts as correct.
    """

    name: str
    title: str
    build: Callable[[], nn.Module]
    data: Callable[[torch.Generator, int], Batch]
    task: Callable[[], tracin.Task]
    loss: Callable[[Any, Batch], torch.Tensor]
    captum: Callable[[Batch], tuple[torch.Tensor, ...]]
    forward: Callable[..., torch.Tensor]
    captum_loss: PerExample
    final: str
    rows: int = 8192
    quick_rows: int = 256
    batch: int = 512
    budget: float = 0.25
    dtype: torch.dtype = torch.float32
    tol: float = CORRECT


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _sq(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y.to(out.dtype)).pow(2).flatten(1).sum(1)


def _bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = out.reshape(-1)
    return F.binary_cross_entropy_with_logits(out, y.to(out.dtype), reduction="none")


def _lm(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy ``(B, T-1, V)`` vs ``(B, T-1)`` (-100 ignored), summed per row."""
    return F.cross_entropy(out.transpose(1, 2), y, ignore_index=-100, reduction="none").sum(1)


def _plain(net: nn.Module, *x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = net(*x)
    return out


def _dict_logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = net(x)["logits"]
    return out


def _hf_logits(net: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = net(input_ids=ids, attention_mask=mask).logits
    return out


def _hf_lm_logits(net: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = net(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return out


def _xy(batch: Batch) -> tuple[torch.Tensor, ...]:
    return tuple(batch)


def _hf_cls(batch: Batch) -> tuple[torch.Tensor, ...]:
    return batch["input_ids"], batch["attention_mask"], batch["labels"]


def _hf_lm(batch: Batch) -> tuple[torch.Tensor, ...]:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return ids, mask, target


_CAPTUM_SIDE: dict[Any, tuple[Callable[..., torch.Tensor], PerExample]] = {
    zoo.ce: (_plain, _ce),
    zoo.ce_two: (_plain, _ce),
    zoo.sq_err: (_plain, _sq),
    zoo.bce: (_plain, _bce),
    zoo.ce_dict: (_dict_logits, _ce),
    zoo.ce_hf: (_hf_logits, _ce),
}


def _last_linear(model: nn.Module) -> str:
    """Name of the last registered nn.Linear (every zoo model's output layer)."""
    names: list[str] = [k for k, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1]


def _mlm(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy ``(B, T, V)`` vs ``(B, T)`` (-100 unscored), summed per row."""
    return F.cross_entropy(out.transpose(1, 2), y, ignore_index=-100, reduction="none").sum(1)


def _captum_side(loss: Any) -> tuple[Callable[..., torch.Tensor], PerExample, Callable[..., Any]]:
    """``(forward, per-example loss, batch -> tensors)`` on Captum's side of a zoo loss."""
    method = getattr(loss, "__func__", None)  # the zoo's LM tasks pass bound train_loss methods
    if method is zoo.CausalLMTask.train_loss:
        return _hf_lm_logits, _lm, _hf_lm
    if method is zoo.MaskedLMTask.train_loss:
        return _hf_logits, _mlm, _hf_cls
    forward, per = _CAPTUM_SIDE[loss]
    return forward, per, _hf_cls if loss is zoo.ce_hf else _xy


def zoo_spec(case: zoo.Case) -> Spec:
    forward, loss, tensors = _captum_side(case.loss)
    dtype = case.dtype if case.dtype != torch.float64 else torch.float32
    half = dtype in (torch.float16, torch.bfloat16)
    return Spec(
        name=case.name,
        title=f"zoo {case.name}",
        build=case.build,
        data=case.data,
        task=case.task,
        loss=case.loss,
        captum=tensors,
        forward=forward,
        captum_loss=loss,
        final=_last_linear(case.build()),
        dtype=dtype,
        tol=case.tol if half else CORRECT,
    )


def _ce_model(model: Any, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


EXTRA = {
    "cnn47k": Spec(
        "cnn47k", "CNN 47k, 2x conv5x5 (16, 32) + 512-64-10, digits 28x28", Cnn47k, digits28,
        tracin.ClassificationTask, _ce_model, _xy, _plain, _ce, "fc2",
        rows=4096, budget=1.0,
    ),
    "rescnn": Spec(
        "rescnn", "ResNet-style CNN with BatchNorm, digits 28x28", ResCnn, digits28,
        tracin.ClassificationTask, _ce_model, _xy, _plain, _ce, "fc",
        rows=2048, batch=128, budget=1.0,
    ),
    "gpt2": Spec(
        "gpt2", "GPT-2 small config (2x128, vocab 1000), causal LM, 32 tokens", gpt2_small,
        lambda g, n: hf_tokens(g, n, None), zoo.CausalLMTask, zoo.CausalLMTask().train_loss,
        _hf_lm, _hf_lm_logits, _lm, "lm_head",
        rows=512, quick_rows=16, batch=64, budget=1.2,
    ),
    "gpt2_eager": Spec(
        "gpt2_eager", "the same GPT-2 with attn_implementation='eager' (vmap-able)",
        functools.partial(gpt2_small, "eager"), lambda g, n: hf_tokens(g, n, None),
        zoo.CausalLMTask, zoo.CausalLMTask().train_loss, _hf_lm, _hf_lm_logits, _lm, "lm_head",
        rows=512, quick_rows=16, batch=64, budget=1.2,
    ),
    "bert": Spec(
        "bert", "BERT small config (2x128, vocab 1000), sequence classification, 32 tokens",
        bert_small, lambda g, n: hf_tokens(g, n, 4),
        lambda: tracin.ClassificationTask(output="logits"), zoo.ce_hf, _hf_cls, _hf_logits, _ce,
        "classifier", rows=512, quick_rows=16, batch=64, budget=1.2,
    ),
}  # fmt: skip


def all_specs() -> dict[str, Spec]:
    out = {c.name: zoo_spec(c) for c in zoo.CASES}
    return {**out, **EXTRA}


# --- batches ------------------------------------------------------------------------------------
def take(batch: Batch, rows: slice) -> Batch:
    if isinstance(batch, dict):
        return {k: v[rows] for k, v in batch.items()}
    return tuple(v[rows] for v in batch)


def cast(batch: Batch, dtype: torch.dtype) -> Batch:
    if isinstance(batch, dict):
        return {k: cast(v, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return tuple(cast(v, dtype) for v in batch)
    return batch.to(dtype) if batch.is_floating_point() else batch


def fast_path_refusal(spec: Spec) -> str | None:
    """None when ``engine="factored"`` computes the model (8 rows, 1 checkpoint), else why not."""
    gen = torch.Generator().manual_seed(0)
    model = spec.build().to(spec.dtype).eval()
    ckpts = tracin.Checkpoints.from_state_dicts([model.state_dict()], lr=[0.1])
    data = cast(spec.data(gen, 8), spec.dtype)
    try:
        tracin.featurize(model, spec.task(), ckpts, data, engine="factored", batch_size=8)
    except tracin.TracInError as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None


# --- timing and memory --------------------------------------------------------------------------


def _timed(fn: Callable[[int], Any], rows: int) -> tuple[float, float, Any]:
    """``(seconds, cores other processes used meanwhile, result)`` of ``fn(rows)``."""
    w0, b0, p0 = _cpu()
    out = fn(rows)
    w1, b1, p1 = _cpu()
    secs = w1 - w0
    others = max(0.0, (b1 - b0) - (p1 - p0)) / secs if secs >= 0.25 else float("nan")
    return secs, others, out


@dataclass
class Opts:
    budget: float
    quick: bool


def _size(rows: int, secs: float, budget: float, limit: int, step: int) -> int:
    """Rows for a run of ~``budget`` s at the rate of ``rows`` in ``secs``.

    A multiple of ``step`` when at least one ``step`` fits, else as many rows as fit (>= 8).
    """
    want = int(min(limit, rows * budget / max(secs, 1e-6)))
    if want >= limit:
        return limit
    return want // step * step if want >= step else max(min(8, limit), want)


def measure(
    key: str,
    fn: Callable[[int], Any],
    limit: int,
    start: int,
    opts: Opts,
    ckpts: int = len(LRS),
    step: int = 1,
    prepare: Callable[[int], None] | None = None,
    floor: int = 0,
) -> dict[str, Any]:
    """Time ``fn(rows)``, rows sized to ~``opts.budget`` s; a result dict.

    ``floor``: the fewest rows of a kept run (tracin's paths: 4 batches), so that a run's fixed
    cost (engine self-check, checkpoint loading, store creation) does not stand for its
    throughput; the 8-row warm-up's time is kept as ``warmup_s``, an upper bound of that cost.

    A warm-up on 8 rows (timed, to guess the size), sizing runs (repeated at a corrected size,
    at least twice the rows, while under 60% of the budget or under one ``step`` of rows, unless
    a run took 4x the budget; never past ``limit``), then the
    best of the last one and one more run at that size (a run over 2x the budget is kept
    alone). ``--quick``: the warm-up, then one run on
    ``start`` rows. ``prepare(rows)``, when given, runs untimed before each timed run.
    """
    res: dict[str, Any] = {"key": key}
    base = mem_reset()

    def timed(fn: Callable[[int], Any], rows: int) -> tuple[float, float, Any]:
        if prepare is not None:
            prepare(rows)
        return _timed(fn, rows)

    try:
        w = min(8, limit)
        t_w = timed(fn, w)[0]
        if opts.quick:
            rows = min(start, limit)
            secs, others, out = timed(fn, rows)
        else:
            rows = _size(w, t_w, opts.budget, limit, step)
            secs, others, out = timed(fn, rows)
            least = min(limit, max(step, floor))  # a fixed cost can fill the budget
            for _ in range(8):  # fixed costs make small runs look slow: grow at least 2x
                enough = secs >= 0.6 * opts.budget and (rows >= least or secs > 4 * opts.budget)
                if enough or rows >= limit:
                    break
                grown = _size(rows, secs, opts.budget, limit, step)
                rows = max(grown, min(limit, 2 * rows))
                secs, others, out = timed(fn, rows)
            if secs < 2 * opts.budget:
                again = timed(fn, rows)
                if again[0] < secs:
                    secs, others, out = again
    except Exception as exc:  # a path that cannot run this model: record why
        res["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        if os.environ.get("ZOO_DEBUG"):
            traceback.print_exc()
        print(f"    {key:<20} ERROR {res['error']}", flush=True)
        return res
    peak = _status_kb("VmHWM")
    res.update(rows=rows, seconds=secs, rate=rows * ckpts / secs, others=others, warmup_s=t_w)
    if peak is not None and base is not None:
        res.update(peak_mb=peak / 1024, mem_mb=max(0, peak - base) / 1024)
    if isinstance(out, np.ndarray):
        res["scores"] = out
    print(
        f"    {key:<20} rows {rows:>6} {res['rate']:>10.1f}/s  +{res.get('mem_mb', 0):.0f} MB",
        flush=True,
    )
    return res


# --- the paths ----------------------------------------------------------------------------------
@dataclass
class Ctx:
    spec: Spec
    model: nn.Module
    train: Batch
    query: Batch
    n: int
    paths: list[str]
    ckpts: tracin.Checkpoints
    tmp: Path

    def rows(self, n: int) -> Batch:
        return take(self.train, slice(0, n))


def train_step(ctx: Ctx) -> Callable[[int], None]:
    model = copy.deepcopy(ctx.model).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def fn(rows: int) -> None:
        for s in range(0, rows, TRAIN_BATCH):
            opt.zero_grad()
            batch = take(ctx.train, slice(s, min(s + TRAIN_BATCH, rows)))
            ctx.spec.loss(model, batch).mean().backward()  # type: ignore[no-untyped-call]
            opt.step()

    return fn


def forward(ctx: Ctx) -> Callable[[int], None]:
    model = ctx.model.eval()
    inputs = ctx.spec.captum(ctx.train)[:-1]

    def fn(rows: int) -> None:
        with torch.no_grad():
            for s in range(0, rows, 256):
                ctx.spec.forward(model, *(t[s : min(s + 256, rows)] for t in inputs))

    return fn


def exact(ctx: Ctx, **kw: Any) -> Callable[[int], np.ndarray]:
    def fn(rows: int) -> np.ndarray:
        run = tracin.featurize(
            ctx.model, ctx.spec.task(), ctx.ckpts, ctx.rows(rows), batch_size=ctx.spec.batch, **kw
        )
        return np.asarray(run.self_influence())

    return fn


def streamed(ctx: Ctx) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """``(fn, prepare)``: ``prepare(rows)`` builds the run (untimed), ``fn`` the query pass."""
    runs: dict[int, tracin.Run] = {}

    def prepare(rows: int) -> None:
        if rows not in runs:
            runs.clear()
            runs[rows] = tracin.featurize(
                ctx.model, ctx.spec.task(), ctx.ckpts, ctx.rows(rows), batch_size=ctx.spec.batch
            )

    def fn(rows: int) -> None:
        runs[rows].influence(ctx.query)

    return fn, prepare


def kron_store(ctx: Ctx) -> Callable[[int], None]:
    count = [0]

    def fn(rows: int) -> None:
        count[0] += 1
        folder = ctx.tmp / f"store_{count[0]}"
        tracin.featurize(
            ctx.model, ctx.spec.task(), ctx.ckpts, ctx.rows(rows), batch_size=ctx.spec.batch,
            store=folder, proj_dim=1024, projection="kronecker", max_store_gb=None,
        )  # fmt: skip

    return fn


class CaptumLoss(nn.Module):
    """A per-example loss with the ``reduction`` attribute Captum reads ("sum" or "none")."""

    def __init__(self, fn: PerExample, reduction: str) -> None:
        super().__init__()
        self.fn, self.reduction = fn, reduction

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per = self.fn(out, target)
        return per.sum() if self.reduction == "sum" else per


class CaptumNet(nn.Module):
    """``net`` called the way Captum calls models: ``forward(*inputs)`` -> output tensor."""

    def __init__(self, net: nn.Module, call: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.net, self.call = net, call

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.call(self.net, *inputs)


def _captum_load(model: nn.Module, path: str) -> float:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.net.load_state_dict(payload["model_state_dict"])  # type: ignore[union-attr]
    return float(payload["lr"])


def captum(ctx: Ctx, kind: str) -> Callable[[int], np.ndarray]:
    from captum.influence import TracInCP, TracInCPFast
    from torch.utils.data import TensorDataset

    tensors = ctx.spec.captum(ctx.train)
    layers = trainable_layers(ctx.model)

    def fn(rows: int) -> np.ndarray:
        net = CaptumNet(copy.deepcopy(ctx.model).eval(), ctx.spec.forward)
        data = TensorDataset(*(t[:rows] for t in tensors))
        bs = 1 if kind == "loop" else CAPTUM_BATCH  # a batch's loop re-runs its backward per row
        common: dict[str, Any] = dict(checkpoints_load_func=_captum_load, batch_size=bs)
        if kind != "fast_last" and layers:
            common["layers"] = layers
        if kind == "fast_last":
            loss = CaptumLoss(ctx.spec.captum_loss, "sum")
            inst: Any = TracInCPFast(
                net, f"net.{ctx.spec.final}", data, list(ctx.paths), loss_fn=loss, **common
            )
        else:  # "samplewise", "loop" (batch 1) or "loop_b64"
            wise = kind == "samplewise"
            loss = CaptumLoss(ctx.spec.captum_loss, "sum" if wise else "none")
            inst = TracInCP(
                net, data, list(ctx.paths), loss_fn=loss, sample_wise_grads_per_batch=wise, **common
            )
        scores: np.ndarray = inst.self_influence().detach().double().numpy()
        return scores

    return fn


def trainable_layers(model: nn.Module) -> list[str] | None:
    """Captum ``layers=``: None when every parameter trains, else the modules whose own
    parameters all train (Captum differentiates every parameter of the layers it is given)."""
    if all(p.requires_grad for p in model.parameters()):
        return None
    return [
        f"net.{k}" if k else "net"
        for k, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False))
        and all(p.requires_grad for p in m.parameters(recurse=False))
    ]


def relerr(a: np.ndarray | None, ref: np.ndarray | None) -> float | None:
    if a is None or ref is None:
        return None
    m = min(len(a), len(ref))
    if m == 0:
        return None
    a, ref = np.asarray(a[:m], np.float64), np.asarray(ref[:m], np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.max(np.abs(a - ref) / np.abs(ref).clip(1e-30)))


# --- one model (child process) ------------------------------------------------------------------
def make_checkpoints(model: nn.Module, root: Path) -> list[str]:
    """3 files: the model's weights plus a different 5%-of-rms Gaussian perturbation each."""
    gen = torch.Generator().manual_seed(1)
    paths = []
    for i, lr in enumerate(LRS):
        state: dict[str, torch.Tensor] = {}
        done: dict[
            int, torch.Tensor
        ] = {}  # tied tensors (one storage, several keys) perturbed once
        for k, v in model.state_dict().items():
            if v.is_floating_point() and v.data_ptr() in done:
                v = done[v.data_ptr()]
            elif v.is_floating_point():
                rms = float(v.double().pow(2).mean().sqrt()) or 1.0
                ptr = v.data_ptr()
                v = v + (0.05 * rms * torch.randn(v.shape, generator=gen)).to(v.dtype)
                done[ptr] = v
            state[k] = v.clone()
        path = root / f"ckpt_{i}.pt"
        torch.save({"model_state_dict": state, "lr": lr, "step": i}, path)
        paths.append(str(path))
    return paths


def bench_model(spec: Spec, quick: bool, budget: float | None, tmp: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = spec.build().to(spec.dtype).eval()
    n = spec.quick_rows if quick else spec.rows
    data = cast(spec.data(gen, n + QUERIES), spec.dtype)
    train, query = take(data, slice(0, n)), take(data, slice(n, None))
    params = sum(p.numel() for p in model.parameters())
    print(f"\n== {spec.name}: {spec.title}, {params:,} parameters, {n} rows", flush=True)
    paths = make_checkpoints(model, tmp)
    ckpts = tracin.Checkpoints.from_paths(paths, lr="lr")
    ctx = Ctx(spec, model, train, query, n, paths, ckpts, tmp)
    opts = Opts(budget or spec.budget, quick)
    bs, probe = spec.batch, min(n, 64)  # probe: the rows of a --quick run
    fl = min(n, 4 * bs, 512)  # tracin's paths and the train step: >= 4 batches (<= 512 rows)
    stream, prepare = streamed(ctx)
    res = [
        measure("train", train_step(ctx), n, probe, opts, ckpts=1, step=TRAIN_BATCH, floor=fl),
        measure("forward", forward(ctx), n, probe, opts, ckpts=1, step=256),
        measure("exact", exact(ctx), n, probe, opts, step=bs, floor=fl),
        measure("stream_q64", stream, n, probe, opts, step=bs, prepare=prepare, floor=fl),
        measure("kron_store", kron_store(ctx), n, probe, opts, step=bs, floor=fl),
        measure(
            "last_layer",
            exact(ctx, layers=[spec.final], projection="last_layer"),
            n,
            probe,
            opts,
            step=bs,
            floor=fl,
        ),
        measure("captum_fast_last", captum(ctx, "fast_last"), n, probe, opts, step=64),
        measure("captum_samplewise", captum(ctx, "samplewise"), n, probe, opts, step=64),
        measure("captum_loop", captum(ctx, "loop"), n, probe, opts, step=8),
        measure("captum_loop_b64", captum(ctx, "loop_b64"), n, probe, opts, step=64),
    ]
    by = {r["key"]: r for r in res}
    ref = by["exact"].get("scores")
    check = min(n, 64)
    try:
        weight_only: np.ndarray | None = exact(ctx, layers=[f"{spec.final}.weight"])(check)
    except tracin.TracInError:  # e.g. a tied output layer, which has no parameter of its own
        weight_only = None
    for r in res:
        scores = r.pop("scores", None)
        if r["key"].startswith("captum") and scores is not None:
            r["relerr"] = relerr(scores, weight_only if r["key"] == "captum_fast_last" else ref)
            r["correct"] = r["relerr"] is not None and r["relerr"] < spec.tol
    loop = by["captum_loop"].get("relerr")
    train_rate = by["train"].get("rate")
    for r in res:
        r["ratio_to_train"] = r["rate"] / train_rate if "rate" in r and train_rate else None
    return {
        "title": spec.title,
        "parameters": params,
        "rows": n,
        "batch": bs,
        "dtype": str(spec.dtype).replace("torch.", ""),
        "final": spec.final,
        "exact_vs_captum_loop": loop,
        "results": res,
        "targets": targets(by, spec),
    }


def targets(by: dict[str, dict[str, Any]], spec: Spec) -> list[dict[str, Any]]:
    """The issue-15 targets: ratio, goal, met / missed / n/a, and what bounds a miss."""

    def rate(key: str) -> float | None:
        return by.get(key, {}).get("rate")

    correct = {k: rate(k) for k in CAPTUM_TCP if by.get(k, {}).get("correct")}
    best_key = max(correct, key=lambda k: correct[k] or 0.0, default=None)
    fast_ok = bool(by["captum_fast_last"].get("correct"))
    train, fwd = rate("train"), rate("forward")

    def row(name: str, a: str, b: float | None, goal: float, note: str = "") -> dict[str, Any]:
        va = rate(a)
        ratio = None if va is None or b is None else va / b
        return {"target": name, "ratio": ratio, "goal": goal,
                "met": None if ratio is None else ratio >= goal, "note": note}  # fmt: skip

    cf = rate("captum_fast_last")
    bound = f"forward alone is {fwd / cf:.2f}x TracInCPFast" if fwd and cf else ""
    fwd_note = f"forward alone is {fwd / train:.2f}x the train step" if fwd and train else ""
    return [
        row("exact self-influence >= 0.67x train step", "exact", train, 0.67, fwd_note),
        row("exact self-influence >= 3x Captum fastest correct", "exact",
            correct.get(best_key) if best_key else None, 3.0,
            f"Captum: {best_key or 'no correct configuration'}"),
        row("Kronecker 1024 with a store >= 0.5x train step", "kron_store", train, 0.5),
        row("last layer >= 1.5x Captum TracInCPFast", "last_layer", cf if fast_ok else None,
            1.5, bound if fast_ok else "TracInCPFast failed or wrong here"),
    ]  # fmt: skip


def child(name: str, out: Path, quick: bool, budget: float | None, threads: int) -> int:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    spec = all_specs()[name]
    with tempfile.TemporaryDirectory() as tmp:
        report = bench_model(spec, quick, budget, Path(tmp))
    out.write_text(json.dumps(report, indent=1))
    return 0


# --- the driver ---------------------------------------------------------------------------------
def others_cores(seconds: float = 2.0) -> float:
    """Cores other processes used over ``seconds`` (this process sleeps meanwhile)."""
    return _timed(time.sleep, seconds)[1]  # type: ignore[arg-type]


def wait_quiet(quiet: float, max_load: float, max_wait: float) -> dict[str, Any]:
    t0, others = time.perf_counter(), others_cores()
    while (others > quiet or os.getloadavg()[0] > max_load) and time.perf_counter() - t0 < max_wait:
        print(f"  waiting: others {others:.2f} cores, load {os.getloadavg()[0]:.2f}", flush=True)
        time.sleep(10)
        others = others_cores()
    return {"waited_s": round(time.perf_counter() - t0 - 2, 1), "others_before": others,
            "load_before": os.getloadavg()[0]}  # fmt: skip


def run_child(name: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    out = folder / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-out", str(out),
           "--threads", str(args.threads)]  # fmt: skip
    if args.quick:
        cmd.append("--quick")
    if args.budget:
        cmd += ["--budget", str(args.budget)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=args.timeout, check=False)
        error = None if proc.returncode == 0 else f"child exited with {proc.returncode}"
    except subprocess.TimeoutExpired:
        error = f"timed out after {args.timeout} s"
    report = json.loads(out.read_text()) if out.exists() and error is None else {"error": error}
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    return report


def _f(v: Any, spec: str = ".0f") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return format(v, spec) if isinstance(v, float | int) else str(v)


def _max_others(model: dict[str, Any]) -> float | None:
    """Most cores other processes took during any kept timed run of the model (None: none)."""
    seen = [r["others"] for r in model.get("results", []) if r.get("others") is not None]
    seen = [v for v in seen if np.isfinite(v)]
    return max(seen) if seen else None


PATHS = ("forward", "exact", "stream_q64", "kron_store", "last_layer")
CAPTUMS = ("captum_fast_last", *CAPTUM_TCP)


def markdown(report: dict[str, Any]) -> str:
    meta, models = report["meta"], report["models"]
    lines = [
        "# Zoo engines: tracin paths vs the training step and Captum",
        "",
        f"Reproduce: `{meta['command']}` ({meta['date']}, {meta['machine']}, torch "
        f"{meta['torch']}, captum {meta['captum']}, transformers {meta['transformers']}, "
        f"{meta['threads']} threads, {meta['seconds']} s in all).",
        "",
        "Rates: checkpoint-examples/s (3 checkpoints); train and forward: examples/s. Cells "
        "`rate (x train)`. Captum cells: rate, and `!` when the configuration is wrong on this "
        "model (rel. err vs tracin exact >= 1e-3). `peak +MB`: peak resident set above the one "
        "at the path's start (VmHWM reset per path). `load`: 1-minute load average before / "
        "after the model's process; `oth`: cores other processes used just before it / at most "
        "during one of its timed runs (runs under 0.25 s not counted).",
        "",
        "| model | params | train /s | " + " | ".join(PATHS) + " | Captum fast-last | Captum "
        "sample-wise | Captum loop b1 | Captum loop b64 | exact vs loop err | load | oth |",
        "|---|---:|---:|" + "---:|" * (len(PATHS) + 4) + "---:|---|---:|",
    ]
    for name, m in models.items():
        if "results" not in m:
            continue
        by = {r["key"]: r for r in m["results"]}

        def cell(key: str, by: dict[str, Any] = by) -> str:
            r = by.get(key, {})
            if "rate" not in r:
                return "err"
            bad = "!" if r.get("correct") is False else ""
            return f"{r['rate']:.0f}{bad} ({_f(r.get('ratio_to_train'), '.2f')})"

        run = m.get("run", {})
        lines.append(
            f"| {name} | {m['parameters']:,} | {_f(by['train'].get('rate'))} | "
            + " | ".join(cell(k) for k in (*PATHS, *CAPTUMS))
            + f" | {_f(m.get('exact_vs_captum_loop'), '.0e')} | "
            f"{_f(run.get('load_before'), '.2f')} / {_f(run.get('load_after'), '.2f')} | "
            f"{_f(run.get('others_before'), '.2f')} / {_f(_max_others(m), '.2f')} |"
        )
    lines += ["", "Targets (ratio / goal; **bold** = missed):", "",
              "| model | exact >= 0.67x train | exact >= 3x Captum | Kronecker store >= 0.5x "
              "train | last layer >= 1.5x TracInCPFast | notes |",
              "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, m in models.items():
        if "targets" not in m:
            continue
        cells, notes = [], []
        for t in m["targets"]:
            v = _f(t["ratio"], ".2f")
            cells.append(f"**{v}**" if t["met"] is False else v if t["met"] else "n/a")
            if t["note"] and t["met"] is not True:
                notes.append(t["note"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'; '.join(notes)} |")
    lines += ["", "Peak memory, +MB above the path's start (process peak MB in brackets):", "",
              "| model | train | " + " | ".join((*PATHS, *CAPTUMS)) + " |",
              "|---|" + "---:|" * (len(PATHS) + len(CAPTUMS) + 1)]  # fmt: skip
    for name, m in models.items():
        if "results" not in m:
            continue
        by = {r["key"]: r for r in m["results"]}
        lines.append(f"| {name} | " + " | ".join(
            f"{_f(by.get(k, {}).get('mem_mb'))} ({_f(by.get(k, {}).get('peak_mb'))})"
            for k in ("train", *PATHS, *CAPTUMS)) + " |")  # fmt: skip
    skipped = [(k, m) for k, m in models.items() if "results" not in m]
    if skipped:
        lines += ["", "Not measured:", ""]
        lines += [f"- {k}: {m.get('skipped') or m.get('error')}" for k, m in skipped]
    errors = [(k, r) for k, m in models.items() for r in m.get("results", []) if "error" in r]
    if errors:
        lines += ["", "Path errors:", ""]
        lines += [f"- {k} / {r['key']}: {r['error']}" for k, r in errors]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="model names (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads per model")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, probe runs only")
    parser.add_argument("--budget", type=float, default=None, help="seconds per timed run")
    parser.add_argument(
        "--quiet-cores",
        type=float,
        default=0.3,
        help="wait until other processes use fewer cores than this",
    )
    parser.add_argument(
        "--max-load",
        type=float,
        default=2.5,
        help="... and the 1-minute load average is below this",
    )
    parser.add_argument("--max-wait", type=float, default=120.0, help="seconds, per model")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model process")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default benchmarks/results; --quick: a temp dir)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)  # fmt: skip
    if args.child:
        return child(args.child, args.child_out, args.quick, args.budget, args.threads)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    specs = all_specs()
    names = args.models or list(specs)
    unknown = sorted(set(names) - set(specs))
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(specs)}")
    import captum

    meta = {
        "command": "python benchmarks/zoo_engines.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "captum": captum.__version__,
        "transformers": _version("transformers"), "threads": args.threads, "quick": args.quick,
    }  # fmt: skip
    t0 = time.perf_counter()
    models: dict[str, Any] = {}
    for name in names:
        refusal = fast_path_refusal(specs[name]) if name not in EXTRA else None
        if refusal:
            models[name] = {
                "skipped": f"not on the fast path (engine='factored' refuses: {refusal})"
            }
            continue
        with tempfile.TemporaryDirectory() as folder:
            run = wait_quiet(args.quiet_cores, args.max_load, args.max_wait)
            models[name] = run_child(name, args, Path(folder))
            run["load_after"] = os.getloadavg()[0]
            models[name]["run"] = run
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    report = {"meta": meta, "models": models}
    text = markdown(report)
    print("\n" + text)
    out = args.out or (
        Path(tempfile.gettempdir()) / "tracin_zoo_engines" if args.quick else RESULTS
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo_engines.json").write_text(json.dumps(report, indent=1))
    (out / "zoo_engines.md").write_text(text)
    print(f"wrote {out / 'zoo_engines.json'} and {out / 'zoo_engines.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
