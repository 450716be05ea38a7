"""Neighbor search over folded TracIn vectors: exact and blockwise, or a FAISS index.

With ``u(x) = concat_c sqrt(lr_c) f_c(x)`` (see `fold`), TracInCP(z, q) = ``<u(q), u(z)>``. So
proponents of ``q`` are a maximum-inner-product search over the training vectors ``u(z)``, and
opponents are the same search for ``-u(q)``: the most negative ``<u(q), u(z)>`` are the largest
``<-u(q), u(z)>``. Every index implements `NeighborIndex.search`; `neighbors` derives both.

- `ExactIndex` reads the run's stored blocks on every search (memory ``O(Q x block_rows)``).
- `FaissIndex` holds the vectors in a FAISS index (``"flat"`` exact, ``"hnsw"`` or ``"ivf"``
  approximate), built block by block, saved and loaded atomically. FAISS is optional:
  ``pip install 'tracin[faiss]'``.
"""

from __future__ import annotations

import importlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from tracin._errors import ConfigError, MissingDependencyError, StoreError
from tracin._validate import integer
from tracin.scoring._maths import Neighbors, merge_top_k, top_k
from tracin.scoring._protocol import StoredRun
from tracin.scoring._relevance import Relevance, check_relevance

__all__ = ["ExactIndex", "FaissIndex", "NeighborIndex", "proponents_and_opponents"]

Kind = Literal["flat", "hnsw", "ivf"]


class NeighborIndex(Protocol):
    """Maximum-inner-product search over the training rows' folded vectors ``u(z)``."""

    def search(self, queries: np.ndarray, k: int) -> Neighbors:
        """The ``k`` training rows with the largest ``<query, u(z)>``, best first.

        Args:
            queries: ``(Q, D)`` float32 folded query vectors (`Run.folded_queries`).
            k: rows per query, ``1 <= k <= N``.

        Returns:
            ``Neighbors(indices, scores)``, each ``(Q, k)``: int64 rows, float64 inner products.

        Raises:
            ConfigError: ``queries`` not ``(Q, D)`` with the index's ``D``, or ``k`` out of range.
        """
        ...


def proponents_and_opponents(
    index: NeighborIndex, queries: np.ndarray, k: int
) -> tuple[Neighbors, Neighbors]:
    """Proponents and opponents of each query from one search of ``[queries; -queries]``.

    Args:
        index: any `NeighborIndex`.
        queries: ``(Q, D)`` folded query vectors.
        k: rows per query.

    Returns:
        ``(proponents, opponents)``: proponents with the largest TracIn scores, descending;
        opponents with the most negative scores (the true scores, not negated), ascending.

    Raises:
        ConfigError: ``queries`` not ``(Q, D)`` with the index's ``D``, or ``k`` out of range.
    """
    q = _as_queries(queries)
    both = index.search(np.concatenate([q, -q]), k)
    n = q.shape[0]
    return (
        Neighbors(both.indices[:n], both.scores[:n]),
        Neighbors(both.indices[n:], -both.scores[n:]),
    )


class ExactIndex:
    """Exact search that streams the run's stored blocks; nothing is held between searches.

    Equal to the top ``k`` of `Run.influence` (ties go to the lower row). Each search reads
    every block once, so it costs a full pass over the store.

    Args:
        run: a run with stored features (`tracin.featurize` with a store or ``proj_dim``).
        relevance: how the training rows are folded (`Run.folded_blocks`): ``"tracin"`` (raw
            scores) or ``"cosine"`` / ``"relatif"``; fold the queries with the same relevance.

    Raises:
        ConfigError: an unknown ``relevance``.
    """

    def __init__(self, run: StoredRun, relevance: Relevance = "tracin") -> None:
        self.run = run
        self.relevance = check_relevance(relevance)

    @property
    def ntotal(self) -> int:
        """Number of training rows."""
        return self.run.n_train

    def search(self, queries: np.ndarray, k: int) -> Neighbors:
        """See `NeighborIndex.search`.

        Raises:
            ConfigError: ``queries`` not ``(Q, D)`` with the run's folded width ``D`` (make them
                with `Run.folded_queries`), or ``k`` out of range.
        """
        q = _as_queries(queries)
        _check_k(k, self.ntotal)
        best: Neighbors | None = None
        for start, block in self.run.folded_blocks(relevance=self.relevance):
            if block.shape[1] != q.shape[1]:
                raise ConfigError(
                    f"queries have {q.shape[1]} columns but the run's folded vectors have "
                    f"{block.shape[1]}; make them with run.folded_queries(...)"
                )
            scores = (q @ block.T).astype(np.float64)
            part = top_k(scores, min(k, scores.shape[1]))
            part = Neighbors(part.indices + start, part.scores)
            best = part if best is None else merge_top_k(best, part, k)
        assert best is not None  # a run has at least one row
        return best


class FaissIndex:
    """A FAISS inner-product index over the folded training vectors.

    Build one with `FaissIndex.build`, or reopen a saved one with `FaissIndex.load`.

    Args:
        index: a FAISS index with ``METRIC_INNER_PRODUCT`` whose row ``i`` is training row ``i``.
    """

    def __init__(self, index: Any) -> None:
        self.index = index

    @classmethod
    def build(
        cls,
        run: StoredRun,
        kind: Kind = "flat",
        *,
        m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        nlist: int | None = None,
        nprobe: int = 16,
        train_rows: int | None = None,
        seed: int = 0,
        relevance: Relevance = "tracin",
    ) -> FaissIndex:
        """Build an index from the run's stored blocks, adding one block at a time.

        Args:
            run: a run with stored features.
            kind: ``"flat"`` (exact, ``IndexFlatIP``), ``"hnsw"`` (``IndexHNSWFlat``) or
                ``"ivf"`` (IVF lists holding float16 vectors: half the memory of flat).
            m: HNSW neighbors per node.
            ef_construction: HNSW candidate list size while building.
            ef_search: HNSW candidate list size while searching (recall against speed).
            nlist: IVF lists; default ``sqrt(N)``, at most ``N / 39``.
            nprobe: IVF lists scanned per query (recall against speed).
            train_rows: rows sampled to train IVF; default ``min(N, 50 * nlist)``.
            seed: seed of the IVF training sample and k-means.
            relevance: how the rows are folded (`Run.folded_blocks`): ``"tracin"`` (raw
                scores), ``"cosine"`` (unit vectors: the search ranks by the cosine relevance
                that `Run.neighbors` uses by default) or ``"relatif"``; fold the queries with
                the same relevance (`Run.folded_queries`).

        Raises:
            ConfigError: FAISS is missing, the run has no stored features, or a bad parameter.
        """
        faiss = _faiss()
        relevance = check_relevance(relevance)
        n = run.n_train
        dim = _folded_dim(run)
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            _positive(m=m, ef_construction=ef_construction, ef_search=ef_search)
            index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = ef_search
        elif kind == "ivf":
            nlist = max(1, min(math.isqrt(n), n // 39)) if nlist is None else nlist
            train_rows = min(n, 50 * nlist) if train_rows is None else min(n, train_rows)
            _positive(nlist=nlist, nprobe=nprobe, train_rows=train_rows)
            if train_rows < nlist:
                raise ConfigError(f"train_rows={train_rows} is fewer than nlist={nlist} lists")
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
            )
            index.cp.seed = seed
            index.train(_sample_rows(run, train_rows, seed, relevance))
            index.nprobe = nprobe
        else:
            raise ConfigError(f"index kind={kind!r}; expected 'flat', 'hnsw' or 'ivf'")
        for _, block in run.folded_blocks(relevance=relevance):
            index.add(np.ascontiguousarray(block, dtype=np.float32))
        return cls(index)

    @property
    def ntotal(self) -> int:
        """Number of indexed training rows."""
        return int(self.index.ntotal)

    def tune(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change search-time parameters: IVF ``nprobe``, HNSW ``ef_search``.

        Raises:
            ConfigError: a value below 1, or a parameter this kind of index does not have.
        """
        if nprobe is not None:
            _positive(nprobe=nprobe)
            if not hasattr(self.index, "nprobe"):
                raise ConfigError(f"nprobe={nprobe}: this is not an IVF index")
            self.index.nprobe = nprobe
        if ef_search is not None:
            _positive(ef_search=ef_search)
            if not hasattr(self.index, "hnsw"):
                raise ConfigError(f"ef_search={ef_search}: this is not an HNSW index")
            self.index.hnsw.efSearch = ef_search

    def search(self, queries: np.ndarray, k: int) -> Neighbors:
        """See `NeighborIndex.search`.

        An approximate index can find fewer than ``k`` rows for a query (IVF with a small
        ``nprobe``); the missing places hold row ``-1`` and score ``-inf``.

        Raises:
            ConfigError: ``queries`` not ``(Q, D)`` with the index's ``D``, or ``k`` out of range.
        """
        q = _as_queries(queries)
        if q.shape[1] != self.index.d:
            raise ConfigError(
                f"queries have {q.shape[1]} columns but the index holds {self.index.d}-dim "
                "vectors; make them with run.folded_queries(...) on the run it was built from"
            )
        _check_k(k, self.ntotal)
        scores, indices = self.index.search(q, k)
        indices = np.asarray(indices, dtype=np.int64)
        scores = np.where(indices < 0, -np.inf, np.asarray(scores, dtype=np.float64))
        return Neighbors(indices, scores)

    def save(self, path: str | Path) -> None:
        """Write the index to ``path`` atomically (temporary name, fsync, rename).

        Raises:
            ConfigError: FAISS is not installed.
        """
        faiss = _faiss()
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> FaissIndex:
        """Read an index written by `save` (search parameters included).

        Raises:
            StoreError: the file is missing or not a FAISS index.
        """
        faiss = _faiss()
        source = Path(path)
        try:
            index = faiss.read_index(str(source))
        except RuntimeError as exc:
            raise StoreError(
                f"cannot read a FAISS index from {source} ({exc}); build it again with "
                "FaissIndex.build(run, ...).save(path)"
            ) from exc
        return cls(index)


def _faiss() -> Any:
    try:
        return importlib.import_module("faiss")
    except ImportError as exc:
        raise MissingDependencyError(
            "FaissIndex needs FAISS, which is not installed: pip install 'tracin[faiss]' "
            "(or faiss-cpu / faiss-gpu); ExactIndex needs nothing extra"
        ) from exc


def _folded_dim(run: StoredRun) -> int:
    for _, block in run.folded_blocks():
        return int(block.shape[1])
    raise ConfigError("the run has no training rows to index")


def _sample_rows(run: StoredRun, rows: int, seed: int, relevance: Relevance) -> np.ndarray:
    """``rows`` distinct training vectors, chosen with ``default_rng(seed)``, in one pass."""
    chosen = np.sort(np.random.default_rng(seed).choice(run.n_train, size=rows, replace=False))
    parts = []
    for start, block in run.folded_blocks(relevance=relevance):
        lo, hi = np.searchsorted(chosen, [start, start + block.shape[0]])
        parts.append(block[chosen[lo:hi] - start])
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def _as_queries(queries: np.ndarray) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[0] == 0 or not np.issubdtype(q.dtype, np.floating):
        raise ConfigError(
            f"queries must be a non-empty (Q, D) float array, got shape {q.shape} and dtype "
            f"{q.dtype}; make them with run.folded_queries(...)"
        )
    return np.ascontiguousarray(q, dtype=np.float32)


def _check_k(k: Any, n: int) -> None:
    integer("k", k, maximum=n, of=" indexed rows")


def _positive(**values: int) -> None:
    for name, value in values.items():
        integer(name, value)
