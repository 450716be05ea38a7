"""The ``tracin`` command line: each subcommand parses, then calls one library function.

Errors from tracin (bad input, a broken store) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import torch
import typer
from rich.console import Console

import tracin
from tracin._errors import ConfigError, TracInError
from tracin._output import write_table

__all__ = ["app", "main"]

app = typer.Typer(
    name="tracin",
    help="TracIn: which training examples made a model predict what it predicts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

Format = Annotated[str, typer.Option("--format", "-f", help="table, csv, json or parquet")]
Output = Annotated[
    Path | None, typer.Option("--output", "-o", help="write to this file (default: stdout)")
]
StoreArg = Annotated[Path, typer.Argument(help="run directory written by `tracin featurize`")]


def one_line_errors(fn: F) -> F:
    """Turn a `TracInError` into ``tracin: error: ...`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TracInError as exc:
            err.print(f"tracin: error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _rows(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(
            f"--rows {text!r}: expected comma-separated integers, e.g. 0,5,12"
        ) from None


def _version(value: bool) -> None:
    if value:
        console.print(f"tracin {tracin.__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="show the version")
    ] = False,
) -> None:
    """TracIn: which training examples made a model predict what it predicts."""


@app.command()
@one_line_errors
def demo(
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="seed of the split, the label noise and training")] = 0,
) -> None:
    """Train a small CNN on bundled digits with 10% flipped labels, find them, explain it."""
    from tracin._demo import run_demo

    run_demo(str(out), seed)


@app.command()
@one_line_errors
def featurize(
    spec: Annotated[Path, typer.Argument(help="Python spec: model, task, checkpoints, train, ...")],
    store: Annotated[Path, typer.Option(help="run directory to write (resumable)")],
    proj_dim: Annotated[int | None, typer.Option(help="project gradients (TracIn-RP)")] = None,
    projection: Annotated[
        str | None, typer.Option(help="gaussian, rademacher, kronecker or last_layer")
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32, float16 or float64 features")] = "float32",
    batch_size: Annotated[int, typer.Option(help="rows per gradient batch")] = 64,
    block_rows: Annotated[int, typer.Option(help="rows per stored block")] = 4096,
    engine: Annotated[str, typer.Option(help="auto, functional or factored")] = "auto",
    query_score: Annotated[
        str, typer.Option(help="loss (labelled queries) or prediction (unlabelled)")
    ] = "loss",
    seed: Annotated[int, typer.Option(help="projection seed")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace a store made differently")] = False,
) -> None:
    """Compute per-example gradient features of the spec's train and query data into a store.

    Under torchrun (``torchrun --nproc_per_node N -m tracin featurize ...``) the store's blocks
    are split across the processes (gloo on CPU, nccl on GPUs); the store is the same as a
    single-process run's, and a rerun after a crash computes only the missing blocks.
    """
    from rich.progress import Progress

    from tracin._spec import load_spec

    s = load_spec(spec)
    query_task = s.task
    if query_score != "loss":
        if not dataclasses.is_dataclass(s.task) or not hasattr(s.task, "query"):
            raise ConfigError("--query-score prediction needs a ClassificationTask/RegressionTask")
        query_task = dataclasses.replace(s.task, query=query_score)
    rank = _init_distributed()
    with Progress(console=console, transient=True, disable=rank != 0) as bars:
        tasks: dict[str, Any] = {}

        def progress(stage: str, advance: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.advance(tasks[stage], advance)

        run = tracin.featurize(
            s.model, s.task, s.checkpoints, s.train, store=store, layers=s.layers,
            proj_dim=proj_dim, projection=projection, seed=seed, dtype=dtype,
            batch_size=batch_size, block_rows=block_rows, engine=engine,
            embedding_layer=s.embedding_layer, queries=s.queries, query_task=query_task,
            overwrite=overwrite, progress=progress,
        )  # fmt: skip
    if rank == 0:
        console.print(f"featurized {run.n_train} training rows x {len(run.lrs)} checkpoints "
                      f"into {store}; splits: {sorted(run.split_rows)}")  # fmt: skip
    if rank >= 0 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _init_distributed() -> int:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1); returns the rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return int(torch.distributed.get_rank())


@app.command("self-influence")
@one_line_errors
def self_influence(
    store: StoreArg,
    top: Annotated[int, typer.Option(help="how many rows (0 = all)")] = 20,
    fmt: Format = "table",
    output: Output = None,
) -> None:
    """Rank training rows by self-influence (mislabelled and rare examples first)."""
    scores = tracin.open(store).self_influence()
    order = np.argsort(-scores, kind="stable")
    order = order[:top] if top > 0 else order
    rows = [(rank + 1, int(i), float(scores[i])) for rank, i in enumerate(order)]
    write_table(["rank", "train_row", "self_influence"], rows, fmt, output, console,
                "highest self-influence")  # fmt: skip


@app.command()
@one_line_errors
def explain(
    store: StoreArg,
    split: Annotated[str, typer.Option(help="stored query split (see featurize's spec)")],
    rows: Annotated[str | None, typer.Option(help="query rows, e.g. 0,3,7 (default: all)")] = None,
    k: Annotated[int, typer.Option(help="proponents and opponents per query")] = 10,
    fmt: Format = "table",
    output: Output = None,
) -> None:
    """Proponents (helped) and opponents (hurt) of stored queries, from one pass."""
    run = tracin.open(store)
    props, opps = run.neighbors(split, k)
    chosen = _rows(rows) or list(range(props.indices.shape[0]))
    table = []
    for q in chosen:
        if not 0 <= q < props.indices.shape[0]:
            raise ConfigError(f"--rows: query row {q} is outside split {split!r}")
        for kind, nb in (("proponent", props), ("opponent", opps)):
            table += [(q, kind, r + 1, int(nb.indices[q, r]), float(nb.scores[q, r]))
                      for r in range(k)]  # fmt: skip
    write_table(["query_row", "kind", "rank", "train_row", "score"], table, fmt, output, console)


@app.command()
@one_line_errors
def cluster(
    store: StoreArg,
    n_clusters: Annotated[int, typer.Option(help="number of clusters")] = 8,
    rows: Annotated[str | None, typer.Option(help="training rows to cluster (default all)")] = None,
    method: Annotated[str, typer.Option(help="agglomerative or kmeans")] = "agglomerative",
    fmt: Format = "table",
    output: Output = None,
) -> None:
    """Cluster training rows by TracIn similarity (distance 1 - cosine of gradients)."""
    run = tracin.open(store)
    chosen = _rows(rows)
    labels = run.cluster(n_clusters, rows=chosen, method=method)
    index = chosen if chosen is not None else range(run.n_train)
    write_table(["train_row", "cluster"], list(zip(index, labels.tolist(), strict=True)), fmt,
                output, console)  # fmt: skip


@app.command()
@one_line_errors
def report(
    store: StoreArg,
    spec: Annotated[Path, typer.Option(help="spec whose `render` draws the examples")],
    split: Annotated[str | None, typer.Option(help="query split to explain")] = None,
    rows: Annotated[str | None, typer.Option(help="query rows to explain")] = "0,1,2,3",
    k: Annotated[int, typer.Option(help="examples per row")] = 6,
    out: Annotated[
        Path | None, typer.Option(help="HTML file (default STORE/report/index.html)")
    ] = None,
) -> None:
    """Write the HTML report: self-influence gallery, explanations, clusters, with the examples."""
    from tracin._explain import compose_report
    from tracin._report import write_report
    from tracin._spec import load_spec

    s = load_spec(spec)
    if s.render is None:
        raise ConfigError(
            f"spec {str(spec)!r} defines no `render(split, index)`; the report needs it"
        )
    run = tracin.open(store)
    page = compose_report(run, s.render, title=f"tracin report: {store}", query_split=split,
                          query_rows=_rows(rows) or [], k=k)  # fmt: skip
    path = write_report(page, out or store / "report" / "index.html")
    console.print(f"report: {path.resolve()}")


eval_app = typer.Typer(help="Measure the quality of tracin's rankings.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("mislabel")
@one_line_errors
def eval_mislabel(
    regime: Annotated[
        str, typer.Option(help="brief or memorise (>= 99% train accuracy)")
    ] = "brief",
    noise: Annotated[float, typer.Option(help="fraction of training labels flipped")] = 0.1,
    seeds: Annotated[int, typer.Option(help="runs averaged (seeds 0, 1, ...)")] = 3,
    checkpoints: Annotated[int, typer.Option(help="log-spaced checkpoints recorded")] = 30,
    cleanlab_folds: Annotated[int, typer.Option(help="K-fold for cleanlab (0 skips it)")] = 5,
    out: Annotated[Path, typer.Option(help="directory for mislabel.json and mislabel.png")] = Path(
        "runs/eval-mislabel"
    ),
    fmt: Format = "table",
) -> None:
    """Flip labels of bundled digits, train, and score TracIn's rankings against the baselines.

    Baselines: final loss, loss summed over the same checkpoints, random and cleanlab. Recall
    of flipped labels at 5/10/20/30% inspected and AUROC, mean ± std over seeds, with a plot.
    """
    from tracin._eval import FRACTIONS, MislabelConfig, evaluate_mislabel

    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: give at least 1")
    cfg = MislabelConfig(noise=noise, seeds=tuple(range(seeds)), regime=regime,  # type: ignore[arg-type]
                         n_checkpoints=checkpoints, cleanlab_folds=cleanlab_folds)  # fmt: skip
    with console.status("training and scoring") as status:
        result = evaluate_mislabel(cfg, progress=lambda stage: status.update(stage))
    header = ["method", *[f"recall@{f:.0%}" for f in FRACTIONS], "AUROC"]
    acc = ", ".join(f"{a:.3f}" for a in result.train_accuracy)
    write_table(header, result.table(), fmt, None, console,
                f"{regime} training, {noise:.0%} flipped, train accuracy {acc}")  # fmt: skip
    paths = result.save(out)
    console.print(f"saved {paths['json']} and {paths['plot']}")


def main() -> None:
    """Entry point of the ``tracin`` script."""
    sys.exit(app())
