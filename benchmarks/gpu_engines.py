"""GPU engines: zoo_engines' paths on one device (CUDA when there is one), checked for correctness.

What it measures, per model (one process, models in turn, 3 checkpoints as in zoo_engines):

- ``train``: forward + backward + SGD step, batch 64 (examples/s);
- ``forward``: eval, no grad, batch 256 (examples/s);
- ``exact``: ``tracin.featurize(...)`` then ``run.self_influence()`` (checkpoint-examples/s);
- ``kron_store``: ``featurize(store=dir, proj_dim=1024, projection="kronecker")``;
- ``captum_samplewise``, ``captum_loop``, ``captum_loop_b64``: Captum ``TracInCP`` (when captum
  is importable); the fastest whose self-influence matches tracin's exact one (max elementwise
  relative error below 1e-3, 2e-2 in bfloat16) is "Captum fastest correct".

Correctness: tracin's exact self-influence of the first 8 rows, computed on the device, against
a per-example loop (one ``torch.autograd.grad`` per row and checkpoint) in float64 on the CPU,
at the same (rounded) weights and inputs: ``loop err`` is the max elementwise relative error;
it must be under 1e-4 in float32 (5e-2 in bfloat16) for ``ok``.

Device and dtype: ``--device`` (default ``cuda`` when available); model, checkpoint weights and
data are moved there (checkpoint files are written from the CPU model first). ``--dtype
bfloat16`` applies to the models listed in ``BF16`` (the CNNs, the transformers and the MLP);
the others stay float32 and the output says so. On CUDA every timed call ends with
``torch.cuda.synchronize()``, TF32 is switched off (float32 means float32) and memory is
``torch.cuda.max_memory_allocated`` per path (peak above the allocation at the path's start);
on the CPU it is the process's peak resident set (``VmHWM``, reset per path), as in zoo_engines.

Timing: zoo_engines' ``measure``: a warm-up on 8 rows, rows sized until a run takes ~``--path-s``
seconds (at most the model's rows: zoo_engines' counts, times ``--rows-scale``, 8 on CUDA), then
the best of two runs. ``--quick``: the warm-up and one run on up to 64 rows. ``--budget-s``:
once the whole run has taken that long, the remaining models are skipped (and listed).

    python benchmarks/gpu_engines.py --out results/gpu   # est. 2-4 min on one GPU (untried)
    python benchmarks/gpu_engines.py --out results/gpu --dtype bfloat16
    python benchmarks/gpu_engines.py --device cpu --quick --models mlp cnn47k --out /tmp/g
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from torch import nn

import tracin

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo_engines as ze
from engines import _version

import zoo  # type: ignore[import-not-found]

DEFAULT_MODELS = ("cnn47k", "rescnn", "gpt2", "bert", "transformer_encoder", "lstm", "mlp")
BF16 = {  # models run in bfloat16 under --dtype bfloat16, and why they may
    "cnn47k": "CNN", "rescnn": "CNN (BatchNorm)", "gpt2": "transformer", "bert": "transformer",
    "gpt2_eager": "transformer", "transformer_encoder": "transformer",
    "mlp": "MLP (the zoo checks mlp_bfloat16)",
}  # fmt: skip
NEEDS = {"cnn47k": "sklearn", "rescnn": "sklearn", "gpt2": "transformers",
         "gpt2_eager": "transformers", "bert": "transformers"}  # fmt: skip
CHECK_ROWS = 8
LOOP_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
CAPTUM_TOL = {torch.float32: ze.CORRECT, torch.bfloat16: 2e-2}
CAPTUM_KINDS = ("samplewise", "loop", "loop_b64")
TIMED = ("train", "forward", "exact", "kron_store")


# --- models -------------------------------------------------------------------------------------
MLP = zoo.Case("mlp", zoo.mlp, zoo.dense(5), zoo.CLS, zoo.ce)  # the zoo's 5 -> 8 -> 3, float32


def known_models() -> list[str]:
    """zoo_engines' models (the zoo's cases and its extras) plus ``mlp``."""
    return [*(c.name for c in zoo.CASES), *ze.EXTRA, MLP.name]


def spec_of(name: str) -> ze.Spec:
    """Model ``name``'s zoo_engines spec (built only when asked: some need transformers)."""
    if name in ze.EXTRA:
        return ze.EXTRA[name]
    return ze.zoo_spec(next((c for c in zoo.CASES if c.name == name), MLP))


def missing_package(name: str) -> str | None:
    """The package model ``name`` needs that is not installed, else None."""
    case = next((c for c in zoo.CASES if c.name == name), None)
    need = NEEDS.get(name) or (case.needs if case is not None else None)
    return need if need and importlib.util.find_spec(need) is None else None


def model_dtype(name: str, requested: torch.dtype) -> tuple[torch.dtype, str]:
    """The dtype model ``name`` runs in and why."""
    if requested == torch.float32:
        return torch.float32, "float32 requested"
    if name in BF16:
        return torch.bfloat16, f"bfloat16: {BF16[name]}"
    return torch.float32, "float32: not in the bfloat16 list (BF16)"


def to_device(batch: ze.Batch, device: torch.device) -> ze.Batch:
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return tuple(v.to(device) for v in batch)


# --- timing and memory on the device ------------------------------------------------------------
def synced(fn: Callable[[int], Any], device: torch.device) -> Callable[[int], Any]:
    """``fn`` that waits for the device's queued work before returning (CUDA; else ``fn``)."""
    if device.type != "cuda":
        return fn

    def run(rows: int) -> Any:
        out = fn(rows)
        torch.cuda.synchronize(device)
        return out

    return run


def timed_path(
    key: str, fn: Callable[[int], Any], device: torch.device, **kw: Any
) -> dict[str, Any]:
    """``ze.measure`` of ``fn`` synchronised; on CUDA, memory from the CUDA allocator's peak."""
    if device.type != "cuda":
        return ze.measure(key, fn, **kw)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    res = ze.measure(key, synced(fn, device), **kw)
    peak = torch.cuda.max_memory_allocated(device)
    res["host_peak_mb"], res["host_mem_mb"] = res.pop("peak_mb", None), res.pop("mem_mb", None)
    res.update(peak_mb=peak / 2**20, mem_mb=max(0, peak - base) / 2**20)
    print(f"    {'':<20} device peak {res['peak_mb']:.0f} MB (+{res['mem_mb']:.0f})", flush=True)
    return res


# --- Captum on any device -----------------------------------------------------------------------
def captum(ctx: ze.Ctx, kind: str) -> Callable[[int], np.ndarray]:
    """zoo_engines' TracInCP configuration ``kind``, scores brought back to the CPU."""
    from captum.influence import TracInCP
    from torch.utils.data import TensorDataset

    tensors = ctx.spec.captum(ctx.train)
    layers = ze.trainable_layers(ctx.model)

    def fn(rows: int) -> np.ndarray:
        net = ze.CaptumNet(copy.deepcopy(ctx.model).eval(), ctx.spec.forward)
        data = TensorDataset(*(t[:rows] for t in tensors))
        wise = kind == "samplewise"
        loss = ze.CaptumLoss(ctx.spec.captum_loss, "sum" if wise else "none")
        extra: dict[str, Any] = {"layers": layers} if layers else {}
        inst = TracInCP(
            net, data, list(ctx.paths), loss_fn=loss, sample_wise_grads_per_batch=wise,
            checkpoints_load_func=ze._captum_load, batch_size=1 if kind == "loop" else 64, **extra,
        )  # fmt: skip
        scores: np.ndarray = inst.self_influence().detach().double().cpu().numpy()
        return scores

    return fn


def fastest_correct(by: dict[str, dict[str, Any]]) -> str | None:
    """The key of the fastest correct Captum configuration (None: none ran correctly)."""
    ok = [k for k, r in by.items() if k.startswith("captum") and r.get("correct")]
    return max(ok, key=lambda k: by[k]["rate"], default=None)


# --- correctness --------------------------------------------------------------------------------
def loop_self_influence(
    model: nn.Module, loss: Callable[[Any, ze.Batch], torch.Tensor], paths: Sequence[str],
    batch: ze.Batch,
) -> np.ndarray:  # fmt: skip
    """Self-influence from one ``autograd.grad`` per row and checkpoint, float64 on the CPU."""
    net = copy.deepcopy(model).cpu().double().eval()
    params = [p for p in net.parameters() if p.requires_grad]  # a tied tensor once
    batch = ze.cast(to_device(batch, torch.device("cpu")), torch.float64)
    n = len(next(iter(batch.values())) if isinstance(batch, dict) else batch[0])
    total = np.zeros(n)
    for path in paths:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(payload["model_state_dict"])  # copy_ upcasts to float64
        for i in range(n):
            value = loss(net, ze.take(batch, slice(i, i + 1))).sum()
            grads = torch.autograd.grad(value, params, allow_unused=True)
            total[i] += payload["lr"] * sum(float(g.pow(2).sum()) for g in grads if g is not None)
    return total


def check_exact(ctx: ze.Ctx, cpu_model: nn.Module) -> dict[str, Any]:
    """tracin exact on the device vs the float64 loop, on the first ``CHECK_ROWS`` rows."""
    rows = min(CHECK_ROWS, ctx.n)
    try:
        got = ze.exact(ctx)(rows)
    except Exception as exc:  # recorded: the table shows the model failed the check
        return {"rows": rows, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    want = loop_self_influence(cpu_model, ctx.spec.loss, ctx.paths, ctx.rows(rows))
    err = ze.relerr(got, want)
    tol = LOOP_TOL[ctx.spec.dtype]
    return {"rows": rows, "relerr": err, "tol": tol, "ok": err is not None and err < tol}


# --- one model ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Opts:
    device: torch.device
    dtype: torch.dtype
    quick: bool
    path_s: float
    rows_scale: int
    captum: bool


def build(spec: ze.Spec, opts: Opts, tmp: Path) -> tuple[ze.Ctx, nn.Module, str]:
    """The context on the device, the CPU model (the loop's), and why this dtype."""
    dtype, why = model_dtype(spec.name, opts.dtype)
    spec = dataclasses.replace(spec, dtype=dtype)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cpu_model = spec.build().to(dtype).eval()
    n = spec.quick_rows if opts.quick else spec.rows * opts.rows_scale
    train = ze.cast(spec.data(gen, n), dtype)
    paths = ze.make_checkpoints(cpu_model, tmp)  # from the CPU model: files hold CPU tensors
    model = copy.deepcopy(cpu_model).to(opts.device)
    train = to_device(train, opts.device)
    ckpts = tracin.Checkpoints.from_paths(paths, lr="lr")
    return ze.Ctx(spec, model, train, train, n, paths, ckpts, tmp), cpu_model, why


def bench_model(spec: ze.Spec, opts: Opts, tmp: Path) -> dict[str, Any]:
    ctx, cpu_model, why = build(spec, opts, tmp)
    spec, n = ctx.spec, ctx.n
    params = sum(p.numel() for p in ctx.model.parameters())
    print(f"\n== {spec.name}: {spec.title}, {params:,} parameters, {n} rows, {why}", flush=True)
    measure_opts = ze.Opts(opts.path_s, opts.quick)
    common = {"limit": n, "start": min(n, 64), "opts": measure_opts}

    def path(key: str, fn: Callable[[int], Any], **kw: Any) -> dict[str, Any]:
        return timed_path(key, fn, opts.device, **common, **kw)

    res = [
        path("train", ze.train_step(ctx), ckpts=1, step=ze.TRAIN_BATCH),
        path("forward", ze.forward(ctx), ckpts=1, step=256),
        path("exact", ze.exact(ctx), step=spec.batch),
        path("kron_store", ze.kron_store(ctx), step=spec.batch),
    ]
    if opts.captum:
        steps = {"samplewise": 64, "loop": 8, "loop_b64": 64}
        res += [path(f"captum_{k}", captum(ctx, k), step=steps[k]) for k in CAPTUM_KINDS]
    return summarise(ctx, cpu_model, res, why, params)


def summarise(
    ctx: ze.Ctx, cpu_model: nn.Module, res: list[dict[str, Any]], why: str, params: int
) -> dict[str, Any]:
    """Captum correctness vs tracin exact, the loop check, ratios; the model's report."""
    by = {r["key"]: r for r in res}
    ref = by["exact"].get("scores")
    for r in res:
        scores = r.pop("scores", None)
        if r["key"].startswith("captum") and scores is not None:
            r["relerr"] = ze.relerr(scores, ref)
            r["correct"] = r["relerr"] is not None and r["relerr"] < CAPTUM_TOL[ctx.spec.dtype]
    train = by["train"].get("rate")
    for r in res:
        r["ratio_to_train"] = r["rate"] / train if "rate" in r and train else None
    best = fastest_correct(by)
    check = check_exact(ctx, cpu_model)
    print(f"    exact vs float64 loop on {check['rows']} rows: rel. err "
          f"{_f(check.get('relerr'), '.1e')} ({'ok' if check.get('ok') else 'FAILED'})"
          f"; Captum fastest correct: {best}", flush=True)  # fmt: skip
    exact_rate = by["exact"].get("rate")
    return {
        "title": ctx.spec.title, "parameters": params, "rows": ctx.n, "batch": ctx.spec.batch,
        "dtype": str(ctx.spec.dtype).replace("torch.", ""), "dtype_why": why,
        "results": res, "loop_check": check, "captum_fastest_correct": best,
        "exact_over_captum": exact_rate / by[best]["rate"] if best and exact_rate else None,
    }  # fmt: skip


# --- the report ---------------------------------------------------------------------------------
def _f(v: Any, spec: str = ".0f") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return format(v, spec) if isinstance(v, float | int) else str(v)


def _cell(r: dict[str, Any] | None) -> str:
    if not r:
        return "-"
    if "rate" not in r:
        return "err"
    bad = "!" if r.get("correct") is False else ""
    return f"{r['rate']:.0f}{bad} ({_f(r.get('ratio_to_train'), '.2f')})"


def _rate_row(name: str, m: dict[str, Any]) -> str:
    by = {r["key"]: r for r in m["results"]}
    best, check = m["captum_fastest_correct"], m["loop_check"]
    ok = "ok" if check.get("ok") else "**FAILED**"
    return (
        f"| {name} | {m['parameters']:,} | {m['dtype']} | {_f(by['train'].get('rate'))} | "
        + " | ".join(_cell(by.get(k)) for k in TIMED[1:])
        + f" | {' | '.join(_cell(by.get('captum_' + k)) for k in CAPTUM_KINDS)} | "
        f"{best or '-'} | {_f(m['exact_over_captum'], '.2f')} | "
        f"{_f(check.get('relerr'), '.0e')} {ok} |"
    )


def _memory_row(name: str, m: dict[str, Any]) -> str:
    by = {r["key"]: r for r in m["results"]}
    keys = (*TIMED, *(f"captum_{k}" for k in CAPTUM_KINDS))
    cells = [
        f"{_f(by.get(k, {}).get('mem_mb'))} ({_f(by.get(k, {}).get('peak_mb'))})" for k in keys
    ]
    return f"| {name} | " + " | ".join(cells) + " |"


def markdown(report: dict[str, Any]) -> str:
    meta, models = report["meta"], report["models"]
    done = {k: m for k, m in models.items() if "results" in m}
    memory = "CUDA max_memory_allocated" if meta["device_type"] == "cuda" else "peak RSS (VmHWM)"
    lines = [
        "# GPU engines: tracin paths vs the training step and Captum, on one device",
        "",
        f"Reproduce: `{meta['command']}` ({meta['date']}; {meta['device_name']}; torch "
        f"{meta['torch']} (CUDA {meta['cuda']}), captum {meta['captum']}, transformers "
        f"{meta['transformers']}; dtype requested {meta['dtype']}; TF32 {meta['tf32']}; "
        f"{meta['seconds']} s in all).",
        "",
        "Rates: checkpoint-examples/s (3 checkpoints); train and forward: examples/s. Cells "
        "`rate (x train)`; `!`: a Captum configuration whose self-influence is wrong here (vs "
        "tracin exact). `loop err`: tracin exact on the device vs a float64 per-example loop on "
        "the CPU, first 8 rows (max elementwise relative error; tolerance 1e-4 float32, 5e-2 "
        "bfloat16).",
        "",
        "| model | params | dtype | train /s | forward | exact | Kronecker 1024 store | Captum "
        "sample-wise | Captum loop b1 | Captum loop b64 | Captum fastest correct | exact / it | "
        "loop err |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
        *(_rate_row(k, m) for k, m in done.items()),
        "",
        f"Memory ({memory}), MB above the path's start (peak in brackets):",
        "",
        "| model | " + " | ".join((*TIMED, *(f"captum {k}" for k in CAPTUM_KINDS))) + " |",
        "|---|" + "---:|" * (len(TIMED) + len(CAPTUM_KINDS)),
        *(_memory_row(k, m) for k, m in done.items()),
        "",
        "dtype per model: " + "; ".join(f"{k}: {m['dtype_why']}" for k, m in done.items()),
    ]
    skipped = [(k, m) for k, m in models.items() if "results" not in m]
    if skipped:
        lines += ["", "Not measured:", ""]
        lines += [f"- {k}: {m.get('skipped') or m.get('error')}" for k, m in skipped]
    errors = [(k, r) for k, m in done.items() for r in m["results"] if "error" in r]
    errors += [(k, {"key": "loop check", **m["loop_check"]}) for k, m in done.items()
               if "error" in m["loop_check"]]  # fmt: skip
    if errors:
        lines += ["", "Path errors:", ""]
        lines += [f"- {k} / {r['key']}: {r['error']}" for k, r in errors]
    return "\n".join(lines) + "\n"


# --- the driver ---------------------------------------------------------------------------------
def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda, cuda:1, cpu, ...")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="model names")
    p.add_argument("--quick", action="store_true", help="tiny sizes: warm-up and one run")
    p.add_argument("--path-s", type=float, default=1.0, help="seconds per timed run")
    p.add_argument("--rows-scale", type=int, default=None, help="rows x zoo_engines' (CUDA: 8)")
    p.add_argument("--budget-s", type=float, default=300.0, help="skip models after this long")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=Path("results/gpu"), help="results folder")
    return p.parse_args(argv)


def setup_device(device: torch.device) -> str:
    """TF32 off on CUDA (float32 stays float32); the device's name."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"{device}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def metadata(args: argparse.Namespace, argv: Sequence[str] | None, name: str) -> dict[str, Any]:
    given = sys.argv[1:] if argv is None else list(argv)
    return {
        "command": "python benchmarks/gpu_engines.py " + " ".join(given),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device, "device_type": torch.device(args.device).type,
        "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "captum": _version("captum"), "transformers": _version("transformers"),
        "dtype": args.dtype, "tf32": "off" if args.device.startswith("cuda") else "n/a",
        "threads": torch.get_num_threads(), "quick": args.quick, "budget_s": args.budget_s,
    }  # fmt: skip


def run_models(args: argparse.Namespace, opts: Opts, t0: float) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for name in args.models:
        elapsed = time.perf_counter() - t0
        if elapsed > args.budget_s:
            why = f"time budget --budget-s {args.budget_s:g} exceeded ({elapsed:.0f} s so far)"
            models[name] = {"skipped": why}
            print(f"\n== {name}: skipped, {why}", flush=True)
            continue
        missing = missing_package(name)
        if missing:
            models[name] = {"skipped": f"needs {missing}, which is not installed"}
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                models[name] = bench_model(spec_of(name), opts, Path(tmp))
            except Exception as exc:  # one model's failure is recorded, the others still run
                models[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(f"\n== {name}: ERROR {models[name]['error']}", flush=True)
    return models


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    unknown = sorted(set(args.models) - set(known_models()))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {', '.join(known_models())}")
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = setup_device(device)
    scale = args.rows_scale or (8 if device.type == "cuda" else 1)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    has_captum = importlib.util.find_spec("captum") is not None
    opts = Opts(device, dtype, args.quick, args.path_s, scale, has_captum)
    meta = metadata(args, argv, name)
    t0 = time.perf_counter()
    models = run_models(args, opts, t0)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    report = {"meta": meta, "models": models}
    text = markdown(report)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_engines.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu_engines.md").write_text(text)
    print(f"wrote {args.out / 'gpu_engines.json'} and {args.out / 'gpu_engines.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
