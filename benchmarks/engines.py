"""Engines: tracin's gradient engines against Captum and dattri, side by side in one process.

Throughput in checkpoint-examples per second (examples x checkpoints / seconds) on this machine's
CPU (``torch.set_num_threads(2)``), 3 checkpoints (files ``{"model_state_dict", "lr", "step"}``:
random perturbations of a briefly trained model, lr 0.1, 0.1, 0.01), on:

- ``democnn``: `tracin._demo.DemoCNN` (~10k parameters) on scikit-learn's digits (8x8), the 1797
  images repeated 4 times;
- ``cnn28``: a ~0.83M-parameter CNN on the digits upsampled to 28x28;
- ``text_mha``: an nn.Embedding (5000 x 128) + 2-layer nn.TransformerEncoder text classifier
  (~1.04M parameters, mean-pooled over the padding mask) on synthetic token sequences of length
  48. nn.MultiheadAttention holds a raw ``in_proj_weight`` and LayerNorm weights, so
  ``engine="auto"`` takes torch.func for all parameters;
- ``text_linear``: the same shape written with nn.Linear q/k/v/o and affine-free LayerNorm, so
  every parameter sits in a Linear or Embedding and the factored (hook) engine covers it all.

For each model (every rate also as a ratio to the training step):

- ``train``: forward + backward + SGD step, batch 64 (examples/s): the floor; and a no-grad
  forward pass (what a last-layer method is bound by);
- ``tracin exact``: ``tracin.featurize(...)`` then ``run.self_influence()`` (no store, no
  projection: streaming exact squared norms), engines functional and factored (``auto`` is one
  of them: factored when every parameter is hookable), batch 64, 128 (small models) and 256,
  best shown; plus auto fed in-memory tensors instead of a TensorDataset;
- ``captum fast``: ``TracInCP(sample_wise_grads_per_batch=True,
  loss_fn=CrossEntropyLoss(reduction="sum"), batch_size=64)``; ``captum default``: batch_size=1,
  per-example loop (``reduction="none"``), on at most 256 rows; both with a loader that returns
  the file's lr;
- ``last layer``: tracin ``layers=[final], projection="last_layer"`` against Captum
  ``TracInCPFast(final_fc_layer=final, batch_size=64)``;
- ``projected``: tracin ``proj_dim=1024`` with ``projection="kronecker"`` (per layer 32 x 32,
  only where every parameter is hookable; at the exact engine's best batch size) and dense
  ``"gaussian"`` (batch 64), timing featurize; against
  dattri ``TracInAttributor.self_attribute`` without projection and with its default 512;
- ``PROTOTYPE``: a faster ``FactoredEngine.sqnorms`` streaming loop, built in this file from
  tracin's hook helpers: hooks on every Linear/Conv/Embedding layer the forward pass actually
  calls, torch.func for the rest, in-memory slicing, float32 products accumulated in float64
  with the bias apart (no ones column), embedding norms from a (T x T) Gram of equal indices,
  convolution weight gradients from one grouped ``conv2d_weight``; with ``kron`` the Kronecker
  features too (a convolution's input projection done as a convolution). Ablation: ``unfold``
  keeps F.unfold for convolutions (then the per-layer maths is what tracin's ``_hooks`` does
  since commit 57cd331, so the gap to ``tracin exact`` is the grouped convolution alone).

Each figure: an untimed warm-up, a probe run (one batch) that sizes ``rows`` so one run takes
about ``--budget`` seconds (capped by the dataset size), then best of 2 runs; a method slower
than the budget on its probe is timed by that one run. Correctness: every exact self-influence
is compared, on the rows both computed, with Captum's per-example loop (plain autograd, one
example at a time): the maximum elementwise relative error. The last layer is compared with
Captum TracInCP restricted to the final layer (sample-wise trick, exact for a Linear layer).
The load of other processes on the machine is recorded; ``--wait-load`` waits for a quiet one.

    python benchmarks/engines.py --wait-load 1.5 --wait-quiet 300   # as in results/engines.md
    python benchmarks/engines.py --quick          # smoke run, under a minute on a quiet machine
    python benchmarks/engines.py --models cnn28 --merge   # re-measure one model, keep the rest
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri prints a progress bar per batch

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

import tracin
from tracin._demo import DemoCNN
from tracin._engine import _flatten, functional_model
from tracin._hooks import _capture, _Layer, _positions, supported_layers
from tracin._params import eval_mode, fit_state, select_parameters
from tracin._projection import checkpoint_key

RESULTS = Path(__file__).resolve().parent / "results"
LRS = (0.1, 0.1, 0.01)
THREADS = 2
PAD = 0
SEQ = 48
VOCAB = 5000
TRAIN_BATCH = 64
TASK = tracin.ClassificationTask()
OTHERS_MAX = 0.25  # cores other processes may take during a timed run before it is retried
RETRIES = 3  # retries per measurement
RETRY_PER_MODEL = 60.0  # wall time all retries of one model's figures may take together
RETRY_SECONDS = {"left": RETRY_PER_MODEL}
SMOKE: dict[str, int] = {}  # --quick: {"probe": rows} caps every probe and times one run


# --- models and data ----------------------------------------------------------------------------
class Cnn28(nn.Module):
    """~0.83M parameters for 28x28 images (most of them in fc1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = F.max_pool2d(torch.relu(self.conv2(h)), 2)
        h = F.max_pool2d(torch.relu(self.conv3(h)), 2)
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def _pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = (~mask).unsqueeze(-1).to(h.dtype)
    return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)


class TextMHA(nn.Module):
    """Embedding + nn.TransformerEncoder (2 layers, d_model 128), mean-pooled, Linear head."""

    def __init__(self, d: int = 128, heads: int = 4, ff: int = 512, classes: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d, padding_idx=PAD)
        self.pos = nn.Embedding(SEQ, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens == PAD
        pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        h = self.encoder(self.tok(tokens) + self.pos(pos), src_key_padding_mask=mask)
        return self.head(_pool(h, mask))


class Block(nn.Module):
    """Pre-norm encoder block with nn.Linear q/k/v/o and affine-free LayerNorm."""

    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.n1 = nn.LayerNorm(d, elementwise_affine=False)
        self.n2 = nn.LayerNorm(d, elementwise_affine=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n1(x)

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        att = F.scaled_dot_product_attention(
            split(self.q(h)), split(self.k(h)), split(self.v(h)), attn_mask=~mask[:, None, None]
        )
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.ff2(F.gelu(self.ff1(self.n2(x))))


class TextLinear(nn.Module):
    """`TextMHA`'s shape, every weight in an nn.Linear or nn.Embedding (all hookable)."""

    def __init__(self, d: int = 128, heads: int = 4, ff: int = 512, classes: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d, padding_idx=PAD)
        self.pos = nn.Embedding(SEQ, d)
        self.blocks = nn.ModuleList(Block(d, heads, ff) for _ in range(2))
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens == PAD
        pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        h = self.tok(tokens) + self.pos(pos)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(_pool(self.norm(h), mask))


def digits(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits, upsampled to ``size`` x ``size``, repeated up to ``n`` rows."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    reps = -(-n // len(y))
    return x.repeat(reps, 1, 1, 1)[:n].contiguous(), y.repeat(reps)[:n].contiguous()


def text(n: int, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens, lengths 16..48 (right-padded with 0), one class marker token planted."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(SEQ // 3, SEQ + 1, (n,), generator=gen)
    tokens = torch.randint(1, VOCAB, (n, SEQ), generator=gen)
    tokens[torch.arange(SEQ)[None, :] >= lengths[:, None]] = PAD
    y = torch.randint(0, classes, (n,), generator=gen)
    where = (torch.rand(n, generator=gen) * lengths).long()
    tokens[torch.arange(n), where] = 1 + y * 10 + torch.randint(0, 10, (n,), generator=gen)
    return tokens, y


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    build: Callable[[], nn.Module]
    data: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    n: int
    quick_n: int
    final: str


SPECS = {
    "democnn": Spec(
        "democnn", "DemoCNN, digits 8x8", DemoCNN, lambda n: digits(n, 8), 4 * 1797, 1024, "fc2"
    ),
    "cnn28": Spec(
        "cnn28", "CNN ~0.8M, digits 28x28", Cnn28, lambda n: digits(n, 28), 2048, 256, "fc2"
    ),
    "text_mha": Spec(
        "text_mha", "nn.TransformerEncoder text, ~1M", TextMHA, text, 1536, 256, "head"
    ),
    "text_linear": Spec(
        "text_linear", "Linear-q/k/v encoder text, ~1M", TextLinear, text, 1536, 256, "head"
    ),
}


# --- timing -------------------------------------------------------------------------------------
@dataclass
class Result:
    key: str
    label: str
    group: str
    batch: int | None = None
    rows: int = 0
    seconds: float = float("nan")
    rate: float = float("nan")  # checkpoint-examples per second (examples/s for train)
    runs: int = 0
    note: str = ""
    error: str | None = None
    scores: np.ndarray | None = field(default=None, repr=False)
    relerr: float | None = None
    others: float | None = None  # cores other processes used during the kept run

    def to_json(self, train_rate: float) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "scores"}
        out["ratio_to_train"] = self.rate / train_rate if self.error is None else None
        for k, v in list(out.items()):
            if isinstance(v, float) and not np.isfinite(v):
                out[k] = None
        return out


def _cpu_snapshot() -> tuple[float, float, float]:
    """Wall clock, CPU seconds the whole machine has been busy, CPU seconds of this process."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = float("nan")
    return time.perf_counter(), busy, time.process_time()


def timed(fn: Callable[[int], Any], rows: int) -> tuple[float, float, Any]:
    """``(seconds, cores other processes used meanwhile, result)`` of one call."""
    w0, b0, p0 = _cpu_snapshot()
    out = fn(rows)
    w1, b1, p1 = _cpu_snapshot()
    secs = w1 - w0
    if secs < 0.25:  # /proc/stat counts 10 ms ticks: too coarse to tell
        return secs, float("nan"), out
    return secs, max(0.0, (b1 - b0) - (p1 - p0)) / secs, out


def timed_clean(
    fn: Callable[[int], Any], rows: int, retries: list[int]
) -> tuple[float, float, Any]:
    """`timed`, run again (after a pause) while other processes took > OTHERS_MAX cores.

    ``retries`` is a one-element budget shared by one measurement. Keeps the fastest run among
    the clean ones, else the fastest of all.
    """
    runs = []
    while True:
        secs, others, out = timed(fn, rows)
        runs.append((bool(others > OTHERS_MAX), secs, others))
        if others <= OTHERS_MAX or retries[0] <= 0 or secs + 3 > RETRY_SECONDS["left"]:
            break
        retries[0] -= 1
        RETRY_SECONDS["left"] -= secs + 3
        time.sleep(3.0)
    _, secs, others = min(runs)
    return secs, others, out


def measure(
    fn: Callable[[int], Any],
    n: int,
    probe: int,
    budget: float,
    step: int,
    ckpts: int = len(LRS),
    repeats: int = 2,
    cap: int | None = None,
    warmup: int = 0,
) -> tuple[int, float, int, float, Any]:
    """Time ``fn(rows)``: a probe on ``probe`` rows, then ``repeats`` runs of ~``budget`` s.

    ``warmup`` rows are run first, untimed. A probe slower than the budget is the measurement
    (one run: for methods that take seconds a batch, whose first-call cost is negligible);
    otherwise ``rows`` is sized from the probe's rate and the fastest of ``repeats`` runs is kept.
    A run during which other processes used more than ``OTHERS_MAX`` cores is repeated (up to
    ``RETRIES`` times per measurement, ``RETRY_SECONDS`` in all).
    Returns ``(rows, seconds, timed runs, others, result)``.
    """
    limit = min(n, cap or n)
    probe = min(probe, limit, SMOKE.get("probe", limit))
    retries = [0 if SMOKE else RETRIES]
    if SMOKE:
        repeats, warmup = 0, 0
    if warmup:
        fn(min(warmup, limit))
    t_probe, others, out = timed(fn, probe)
    if t_probe >= budget or repeats == 0:
        if others > OTHERS_MAX and retries[0] > 0 and t_probe + 3 < RETRY_SECONDS["left"]:
            retries[0] -= 1
            RETRY_SECONDS["left"] -= t_probe + 3
            time.sleep(3.0)
            again = timed(fn, probe)
            if again[0] < t_probe:
                t_probe, others, out = again
        return probe, t_probe, 1, others, out
    rows = int(min(limit, probe * budget / max(t_probe, 1e-6)))
    rows = max(probe, rows // step * step if rows < limit else limit)
    best = (float("inf"), float("nan"))
    for _ in range(repeats):
        secs, others, out = timed_clean(fn, rows, retries)
        if secs < best[0]:
            best = (secs, others)
    return rows, best[0], repeats, best[1], out


def run_measure(
    res: Result, fn: Callable[[int], Any], n: int, probe: int, budget: float, **kw: Any
) -> Result:
    ckpts = kw.get("ckpts", len(LRS))
    try:
        rows, secs, runs, others, out = measure(fn, n, probe, budget, **kw)
    except Exception as exc:  # a library that cannot run this model: record why
        res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:240]}"
        print(f"    {res.label}: ERROR {res.error}", flush=True)
        if os.environ.get("ENGINES_DEBUG"):
            traceback.print_exc()
        return res
    res.rows, res.seconds, res.runs, res.others = rows, secs, runs, others
    res.rate = rows * ckpts / secs
    if isinstance(out, np.ndarray):
        res.scores = out
    print(
        f"    {res.label:<46} batch {res.batch!s:>4} rows {rows:>5}  {res.rate:9.1f}/s"
        f"  (others {_fmt(others, '.2f')} cores)",
        flush=True,
    )
    return res


# --- the libraries ------------------------------------------------------------------------------
@dataclass
class Ctx:
    spec: Spec
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    paths: list[str]
    ckpts: tracin.Checkpoints

    def dataset(self, rows: int) -> TensorDataset:
        return TensorDataset(self.x[:rows], self.y[:rows])

    def tensors(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[:rows], self.y[:rows]


def _captum_load(model: nn.Module, path: str) -> float:
    """Captum ``checkpoints_load_func``: load the weights in place, return the file's lr."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model_state_dict"])
    return float(payload["lr"])


def tracin_exact(ctx: Ctx, engine: str, bs: int, in_memory: bool = False) -> Callable[[int], Any]:
    def fn(rows: int) -> np.ndarray:
        data = ctx.tensors(rows) if in_memory else ctx.dataset(rows)
        run = tracin.featurize(ctx.model, TASK, ctx.ckpts, data, batch_size=bs, engine=engine)
        return run.self_influence()

    return fn


def tracin_last_layer(ctx: Ctx, bs: int) -> Callable[[int], Any]:
    def fn(rows: int) -> np.ndarray:
        run = tracin.featurize(
            ctx.model,
            TASK,
            ctx.ckpts,
            ctx.dataset(rows),
            batch_size=bs,
            layers=[ctx.spec.final],
            projection="last_layer",
        )
        return run.self_influence()

    return fn


def tracin_projected(ctx: Ctx, kind: str, bs: int, engine: str = "auto") -> Callable[[int], Any]:
    def fn(rows: int) -> np.ndarray:
        run = tracin.featurize(
            ctx.model,
            TASK,
            ctx.ckpts,
            ctx.dataset(rows),
            batch_size=bs,
            proj_dim=1024,
            projection=kind,
            engine=engine,
        )
        return run.self_influence()

    return fn


def captum_tracincp(
    ctx: Ctx, fast: bool, bs: int, layers: list[str] | None = None
) -> Callable[[int], Any]:
    from captum.influence import TracInCP

    def fn(rows: int) -> np.ndarray:
        if fast:
            kw: dict[str, Any] = dict(
                sample_wise_grads_per_batch=True, loss_fn=nn.CrossEntropyLoss(reduction="sum")
            )
        else:
            kw = dict(loss_fn=nn.CrossEntropyLoss(reduction="none"))
        inst = TracInCP(
            copy.deepcopy(ctx.model),
            ctx.dataset(rows),
            list(ctx.paths),
            checkpoints_load_func=_captum_load,
            batch_size=bs,
            layers=layers,
            **kw,
        )
        return inst.self_influence().detach().numpy().astype(np.float64)

    return fn


def captum_fast_last_layer(ctx: Ctx, bs: int) -> Callable[[int], Any]:
    from captum.influence import TracInCPFast

    def fn(rows: int) -> np.ndarray:
        inst = TracInCPFast(
            copy.deepcopy(ctx.model),
            ctx.spec.final,
            ctx.dataset(rows),
            list(ctx.paths),
            checkpoints_load_func=_captum_load,
            loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            batch_size=bs,
        )
        return inst.self_influence().detach().numpy().astype(np.float64)

    return fn


def dattri_tracin(ctx: Ctx, project: bool, bs: int) -> Callable[[int], Any]:
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    model = copy.deepcopy(ctx.model).eval()

    def loss_func(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...]) -> Any:
        xb, yb = data
        out = functional_call(model, params, (xb.unsqueeze(0),))
        return F.cross_entropy(out, yb.unsqueeze(0))

    def load(m: nn.Module, path: str) -> nn.Module:
        m.load_state_dict(
            torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]
        )
        return m.eval()

    def fn(rows: int) -> np.ndarray:
        task = AttributionTask(
            loss_func=loss_func,
            model=model,
            checkpoints=list(ctx.paths),
            checkpoints_load_func=load,
        )
        # no projector_kwargs: dattri's default (dim 512); passing a dict would mutate its
        # module-level default for every later instance
        attr = TracInAttributor(
            task=task, weight_list=torch.tensor(LRS), normalized_grad=False, device="cpu"
        )
        if not project:
            attr.projector_kwargs = None  # the only way to turn its projection off
        loader = DataLoader(ctx.dataset(rows), batch_size=bs, shuffle=False)
        return attr.self_attribute(loader).detach().numpy().astype(np.float64)

    return fn


# --- the prototype: sqnorm-only streaming -------------------------------------------------------
def _layer_sqnorm(a: torch.Tensor, d: torch.Tensor, bias: bool, emb: int | None) -> torch.Tensor:
    """``||sum_t d_t [a_t, 1]^T||^2`` per example: float32 products, float64 accumulation."""
    f64 = torch.float64
    if emb is not None:  # rows of G sum d over equal indices: sum_{t,s} [i_t = i_s] <d_t, d_s>
        same = (a.unsqueeze(2) == a.unsqueeze(1)).to(d.dtype)
        return (torch.bmm(d, d.transpose(1, 2)) * same).sum((1, 2), dtype=f64)
    t, n_in, n_out = a.shape[1], a.shape[2] + bias, d.shape[2]
    if t == 1:
        sa = a.pow(2).sum((1, 2), dtype=f64) + float(bias)
        return sa * d.pow(2).sum((1, 2), dtype=f64)
    if t * t * (n_in + n_out) < t * n_in * n_out:  # Gram matrices over positions
        ga = torch.bmm(a, a.transpose(1, 2))
        if bias:
            ga += 1.0
        return (ga * torch.bmm(d, d.transpose(1, 2))).sum((1, 2), dtype=f64)
    out = torch.bmm(d.transpose(1, 2), a).pow(2).sum((1, 2), dtype=f64)
    if bias:
        out += d.sum(1).pow(2).sum(1, dtype=f64)
    return out


class ProtoSqnorms:
    """Exact per-example squared gradient norms only, no feature matrix (see module docstring).

    Layers the forward pass never calls (nn.MultiheadAttention's ``out_proj``, whose weight it
    uses functionally) go to torch.func with the other unhookable parameters instead of failing.
    """

    def __init__(
        self,
        model: nn.Module,
        probe: tuple[torch.Tensor, ...],
        kron: bool,
        unfold: bool = False,
    ) -> None:
        self.model = model
        self.unfold = unfold  # ablation: convolutions through F.unfold as tracin does now
        names = select_parameters(model, None)
        layers, _ = supported_layers(model, names)
        with torch.no_grad(), _capture(layers):
            TASK.train_loss(model, probe)
        self.layers = [
            _Layer(lay.name, lay.module, i, lay.weight, lay.bias)
            for i, lay in enumerate(lay for lay in layers if lay.inputs)
        ]
        for lay in layers:
            lay.inputs.clear()
            lay.outputs.clear()
        hooked = {n for lay in self.layers for n in (lay.weight, lay.bias) if n}
        self.hooked = hooked
        self.rest = [n for n in names if n not in hooked]
        self.kron = kron
        if kron and self.rest:
            raise ValueError(f"kronecker needs every parameter hookable; not: {self.rest[:3]}")
        self._mats: dict[tuple[int, int, int], torch.Tensor] = {}

    def _matrix(self, key: tuple[int, int, int], rows: int) -> torch.Tensor:
        if key not in self._mats:
            gen = torch.Generator().manual_seed(hash(key) & 0x7FFFFFFF)
            self._mats[key] = torch.randn(rows, 32, generator=gen) / 32**0.5
        return self._mats[key]

    def _rest_sqnorm(self, weights: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        params = {n: weights[n] for n in self.rest}
        frozen = {n: w for n, w in weights.items() if n not in params}
        leaves, rebuild = _flatten(batch)

        def one(p: dict[str, torch.Tensor], *row: torch.Tensor) -> torch.Tensor:
            single = rebuild([t.unsqueeze(0) for t in row])
            return TASK.train_loss(functional_model(self.model, {**frozen, **p}), single)[0]

        grads = vmap(grad(one), in_dims=(None, *([0] * len(leaves))))(params, *leaves)
        n = leaves[0].shape[0]
        return sum(g.reshape(n, -1).pow(2).sum(1, dtype=torch.float64) for g in grads.values())

    def _linear(
        self, lay: _Layer, grads: Sequence[torch.Tensor], ckpt: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Linear / Embedding: a and d per position, no ones column, no float64 copies."""
        a_parts, d_parts = [], []
        for x, g in zip(lay.inputs, grads, strict=True):
            a, d = _positions(lay, x, g)
            a_parts.append(a)
            d_parts.append(d)
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, 1)
        d = d_parts[0] if len(d_parts) == 1 else torch.cat(d_parts, 1)
        emb = lay.module.num_embeddings if isinstance(lay.module, nn.Embedding) else None
        pad = getattr(lay.module, "padding_idx", None)
        if pad is not None:
            d = d * (a != pad).unsqueeze(-1).to(d.dtype)
        bias = lay.bias is not None
        sq = _layer_sqnorm(a, d, bias, emb)
        if not self.kron:
            return sq, None
        n_in = emb if emb is not None else a.shape[-1] + bias
        p_in = self._matrix((ckpt, lay.index, 0), n_in)
        p_out = self._matrix((ckpt, lay.index, 1), d.shape[-1])
        if emb is not None:
            a_proj = p_in[a]
        else:
            a_proj = a @ p_in[: a.shape[-1]]
            if bias:
                a_proj = a_proj + p_in[-1]
        return sq, torch.bmm((d @ p_out).transpose(1, 2), a_proj).flatten(1)

    def _conv(
        self, lay: _Layer, grads: Sequence[torch.Tensor], ckpt: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conv2d: per-example weight gradients by one grouped convolution_backward (no unfold).

        With ``kron``, the input-side projection of the unfolded patches is itself a
        convolution with ``P_in`` as its kernel: no unfold there either.
        """
        mod = lay.module
        assert isinstance(mod, nn.Conv2d)
        weight = mod.weight
        c_out, c_in, kh, kw = weight.shape
        gw: torch.Tensor | None = None
        gb: torch.Tensor | None = None
        a_proj: list[torch.Tensor] = []
        d_proj: list[torch.Tensor] = []
        pad = tuple(int(p) for p in mod.padding)  # type: ignore[union-attr]
        for x, g in zip(lay.inputs, grads, strict=True):
            b = x.shape[0]
            part = torch.nn.grad.conv2d_weight(
                x.reshape(1, b * c_in, *x.shape[2:]),
                (b * c_out, c_in, kh, kw),
                g.reshape(1, b * c_out, *g.shape[2:]),
                mod.stride,
                pad,
                mod.dilation,
                groups=b,
            ).reshape(b, -1)
            gw = part if gw is None else gw + part
            if lay.bias is not None:
                gsum = g.sum((2, 3))
                gb = gsum if gb is None else gb + gsum
            if self.kron:
                n_in = c_in * kh * kw
                p_in = self._matrix((ckpt, lay.index, 0), n_in + (lay.bias is not None))
                kernel = p_in[:n_in].T.reshape(-1, c_in, kh, kw)
                bias_row = p_in[-1] if lay.bias is not None else None
                ap = F.conv2d(x, kernel, bias_row, mod.stride, pad, mod.dilation)
                a_proj.append(ap.flatten(2).transpose(1, 2))
                p_out = self._matrix((ckpt, lay.index, 1), c_out)
                d_proj.append(g.flatten(2).transpose(1, 2) @ p_out)
        assert gw is not None
        sq = gw.pow(2).sum(1, dtype=torch.float64)
        if gb is not None:
            sq += gb.pow(2).sum(1, dtype=torch.float64)
        if not self.kron:
            return sq, None
        ap_all, dp_all = torch.cat(a_proj, 1), torch.cat(d_proj, 1)
        return sq, torch.bmm(dp_all.transpose(1, 2), ap_all).flatten(1)

    def batch(
        self, weights: dict[str, torch.Tensor], batch: Any, ckpt: int
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        params = {
            n: w.detach().requires_grad_(n in self.hooked) if w.is_floating_point() else w
            for n, w in weights.items()
        }
        with torch.enable_grad(), _capture(self.layers):
            out = TASK.train_loss(functional_model(self.model, params), batch)
            outputs = [o for lay in self.layers for o in lay.outputs]
            grads = torch.autograd.grad(out.sum(), outputs)
        sq = torch.zeros(out.shape[0], dtype=torch.float64)
        feats, i = [], 0
        for lay in self.layers:
            calls = len(lay.inputs)
            if isinstance(lay.module, nn.Conv2d) and not self.unfold:
                sq_l, f = self._conv(lay, grads[i : i + calls], ckpt)
            else:
                sq_l, f = self._linear(lay, grads[i : i + calls], ckpt)
            i += calls
            sq += sq_l
            if f is not None:
                feats.append(f)
        if self.rest:
            sq += self._rest_sqnorm(weights, batch)
        return sq, feats


def proto_self_influence(
    ctx: Ctx, bs: int, kron: bool = False, unfold: bool = False
) -> Callable[[int], Any]:
    proto = ProtoSqnorms(ctx.model, ctx.tensors(2), kron, unfold)

    def fn(rows: int) -> np.ndarray:
        x, y = ctx.tensors(rows)
        norms = []
        with eval_mode(ctx.model):
            for ckpt in ctx.ckpts:
                weights = fit_state(ctx.model, ckpt.state_dict(), ckpt.id)
                key = checkpoint_key(ckpt.id)
                parts = []
                for s in range(0, rows, bs):
                    sq, feats = proto.batch(weights, (x[s : s + bs], y[s : s + bs]), key)
                    if not bool(torch.isfinite(sq).all()):
                        raise ValueError("non-finite gradients")
                    if feats:
                        np.concatenate([f.numpy() for f in feats], axis=1)  # as a store would
                    parts.append(sq.numpy())
                norms.append(np.concatenate(parts))
        return sum(lr * s for lr, s in zip(LRS, norms, strict=True))

    return fn


# --- one model ----------------------------------------------------------------------------------
def train_rate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, budget: float, quick: bool
) -> Result:
    """SGD (lr 0.05) on the data; timed as the floor. The model keeps the training."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()

    def fn(rows: int) -> None:
        for s in range(0, rows, TRAIN_BATCH):
            opt.zero_grad()
            F.cross_entropy(model(x[s : s + TRAIN_BATCH]), y[s : s + TRAIN_BATCH]).backward()
            opt.step()

    res = Result("train", "train step (fwd+bwd+SGD)", "train", batch=TRAIN_BATCH)
    fn(4 * TRAIN_BATCH)  # the first optimiser steps of a process are slow (lazy imports)
    run_measure(
        res,
        fn,
        len(y),
        4 * TRAIN_BATCH,
        budget,
        step=TRAIN_BATCH,
        ckpts=1,
        repeats=2 if quick else 3,
        warmup=4 * TRAIN_BATCH,
    )
    model.eval()
    return res


def forward_rate(model: nn.Module, x: torch.Tensor, budget: float) -> Result:
    """Forward pass only, eval mode, no grad, batch 256: what a last-layer method is bound by."""

    def fn(rows: int) -> None:
        with torch.no_grad():
            for s in range(0, rows, 256):
                model(x[s : s + 256])

    res = Result("forward", "forward only (eval, no grad)", "train", batch=256)
    return run_measure(res, fn, len(x), 256, budget, step=256, ckpts=1, warmup=256)


def make_checkpoints(model: nn.Module, root: Path, seed: int) -> list[str]:
    """3 files: the trained weights plus a different 2%-of-rms Gaussian perturbation each."""
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i, lr in enumerate(LRS):
        state = {}
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                rms = float(v.pow(2).mean().sqrt()) or 1.0
                v = v + 0.02 * rms * torch.randn(v.shape, generator=gen)
            state[k] = v.clone()
        path = root / f"ckpt_{i}.pt"
        torch.save({"model_state_dict": state, "lr": lr, "step": i}, path)
        paths.append(str(path))
    return paths


def relerr(a: np.ndarray | None, ref: np.ndarray | None) -> float | None:
    if a is None or ref is None:
        return None
    m = min(len(a), len(ref))
    if m == 0:
        return None
    return float(np.max(np.abs(a[:m] - ref[:m]) / np.abs(ref[:m]).clip(1e-30)))


def sweep_engine(
    ctx: Ctx, engine: str, sizes: Sequence[int], budget: float, results: list[Result]
) -> Result:
    """Exact self-influence with one engine: one run per batch size, then best of 2 at the best."""
    n = len(ctx.y)
    label = f"tracin exact, engine={engine}"
    try:
        tracin_exact(ctx, engine, sizes[0])(8 if SMOKE else 16)  # warm-up
    except Exception as exc:
        res = Result(f"tracin_exact_{engine}", label, "exact", batch=sizes[0])
        res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:240]}"
        print(f"    {label}: ERROR {res.error}", flush=True)
        results.append(res)
        return res
    tried = []
    for bs in sizes:
        res = Result(f"tracin_exact_{engine}_b{bs}", label, "sweep", batch=bs)
        tried.append(
            run_measure(res, tracin_exact(ctx, engine, bs), n, bs, budget / 2, step=bs, repeats=1)
        )
    ok = [r for r in tried if r.error is None]
    top = max(ok, key=lambda r: r.rate)
    bs = top.batch or 64
    res = Result(f"tracin_exact_{engine}", label, "exact", batch=bs)
    run_measure(res, tracin_exact(ctx, engine, bs), n, bs, budget, step=bs)
    if res.error is None and res.rate < top.rate:
        res.rate, res.rows, res.seconds, res.others = top.rate, top.rows, top.seconds, top.others
    res.runs += top.runs
    res.note = "batch sweep: " + ", ".join(f"{r.batch}: {r.rate:.0f}/s" for r in ok)
    results.extend([*tried, res])
    return res


def bench_model(spec: Spec, n: int, budget: float, quick: bool, root: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = spec.build()
    x, y = spec.data(n)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n== {spec.name}: {spec.title}, {n_params:,} parameters, {n} examples", flush=True)
    results: list[Result] = []
    train = train_rate(model, x, y, budget, quick)
    results += [train, forward_rate(model, x, budget)]
    folder = root / spec.name
    folder.mkdir()
    paths = make_checkpoints(model, folder, seed=1)
    ckpts = tracin.Checkpoints.from_paths(paths, lr="lr")
    ctx = Ctx(spec, model, x, y, paths, ckpts)
    hookable = not supported_layers(model, select_parameters(model, None))[1]
    skip_slow = quick and n_params > 100_000  # baselines that take ~10-30 s a batch

    def add(res: Result, fn: Callable[[int], Any], probe: int, **kw: Any) -> Result:
        if skip_slow and res.key in ("tracin_gauss", "dattri_noproj", "dattri_proj512"):
            res.error = "skipped in --quick (tens of seconds a batch on this model)"
            results.append(res)
            return res
        results.append(run_measure(res, fn, n, probe, budget, **kw))
        return res

    # tracin exact: engine auto is one of these two (factored when every parameter is hookable)
    sizes = (64,) if quick else (64, 256) if n_params > 100_000 else (64, 128, 256)
    best = {e: sweep_engine(ctx, e, sizes, budget, results) for e in ("functional", "factored")}
    auto_is = "factored" if hookable else "functional"
    auto = copy.copy(best[auto_is])
    auto.key, auto.label = "tracin_exact_auto", f"tracin exact, engine=auto (= {auto_is})"
    results.append(auto)
    bs_auto = auto.batch or 64
    add(
        Result(
            "tracin_exact_auto_tensors",
            "tracin exact, auto, in-memory tensors",
            "exact",
            batch=bs_auto,
        ),
        tracin_exact(ctx, "auto", bs_auto, in_memory=True),
        bs_auto,
        step=bs_auto,
    )
    # Captum TracInCP
    add(
        Result("captum_fast", "Captum TracInCP, sample-wise, sum, b64", "exact", batch=64),
        captum_tracincp(ctx, True, 64),
        64,
        step=64,
        warmup=8,
    )
    ref = add(
        Result("captum_default", "Captum TracInCP default (b1, per-example)", "exact", batch=1),
        captum_tracincp(ctx, False, 1),
        16,
        step=16,
        cap=32 if quick else 256,
        warmup=4,
    )
    # last layer
    add(
        Result("tracin_last_layer", "tracin last_layer", "last", batch=256),
        tracin_last_layer(ctx, 256),
        256,
        step=256,
        warmup=16,
    )
    add(
        Result("captum_fast_last", "Captum TracInCPFast, b64", "last", batch=64),
        captum_fast_last_layer(ctx, 64),
        64,
        step=64,
        warmup=16,
    )
    last_ref = captum_tracincp(ctx, True, 64, layers=[spec.final])(min(n, 256))
    weight_only = tracin.featurize(
        model, TASK, ckpts, ctx.dataset(min(n, 256)), layers=[f"{spec.final}.weight"]
    ).self_influence()
    # projected, dim 1024
    if hookable:
        add(
            Result("tracin_kron", "tracin proj 1024 kronecker (per layer)", "proj", batch=bs_auto),
            tracin_projected(ctx, "kronecker", bs_auto),
            bs_auto,
            step=bs_auto,
            warmup=16,
        )
    big = n_params * 1024 * 4 > 1 << 30  # P exceeds DenseProjector's 1 GiB cache
    how = "regenerated every batch" if big else "generated once per checkpoint and call"
    add(
        Result(
            "tracin_gauss",
            "tracin proj 1024 gaussian, auto",
            "proj",
            batch=64,
            note=f"P ({n_params * 4096 / 1e9:.2f} GB) {how}",
        ),
        tracin_projected(ctx, "gaussian", 64),
        64 if big else 512,
        step=64,
    )
    add(
        Result("dattri_noproj", "dattri TracIn, no projection, b64", "proj", batch=64),
        dattri_tracin(ctx, False, 64),
        64,
        step=64,
    )
    add(
        Result(
            "dattri_proj512",
            "dattri TracIn, projection 512, b64",
            "proj",
            batch=64,
            note="its projection matrix is rebuilt every batch",
        ),
        dattri_tracin(ctx, True, 64),
        64,
        step=64,
    )
    # prototype of the proposed fix
    add(
        Result("proto_exact", "PROTOTYPE exact (fixes 1, 2 below)", "proto", batch=bs_auto),
        proto_self_influence(ctx, bs_auto),
        bs_auto,
        step=bs_auto,
        warmup=16,
    )
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        add(
            Result(
                "proto_exact_unfold",
                "PROTOTYPE, but convolutions via F.unfold + bmm",
                "proto",
                batch=bs_auto,
            ),
            proto_self_influence(ctx, bs_auto, unfold=True),
            bs_auto,
            step=bs_auto,
            warmup=16,
        )
    if hookable:
        add(
            Result("proto_kron", "PROTOTYPE kronecker 1024 (fix 1)", "proto", batch=bs_auto),
            proto_self_influence(ctx, bs_auto, kron=True),
            bs_auto,
            step=bs_auto,
            warmup=16,
        )

    by_key = {r.key: r for r in results}
    for res in results:
        if res.scores is not None:
            reference = last_ref if res.group == "last" else ref.scores
            res.relerr = relerr(res.scores, reference)
    ref.relerr, ref.note = None, "the reference for rel. err"
    fast_last = by_key.get("captum_fast_last")
    if fast_last is not None and fast_last.scores is not None:
        fast_last.note = (
            f"ignores the bias: matches tracin layers=['{spec.final}.weight'] to "
            f"{relerr(fast_last.scores, weight_only):.1e}"
        )
    return {
        "title": spec.title,
        "parameters": n_params,
        "examples": n,
        "all_hookable": hookable,
        "results": [r.to_json(train.rate) for r in results],
        "targets": targets(by_key, train.rate),
    }


# --- targets ------------------------------------------------------------------------------------
def _rate(by_key: dict[str, Result], key: str) -> float | None:
    r = by_key.get(key)
    return None if r is None or r.error is not None else r.rate


def _exact_ok(r: Result | None) -> bool:
    if r is None or r.error is not None:
        return False
    return r.key == "captum_default" or (r.relerr is not None and r.relerr < 1e-3)


def targets(by_key: dict[str, Result], train: float) -> list[dict[str, Any]]:
    """Each target: the measured ratio, the goal, met or missed (prototype ratio alongside)."""
    tracin_rates = {
        k: _rate(by_key, f"tracin_exact_{k}") for k in ("auto", "functional", "factored")
    }
    exact = _rate(by_key, "tracin_exact_auto")
    proto = _rate(by_key, "proto_exact")
    fast = by_key.get("captum_fast")
    captum_best = max(
        (r.rate for r in (fast, by_key.get("captum_default")) if _exact_ok(r) and r is not None),
        default=None,
    )
    default = _rate(by_key, "captum_default")
    last, cfast = _rate(by_key, "tracin_last_layer"), _rate(by_key, "captum_fast_last")
    proj_candidates = [_rate(by_key, k) for k in ("tracin_kron", "tracin_gauss")]
    proj = max((p for p in proj_candidates if p), default=None)
    proto_proj = _rate(by_key, "proto_kron")
    dattri = _rate(by_key, "dattri_proj512")

    def row(
        name: str,
        value: float | None,
        other: float | None,
        goal: float,
        proto_value: float | None = None,
        note: str = "",
    ) -> dict[str, Any]:
        ratio = None if value is None or other is None else value / other
        pr = None if proto_value is None or other is None else proto_value / other
        return {
            "target": name,
            "ratio": ratio,
            "goal": goal,
            "met": None if ratio is None else ratio >= goal,
            "prototype_ratio": pr,
            "note": note,
        }

    notes = (
        ""
        if fast is None or _exact_ok(fast)
        else (
            f"Captum sample-wise is wrong here (rel. err {fast.relerr:.2g}): it drops parameters "
            "outside Linear/Conv2d; compared with its correct per-example path"
        )
    )
    best_engine = max((v for v in tracin_rates.values() if v), default=None)
    return [
        row(
            "exact all-layer >= 3x Captum TracInCP fastest (correct)",
            exact,
            captum_best,
            3.0,
            proto,
            notes,
        ),
        row("exact all-layer >= 10x Captum TracInCP default", exact, default, 10.0, proto),
        row(
            "exact all-layer within 1.5x of the training step",
            exact,
            train,
            1 / 1.5,
            proto,
            f"best engine: {best_engine and best_engine / train:.2f}x",
        ),
        row("last layer >= 2x Captum TracInCPFast", last, cfast, 2.0),
        row("projected 1024 within 2x of the training step", proj, train, 0.5, proto_proj),
        row("projected 1024 >= 10x dattri (projection 512)", proj, dattri, 10.0, proto_proj),
    ]


# --- output -------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = ".0f") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _run_line(run: dict[str, Any]) -> str:
    if not run:
        return ""
    return (
        f"Measured {run['date']} by `{run['command']}` in {run['seconds']} s; load "
        f"{run['load_before']:.2f} before, {run['load_after']:.2f} after; other processes "
        f"{_fmt(run['others_before'], '.2f')} cores before; waited {run['waited_s']:.0f} s; "
        f"{run['retry_s_used']} s re-running disturbed runs."
    )


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        "# Engines: tracin vs Captum vs dattri (throughput)",
        "",
        f"Reproduce: `{meta['command']}`",
        "",
        f"{meta['date']}, {meta['machine']}, torch {meta['torch']} ({meta['threads']} threads), "
        f"captum {meta['captum']}, dattri {meta['dattri']}. This machine is shared with other "
        "processes: each model's line says how busy it was (1-minute load average, the cores "
        "other processes used just before, seconds waited for them to go quiet, seconds spent "
        "re-running disturbed runs).",
        "",
        "Rates are checkpoint-examples per second (examples x 3 checkpoints / s); the train step "
        "is examples/s. `x train` is the rate over the training step's. `rel. err` is the max "
        "elementwise relative error of self-influence against Captum's per-example loop (last "
        "layer: against Captum TracInCP restricted to the final layer) on the rows both ran. "
        "`others`: CPU cores other processes used during the kept run (from /proc/stat; a run "
        f"with more than {OTHERS_MAX} was retried, up to {RETRIES} times per figure). "
        "PROTOTYPE rows are the proposed fix, built in this script from tracin's hook helpers "
        "(see the notes at the end).",
    ]
    for name, m in report["models"].items():
        lines += [
            "",
            f"## {name}: {m['title']}, {m['parameters']:,} parameters, {m['examples']} examples",
            "",
            _run_line(m.get("run", {})),
            "",
            "| method | batch | rows timed | rate /s | x train | rel. err | others | note |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in m["results"]:
            if r["group"] == "sweep":
                continue  # batch-size sweep rows are summarised in the engine's note
            note = r["error"] or r["note"]
            lines.append(
                f"| {r['label']} | {_fmt(r['batch'])} | {r['rows'] or '-'} | {_fmt(r['rate'])} "
                f"| {_fmt(r['ratio_to_train'], '.3f')} | {_fmt(r['relerr'], '.1e')} "
                f"| {_fmt(r['others'], '.2f')} | {note} |"
            )
        lines += [
            "",
            "| target | ratio | goal | met | prototype ratio | note |",
            "|---|---:|---:|---|---:|---|",
        ]
        for t in m["targets"]:
            met = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
            lines.append(
                f"| {t['target']} | {_fmt(t['ratio'], '.2f')} | {t['goal']:.2f} | {met} "
                f"| {_fmt(t['prototype_ratio'], '.2f')} | {t['note']} |"
            )
    lines += ["", "## What the PROTOTYPE rows change (proposed fixes in src/tracin)", "", *FIXES]
    return "\n".join(lines) + "\n"


FIXES = [
    "0. Done in src during this benchmark's development, and measured by the `tracin exact` "
    "rows: self-influence streams `engine.sqnorms` with no (B, P) gradient matrix and no "
    "isfinite over one (a9c8240, cf57024); native-dtype products with float64 sums (a9c8240); "
    "embedding norms from a (B, T, T) index-equality Gram instead of a dense (B, vocab, dim) "
    "tensor (6b52dcb); the bias handled apart instead of a ones column copied onto every layer "
    "input (57cd331). The prototype below has all of them as well.",
    "1. Convolutions go through `F.unfold` + `bmm` (`_hooks._positions`). Fix: per-example "
    "weight gradients from one grouped `torch.nn.grad.conv2d_weight(x.reshape(1, B*C, H, W), "
    "(B*O, C, kh, kw), g.reshape(1, B*O, H', W'), stride, padding, dilation, groups=B)`, bias "
    "`g.sum((2, 3))`; the Kronecker input projection `unfold(x) @ P_in` is "
    "`F.conv2d(x, P_in[:-1].T.reshape(k, C, kh, kw), bias=P_in[-1])`. Rows `PROTOTYPE` against "
    "`PROTOTYPE, but convolutions via F.unfold + bmm` isolate this.",
    "2. `_hooks.supported_layers` hooks `nn.MultiheadAttention.out_proj`, whose weight MHA uses "
    "functionally, so `engine='factored'` fails on every nn.TransformerEncoder ('out_proj was "
    "not called'), and `auto` sends the whole model to torch.func (dense per-example embedding "
    "gradients included). Fix: route layers whose hook did not fire on the first batch (or "
    "Linear children of nn.MultiheadAttention) to the torch.func rest, and let `auto` use hooks "
    "+ torch.func rest when some parameters are unhookable. The prototype does this on "
    "text_mha. Also `FunctionalEngine.sqnorms` still concatenates the (B, P) gradients before "
    "squaring them: sum each parameter's squares from the vmap dict instead.",
    "3. Not prototyped: `_projection.DenseProjector._block` charges every cached block a full "
    "`block_rows * k * 4` bytes (64 MiB at k=1024) whatever its real size, so at most 16 blocks "
    "are kept: a model with more than 16 parameter tensors regenerates the rest of P every "
    "batch even when P is a few MB (30 tensors of 100 rows: 58 generations in 3 batches). Fix: "
    "count `mat.numel() * mat.element_size()`. Past the cache (P x k > 1 GiB, ~262k parameters "
    "at k=1024) P is regenerated every batch: prefer kronecker (or a sparse JL sketch) there.",
    "4. Not prototyped: `_batch._loader` wraps a TensorDataset in a DataLoader (per-row "
    "indexing + collate); slicing `dataset.tensors` directly is what the `in-memory tensors` "
    "row measures.",
    "5. Not prototyped: `_api._check_first_batch` runs `check_task` (two forward passes, B and "
    "B - 1 rows) on a whole first batch per featurize call: ~15% of a last-layer run on the "
    "1M-parameter text model (measured by slicing it to 8 rows). Fix: check on <= 8 rows.",
    "6. Not prototyped: `projection='kronecker'` gives every layer 32 x 32 = 1024 features "
    "whatever its size (`FactoredEngine._side`), so DemoCNN's conv1 (8 x 10 numbers with the "
    "bias) is inflated to 1024 and the 9.8k-parameter model gets 4096 features per checkpoint. "
    "Fix: `k_in = min(side, n_in + bias)`, `k_out = min(side, n_out)` (or keep such layers "
    "exact).",
]


def print_table(report: dict[str, Any]) -> None:
    for name, m in report["models"].items():
        print(f"\n{name}: {m['title']} ({m['parameters']:,} params)")
        for r in m["results"]:
            if r["group"] == "sweep":
                continue
            err = f"  ERROR {r['error'][:70]}" if r["error"] else ""
            ratio, rel = _fmt(r["ratio_to_train"], ".3f"), _fmt(r["relerr"], ".1e")
            print(
                f"  {r['label']:<46} b{r['batch']!s:<4} {_fmt(r['rate'], '10.1f')}/s "
                f"x{ratio:<6} err {rel}{err}"
            )
        for t in m["targets"]:
            met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
            print(
                f"  target {t['target']:<58} {_fmt(t['ratio'], '.2f'):>6} / {t['goal']:.2f} "
                f"{met} (prototype {_fmt(t['prototype_ratio'], '.2f')})"
            )


def wait_for_load(threshold: float, max_wait: float) -> float:
    waited = 0.0
    while threshold > 0 and os.getloadavg()[0] > threshold and waited < max_wait:
        print(f"load {os.getloadavg()[0]:.2f} > {threshold}: waiting 60 s", flush=True)
        time.sleep(60)
        waited += 60
    return waited


def wait_quiet(max_wait: float) -> tuple[float, float]:
    """Wait (20 s steps) until other processes use < OTHERS_MAX cores over 3 s."""
    waited = 0.0
    others = timed(time.sleep, 3)[1]
    while others > OTHERS_MAX and waited < max_wait:
        print(f"other processes use {others:.2f} cores: waiting 20 s", flush=True)
        time.sleep(20)
        waited += 23
        others = timed(time.sleep, 3)[1]
    return waited, others


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(SPECS), default=list(SPECS))
    parser.add_argument("--n", type=int, default=None, help="examples per model")
    parser.add_argument("--quick", action="store_true", help="1-minute smoke run")
    parser.add_argument("--budget", type=float, default=None, help="seconds per timed run")
    parser.add_argument(
        "--wait-load",
        type=float,
        default=0.0,
        help="wait (60 s steps, up to 10 min) until the 1-min load is below this",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each model, wait up to this many seconds for other processes to go quiet",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other models already in the results file (re-measure only --models)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default benchmarks/results; --quick: a temp dir)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    budget = args.budget or (0.1 if args.quick else 1.5)
    if args.quick:
        SMOKE["probe"] = 16
    waited = wait_for_load(args.wait_load, 600)
    import captum
    import dattri

    meta = {
        "command": "python benchmarks/engines.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "captum": captum.__version__,
        "dattri": getattr(dattri, "__version__", "0.3.0"),
        "threads": torch.get_num_threads(),
        "load_before": os.getloadavg()[0],
        "waited_s": waited,
        "budget_s": budget,
        "quick": args.quick,
    }
    t0 = time.perf_counter()
    models = {}
    out = args.out or (Path(tempfile.gettempdir()) / "tracin_engines" if args.quick else RESULTS)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            spec = SPECS[name]
            n = args.n or (spec.quick_n if args.quick else spec.n)
            waited, others = wait_quiet(args.wait_quiet) if args.wait_quiet else (0.0, None)
            RETRY_SECONDS["left"] = RETRY_PER_MODEL
            run = {
                "command": meta["command"],
                "date": datetime.datetime.now().isoformat("T", "seconds"),
                "load_before": os.getloadavg()[0],
                "others_before": others,
                "waited_s": waited,
            }
            t_model = time.perf_counter()
            models[name] = bench_model(spec, n, budget, args.quick, Path(tmp))
            run["seconds"] = round(time.perf_counter() - t_model, 1)
            run["load_after"] = os.getloadavg()[0]
            run["retry_s_used"] = round(RETRY_PER_MODEL - RETRY_SECONDS["left"], 1)
            models[name]["run"] = run
    meta["load_after"] = os.getloadavg()[0]
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    if args.merge and (out / "engines.json").exists():
        old = json.loads((out / "engines.json").read_text())["models"]
        models = {k: models.get(k, old.get(k)) for k in SPECS if k in models or k in old}
    report = {"meta": meta, "models": models}
    print_table(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engines.json").write_text(json.dumps(report, indent=2))
    (out / "engines.md").write_text(markdown(report))
    print(f"\n{meta['seconds']} s; wrote {out / 'engines.json'} and {out / 'engines.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
