"""Featurize: the only step that touches the model and the data.

For each checkpoint (loaded once per pass) and each missing block of rows, take per-example
gradients, project them, and write features plus exact squared norms to the store. A block that
is already complete is skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from tracin._batch import Batch, Data, batch_size, iter_batches, map_tensors, slice_batch
from tracin._checkpoints import Checkpoint
from tracin._engine import (
    ExampleGradients,
    FeatureEngine,
    FunctionalEngine,
    FunctionalFeatures,
    ScoreFn,
)
from tracin._errors import ConfigError, DataError
from tracin._hooks import FactoredEngine, supported_layers
from tracin._loop import LoopEngine
from tracin._precondition import PreconditionedFeatures, check_scaling, needs_group_scaling
from tracin._projection import ProjectionConfig, Projector, make_projector
from tracin._selfcheck import EngineChoice
from tracin._store import FeatureStore

__all__ = [
    "ENGINES",
    "IDENTITY",
    "block_pieces",
    "block_sizes",
    "RunConfig",
    "count_rows",
    "data_fingerprint",
    "device_of",
    "effective_projection",
    "make_engine",
    "missing_blocks",
    "model_fingerprint",
    "rows_in",
]


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
        keep_features: whether the training split's features are stored; ``False`` stores
            only its exact squared norms (query splits always keep their features).
    """

    parameters: tuple[str, ...]
    projection: ProjectionConfig
    dtype: str
    block_rows: int
    batch_size: int
    engine: str = "auto"
    precondition: str | None = None
    keep_features: bool = True

    def to_json(self) -> dict[str, Any]:
        """The comparable part of the configuration (batch size does not change results).

        ``keep_features`` appears only when ``False``, so stores written before it existed
        (which all kept their features) compare equal.
        """
        out = asdict(self)
        out["parameters"] = list(self.parameters)
        del out["batch_size"], out["engine"]
        if self.keep_features:
            del out["keep_features"]
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
            model, names, proj if own else IDENTITY, exclude=choice.exclude, rest=choice.rest
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


IDENTITY = ProjectionConfig()
"""No projection: the exact gradient."""


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


def missing_blocks(
    store: FeatureStore,
    split: str,
    key: str,
    n_rows: int,
    block_rows: int,
    shard: tuple[int, int] = (0, 1),
) -> list[int]:
    """Blocks of ``split`` under ``key`` that are absent or invalid (those of ``shard`` only)."""
    rank, world = shard
    rows_of = block_sizes(n_rows, block_rows)
    return [
        k
        for k, rows in enumerate(rows_of)
        if k % world == rank and not store.is_valid(split, key, k, rows)
    ]


def rows_in(blocks: list[int], n_rows: int, block_rows: int) -> int:
    """Rows the given blocks hold."""
    return sum(min(block_rows, n_rows - k * block_rows) for k in blocks)


def block_sizes(n_rows: int, block_rows: int) -> list[int]:
    """Rows of each block of a split of ``n_rows`` rows."""
    return [min(block_rows, n_rows - s) for s in range(0, n_rows, block_rows)]


def block_pieces(
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


def __getattr__(name: str) -> Any:
    """``GradientSource`` and ``model_errors`` moved to `tracin._source`; still importable here."""
    if name in ("GradientSource", "model_errors"):
        from tracin import _source

        return getattr(_source, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
