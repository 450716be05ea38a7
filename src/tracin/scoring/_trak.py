"""TRAK-style preconditioned influence over a store's projected training features.

TracInCP scores a training row by the lr-weighted inner product of gradients. TRAK (Park et al.
2023, "TRAK: Attributing Model Behavior at Scale", arXiv 2303.14186, eq. (16)) weights the inner
product by the inverse Gauss-Newton kernel of the projected training gradients, per model, and
averages over models. Over the checkpoints ``c = 1..C`` of one run:

    score(q, z) = sum_c w_c * phi_c(q)^T (Phi_c^T Phi_c + lambda_c I)^{-1} phi_c(z)

- ``phi_c(x)``: the store's projected gradient of ``x`` at checkpoint ``c``, ``(k,)`` with
  ``k = proj_dim``; ``Phi_c``: all ``N`` training rows, ``(N, k)``, read block by block (the
  ``(k, k)`` kernel is the only state, so memory is flat in ``N``);
- ``lambda_c = damping * trace(Phi_c^T Phi_c) / k``: damping relative to the mean eigenvalue, so
  one ``damping`` fits any gradient scale (each checkpoint's term is then invariant to a
  rescaling of its features). The default, 1, was the best of 0.001..10 on digits and was
  then confirmed on MNIST-1D (docs/quality.md, "Counterfactual accuracy (LDS)"); small dampings
  approach TRAK's undamped inverse, large ones TracInCP with weights ``w_c / lambda_c``;
- ``w_c = 1 / C`` (``weighting="mean"``: TRAK's average over models, the default) or ``lr_c``
  (``weighting="lr"``: TracInCP's weights), applied by `tracin.scoring._maths.lr_scaled_concat`.

The training features are gradients of the training loss. For softmax cross entropy,
``d loss = -(1 - p) d margin`` with TRAK's margin ``log(p / (1 - p))``, so the training side already
carries TRAK's ``(1 - p)`` reweighting (``Q``), with a sign that the loss-gradient query cancels.
The kernel differs from TRAK's: it is built from loss gradients (an empirical Fisher), not from
margin gradients, which the store does not hold.

The precompute, ``K_c^{-1}`` per checkpoint, is cached per run and damping in memory and, for a
store on disk, saved under ``<run>/preconditioner/`` (atomically, keyed by a hash of the manifest
and the damping, so a changed store never reuses a stale inverse). Scoring then costs one
``(Q, k) x (k, k)`` product per checkpoint plus the same blockwise pass as TracInCP.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from tracin._batch import Batch, Data
from tracin._errors import ConfigError, StoreError
from tracin._io import atomic_write, not_writable
from tracin._task import Task
from tracin.scoring._maths import lr_scaled_concat, products
from tracin.scoring._protocol import StoredRun

__all__ = [
    "DEFAULT_DAMPING",
    "Preconditioner",
    "Weighting",
    "kernel_inverse",
    "preconditioner",
    "trak_influence",
]

Weighting = Literal["mean", "lr"]
DEFAULT_DAMPING = 1.0
"""Default ``damping``: ``lambda_c = damping * trace(K_c) / k`` (see benchmarks/lds_trak.py)."""

_CACHE: weakref.WeakKeyDictionary[StoredRun, dict[float, Preconditioner]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class Preconditioner:
    """Per-checkpoint inverse damped Gauss-Newton kernels of one run.

    Attributes:
        damping: the relative damping the kernels were built with.
        lambdas: ``lambda_c`` per checkpoint (absolute, in squared feature units).
        inverses: ``(k, k)`` float64 ``(Phi_c^T Phi_c + lambda_c I)^{-1}`` per checkpoint.
    """

    damping: float
    lambdas: tuple[float, ...]
    inverses: tuple[np.ndarray, ...]


def check_damping(damping: object) -> float:
    """``damping`` as a float, or a ConfigError naming it.

    Raises:
        ConfigError: not a finite number > 0.
    """
    if isinstance(damping, bool) or not isinstance(damping, int | float | np.floating):
        raise ConfigError(f"damping={damping!r} must be a positive number, e.g. damping=1.0")
    value = float(damping)
    if not math.isfinite(value) or value <= 0.0:
        raise ConfigError(f"damping={damping!r} must be a positive number, e.g. damping=1.0")
    return value


def check_weighting(weighting: object) -> Weighting:
    """``weighting`` if it is ``"mean"`` or ``"lr"``.

    Raises:
        ConfigError: any other value.
    """
    if weighting == "mean":
        return "mean"
    if weighting == "lr":
        return "lr"
    raise ConfigError(f"weighting={weighting!r}; expected 'mean' (TRAK's average) or 'lr'")


def kernel_inverse(blocks: Iterable[np.ndarray], damping: float) -> tuple[np.ndarray, float]:
    """``(Phi^T Phi + lambda I)^{-1}`` from row blocks of ``Phi``, with ``lambda`` relative.

    Args:
        blocks: ``(rows, k)`` arrays whose stacked rows are ``Phi`` ``(N, k)``; any float dtype.
        damping: ``lambda = damping * trace(Phi^T Phi) / k`` (> 0).

    Returns:
        ``(K^{-1}, lambda)``: the ``(k, k)`` float64 inverse and the absolute damping.

    Raises:
        ConfigError: no blocks, blocks of different widths, or all-zero features.
    """
    kernel: torch.Tensor | None = None
    for block in blocks:
        b = torch.from_numpy(np.asarray(block, dtype=np.float64))
        if kernel is None:
            kernel = b.T @ b
        elif kernel.shape[0] != b.shape[1]:
            raise ConfigError(f"feature blocks differ in width: {kernel.shape[0]} vs {b.shape[1]}")
        else:
            kernel += b.T @ b
    if kernel is None:
        raise ConfigError("no training features to build the TRAK kernel from")
    k = kernel.shape[0]
    trace = float(kernel.diagonal().sum())
    if not trace > 0.0:
        raise ConfigError(
            "every training gradient is zero at a checkpoint, so the TRAK kernel is empty; "
            "drop that checkpoint"
        )
    lam = check_damping(damping) * trace / k
    kernel.diagonal().add_(lam)
    factor = torch.linalg.cholesky(kernel)  # positive definite: lambda > 0
    inverse = torch.cholesky_inverse(factor)
    return ((inverse + inverse.T) / 2).numpy(), lam


def _check_projected(run: StoredRun) -> None:
    kind = run.config.projection.kind
    if run.streaming or not run.config.projection.projected:
        raise ConfigError(
            f"trak_influence needs projected training features in the store, and this run has "
            f"{'none (streaming)' if run.streaming else f'projection {kind!r}'}: featurize with "
            "proj_dim=k (e.g. proj_dim=1024) to store them"
        )


def _blocks(run: StoredRun, ckpt_id: str) -> Iterable[np.ndarray]:
    for k in range(-(-run.n_train // run.config.block_rows)):
        yield np.asarray(run.store.read_block("train", ckpt_id, k)[0])


def _disk_path(run: StoredRun, damping: float) -> Path | None:
    root = run.store.root
    manifest = run.store.read_manifest()
    if root is None or manifest is None:
        return None
    key = json.dumps({"manifest": manifest, "damping": repr(damping), "n": run.n_train},
                     sort_keys=True)  # fmt: skip
    return root / "preconditioner" / f"trak_{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def _load(
    path: Path | None, n_ckpts: int
) -> tuple[tuple[float, ...], tuple[np.ndarray, ...]] | None:
    if path is None or not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            lambdas = tuple(float(x) for x in saved["lambdas"])
            inverses = tuple(np.asarray(saved[f"inverse_{c}"]) for c in range(n_ckpts))
    except (OSError, ValueError, KeyError):
        return None  # unreadable: recompute and overwrite
    return (lambdas, inverses) if len(lambdas) == n_ckpts else None


def _save(path: Path, lambdas: tuple[float, ...], inverses: tuple[np.ndarray, ...]) -> None:
    buf = io.BytesIO()
    arrays = {f"inverse_{c}": inv for c, inv in enumerate(inverses)}
    np.savez(buf, lambdas=np.asarray(lambdas, dtype=np.float64), **arrays)  # type: ignore[arg-type]
    try:
        atomic_write(path, buf.getvalue())
    except OSError as exc:
        raise StoreError(not_writable(path.parent, exc)) from exc


def preconditioner(run: StoredRun, damping: float = DEFAULT_DAMPING) -> Preconditioner:
    """The run's per-checkpoint inverse kernels, built once per damping (cached, and saved).

    Args:
        run: a run whose store holds projected training features (``proj_dim=k``).
        damping: relative damping (see the module docstring).

    Raises:
        ConfigError: no projected features in the store, or a bad ``damping``.
        StoreError: the store folder cannot be written.
    """
    _check_projected(run)
    damping = check_damping(damping)
    cached = _CACHE.setdefault(run, {})
    if damping in cached:
        return cached[damping]
    path = _disk_path(run, damping)
    loaded = _load(path, len(run.ckpt_ids))
    if loaded is None:
        pairs = [kernel_inverse(_blocks(run, c), damping) for c in run.ckpt_ids]
        lambdas, inverses = tuple(p[1] for p in pairs), tuple(p[0] for p in pairs)
        if path is not None:
            _save(path, lambdas, inverses)
    else:
        lambdas, inverses = loaded
    cached[damping] = Preconditioner(damping, lambdas, inverses)
    return cached[damping]


def trak_influence(
    run: StoredRun,
    query: Data | Batch | str,
    *,
    query_task: Task | None = None,
    damping: float = DEFAULT_DAMPING,
    weighting: Weighting = "mean",
) -> np.ndarray:
    """TRAK-style preconditioned score of every training row on every query, ``(Q, N)`` float64.

    ``score(q, z) = sum_c w_c phi_c(q)^T (Phi_c^T Phi_c + lambda_c I)^{-1} phi_c(z)``, see the
    module docstring; positive means, as for TracInCP, that ``z`` lowers the query's loss.

    Args:
        run: a run whose store holds projected training features (``proj_dim=k``).
        query: as for `Run.influence`.
        query_task: as for `Run.influence`.
        damping: ``lambda_c = damping * trace(Phi_c^T Phi_c) / k``.
        weighting: ``"mean"`` (``w_c = 1 / C``) or ``"lr"`` (``w_c = lr_c``).

    Raises:
        ConfigError: no projected features in the store (featurize with ``proj_dim=``), a bad
            ``damping`` or ``weighting``, or a query the run cannot score.
        StoreError: the inverses cannot be saved under ``<run>/preconditioner/``.
    """
    _check_projected(run)
    weighting = check_weighting(weighting)
    pre = preconditioner(run, damping)
    dtype = torch.float64 if run.config.dtype == "float64" else torch.float32
    queries = [
        (q.detach().cpu().double() @ torch.from_numpy(inv)).to(dtype)  # K_c^{-1} symmetric
        for q, inv in zip(run.query_features(query, query_task), pre.inverses, strict=True)
    ]
    n_ckpts = len(run.ckpt_ids)
    weights = [1.0 / n_ckpts] * n_ckpts if weighting == "mean" else list(run.lrs)
    q_cat = lr_scaled_concat(weights, queries)
    out = np.empty((q_cat.shape[0], run.n_train), dtype=np.float64)
    blocks = [_blocks(run, c) for c in run.ckpt_ids]
    start = 0
    for parts in zip(*blocks, strict=True):
        train = torch.cat([torch.from_numpy(np.asarray(p)).to(dtype) for p in parts], dim=1)
        out[:, start : start + len(train)] = products(q_cat, train).double().numpy()
        start += len(train)
        if run.progress is not None:
            run.progress("score", len(train), run.n_train)
    return out
