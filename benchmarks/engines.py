"""Engines: tracin's gradient engines against Captum, dattri and TRAK, side by side in one process.

Throughput in checkpoint-examples per second (examples x checkpoints / seconds) on this machine's
CPU (``torch.set_num_threads(2)``), 3 checkpoints (files ``{"model_state_dict", "lr", "step"}``:
random perturbations of a briefly trained model, lr 0.1, 0.1, 0.01), on:

- ``democnn``: `tracin.experiments.DemoCNN` (~10k parameters) on scikit-learn's digits (8x8),
the 1797
  images repeated 4 times;
- ``cnn28``: a ~0.83M-parameter CNN on the digits upsampled to 28x28;
- ``text_mha``: an nn.Embedding (5000 x 128) + 2-layer nn.TransformerEncoder text classifier
  (~1.04M parameters, mean-pooled over the padding mask) on synthetic token sequences of length
  48. nn.MultiheadAttention uses its ``in_proj_weight`` and ``out_proj`` functionally, so
  ``engine="auto"`` hooks the Embeddings, feed-forward Linears, LayerNorms and head and leaves
  those attention parameters to torch.func (no Kronecker projection there);
- ``text_linear``: the same shape written with nn.Linear q/k/v/o and affine-free LayerNorm, so
  every parameter sits in a hookable layer and the factored engine covers it all.

For each model (every rate also as a ratio to the training step):

- ``train``: forward + backward + SGD step, batch 64 (examples/s): the floor; and a no-grad
  forward pass (what a last-layer method is bound by);
- ``tracin exact``: ``tracin.featurize(...)`` then ``run.self_influence()`` (no store, no
  projection: streaming exact squared norms), engines functional and factored (``auto`` is the
  factored one whenever a layer is hookable: hooks for those layers, torch.func for the rest),
  batch 64, 128 (small models) and 256, best shown; plus auto fed in-memory tensors instead of
  a TensorDataset (both are sliced, no DataLoader);
- ``captum fast``: ``TracInCP(sample_wise_grads_per_batch=True,
  loss_fn=CrossEntropyLoss(reduction="sum"), batch_size=64)``; ``captum default``: batch_size=1,
  per-example loop (``reduction="none"``), on at most 256 rows; both with a loader that returns
  the file's lr;
- ``last layer``: tracin ``layers=[final], projection="last_layer"`` against Captum
  ``TracInCPFast(final_fc_layer=final, batch_size=64)``;
- ``projected``: tracin ``proj_dim=1024`` with ``projection="kronecker"`` (per layer up to
  32 x 32, a side narrower than 32 kept exact; parameters outside hooked layers projected by
  one dense Gaussian block; at the
  exact engine's best batch size) and dense ``"gaussian"`` (batch 64), timing featurize (features
  kept in memory); against dattri ``TracInAttributor.self_attribute`` without projection and
  with its default 512, and TRAK (``traker``) ``TRAKer.featurize`` at proj_dim 1024 on the CPU
  (its BasicProjector, Gaussian, float32; ``finalize_features`` not timed).

Each figure: an untimed warm-up, a probe run (one batch) that sizes ``rows`` so one run takes
about ``--budget`` seconds (capped by the dataset size), then best of 2 runs; a method slower
than the budget on its probe is timed by that one run. Correctness: every exact self-influence
is compared, on the rows both computed, with Captum's per-example loop (plain autograd, one
example at a time): the maximum elementwise relative error. The last layer is compared with
Captum TracInCP restricted to the final layer (sample-wise trick, exact for a Linear layer).
The load of other processes on the machine is recorded; ``--wait-load`` waits for a quiet one.

Memory: before each method the process's peak resident set is reset (``malloc_trim(0)``, then
``5`` written to ``/proc/self/clear_refs``); after its warm-up, probe and timed runs ``VmHWM``
is read from ``/proc/self/status``. ``peak MB`` is that process-wide peak (which includes the
interpreter, torch, the data and the model: the ``train`` row's is the baseline) and ``+MB`` the
peak above the resident set just before the method started: what the method itself added.

    python benchmarks/engines.py --wait-load 1.5 --wait-quiet 300   # as in results/engines.md
    python benchmarks/engines.py --quick          # smoke run, under a minute on a quiet machine
    python benchmarks/engines.py --models cnn28 --merge   # re-measure one model, keep the rest
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import json
import logging
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
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import tracin
from tracin.experiments import DemoCNN
from tracin.gradients import FactoredEngine, select_parameters, supported_layers
from tracin.projection import ProjectionConfig

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
    peak_mb: float | None = None  # process VmHWM over the method's runs (MiB)
    mem_mb: float | None = None  # that peak above the resident set before the method (MiB)

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


def _status_kb(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def mem_reset() -> int | None:
    """Give freed heap back, reset the peak resident set; the resident set now (kB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
    except (OSError, AttributeError):
        return None
    return _status_kb("VmRSS")


def mem_peak(res: Result, base: int | None) -> None:
    peak = _status_kb("VmHWM")
    if base is not None and peak is not None:
        res.peak_mb, res.mem_mb = peak / 1024, max(0, peak - base) / 1024


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
    base = mem_reset()
    try:
        rows, secs, runs, others, out = measure(fn, n, probe, budget, **kw)
        mem_peak(res, base)
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
        f"  (others {_fmt(others, '.2f')} cores, +{_fmt(res.mem_mb)} MB)",
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


def tracin_streamed_influence(ctx: Ctx, bs: int, queries: int = 64) -> Callable[[int], Any]:
    """One exact streamed query pass: ``run.influence`` of 64 queries over ``rows`` rows.

    The run (featurize's squared-norm pass) is built on the first call for a row count and
    reused, so with the warm-up at the probe's size and best of 2 the figure is the query pass
    alone: every checkpoint's exact training gradients recomputed and multiplied by the queries.
    """
    runs: dict[int, tracin.Run] = {}
    query = (ctx.x[:queries], ctx.y[:queries])

    def fn(rows: int) -> None:
        if rows not in runs:
            runs.clear()
            runs[rows] = tracin.featurize(
                ctx.model, TASK, ctx.ckpts, ctx.dataset(rows), batch_size=bs
            )
        runs[rows].influence(query)

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


def trak_featurize(ctx: Ctx, bs: int) -> Callable[[int], Any]:
    """TRAK ``TRAKer.featurize`` at proj_dim 1024 on the CPU, every checkpoint (no scores).

    On a CPU TRAK uses its BasicProjector (Gaussian, generated in blocks of 100 columns every
    batch); float32 (``use_half_precision=False``: float16 matmuls are not a CPU path).
    """
    states = [
        torch.load(p, map_location="cpu", weights_only=True)["model_state_dict"] for p in ctx.paths
    ]

    def fn(rows: int) -> None:
        from trak import TRAKer  # a missing package is recorded as this row's error

        with tempfile.TemporaryDirectory() as folder:
            traker = TRAKer(
                model=copy.deepcopy(ctx.model).eval(),
                task="image_classification",  # margin of the label's logit: model(x) -> logits
                train_set_size=rows,
                save_dir=folder,
                load_from_save_dir=False,
                device="cpu",
                proj_dim=1024,
                use_half_precision=False,
                logging_level=logging.ERROR,
            )
            for i, state in enumerate(states):
                traker.load_checkpoint(state, model_id=i)
                for s in range(0, rows, bs):
                    xb, yb = ctx.x[s : min(s + bs, rows)], ctx.y[s : min(s + bs, rows)]
                    traker.featurize(batch=(xb, yb), num_samples=len(yb))

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
    names = select_parameters(model, None)
    hooked, rest = supported_layers(model, names)
    hookable = not rest  # every parameter in a hookable layer (else Kronecker + a dense block)
    sizes_of = dict(model.named_parameters())
    n_rest = sum(sizes_of[r].numel() for r in rest)
    skip_slow = quick and n_params > 100_000  # baselines that take ~10-30 s a batch

    def add(res: Result, fn: Callable[[int], Any], probe: int, **kw: Any) -> Result:
        slow = ("tracin_gauss", "dattri_noproj", "dattri_proj512", "trak_proj1024")
        if skip_slow and res.key in slow:
            res.error = "skipped in --quick (tens of seconds a batch on this model)"
            results.append(res)
            return res
        results.append(run_measure(res, fn, n, probe, budget, **kw))
        return res

    # tracin exact: engine auto is the factored one whenever some layer is hookable
    sizes = (64,) if quick else (64, 256) if n_params > 100_000 else (64, 128, 256)
    best = {e: sweep_engine(ctx, e, sizes, budget, results) for e in ("functional", "factored")}
    auto_is = "factored" if hooked else "functional"
    auto = copy.copy(best[auto_is])
    how = "factored + torch.func rest" if hooked and rest else auto_is
    auto.key, auto.label = "tracin_exact_auto", f"tracin exact, engine=auto (= {how})"
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
    add(
        Result(
            "tracin_stream_q64",
            "tracin exact influence, streamed, 64 queries",
            "exact",
            batch=bs_auto,
            note="one query pass, no store (the queries' gradients included): rows x ckpts / s",
        ),
        tracin_streamed_influence(ctx, bs_auto),
        4 * bs_auto,  # the 64 queries' own gradients are amortised over the rows
        step=bs_auto,
        warmup=4 * bs_auto,
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
    # projected, dim 1024 (kronecker: per hooked layer; unhooked parameters one dense Gaussian)
    add(
        Result("tracin_kron", "tracin proj 1024 kronecker (per layer)", "proj", batch=bs_auto),
        tracin_projected(ctx, "kronecker", bs_auto),
        bs_auto,
        step=bs_auto,
        warmup=16,
    )
    big = n_params * 1024 * 4 > 1 << 30  # P exceeds DenseProjector's 1 GiB cache
    how = (
        "1 GiB of it cached, the rest regenerated every batch"
        if big
        else "generated once per checkpoint and call"
    )
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
    add(
        Result(
            "trak_proj1024",
            "TRAK featurize, proj 1024 (CPU), b64",
            "proj",
            batch=64,
            note="BasicProjector: P generated in 100-column blocks every batch",
        ),
        trak_featurize(ctx, 64),
        64,
        step=64,
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
        "torch_func_parameters": {"tensors": len(rest), "numel": n_rest},
        "feature_dims": feature_dims(model, names, hookable),
        "results": [r.to_json(train.rate) for r in results],
        "targets": targets(by_key, train.rate),
    }


def feature_dims(model: nn.Module, names: Sequence[str], hookable: bool) -> dict[str, int]:
    """Features per row and checkpoint of each configuration (what a store holds)."""
    dims = {"exact": sum(dict(model.named_parameters())[n].numel() for n in names)}
    kron = ProjectionConfig(kind="kronecker", dim=1024)  # unhooked parameters: a dense block
    dims["kronecker_1024"] = FactoredEngine(model, names, kron).dim()
    dims["gaussian_1024"] = 1024
    return dims


# --- targets ------------------------------------------------------------------------------------
def _rate(by_key: dict[str, Result], key: str) -> float | None:
    r = by_key.get(key)
    return None if r is None or r.error is not None else r.rate


def _exact_ok(r: Result | None) -> bool:
    if r is None or r.error is not None:
        return False
    return r.key == "captum_default" or (r.relerr is not None and r.relerr < 1e-3)


def targets(by_key: dict[str, Result], train: float) -> list[dict[str, Any]]:
    """Each target of issue #4: the measured ratio, the goal, met or missed."""
    exact = _rate(by_key, "tracin_exact_auto")
    fast = by_key.get("captum_fast")
    captum_best = max(
        (r.rate for r in (fast, by_key.get("captum_default")) if _exact_ok(r) and r is not None),
        default=None,
    )
    default = _rate(by_key, "captum_default")
    last, cfast = _rate(by_key, "tracin_last_layer"), _rate(by_key, "captum_fast_last")
    proj_rates = {k: _rate(by_key, k) for k in ("tracin_kron", "tracin_gauss")}
    proj_key = max((k for k, v in proj_rates.items() if v), key=proj_rates.get, default=None)
    proj = proj_rates[proj_key] if proj_key else None
    proj_note = {"tracin_kron": "kronecker", "tracin_gauss": "gaussian"}.get(proj_key or "", "")
    dattri = _rate(by_key, "dattri_proj512")
    trak = _rate(by_key, "trak_proj1024")
    forward = _rate(by_key, "forward")

    def row(
        name: str, value: float | None, other: float | None, goal: float, note: str = ""
    ) -> dict[str, Any]:
        ratio = None if value is None or other is None else value / other
        met = None if ratio is None else ratio >= goal
        return {"target": name, "ratio": ratio, "goal": goal, "met": met, "note": note}

    notes = (
        ""
        if fast is None or _exact_ok(fast)
        else (
            f"Captum sample-wise is wrong here (rel. err {fast.relerr:.2g}): it drops parameters "
            "outside Linear/Conv2d; compared with its correct per-example path"
        )
    )
    engines = {k: _rate(by_key, f"tracin_exact_{k}") for k in ("functional", "factored", "auto")}
    best = max((v for v in engines.values() if v), default=None)
    bound = (
        f"the forward pass alone is {forward / cfast:.2f}x TracInCPFast"
        if forward and cfast
        else ""
    )
    return [
        row(
            "exact all-layer >= 3x Captum TracInCP fastest (correct)",
            exact,
            captum_best,
            3.0,
            notes,
        ),
        row("exact all-layer >= 10x Captum TracInCP default", exact, default, 10.0),
        row(
            "exact all-layer within 1.5x of the training step",
            exact,
            train,
            1 / 1.5,
            f"best engine: {best and best / train:.2f}x",
        ),
        row("last layer >= 2x Captum TracInCPFast", last, cfast, 2.0, bound),
        row("projected 1024 within 2x of the training step", proj, train, 0.5, proj_note),
        row("projected 1024 >= 10x dattri (projection 512)", proj, dattri, 10.0, proj_note),
        row("projected 1024 ahead of TRAK featurize (CPU, 1024)", proj, trak, 1.0, proj_note),
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
        "# Engines: tracin vs Captum vs dattri vs TRAK (throughput, memory)",
        "",
        f"Reproduce: `{meta['command']}`",
        "",
        f"{meta['date']}, {meta['machine']}, torch {meta['torch']} ({meta['threads']} threads), "
        f"captum {meta['captum']}, dattri {meta['dattri']}, traker {meta.get('traker', '-')}. "
        "This machine is shared with other processes: each model's line says how busy it was "
        "(1-minute load average, the cores other processes used just before, seconds waited for "
        "them to go quiet, seconds spent re-running disturbed runs).",
        "",
        "Rates are checkpoint-examples per second (examples x 3 checkpoints / s); the train step "
        "is examples/s. `x train` is the rate over the training step's. `rel. err` is the max "
        "elementwise relative error of self-influence against Captum's per-example loop (last "
        "layer: against Captum TracInCP restricted to the final layer) on the rows both ran. "
        "`peak MB`: the process's peak resident set (VmHWM, reset before each method) over the "
        "method's warm-up, probe and timed runs, interpreter, torch, data and model included "
        "(the train row's is the baseline); `+MB`: that peak above the resident set just before "
        "the method. `others`: CPU cores other processes used during the kept run (from "
        f"/proc/stat; a run with more than {OTHERS_MAX} was retried, up to {RETRIES} times per "
        "figure).",
    ]
    for name, m in report["models"].items():
        dims = ", ".join(f"{k} {v:,}" for k, v in m.get("feature_dims", {}).items())
        rest = m.get("torch_func_parameters", {})
        lines += [
            "",
            f"## {name}: {m['title']}, {m['parameters']:,} parameters, {m['examples']} examples",
            "",
            _run_line(m.get("run", {})),
            "",
            f"Features per row and checkpoint: {dims}. "
            + (
                f"Left to torch.func by the factored engine: {rest['tensors']} tensors, "
                f"{rest['numel']:,} parameters."
                if rest.get("tensors")
                else "Every parameter is in a hooked layer."
            ),
            "",
            "| method | batch | rows timed | rate /s | x train | rel. err | peak MB | +MB "
            "| others | note |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in m["results"]:
            if r["group"] == "sweep":
                continue  # batch-size sweep rows are summarised in the engine's note
            note = r["error"] or r["note"]
            lines.append(
                f"| {r['label']} | {_fmt(r['batch'])} | {r['rows'] or '-'} | {_fmt(r['rate'])} "
                f"| {_fmt(r['ratio_to_train'], '.3f')} | {_fmt(r['relerr'], '.1e')} "
                f"| {_fmt(r.get('peak_mb'))} | {_fmt(r.get('mem_mb'))} "
                f"| {_fmt(r['others'], '.2f')} | {note} |"
            )
        lines += ["", "| target | ratio | goal | met | note |", "|---|---:|---:|---|---|"]
        for t in m["targets"]:
            met = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
            lines.append(
                f"| {t['target']} | {_fmt(t['ratio'], '.2f')} | {t['goal']:.2f} | {met} "
                f"| {t['note']} |"
            )
    return "\n".join(lines) + "\n"


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
                f"x{ratio:<6} err {rel} +{_fmt(r.get('mem_mb'))} MB{err}"
            )
        for t in m["targets"]:
            met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
            print(
                f"  target {t['target']:<58} {_fmt(t['ratio'], '.2f'):>6} / {t['goal']:.2f} "
                f"{met} {t['note']}"
            )


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


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
        "traker": _version("traker"),
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
