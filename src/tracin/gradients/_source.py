"""Per-example features of a model at its checkpoints, batch by batch, into the store.

`GradientSource` runs the feature engine on each batch (moved to the model's device and padded
to `tracin._batch.MIN_ROWS` rows, so results do not depend on the batch's size), checks that every
row is finite, and fills the store's missing blocks; `model_errors` turns a failure inside the
user's model or task into one tracin error naming the rows and the checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from tracin._batch import MIN_ROWS, Batch, Data, batch_size, iter_batches, map_tensors, pad_rows
from tracin._errors import (
    ConfigError,
    DataError,
    EngineError,
    HookError,
    TaskError,
    TracInError,
    TracInWarning,
)
from tracin.checkpoints._checkpoints import Checkpoint, Checkpoints
from tracin.gradients._embeddings import EmbeddingCapture
from tracin.gradients._engines import IDENTITY, RunConfig, device_of, make_engine
from tracin.gradients._functional import FeatureEngine, ScoreFn, functional_model
from tracin.gradients._params import fit_state
from tracin.gradients._selfcheck import (
    EngineChoice,
    engine_failure_hint,
    failing_module,
    verify_engine,
)
from tracin.projection._config import checkpoint_key
from tracin.store._blocks import block_pieces, block_sizes, missing_blocks, rows_in
from tracin.store._store import EMBEDDING, FeatureStore

__all__ = ["GradientSource", "Progress", "model_errors"]

T = TypeVar("T")

Progress = Callable[[str, int, int], None]
"""``progress(stage, advance, total)``: ``advance`` more rows of ``total`` done in ``stage``."""


@contextmanager
def model_errors(
    stage: str,
    start: int,
    n: int,
    ckpt_id: str,
    model: nn.Module | None = None,
    batch: Batch | None = None,
) -> Iterator[None]:
    """Turn an exception from inside the user's model or task into one tracin error.

    A `TracInError` passes through. A failure that ``torch.func`` causes becomes an
    `EngineError` naming the module and the engine that works; any other failure on the first
    rows (``start == 0``) inside a module is most likely the model's or the task's (wrong arity,
    the batch laid out differently from what the task expects): a `TaskError` naming the module
    (outside any module, e.g. a label out of range in the loss, a `DataError`); on later rows the
    first rows worked, so the data is the likely cause: a `DataError` naming the rows. A dtype
    mismatch between ``batch``'s floating tensors and the model's parameters is named with the cast
    that fixes it.
    """
    try:
        yield
    except TracInError:
        raise
    except Exception as exc:
        where = None if model is None else failing_module(exc, model)
        place = f" in module {where}" if where else ""
        text = str(exc).strip()
        first = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        first += _dtype_hint(exc, model, batch)
        if n < MIN_ROWS:  # the engines see a padded batch: say why a shape shows MIN_ROWS rows
            first += (
                f" (the {n} rows were padded to {MIN_ROWS} by repeating the last one, so a shape "
                f"above may count {MIN_ROWS})"
            )
        rows = f"{stage} rows {start}..{start + n - 1} at checkpoint {ckpt_id!r}"
        if engine_failure_hint(exc):
            raise EngineError(
                f"torch.func cannot batch the model{place} ({first}) on {rows}. Pass "
                "engine='loop' (one backward per example: slow, exact) or engine='auto'"
            ) from exc
        if start == 0:
            kind = TaskError if where else DataError  # inside a module, or in the task's code
            raise kind(
                f"the model or task failed{place} on the first {stage} rows at checkpoint "
                f"{ckpt_id!r}: {first}. Check the rows' shapes, dtypes and label range, that the "
                "model runs on one batch outside tracin, and that the task's inputs=/labels=/"
                "output= match the batch layout"
            ) from exc
        raise DataError(
            f"the model or task failed{place} on {rows}: {first}. The first rows worked, so "
            "check those rows' shapes, dtypes and label range against the training data the "
            "model was built for"
        ) from exc


def _check_finite(ok: torch.Tensor, stage: str, start: int, ckpt_id: str) -> None:
    """Raise naming the rows (offset by ``start``) whose gradients are not finite."""
    if bool((~ok).any()):
        rows = (torch.nonzero(~ok).flatten() + start).tolist()
        raise DataError(
            f"non-finite gradients for {stage} rows {rows[:10]} at checkpoint {ckpt_id!r}; "
            "check those examples (NaN/inf inputs or labels) or the checkpoint's weights"
        )


def _dtype_hint(exc: Exception, model: nn.Module | None, batch: Batch | None) -> str:
    """`` (the batch is float64, the model float32: ...)`` for a dtype error, else ``""``."""
    if model is None or batch is None or "type" not in str(exc).lower():
        return ""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    leaves: list[torch.Tensor] = []
    map_tensors(leaves.append, batch)
    other = next((t for t in leaves if t.is_floating_point() and param is not None
                  and t.dtype != param.dtype), None)  # fmt: skip
    if param is None or other is None:
        return ""
    want = str(param.dtype).removeprefix("torch.")
    return (
        f" (the batch is {str(other.dtype).removeprefix('torch.')}, the model {want}: pass "
        f"torch.as_tensor(x, dtype=torch.{want}) or convert the model)"
    )


def _finite_rows(feats: torch.Tensor) -> torch.Tensor:
    """Which rows hold only finite values: one pass (a row sum) unless one is suspect."""
    ok = torch.isfinite(feats.sum(dim=1))  # NaN and inf propagate; an overflow is re-checked
    if bool(ok.all()):
        return ok
    return torch.isfinite(feats).all(dim=1)


class GradientSource:
    """Per-example features of a model at its checkpoints.

    Args:
        model: the network (eval mode is the caller's business).
        engine: computes features and exact squared norms per batch.
        batch_size: rows per gradient batch.
        config: when given (and the run is not preconditioned), the engine is verified on the
            first batch it sees (`tracin.gradients._selfcheck.verify_engine`) and replaced by one
            that is
            right if ``config.engine`` is ``"auto"``.
    """

    def __init__(
        self,
        model: nn.Module,
        engine: FeatureEngine,
        batch_size: int,
        config: RunConfig | None = None,
    ) -> None:
        self.model = model
        self.engine = engine
        self.batch_size = batch_size
        self.config = config
        # the loop engine is the reference; scaled gradients are not the reference's
        self._verified = config is None or config.engine == "loop"
        self._verified = self._verified or not engine.verifiable
        self._choice: EngineChoice | None = None
        self.capture: EmbeddingCapture | None = None
        """Set by featurize: the last checkpoint's embeddings kept from its feature pass."""

    def _batch(
        self,
        weights: dict[str, torch.Tensor],
        score: ScoreFn,
        batch: Batch,
        checkpoint: Checkpoint,
        start: int,
        stage: str,
        fn: Callable[[FeatureEngine, Batch], T],
    ) -> tuple[int, T]:
        """``fn(engine, padded batch)`` (`_padded`, `_computed`) and the batch's row count.

        At the checkpoint `capture` keeps, the embedding layer's outputs are kept on the way.
        """
        grabbed: list[torch.Tensor] = []
        capture = self.capture

        def compute(b: Batch) -> T:
            rows = batch_size(b)
            keeping: AbstractContextManager[list[torch.Tensor]]
            keeping = nullcontext([]) if capture is None else capture.during(
                self.engine, checkpoint.id, rows
            )  # fmt: skip
            with keeping as got:
                out = self._computed(weights, score, b, lambda e: fn(e, b))
            grabbed.extend(got)
            return out

        n, out = self._padded(batch, stage, start, checkpoint, compute)
        if capture is not None:
            capture.keep(stage, start, grabbed, n)
        return n, out

    def _verify(
        self,
        weights: dict[str, torch.Tensor],
        score: ScoreFn,
        batch: Batch,
        start: EngineChoice | None = None,
    ) -> None:
        """Check the engine once, on the first batch (`tracin.gradients._selfcheck`)."""
        if self._verified or self.config is None:
            return
        config = self.config

        built: dict[tuple[EngineChoice, bool], FeatureEngine] = {}

        def build(choice: EngineChoice, exact: bool) -> FeatureEngine:
            exact = exact and not config.projection.exact  # else the same engine
            if (choice, exact) not in built:
                chosen = replace(config, projection=IDENTITY) if exact else config
                built[choice, exact] = make_engine(self.model, chosen, choice)
            return built[choice, exact]

        self.engine = verify_engine(
            self.model, config.engine, config.parameters, build, weights, score, batch, start
        )
        self._choice = next((c for (c, _), e in built.items() if e is self.engine), start)
        self._verified = True

    def _computed(
        self,
        weights: dict[str, torch.Tensor],
        score: ScoreFn,
        batch: Batch,
        fn: Callable[[FeatureEngine], T],
    ) -> T:
        """``fn(engine)`` on a batch; a layer the hooks refuse on a later batch is rerouted.

        The self-check saw the first batch only: a later batch (a shorter sequence that slices
        a positional parameter, a packed sequence) can take a path the hooks cannot follow. With
        ``engine="auto"`` and exact or densely projected features, the engine is checked again on
        this batch with those parameters excluded from the hooks, and the batch recomputed:
        every engine's exact gradients are the same numbers, so earlier batches stay valid.

        Raises:
            HookError: a named engine's refusal (the message names ``engine='auto'``).
            EngineError: a Kronecker or last-layer run, whose features depend on the engine.
        """
        self._verify(weights, score, batch)
        for _ in range(len(self.config.parameters) if self.config else 0):
            try:
                return fn(self.engine)
            except HookError as exc:
                self._reroute(exc, weights, score, batch)
        return fn(self.engine)

    def _reroute(
        self, exc: HookError, weights: dict[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> None:
        """Exclude ``exc.params`` from the hooks and check the engine again (see `_computed`)."""
        config = self.config
        if config is None or config.engine != "auto" or not exc.params:
            raise exc
        if config.projection.in_engine:
            raise EngineError(
                f"{exc} -- on a later batch than the engine self-check saw. A "
                f"{config.projection.kind!r} projection cannot move {list(exc.params)} to "
                "another engine mid-run (their features would change projection): pass "
                "projection='gaussian', or leave them out of layers=[...]"
            ) from exc
        if not exc.quiet:
            warnings.warn(
                f"tracin engine 'auto': {str(exc).splitlines()[0]} (on a later batch); "
                f"{list(exc.params)} are computed by torch.func from here on",
                TracInWarning,
                stacklevel=6,
            )
        choice = self._choice or EngineChoice()
        start = replace(choice, exclude=(*choice.exclude, *exc.params))
        self._verified = False
        self._verify(weights, score, batch, start)

    def weights(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors, fitted to the model (with its preconditioner, if any)."""
        weights = fit_state(self.model, checkpoint.state_dict(), repr(checkpoint.id))
        return self.engine.prepare(checkpoint, weights)

    def _padded(
        self, batch: Batch, stage: str, start: int, checkpoint: Checkpoint, fn: Callable[[Batch], T]
    ) -> tuple[int, T]:
        """``fn`` on ``batch`` moved to the model's device and padded (`pad_rows`); its row count.

        Errors raised inside name the rows and the checkpoint.
        """
        batch, n = pad_rows(map_tensors(lambda t: t.to(device_of(self.model)), batch))
        with model_errors(stage, start, n, checkpoint.id, self.model, batch):
            return n, fn(batch)

    def batch_features(
        self,
        weights: dict[str, torch.Tensor],
        score: ScoreFn,
        batch: Batch,
        checkpoint: Checkpoint,
        start: int,
        stage: str,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Features ``(B, dim)`` and squared norms of one batch; non-finite rows are an error."""
        key = checkpoint_key(checkpoint.id)
        n, (feats, sq) = self._batch(
            weights, score, batch, checkpoint, start, stage,
            lambda e, b: e.features(weights, score, b, key),
        )  # fmt: skip
        feats, sq = feats[:n], sq[:n]
        _check_finite(_finite_rows(feats) & torch.isfinite(sq), stage, start, checkpoint.id)
        return feats.detach(), sq.detach().cpu().numpy()

    def batch_sqnorms(
        self,
        weights: dict[str, torch.Tensor],
        score: ScoreFn,
        batch: Batch,
        checkpoint: Checkpoint,
        start: int,
        stage: str = "train",
    ) -> np.ndarray:
        """Exact squared gradient norms of one batch (no features formed)."""
        n, sq = self._batch(
            weights, score, batch, checkpoint, start, stage,
            lambda e, b: e.sqnorms(weights, score, b),
        )  # fmt: skip
        sq = sq[:n]
        _check_finite(torch.isfinite(sq), stage, start, checkpoint.id)
        return sq.detach().cpu().numpy()

    def features(
        self,
        weights: dict[str, torch.Tensor],
        checkpoint: Checkpoint,
        score: ScoreFn,
        data: Data | Batch,
        stage: str,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Features ``(Q, dim)`` and exact squared norms ``(Q,)`` of every row of ``data``.

        Raises:
            DataError: a non-finite gradient (names the rows and the checkpoint).
        """
        feats, norms, start = [], [], 0
        for batch in iter_batches(data, self.batch_size):
            f, sq = self.batch_features(weights, score, batch, checkpoint, start, stage)
            feats.append(f)
            norms.append(sq)
            start += f.shape[0]
        if not feats:
            raise DataError(f"the {stage} data is empty")
        return torch.cat(feats), np.concatenate(norms)

    def fill(
        self,
        store: FeatureStore,
        split: str,
        checkpoints: Checkpoints,
        score: ScoreFn,
        data: Data | Batch,
        n_rows: int,
        config: RunConfig,
        progress: Progress | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        """Compute every missing block of ``split`` for every checkpoint and write it.

        With ``shard=(rank, world)``, only blocks ``rank, rank + world, ...`` are computed.
        ``progress(f"{split} {checkpoint id}", rows, n_rows)`` is called once for the rows
        already stored (or left to other ranks), then after every batch. The training split
        stores only squared norms unless ``config.keep_features``.
        """
        keep = config.keep_features or split != "train"
        for checkpoint in checkpoints:
            todo = missing_blocks(store, split, checkpoint.id, n_rows, config.block_rows, shard)
            stage = f"{split} {checkpoint.id}"
            _advance(progress, stage, n_rows - rows_in(todo, n_rows, config.block_rows), n_rows)
            if not todo:
                continue
            weights = self.weights(checkpoint)

            def compute(
                piece: Batch, start: int, c: Checkpoint = checkpoint, w: Any = weights
            ) -> tuple[torch.Tensor | None, np.ndarray]:
                if keep:
                    return self.batch_features(w, score, piece, c, start, split)
                return None, self.batch_sqnorms(w, score, piece, c, start, split)

            _write_blocks(store, split, checkpoint.id, todo, data, n_rows, config, compute,
                          self.batch_size, progress, stage)  # fmt: skip

    def embed(
        self,
        store: FeatureStore,
        split: str,
        checkpoint: Checkpoint,
        layer: str,
        score: ScoreFn,
        data: Data | Batch,
        n_rows: int,
        config: RunConfig,
        shard: tuple[int, int] = (0, 1),
        progress: Progress | None = None,
    ) -> None:
        """Store the output of module ``layer`` (flattened per example) at ``checkpoint``.

        Raises:
            ConfigError: the embedding layer's output is not one vector per row.
        """
        todo = missing_blocks(store, split, EMBEDDING, n_rows, config.block_rows, shard)
        stage = f"{split} embeddings"
        _advance(progress, stage, n_rows - rows_in(todo, n_rows, config.block_rows), n_rows)
        if not todo:
            return
        module = dict(self.model.named_modules()).get(layer)
        if module is None:
            names = [n for n, _ in self.model.named_modules() if n]
            raise ConfigError(
                f"embedding_layer={layer!r} is not a module of the model: {names[:20]}"
            )
        weights = self.weights(checkpoint)
        captured: list[torch.Tensor] = []

        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            captured.append(out.detach().flatten(1).double())

        def compute(piece: Batch, start: int) -> tuple[torch.Tensor, np.ndarray]:
            kept = (
                None if self.capture is None else self.capture.take(split, start, batch_size(piece))
            )
            if kept is not None:  # the feature pass at this checkpoint ran this forward already
                return kept, kept.pow(2).sum(1).cpu().numpy()
            captured.clear()
            piece, n = pad_rows(map_tensors(lambda t: t.to(device_of(self.model)), piece))
            with torch.no_grad():
                score(functional_model(self.model, weights), piece)
            emb = captured[-1][:n]
            return emb, emb.pow(2).sum(1).cpu().numpy()

        handle = module.register_forward_hook(hook)
        try:
            _write_blocks(store, split, EMBEDDING, todo, data, n_rows, config, compute,
                          self.batch_size, progress, stage)  # fmt: skip
        finally:
            handle.remove()


def _write_blocks(
    store: FeatureStore,
    split: str,
    key: str,
    todo: list[int],
    data: Data | Batch,
    n_rows: int,
    config: RunConfig,
    compute: Callable[[Batch, int], tuple[torch.Tensor | None, np.ndarray]],
    size: int,
    progress: Progress | None,
    stage: str,
) -> None:
    """Compute and write blocks ``todo`` of ``split``; ``compute(piece, start) -> (f, sq)``.

    ``f`` ``None`` stores no features: a ``(rows, 0)`` block beside the squared norms.
    ``progress`` advances after every batch.
    """
    rows_of = block_sizes(n_rows, config.block_rows)
    dtype = np.dtype(config.dtype)
    for k, pieces in block_pieces(data, todo, config.block_rows, n_rows, size):
        feats, norms = [], []
        start = k * config.block_rows
        for piece in pieces:
            f, sq = compute(piece, start)
            feats.append(np.empty((len(sq), 0), dtype) if f is None else _to_numpy(f, dtype))
            norms.append(sq)
            start += len(sq)
            _advance(progress, stage, len(sq), n_rows)
        block = np.concatenate(feats)
        if len(block) != rows_of[k]:
            raise DataError(
                f"{split} block {k} has {len(block)} rows, expected {rows_of[k]}: the data "
                "changed length while featurizing"
            )
        store.write_block(split, key, k, block, np.concatenate(norms))


def _to_numpy(f: torch.Tensor, dtype: np.dtype[Any]) -> np.ndarray:
    """``f`` as a NumPy array of ``dtype``, converted by torch (one multithreaded copy)."""
    target = getattr(torch, dtype.name)
    return f.detach().to("cpu", target).numpy()


def _advance(progress: Progress | None, stage: str, rows: int, total: int) -> None:
    if progress is not None and rows > 0:
        progress(stage, rows, total)
