"""Store scale: exact blockwise neighbors against FAISS on a synthetic store of up to 1e6 rows.

Writes a synthetic float16 store with `FeatureStore` in the layout `tracin.featurize` writes
(``tracin.open`` reads it), then measures each path in a fresh subprocess so that each peak RSS
(``ru_maxrss``) belongs to that measurement alone:

- exact: ``run.neighbors("query", k)`` (proponents and opponents of the stored query split),
  cold (page cache evicted with ``posix_fadvise(DONTNEED)``, so disk reads and sha256
  verification are included), first call with the page cache warm (sha256 included), and warm
  (best of three further calls on the same run);
- profile: the warm exact call under cProfile, grouped into the parts of ``Run._score_blocks``;
- prototype: a faster exact path (lrs folded into the query, one matmul per block, torch
  casts into a reused buffer, a running top-k) to show what a fix to ``Run._score_blocks``
  and ``Run.neighbors`` would gain;
- flat: `FaissIndex` ``"flat"`` (exact) build and query;
- approx: `FaissIndex` ``"ivf"`` (float16 lists) and/or ``"hnsw"``: build, then a sweep of
  ``nprobe`` / ``ef_search`` reporting recall@k against the exact path and query time.

Synthetic rows: 1000 Gaussian centres per checkpoint (correlated across checkpoints), noise of
half the centres' spread, a lognormal per-row scale (sigma 0.25: gradient norms vary) and the
sign flipped on 10% of rows (so every cluster holds opponents: similar rows pulling the other
way). Queries are drawn from the same mixture with scale 1.

    python benchmarks/store_scale.py                      # 1e5 and 1e6 rows, as in README
    python benchmarks/store_scale.py --rows 100000 --approx ivf hnsw
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import tracin
from tracin.gradients import RunConfig
from tracin.projection import ProjectionConfig
from tracin.scoring import FaissIndex, proponents_and_opponents
from tracin.store import SCHEMA_VERSION, FeatureStore

LRS = (0.5, 0.1, 0.02)
BLOCK_ROWS = 16384
N_CENTRES = 1000
RESULTS = Path(__file__).resolve().parent / "results" / "store_scale.json"
MEM_BW, FLOP_RATE = 20e9, 100e9  # the machine limit's assumptions: 20 GB/s, 100 GFLOP/s


# --- the synthetic store ----------------------------------------------------------------------
def centres(rng: np.random.Generator, n_ckpt: int, dim: int) -> list[np.ndarray]:
    base = rng.standard_normal((N_CENTRES, dim), dtype=np.float32)
    return [
        base + 0.5 * rng.standard_normal((N_CENTRES, dim), dtype=np.float32) for _ in range(n_ckpt)
    ]


def synthetic_rows(
    rng: np.random.Generator, mus: list[np.ndarray], rows: int, query: bool
) -> list[np.ndarray]:
    """One block of rows: per checkpoint ``(rows, dim)`` float16 features."""
    ids = rng.integers(0, N_CENTRES, rows)
    scale = np.ones(rows, np.float32) if query else rng.lognormal(0, 0.25, rows).astype(np.float32)
    if not query:
        scale[rng.random(rows) < 0.1] *= -1
    out = []
    for mu in mus:
        noise = 0.5 * rng.standard_normal((rows, mu.shape[1]), dtype=np.float32)
        out.append((scale[:, None] * (mu[ids] + noise)).astype(np.float16))
    return out


def write_store(path: Path, n_rows: int, dim: int, n_ckpt: int, n_query: int) -> dict[str, Any]:
    spec = {
        "n_rows": n_rows,
        "dim": dim,
        "checkpoints": n_ckpt,
        "queries": n_query,
        "block_rows": BLOCK_ROWS,
        "centres": N_CENTRES,
        "generator": 2,
    }
    marker = path / "synthetic.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return {"reused": True, **json.loads((path / "written.json").read_text())}
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    mus = centres(rng, n_ckpt, dim)
    ckpt_ids = [f"ckpt_{c}" for c in range(n_ckpt)]
    lrs = [LRS[c % len(LRS)] for c in range(n_ckpt)]
    store = FeatureStore(path)
    config = RunConfig(
        parameters=("synthetic",),
        dtype="float16",
        block_rows=BLOCK_ROWS,
        projection=ProjectionConfig("gaussian", dim, 0),
        batch_size=64,
    )
    store.write_manifest(
        {
            "schema": SCHEMA_VERSION,
            "tracin_version": tracin.__version__,
            "config": config.to_json(),
            "model": "synthetic",
            "checkpoints": [
                {"id": c, "step": i, "lr": lr, "sha256": "synthetic", "path": None}
                for i, (c, lr) in enumerate(zip(ckpt_ids, lrs, strict=True))
            ],
            "splits": {
                "train": {"n_rows": n_rows, "fingerprint": "synthetic-train"},
                "query": {"n_rows": n_query, "fingerprint": "synthetic-query"},
            },
        }
    )
    for split, rows in (("train", n_rows), ("query", n_query)):
        for k, start in enumerate(range(0, rows, BLOCK_ROWS)):
            block = synthetic_rows(rng, mus, min(BLOCK_ROWS, rows - start), split == "query")
            for c, feats in zip(ckpt_ids, block, strict=True):
                sq = np.square(feats, dtype=np.float64).sum(axis=1)
                store.write_block(split, c, k, feats, sq)
    nbytes = sum(p.stat().st_size for p in (path / "features").rglob("*") if p.is_file())
    train = sum(p.stat().st_size for p in (path / "features/train").rglob("block_*.npy"))
    written = {"seconds": time.perf_counter() - t0, "store_bytes": nbytes, "train_bytes": train}
    (path / "written.json").write_text(json.dumps(written))
    marker.write_text(json.dumps(spec))
    return {"reused": False, **written}


# --- measurements (each in its own process) ---------------------------------------------------
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def evict(path: Path) -> None:
    """Drop the store's pages from the page cache (no root needed for clean pages)."""
    for p in path.rglob("*.npy"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure_exact(path: Path, k: int) -> dict[str, Any]:
    evict(path)
    cold, _ = timed(lambda: tracin.open(path).neighbors("query", k))
    run = tracin.open(path)  # a new store object: sha256 is checked again, from the page cache
    first, _ = timed(lambda: run.neighbors("query", k))
    warm_runs = [timed(lambda: run.neighbors("query", k)) for _ in range(3)]
    warm, (pro, opp) = min(warm_runs, key=lambda r: r[0])
    np.savez(
        path.parent / f"{path.name}.exact.npz",
        pro=pro.indices,
        opp=opp.indices,
        pro_scores=pro.scores,
        opp_scores=opp.scores,
    )
    return {
        "cold_s": cold,
        "first_cached_s": first,
        "warm_s": warm,
        "warm_runs_s": [r[0] for r in warm_runs],
        "rss_mb": peak_rss_mb(),
    }


PARTS = {  # cProfile function names -> the part of the exact path they are (cumulative time)
    "<built-in method numpy.array>": "Run._score_blocks: float16 -> float32 np.array(block)",
    "_inner": "Run._score_blocks: q @ f.T per checkpoint (torch, K = dim)",
    "__matmul__": "Run._score_blocks: q @ f.T per checkpoint (torch, K = dim)",
    "lr_weighted_sum": "Run._score_blocks: lr_weighted_sum (float64 per checkpoint)",
    "top_k": "Run.neighbors: top_k per block, largest and smallest (np.argpartition)",
    "merge_top_k": "Run.neighbors: merge_top_k",
    "read_block": "FeatureStore.read_block (meta json, stat, mmap, sqnorm)",
}


def measure_profile(path: Path, k: int) -> dict[str, Any]:
    run = tracin.open(path)
    run.neighbors("query", k)  # verify and warm up
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(run.neighbors, "query", k)
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    parts: dict[str, float] = {}
    for (_, _, name), (_, _, _, cum, _) in stats.items():
        if name in PARTS:
            parts[PARTS[name]] = parts.get(PARTS[name], 0.0) + cum
    parts["rest"] = total - sum(parts.values())
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:8]
    tottime = {f"{Path(f).name}:{line}({name})": tt for (f, line, name), (_, _, tt, _, _) in top}
    return {"profiled_s": total, "parts_s": parts, "top_tottime_s": tottime}


class RunningTopK:
    """Exact running top-k per query over score blocks: only rows beating the current k-th
    score are looked at (after the first block, a few per query), ties to the lower row."""

    def __init__(self, k: int, largest: bool) -> None:
        self.k, self.largest = k, largest
        self.best: Any = None  # Neighbors with float32 scores

    def update(self, scores: np.ndarray, start: int) -> None:
        """Fold in ``scores`` ``(rows, Q)`` float32 for rows ``start ...``."""
        from tracin.scoring import Neighbors, top_k

        k, q = self.k, scores.shape[1]
        if self.best is not None:
            kth = self.best.scores[:, -1]
            r, c = np.nonzero(scores > kth if self.largest else scores < kth)
        if self.best is None or r.size > 4 * q * k:  # first block, or many candidates
            part = top_k(scores.T, min(k, scores.shape[0]), self.largest)
            part = Neighbors(part.indices + start, part.scores.astype(np.float32))
            if self.best is None:
                self.best = part
                return
            r, c = np.nonzero(np.ones_like(part.indices, dtype=bool))
            rows, vals = part.indices[r, c], part.scores[r, c]
        else:
            rows, vals = r + start, scores[r, c]
        if rows.size == 0:
            return
        qs = np.concatenate([np.repeat(np.arange(q), self.best.indices.shape[1]), c])
        idx = np.concatenate([self.best.indices.ravel(), rows])
        val = np.concatenate([self.best.scores.ravel(), vals])
        order = np.lexsort((idx, -val if self.largest else val, qs))
        first = np.cumsum(np.bincount(qs, minlength=q)) - np.bincount(qs, minlength=q)
        keep = order[(first[:, None] + np.arange(k)).ravel()]
        self.best = Neighbors(idx[keep].reshape(q, k), val[keep].reshape(q, k))


def prototype_neighbors(run: tracin.Run, split: str, k: int) -> tuple[Any, Any]:
    """What `Run._score_blocks` + `Run.neighbors` could do: same results, less work per block.

    1. lrs go into the query once (``q_lr = concat_c lr_c q_c``, transposed and contiguous),
       so a block's C checkpoints are one ``(rows, C*dim) @ (C*dim, Q)`` float32 matmul
       instead of C matmuls with K = dim plus a float64 ``lr_weighted_sum`` per block;
    2. float16 -> float32 with torch ``copy_`` into one reused buffer (multithreaded, ~5x
       numpy's cast, and no fresh 32 MB allocation, so no page faults, per block);
    3. an exact running top-k (`RunningTopK`) instead of two full ``top_k`` per block.
    """
    import torch

    from tracin.scoring import Neighbors

    assert run.store is not None
    q = [np.asarray(f.numpy(), np.float32) for f in run.query_features(split)]
    q_lr = torch.from_numpy(
        np.concatenate([lr * f for lr, f in zip(run.lrs, q, strict=True)], axis=1).T.copy()
    )  # (C*dim, Q), contiguous
    dim = q[0].shape[1]
    buf = torch.empty((run.config.block_rows, q_lr.shape[0]), dtype=torch.float32)
    out = torch.empty((run.config.block_rows, q_lr.shape[1]), dtype=torch.float32)
    pro, opp = RunningTopK(k, True), RunningTopK(k, False)
    for b in range(-(-run.n_train // run.config.block_rows)):
        rows = 0
        for c, ckpt in enumerate(run.ckpt_ids):
            f = run.store.read_block("train", ckpt, b)[0]
            rows = f.shape[0]
            buf[:rows, c * dim : (c + 1) * dim].copy_(torch.from_numpy(np.asarray(f)))
        scores = torch.mm(buf[:rows], q_lr, out=out[:rows]).numpy()  # (rows, Q) float32
        pro.update(scores, b * run.config.block_rows)
        opp.update(scores, b * run.config.block_rows)
    return tuple(Neighbors(t.best.indices, t.best.scores.astype(np.float64)) for t in (pro, opp))


def measure_prototype(path: Path, k: int) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    run = tracin.open(path)
    first, _ = timed(lambda: prototype_neighbors(run, "query", k))
    warm_runs = [timed(lambda: prototype_neighbors(run, "query", k)) for _ in range(3)]
    warm, (pro, opp) = min(warm_runs, key=lambda r: r[0])
    exact = np.load(path.parent / f"{path.name}.exact.npz")
    same = float(
        np.mean(np.concatenate([pro.indices == exact["pro"], opp.indices == exact["opp"]]))
    )
    err = max(
        np.max(np.abs(pro.scores - exact["pro_scores"]) / np.abs(exact["pro_scores"])),
        np.max(np.abs(opp.scores - exact["opp_scores"]) / np.abs(exact["opp_scores"])),
    )
    return {
        "first_cached_s": first,
        "warm_s": warm,
        "rss_mb": peak_rss_mb(),
        "same_indices": same,
        "max_rel_score_err": float(err),
    }


def recall(got: np.ndarray, want: np.ndarray) -> float:
    hits = [len(set(g) & set(w)) for g, w in zip(got.tolist(), want.tolist(), strict=True)]
    return float(np.sum(hits) / want.size)


def measure_faiss(path: Path, k: int, kind: str, sweep: list[int], build: dict[str, Any]) -> Any:
    run = tracin.open(path)
    queries = run.folded_queries("query")
    build_s, index = timed(lambda: FaissIndex.build(run, kind, **build))  # type: ignore[arg-type]
    exact = np.load(path.parent / f"{path.name}.exact.npz")
    rows = []
    for value in sweep or [0]:
        if kind == "ivf":
            index.tune(nprobe=value)
        elif kind == "hnsw":
            index.tune(ef_search=value)
        times = []
        for _ in range(3):
            t, (pro, opp) = timed(lambda: proponents_and_opponents(index, queries, k))
            times.append(t)
        rows.append(
            {
                "param": value,
                "query_s": min(times),
                "recall_pro": recall(pro.indices, exact["pro"]),
                "recall_opp": recall(opp.indices, exact["opp"]),
            }
        )
    return {
        "kind": kind,
        "build": build,
        "build_s": build_s,
        "sweep": rows,
        "rss_mb": peak_rss_mb(),
    }


def child(args: argparse.Namespace) -> None:
    path, k = Path(args.store), args.k
    if args.measure == "exact":
        out = measure_exact(path, k)
    elif args.measure == "profile":
        out = measure_profile(path, k)
    elif args.measure == "prototype":
        out = measure_prototype(path, k)
    else:
        spec = json.loads(args.spec)
        out = measure_faiss(path, k, args.measure, spec["sweep"], spec["build"])
    print(json.dumps(out))


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of CPU time the whole machine spent busy over ``seconds`` (Linux)."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]

    (t0, i0), _ = read(), time.sleep(seconds)
    t1, i1 = read()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(limit_s: float = 600, threshold: float = 0.05) -> float:
    """Wait (up to ``limit_s``) until other processes leave the CPUs idle; the last busy share."""
    deadline = time.monotonic() + limit_s
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


def _cpu_ticks() -> tuple[int, int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4], v[7]  # total, idle + iowait, steal


def in_subprocess(
    measure: str, store: Path, k: int, spec: dict[str, Any] | None = None, attempts: int = 1
) -> Any:
    """Run one measurement in a fresh process; retry while other load disturbed it.

    ``interference`` is the CPU time that other processes (and the hypervisor, as steal) took
    during the measurement, as a share of the machine; the least disturbed attempt is kept.
    """
    cmd = [sys.executable, __file__, "--measure", measure, "--store", str(store), "--k", str(k)]
    if spec is not None:
        cmd += ["--spec", json.dumps(spec)]
    best: Any = None
    for _ in range(attempts):
        wait_quiet()
        r0, (t0, i0, s0), w0 = (
            resource.getrusage(resource.RUSAGE_CHILDREN),
            _cpu_ticks(),
            time.perf_counter(),
        )
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        r1, (t1, i1, s1), w1 = (
            resource.getrusage(resource.RUSAGE_CHILDREN),
            _cpu_ticks(),
            time.perf_counter(),
        )
        if done.returncode != 0:
            raise RuntimeError(f"{measure} on {store} failed:\n{done.stderr}")
        hz = os.sysconf("SC_CLK_TCK")
        child = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        others = max(0.0, ((t1 - t0) - (i1 - i0) - (s1 - s0)) / hz - child) + (s1 - s0) / hz
        out = json.loads(done.stdout.strip().splitlines()[-1])
        out["interference"] = others / ((w1 - w0) * (os.cpu_count() or 1))
        if best is None or out["interference"] < best["interference"]:
            best = out
        if best["interference"] < 0.03:
            break
    return best


# --- the driver -------------------------------------------------------------------------------
def approx_spec(kind: str, n: int) -> dict[str, Any]:
    if kind == "ivf":
        nlist = max(1, min(int(np.sqrt(n)), n // 39))
        return {
            "build": {"nlist": nlist, "nprobe": 1, "train_rows": 50 * nlist},
            "sweep": [1, 2, 4, 8, 16, 32, 64],
        }
    return {
        "build": {"m": 16, "ef_construction": 64, "ef_search": 16},
        "sweep": [16, 32, 64, 128, 256],
    }


def pick(sweep: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The fastest setting whose recall meets the target on both sides (else the best recall)."""
    ok = [r for r in sweep if min(r["recall_pro"], r["recall_opp"]) >= target]
    if ok:
        return min(ok, key=lambda r: r["query_s"])
    return max(sweep, key=lambda r: min(r["recall_pro"], r["recall_opp"]))


def scale(args: argparse.Namespace, n: int) -> dict[str, Any]:
    store = Path(args.out) / f"n{n}"
    written = write_store(store, n, args.dim, args.checkpoints, args.queries)
    flops = 2 * args.queries * n * args.checkpoints * args.dim
    limit = max(written["store_bytes"] / MEM_BW, flops / FLOP_RATE)
    res: dict[str, Any] = {"rows": n, "store": written, "flops": flops, "limit_s": limit}
    res["exact"] = in_subprocess("exact", store, args.k, attempts=args.attempts)
    res["exact"]["ratio_warm"] = res["exact"]["warm_s"] / limit
    res["exact"]["ratio_cold"] = res["exact"]["cold_s"] / limit
    res["profile"] = in_subprocess("profile", store, args.k, attempts=args.attempts)
    res["prototype"] = in_subprocess("prototype", store, args.k, attempts=args.attempts)
    res["prototype"]["ratio_warm"] = res["prototype"]["warm_s"] / limit
    flat = {"build": {}, "sweep": []}
    res["flat"] = in_subprocess("flat", store, args.k, flat, attempts=args.attempts)
    res["approx"] = {}
    for kind in args.approx:
        out = in_subprocess(kind, store, args.k, approx_spec(kind, n), attempts=args.attempts)
        out["chosen"] = pick(out["sweep"], args.target_recall)
        out["speedup_vs_exact_warm"] = res["exact"]["warm_s"] / out["chosen"]["query_s"]
        res["approx"][kind] = out
    return res


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'rows':>9} {'path':<24} {'build s':>8} {'query s':>8} {'x limit':>8} "
        f"{'RSS MB':>7} {'recall pro/opp':>15}"
    ]
    for r in results:
        n, ex, pr, fl = r["rows"], r["exact"], r["prototype"], r["flat"]
        lines.append(
            f"{n:>9} {'store bytes / limit':<24} {r['store']['store_bytes'] / 1e9:>7.2f}G "
            f"{r['limit_s']:>8.3f}"
        )
        for name, t in (
            ("exact cold (disk)", ex["cold_s"]),
            ("exact 1st (cached)", ex["first_cached_s"]),
            ("exact warm", ex["warm_s"]),
        ):
            lines.append(
                f"{n:>9} {name:<24} {'':>8} {t:>8.3f} {t / r['limit_s']:>8.2f} "
                f"{ex['rss_mb']:>7.0f} {'1.000/1.000':>15}"
            )
        lines.append(
            f"{n:>9} {'prototype exact warm':<24} {'':>8} {pr['warm_s']:>8.3f} "
            f"{pr['ratio_warm']:>8.2f} {pr['rss_mb']:>7.0f} "
            f"{'same ' + format(pr['same_indices'], '.3f'):>15}"
        )
        f0 = fl["sweep"][0]
        lines.append(
            f"{n:>9} {'faiss flat':<24} {fl['build_s']:>8.2f} {f0['query_s']:>8.3f} "
            f"{f0['query_s'] / r['limit_s']:>8.2f} {fl['rss_mb']:>7.0f} "
            f"{f0['recall_pro']:>7.3f}/{f0['recall_opp']:.3f}"
        )
        for kind, a in r["approx"].items():
            c = a["chosen"]
            name = f"faiss {kind} ({'nprobe' if kind == 'ivf' else 'ef'}={c['param']})"
            lines.append(
                f"{n:>9} {name:<24} {a['build_s']:>8.2f} {c['query_s']:>8.3f} "
                f"{c['query_s'] / r['limit_s']:>8.2f} {a['rss_mb']:>7.0f} "
                f"{c['recall_pro']:>7.3f}/{c['recall_opp']:.3f}  "
                f"{a['speedup_vs_exact_warm']:.1f}x faster than exact warm"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", default="/tmp/tracin_scale")
    parser.add_argument("--approx", nargs="+", default=["ivf"], choices=["ivf", "hnsw"])
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--json", default=str(RESULTS))
    parser.add_argument(
        "--attempts", type=int, default=3, help="retries of a measurement disturbed by other load"
    )
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        child(args)
        return
    results = []
    for n in args.rows:
        results.append(scale(args, n))
        print(table(results[-1:]), flush=True)
    machine = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "faiss": __import__("faiss").__version__,
        "torch": __import__("torch").__version__,
    }
    out = {
        "machine": machine,
        "args": {k: v for k, v in vars(args).items() if k not in ("measure", "store", "spec")},
        "limit": {"bytes_per_s": MEM_BW, "flops_per_s": FLOP_RATE},
        "results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print("\n" + table(results))


if __name__ == "__main__":
    main()
