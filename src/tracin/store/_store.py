"""The feature store: per-(split, checkpoint) blocks of features and exact squared norms.

Layout under the run directory::

    manifest.json                                    config, checkpoints, splits (atomic rewrite)
    .lock                                            the writer now at work (see
    `tracin.store._lock`)
    features/<split>/ckpt_<id>/block_<k>.npy         (rows, dim) features, float32 or float16
    features/<split>/ckpt_<id>/sqnorm_<k>.npy        (rows,) exact ||g||^2, float64
    features/<split>/ckpt_<id>/block_<k>.json        rows and sha256 of both files, written last
    embeddings/<split>/block_<k>.npy (+ sqnorm, json) activations of a chosen layer (baseline)

Every file is written to a temporary name, fsynced and renamed, and a block counts as present
only once its ``.json`` exists, so a crash at any moment leaves complete blocks or none. Reads
check each block against its sha256 once per process (cached by path, size and mtime); a
mismatch raises `StoreError` naming the block, and the next featurize recomputes it.
``root=None`` keeps everything in memory.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tracin._errors import ConfigError, StoreError
from tracin._io import atomic_write, not_writable

__all__ = [
    "EMBEDDING",
    "KEEP_DIM",
    "SCHEMA_VERSION",
    "FeatureStore",
    "StorePlan",
    "check_store_args",
    "resolve_keep_features",
]

SCHEMA_VERSION = 2
"""Version 2 records each split's task; version 1 stores are read but not resumed."""
EMBEDDING = "__embedding__"
"""Checkpoint key under which a split's embeddings are stored (in ``embeddings/<split>``)."""


@dataclass(frozen=True)
class StorePlan:
    """The size of what featurize writes: per split, rows x checkpoints x dim x bytes.

    Attributes:
        splits: ``(split, rows, dim)`` per split; ``dim`` 0 for a split that keeps only its
            squared norms (the training split of an exact run, unless ``keep_features``).
        checkpoints: number of checkpoints.
        itemsize: bytes per stored feature (4 for float32, 2 for float16, 8 for float64).
    """

    splits: tuple[tuple[str, int, int], ...]
    checkpoints: int
    itemsize: int

    @property
    def feature_bytes(self) -> int:
        """Bytes of features: ``sum over splits of rows x checkpoints x dim x itemsize``."""
        return sum(rows * self.checkpoints * dim * self.itemsize for _, rows, dim in self.splits)

    @property
    def total_bytes(self) -> int:
        """Features plus the float64 squared norms (8 bytes per row and checkpoint)."""
        return self.feature_bytes + sum(rows * self.checkpoints * 8 for _, rows, _ in self.splits)

    def describe(self) -> str:
        """One line, e.g. ``train 4,000 rows x 2 checkpoints x 47,210 dims x 4 B = 1.51 GB``."""
        parts = []
        for split, rows, dim in self.splits:
            size = rows * self.checkpoints * dim * self.itemsize
            what = f"{dim:,} dims x {self.itemsize} B = {_gb(size)}" if dim else "norms only"
            parts.append(f"{split} {rows:,} rows x {self.checkpoints} checkpoints x {what}")
        return "; ".join(parts) + f"; total {_gb(self.total_bytes)} with squared norms"

    def check(self, max_store_gb: float | None, exact: bool) -> None:
        """Refuse a store whose features exceed ``max_store_gb`` (``None``: no limit).

        Raises:
            ConfigError: the features would take more than ``max_store_gb`` GB (10^9 bytes),
                naming the sizes and the fixes (projection, the budget, ``keep_features``).
        """
        if max_store_gb is None or self.feature_bytes <= max_store_gb * 1e9:
            return
        drop = ", or pass keep_features=False (self-influence needs only the squared norms)"
        raise ConfigError(
            f"the store would hold {_gb(self.feature_bytes)} of features ({self.describe()}), "
            f"past max_store_gb={max_store_gb:g}. Project the gradients with "
            f"proj_dim={self._fitting_dim(max_store_gb)}, "
            f'projection="kronecker" (per layer, small and fast){drop if exact else ""}, or '
            "raise max_store_gb= if you mean it"
        )

    def _fitting_dim(self, max_store_gb: float) -> int:
        """A power-of-two ``proj_dim`` (at most 1024, below the widest split) within the budget.

        1024 when even that does not fit (the budget is then the one to raise).
        """
        rows = sum(r for _, r, d in self.splits if d) * self.checkpoints * self.itemsize
        widest = max(d for _, _, d in self.splits)
        fit = int(max_store_gb * 1e9 // max(rows, 1))
        k = 1024
        while k > 16 and (k > fit or k >= widest):
            k //= 2
        return k if k <= fit and k < widest else 1024


KEEP_DIM = 4096
"""An exact run keeps its training features by default only up to this many per row."""


def check_store_args(keep: Any, max_store_gb: Any, on_plan: Any) -> None:
    """Refuse bad ``keep_features``, ``max_store_gb`` or ``on_plan`` arguments of featurize."""
    if keep is not None and not isinstance(keep, bool | np.bool_):
        raise ConfigError(f"keep_features={keep!r} must be True, False or None (the default)")
    ok = isinstance(max_store_gb, int | float) and not isinstance(max_store_gb, bool)
    if max_store_gb is not None and not (ok and max_store_gb > 0):
        raise ConfigError(
            f"max_store_gb={max_store_gb!r} must be a positive number of GB, or None for no limit"
        )
    if on_plan is not None and not callable(on_plan):
        raise ConfigError(f"on_plan={on_plan!r} must be None or a function on_plan(plan)")


def resolve_keep_features(keep: bool | None, kind: str, dim: int) -> bool:
    """``keep_features`` resolved: projected features always, exact ones up to `KEEP_DIM`.

    Args:
        keep: the user's choice, or ``None`` for the default.
        kind: the projection's kind (``"identity"``: exact gradients).
        dim: feature dimension per checkpoint.
    """
    if keep is not None:
        return bool(keep)
    return kind != "identity" or dim <= KEEP_DIM


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e7 else f"{size / 1e6:.2f} MB"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FeatureStore:
    """Blocks of features on disk (or in memory), addressed by split, checkpoint id and block.

    Args:
        root: run directory, or ``None`` for an in-memory store.
    """

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._memory: dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._verified: set[tuple[str, int, int]] = set()

    # --- manifest ---------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path | None:
        """``<root>/manifest.json``, or ``None`` in memory."""
        return None if self.root is None else self.root / "manifest.json"

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or ``None`` if there is none yet.

        Raises:
            StoreError: the manifest is not valid JSON.
        """
        path = self.manifest_path
        if path is None or not path.exists():
            return None
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"cannot read {path}: {exc}; featurize again with overwrite=True"
            ) from exc
        return data

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Atomically replace the manifest.

        Raises:
            StoreError: the store folder cannot be written.
        """
        path = self.manifest_path
        if path is None:
            return
        try:
            atomic_write(path, json.dumps(manifest, indent=2, sort_keys=True).encode())
        except OSError as exc:
            raise StoreError(not_writable(path.parent, exc)) from exc

    def remove_temp_files(self) -> int:
        """Delete temporary files a killed writer left behind; returns how many.

        Only safe while no other process writes to this store (featurize holds its lock).
        """
        if self.root is None:
            return 0
        stale = [*self.root.glob("features/**/.*.tmp"), *self.root.glob("embeddings/*/.*.tmp"),
                 *self.root.glob(".manifest.json.*.tmp")]  # fmt: skip
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    # --- blocks -----------------------------------------------------------------------------
    def _dir(self, split: str, ckpt_id: str) -> Path:
        assert self.root is not None
        if ckpt_id == EMBEDDING:
            return self.root / "embeddings" / split
        return self.root / "features" / split / f"ckpt_{ckpt_id}"

    def _paths(self, split: str, ckpt_id: str, block: int) -> tuple[Path, Path, Path]:
        d = self._dir(split, ckpt_id)
        return d / f"block_{block}.npy", d / f"sqnorm_{block}.npy", d / f"block_{block}.json"

    def block_rows(self, split: str, ckpt_id: str, block: int) -> int | None:
        """Rows of a complete block, or ``None`` if it is absent (or its metadata unreadable)."""
        if self.root is None:
            hit = self._memory.get((split, ckpt_id, block))
            return None if hit is None else len(hit[1])
        meta = self._paths(split, ckpt_id, block)[2]
        try:
            return int(json.loads(meta.read_text())["rows"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write_block(
        self, split: str, ckpt_id: str, block: int, features: np.ndarray, sqnorm: np.ndarray
    ) -> None:
        """Store one block: features ``(rows, dim)`` and squared norms ``(rows,)``.

        Raises:
            StoreError: the store has no folder (a streaming run).
        """
        if self.root is None:
            self._memory[(split, ckpt_id, block)] = (features, sqnorm)
            return
        f_path, s_path, meta = self._paths(split, ckpt_id, block)
        meta.unlink(missing_ok=True)  # the block is absent until its metadata is back
        f_bytes, s_bytes = _npy_bytes(features), _npy_bytes(sqnorm.astype(np.float64))
        info = {"rows": len(sqnorm), "features_sha256": _sha256(f_bytes),
                "sqnorm_sha256": _sha256(s_bytes)}  # fmt: skip
        try:
            atomic_write(f_path, f_bytes)
            atomic_write(s_path, s_bytes)
            atomic_write(meta, json.dumps(info).encode())
        except OSError as exc:
            raise StoreError(
                f"could not write block {block} of {split}/ckpt_{ckpt_id} in {self.root} "
                f"({exc.strerror or exc}); every block written before is intact: free space "
                "and run featurize again, it resumes from there"
            ) from exc

    def _verify(self, path: Path, expected: str, what: str) -> None:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key in self._verified:
            return
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            raise StoreError(
                f"{what} {path} is corrupted or truncated (sha256 mismatch); run featurize again "
                "on this store to recompute it"
            )
        self._verified.add(key)

    def read_block(
        self, split: str, ckpt_id: str, block: int, verify: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Features (memory-mapped) and squared norms of one block, checked against sha256.

        Raises:
            StoreError: a block is missing, or its sha256 does not match (corrupted).
        """
        if self.root is None:
            try:
                return self._memory[(split, ckpt_id, block)]
            except KeyError:
                raise StoreError(f"block {block} of {split}/{ckpt_id} was never computed") from None
        f_path, s_path, meta = self._paths(split, ckpt_id, block)
        try:
            info = json.loads(meta.read_text())
            if verify:
                self._verify(f_path, info["features_sha256"], "feature block")
                self._verify(s_path, info["sqnorm_sha256"], "norm block")
            features = np.load(f_path, mmap_mode="c", allow_pickle=False)  # copy-on-write
            sqnorm = np.load(s_path, allow_pickle=False)
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(
                f"block {block} of {split}/ckpt_{ckpt_id} in {self.root} is missing or unreadable "
                f"({exc}); run featurize again on this store to recompute it"
            ) from exc
        return features, sqnorm

    def is_valid(self, split: str, ckpt_id: str, block: int, rows: int) -> bool:
        """True if the block is complete, has ``rows`` rows and passes its checksums."""
        if self.block_rows(split, ckpt_id, block) != rows:
            return False
        try:
            self.read_block(split, ckpt_id, block)
        except StoreError:
            return False
        return True
