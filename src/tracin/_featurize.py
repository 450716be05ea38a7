"""Featurize: the only step that touches the model and the data.

For each checkpoint (loaded once per pass) and each missing block of rows, take per-example
gradients, project them, and write features plus exact squared norms to the store. A block that
is already complete is skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from tracin._batch import (
    Batch,
    Data,
    batch_size,
    iter_batches,
    map_tensors,
    pad_rows,
    slice_batch,
)
from tracin._checkpoints import Checkpoint, Checkpoints
from tracin._engine import (
    ExampleGradients,
    FeatureEngine,
    FunctionalEngine,
    FunctionalFeatures,
    ScoreFn,
    functional_model,
)
from tracin._errors import ConfigError, DataError, EngineError, TaskError, TracInError
from tracin._hooks import FactoredEngine, supported_layers
from tracin._loop import LoopEngine
from tracin._params import fit_state
from tracin._precondition import PreconditionedFeatures, check_scaling, needs_group_scaling
from tracin._projection import ProjectionConfig, Projector, checkpoint_key, make_projector
from tracin._selfcheck import EngineChoice, engine_failure_hint, failing_module, verify_engine
from tracin._store import EMBEDDING, FeatureStore

__all__ = [
    "ENGINES",
    "GradientSource",
    "RunConfig",
    "count_rows",
    "data_fingerprint",
    "device_of",
    "effective_projection",
    "make_engine",
    "model_errors",
    "model_fingerprint",
]

T = TypeVar("T")


@dataclass(frozen=True)
class RunConfig:
    """What a run computes, and how; saved in the manifest and compared on reopen.

    Attributes:
        parameters: names of the differentiated parameters, in model order.
        projection: kind, dim and seed of the random projection.
        dtype: feature dtype on disk, ``"float32"`` or ``"float16"``.
        block_rows: rows per stored block.
        batch_size: rows per gradient batch.
        engine: ``"functional"`` (torch.func), ``"factored"`` (layer hooks) or ``"auto"``.
        precondition: ``None``, or ``"adam"`` to scale gradients by each checkpoint's Adam
            second moment (see `tracin._precondition`).
    """

    parameters: tuple[str, ...]
    projection: ProjectionConfig
    dtype: str
    block_rows: int
    batch_size: int
    engine: str = "auto"
    precondition: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The comparable part of the configuration (batch size does not change results)."""
        out = asdict(self)
        out["parameters"] = list(self.parameters)
        del out["batch_size"], out["engine"]
        return out


ENGINES = ("auto", "functional", "factored", "loop")


def make_engine(
    model: nn.Module,
    config: RunConfig,
    choice: EngineChoice | None = None,
    checkpoints: Sequence[Checkpoint] = (),
) -> FeatureEngine:
    """The feature engine a configuration asks for.

    ``auto`` takes the factored (hook) engine whenever a selected layer is hookable
    (Linear, Conv, Embedding, LayerNorm, BatchNorm, Hugging Face Conv1D): one batched backward
    gives those layers' per-example gradients and torch.func computes only the other parameters'
    (measured in ``benchmarks/engines.py``: 2-7x faster than torch.func alone on CNNs and
    transformers). With no hookable layer, torch.func. ``loop`` takes one backward per example.
    A dense projection projects the exact features. ``choice`` (from the engine self-check,
    `tracin._selfcheck`) excludes parameters from the hooks and picks the engine for the rest.
    Checkpoints with learning rates per parameter group (or ``precondition``) take torch.func
    with each parameter's gradient scaled (`tracin._precondition.PreconditionedFeatures`).

    Raises:
        ConfigError: an unknown engine, or a projection the engine cannot make.
    """
    names, proj = config.parameters, config.projection
    choice = choice or EngineChoice()
    if config.engine not in ENGINES:
        raise ConfigError(
            f"engine={config.engine!r}; expected one of {list(ENGINES)} ('auto' is the default)"
        )
    grouped = needs_group_scaling(checkpoints)
    if config.precondition is not None or grouped:
        check_scaling(config.precondition, grouped, config.engine, proj.kind)
        sizes = _sizes(model, names)
        return PreconditionedFeatures(
            model, names, make_projector(proj, sizes), sum(sizes), config.precondition
        )
    if config.engine == "loop":
        if proj.kind in ("kronecker", "last_layer"):
            raise ConfigError(f"projection={proj.kind!r} needs engine='factored' (or 'auto')")
        choice = EngineChoice(rest="loop")
    hooked, _ = supported_layers(model, names, exclude=choice.exclude)
    factored = config.engine == "factored" or (config.engine == "auto" and bool(hooked))
    if proj.kind in ("kronecker", "last_layer") and not factored:
        if config.engine == "functional":
            raise ConfigError(f"projection={proj.kind!r} needs engine='factored' (or 'auto')")
        factored = True
    if factored:
        own = proj.kind in ("identity", "kronecker", "last_layer")
        engine = FactoredEngine(
            model, names, proj if own else _IDENTITY, exclude=choice.exclude, rest=choice.rest
        )
        if own:
            return engine
        return _Projected(engine, make_projector(proj, _sizes(model, names)))
    sizes = _sizes(model, names)
    rest: ExampleGradients = (
        LoopEngine(model, names) if choice.rest == "loop" else FunctionalEngine(model, names)
    )
    return FunctionalFeatures(rest, make_projector(proj, sizes), sum(sizes))


def effective_projection(
    model: nn.Module, names: tuple[str, ...], proj: ProjectionConfig
) -> ProjectionConfig:
    """``proj``, or no projection when a dense one would be no smaller than the gradient.

    A dense projection to ``proj_dim >= P`` (the number of selected parameters) costs more than
    the exact features and only adds error, so the exact features are kept instead.
    """
    dense = proj.kind in ("gaussian", "rademacher") and proj.dim is not None
    if dense and int(proj.dim or 0) >= sum(_sizes(model, names)):
        return ProjectionConfig("identity", None, proj.seed)
    return proj


_IDENTITY = ProjectionConfig()


def _sizes(model: nn.Module, names: tuple[str, ...]) -> list[int]:
    params = dict(model.named_parameters())
    return [params[n].numel() for n in names]


class _Projected:
    """Exact features of another engine, densely projected."""

    def __init__(self, engine: FeatureEngine, projector: Projector) -> None:
        self.engine = engine
        self.projector = projector

    def dim(self) -> int:
        return int(self.projector.dim(self.engine.dim()))

    def features(
        self, weights: Any, score: ScoreFn, batch: Batch, checkpoint: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g, sq = self.engine.features(weights, score, batch, checkpoint)
        return self.projector.project(g, checkpoint), sq

    def sqnorms(self, weights: Any, score: ScoreFn, batch: Batch) -> torch.Tensor:
        return self.engine.sqnorms(weights, score, batch)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU if it has none)."""
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's state-dict names, shapes and dtypes (its architecture)."""
    spec = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    return hashlib.sha256(repr(spec).encode()).hexdigest()


def data_fingerprint(data: Data | Batch, size: int) -> str:
    """sha256 of the first batch's tensors: catches a different dataset on reopen, cheaply."""
    digest = hashlib.sha256()
    first = next(iter(iter_batches(data, size)), None)
    if first is not None:
        map_tensors(lambda t: digest.update(t.detach().cpu().contiguous().numpy().tobytes()), first)
    return digest.hexdigest()


def count_rows(data: Data | Batch, size: int) -> int:
    """Number of rows ``data`` yields (refusing a DataLoader that drops rows)."""
    if isinstance(data, DataLoader):
        if data.drop_last:
            raise DataError(
                "the DataLoader has drop_last=True, so some training rows would never be scored; "
                "use drop_last=False"
            )
        source: Any = data.dataset
    elif isinstance(data, Dataset):
        source = data
    else:
        return batch_size(data)
    try:
        return len(source)
    except TypeError:  # an iterable dataset: count what it yields
        return sum(batch_size(b) for b in iter_batches(data, size))


@contextmanager
def model_errors(
    stage: str, start: int, n: int, ckpt_id: str, model: nn.Module | None = None
) -> Iterator[None]:
    """Turn an exception from inside the user's model or task into one tracin error.

    A `TracInError` passes through. A failure that ``torch.func`` causes becomes an
    `EngineError` naming the module and the engine that works; any other failure on the first
    rows (``start == 0``) inside a module is most likely the model's or the task's (wrong arity,
    the batch laid out differently from what the task expects): a `TaskError` naming the module
    (outside any module, e.g. a label out of range in the loss, a `DataError`); on later rows the
    first rows worked, so the data is the likely cause: a `DataError` naming the rows.
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
            first batch it sees (`tracin._selfcheck.verify_engine`) and replaced by one that is
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
        self._verified = self._verified or isinstance(engine, PreconditionedFeatures)

    def _verify(self, weights: dict[str, torch.Tensor], score: ScoreFn, batch: Batch) -> None:
        """Check the engine once, on the first batch (`tracin._selfcheck`)."""
        if self._verified or self.config is None:
            return
        config = self.config

        def build(choice: EngineChoice, exact: bool) -> FeatureEngine:
            if exact:
                return make_engine(self.model, replace(config, projection=_IDENTITY), choice)
            return make_engine(self.model, config, choice)

        self.engine = verify_engine(
            self.model, config.engine, config.parameters, build, weights, score, batch
        )
        self._verified = True

    def weights(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors, fitted to the model (with its preconditioner, if any)."""
        weights = fit_state(self.model, checkpoint.state_dict(), repr(checkpoint.id))
        if isinstance(self.engine, PreconditionedFeatures):
            return self.engine.bind_checkpoint(weights, checkpoint)
        return weights

    def _padded(
        self, batch: Batch, stage: str, start: int, checkpoint: Checkpoint, fn: Callable[[Batch], T]
    ) -> tuple[int, T]:
        """``fn`` on ``batch`` moved to the model's device and padded (`pad_rows`); its row count.

        Errors raised inside name the rows and the checkpoint.
        """
        batch, n = pad_rows(map_tensors(lambda t: t.to(device_of(self.model)), batch))
        with model_errors(stage, start, n, checkpoint.id, self.model):
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

        def compute(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
            self._verify(weights, score, b)
            return self.engine.features(weights, score, b, key)

        n, (feats, sq) = self._padded(batch, stage, start, checkpoint, compute)
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
    ) -> np.ndarray:
        """Exact squared gradient norms of one batch (no features formed)."""

        def compute(b: Batch) -> torch.Tensor:
            self._verify(weights, score, b)
            return self.engine.sqnorms(weights, score, b)

        n, sq = self._padded(batch, "train", start, checkpoint, compute)
        sq = sq[:n]
        _check_finite(torch.isfinite(sq), "train", start, checkpoint.id)
        return sq.detach().cpu().numpy()

    def features(
        self,
        weights: dict[str, torch.Tensor],
        checkpoint: Checkpoint,
        score: ScoreFn,
        data: Data | Batch,
        stage: str,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Features ``(Q, dim)`` and exact squared norms ``(Q,)`` of every row of ``data``."""
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
        progress: Any = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        """Compute every missing block of ``split`` for every checkpoint and write it.

        With ``shard=(rank, world)``, only blocks ``rank, rank + world, ...`` are computed.
        """
        for checkpoint in checkpoints:
            todo = _missing(store, split, checkpoint.id, n_rows, config.block_rows, shard)
            if not todo:
                continue
            weights = self.weights(checkpoint)

            def compute(
                piece: Batch, start: int, c: Checkpoint = checkpoint, w: Any = weights
            ) -> Any:
                return self.batch_features(w, score, piece, c, start, split)

            _write_blocks(store, split, checkpoint.id, todo, data, n_rows, config, compute,
                          self.batch_size, progress)  # fmt: skip

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
    ) -> None:
        """Store the output of module ``layer`` (flattened per example) at ``checkpoint``."""
        todo = _missing(store, split, EMBEDDING, n_rows, config.block_rows, shard)
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
            captured.clear()
            piece, n = pad_rows(map_tensors(lambda t: t.to(device_of(self.model)), piece))
            with torch.no_grad():
                score(functional_model(self.model, weights), piece)
            emb = captured[-1][:n]
            return emb, emb.pow(2).sum(1).cpu().numpy()

        handle = module.register_forward_hook(hook)
        try:
            _write_blocks(store, split, EMBEDDING, todo, data, n_rows, config, compute,
                          self.batch_size, None)  # fmt: skip
        finally:
            handle.remove()


def _missing(
    store: FeatureStore,
    split: str,
    key: str,
    n_rows: int,
    block_rows: int,
    shard: tuple[int, int] = (0, 1),
) -> list[int]:
    rank, world = shard
    rows_of = _block_sizes(n_rows, block_rows)
    return [
        k
        for k, rows in enumerate(rows_of)
        if k % world == rank and not store.is_valid(split, key, k, rows)
    ]


def _write_blocks(
    store: FeatureStore,
    split: str,
    key: str,
    todo: list[int],
    data: Data | Batch,
    n_rows: int,
    config: RunConfig,
    compute: Any,
    size: int,
    progress: Any,
) -> None:
    """Compute and write blocks ``todo`` of ``split``; ``compute(piece, start) -> (f, sq)``."""
    rows_of = _block_sizes(n_rows, config.block_rows)
    dtype = np.dtype(config.dtype)
    for k, pieces in _block_pieces(data, todo, config.block_rows, n_rows, size):
        feats, norms = [], []
        start = k * config.block_rows
        for piece in pieces:
            f, sq = compute(piece, start)
            feats.append(f.cpu().numpy().astype(dtype))
            norms.append(sq)
            start += f.shape[0]
        block = np.concatenate(feats)
        if len(block) != rows_of[k]:
            raise DataError(
                f"{split} block {k} has {len(block)} rows, expected {rows_of[k]}: the data "
                "changed length while featurizing"
            )
        store.write_block(split, key, k, block, np.concatenate(norms))
        if progress is not None:
            progress(f"{split} {key}", len(block), n_rows)


def _block_sizes(n_rows: int, block_rows: int) -> list[int]:
    return [min(block_rows, n_rows - s) for s in range(0, n_rows, block_rows)]


def _block_pieces(
    data: Data | Batch, todo: list[int], block_rows: int, n_rows: int, size: int
) -> Iterator[tuple[int, Iterator[Batch]]]:
    """``(block, batches of its rows)`` for each block in ``todo``, in order.

    A map-style Dataset is read only for the missing blocks; a DataLoader or in-memory batch is
    iterated once, and pieces outside missing blocks are skipped without computing anything.
    """
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        for k in todo:
            rows = range(k * block_rows, min((k + 1) * block_rows, n_rows))
            yield k, iter(DataLoader(Subset(data, rows), batch_size=size, shuffle=False))
        return
    wanted = set(todo)
    current: int | None = None
    buffer: list[Batch] = []
    offset = 0
    for batch in iter_batches(data, size):
        n = batch_size(batch)
        pos = 0
        while pos < n:
            k = (offset + pos) // block_rows
            stop = min(n, (k + 1) * block_rows - offset)
            if k != current:
                if current is not None and buffer:
                    yield current, iter(buffer)
                current, buffer = k, []
            if k in wanted:
                buffer.append(slice_batch(batch, pos, stop))
            pos = stop
        offset += n
    if current is not None and buffer:
        yield current, iter(buffer)
