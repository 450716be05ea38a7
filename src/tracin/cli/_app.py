"""The ``tracin`` command line: each subcommand parses, then calls one library function.

Errors from tracin (bad input, a broken store) and from the operating system (a read-only or
missing folder, a full disk) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from tracin._errors import ConfigError
from tracin._progress import attached
from tracin._version import __version__
from tracin.cli._common import Format, Output, StoreArg, app, console, err, one_line_errors
from tracin.cli._eval import eval_app
from tracin.cli._output import write_table
from tracin.pipeline import featurize as featurize_run
from tracin.pipeline import open as open_run

__all__ = ["app", "main"]


def _rows(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(
            f"--rows {text!r}: expected comma-separated integers, e.g. 0,5,12"
        ) from None


def _check_rows(run: Any, split: str, rows: list[int], option: str) -> None:
    """Refuse a split the store lacks, or rows past its end, before any scoring."""
    if split not in run.split_rows:
        stored = sorted(s for s in run.split_rows if s != "train")
        raise ConfigError(
            f"--split {split!r} is not in the store; its query splits are {stored} (featurize a "
            "spec whose `queries` has it)"
        )
    n = run.split_rows[split]
    bad = [r for r in rows if not 0 <= r < n]
    if bad:
        raise ConfigError(
            f"{option}: row {bad[0]} is outside split {split!r}, which has rows 0..{n - 1}"
        )


def _version(value: bool) -> None:
    if value:
        console.print(f"tracin {__version__}")
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
    from tracin.experiments._demo import run_demo

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
    engine: Annotated[str, typer.Option(help="auto, functional, factored or loop")] = "auto",
    query_score: Annotated[
        str, typer.Option(help="loss (labelled queries) or prediction (unlabelled)")
    ] = "loss",
    seed: Annotated[int, typer.Option(help="projection seed")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace a store made differently")] = False,
    keep_features: Annotated[
        bool | None,
        typer.Option(help="store exact training gradients (default: projected, or <= 4096 wide)"),
    ] = None,
    max_store_gb: Annotated[
        float, typer.Option(help="refuse a store whose features exceed this many GB")
    ] = 4.0,
) -> None:
    """Compute per-example gradient features of the spec's train and query data into a store.

    Under torchrun (``torchrun --nproc_per_node N -m tracin featurize ...``) the store's blocks
    are split across the processes (gloo on CPU, nccl on GPUs); the store is the same as a
    single-process run's, and a rerun after a crash computes only the missing blocks.
    """
    from tracin._progress import ProgressReporter, interval_from_env, plan_printer
    from tracin._spec import load_spec

    s = load_spec(spec)
    query_task = s.task
    if query_score != "loss":
        if not dataclasses.is_dataclass(s.task) or not hasattr(s.task, "query"):
            raise ConfigError("--query-score prediction needs a ClassificationTask/RegressionTask")
        query_task = dataclasses.replace(s.task, query=query_score)
    rank = _init_distributed()
    with ProgressReporter(err, enabled=rank == 0, interval=interval_from_env()) as progress:
        run = featurize_run(
            s.model, s.task, s.checkpoints, s.train, store=store, layers=s.layers,
            proj_dim=proj_dim, projection=projection, seed=seed, dtype=dtype,
            batch_size=batch_size, block_rows=block_rows, engine=engine,
            embedding_layer=s.embedding_layer, queries=s.queries, query_task=query_task,
            overwrite=overwrite, progress=progress, keep_features=keep_features,
            max_store_gb=max_store_gb, on_plan=plan_printer(err),
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
    """Rank training rows by self-influence, lr-weighted (the paper's quantity).

    To find mislabelled rows, `tracin suspects` ranks by the recipe measured best.
    """
    if top < 0:
        raise ConfigError(f"--top {top}: give a count of rows, or 0 for all of them")
    scores = open_run(store).self_influence()
    order = np.argsort(-scores, kind="stable")
    order = order[:top] if top > 0 else order
    rows = [(rank + 1, int(i), float(scores[i])) for rank, i in enumerate(order)]
    write_table(["rank", "train_row", "self_influence"], rows, fmt, output, console,
                "highest self-influence")  # fmt: skip


@app.command()
@one_line_errors
def suspects(
    store: StoreArg,
    top: Annotated[int, typer.Option(help="how many rows (0 = all)")] = 20,
    recipe: Annotated[
        str, typer.Option(help="contrast (measured best), self-influence, or paper")
    ] = "contrast",
    k: Annotated[int, typer.Option(help="neighbors of the contrast")] = 10,
    strict: Annotated[
        bool, typer.Option(help="fail instead of falling back when the store lacks inputs")
    ] = False,
    fmt: Format = "table",
    output: Output = None,
) -> None:
    """Rank training rows by how likely their label is wrong (tracin.mislabel_scores)."""
    from tracin.analysis._suspects import mislabel_scores

    if top < 0:
        raise ConfigError(f"--top {top}: give a count of rows, or 0 for all of them")
    result = mislabel_scores(open_run(store), recipe, k=k, strict=strict)
    if result.notice:
        err.print(f"tracin: notice: {result.notice}", markup=False, highlight=False)
    order = result.order(top or None)  # --top 0: every row (order() takes None for all)
    rows = [(rank + 1, int(i), float(result.scores[i])) for rank, i in enumerate(order)]
    write_table(["rank", "train_row", "score"], rows, fmt, output, console, result.description)


@app.command()
@one_line_errors
def explain(
    store: StoreArg,
    split: Annotated[str, typer.Option(help="stored query split (see featurize's spec)")],
    rows: Annotated[str | None, typer.Option(help="query rows, e.g. 0,3,7 (default: all)")] = None,
    k: Annotated[int, typer.Option(help="proponents and opponents per query")] = 10,
    relevance: Annotated[
        str,
        typer.Option(help="cosine (of gradients, the default), relatif, or tracin (raw score)"),
    ] = "cosine",
    fmt: Format = "table",
    output: Output = None,
) -> None:
    """Proponents (helped) and opponents (hurt) of stored queries, from one pass.

    Ranked by the cosine of per-checkpoint gradients (lr-weighted mean) unless --relevance tracin
    asks for the raw TracInCP score, which favours rows with large gradients (docs/quality.md).
    """
    from tracin.scoring._relevance import check_relevance

    chosen_relevance = check_relevance(relevance)
    run = open_run(store)
    chosen = _rows(rows) or list(range(run.split_rows.get(split, 0)))
    _check_rows(run, split, chosen, "--rows")
    with attached(run, err):
        props, opps = run.neighbors(split, k, relevance=chosen_relevance)
    table = []
    for q in chosen:
        for kind, nb in (("proponent", props), ("opponent", opps)):
            table += [(q, kind, r + 1, int(nb.indices[q, r]), float(nb.scores[q, r]))
                      for r in range(k)]  # fmt: skip
    write_table(["query_row", "kind", "rank", "train_row", "score"], table, fmt, output, console)


@app.command()
@one_line_errors
def cluster(
    store: StoreArg,
    n_clusters: Annotated[
        str, typer.Option(help="number of clusters, or auto (best silhouette over 2..10)")
    ] = "8",
    rows: Annotated[str | None, typer.Option(help="training rows to cluster (default all)")] = None,
    method: Annotated[
        str, typer.Option(help="kmeans (spherical, memory flat in N) or agglomerative (small N)")
    ] = "kmeans",
    fmt: Format = "table",
    output: Output = None,
) -> None:
    """Cluster training rows by TracIn similarity (the cosine of gradients).

    With kmeans, the table also gives each row's cosine to its cluster's centre (highest: the
    most typical members).
    """
    count: int | str = n_clusters.strip().lower()
    if count != "auto":
        try:
            count = int(n_clusters)
        except ValueError:
            raise ConfigError(
                f"--n-clusters {n_clusters!r}: give a number of clusters, e.g. 8, or auto"
            ) from None
    run = open_run(store)
    chosen = _rows(rows)
    if chosen is not None:
        _check_rows(run, "train", chosen, "--rows")
    index = chosen if chosen is not None else range(run.n_train)
    if method == "kmeans":
        with attached(run, err):
            found = run.clusters(count, rows=chosen)  # type: ignore[arg-type]
        table = [(i, int(c), float(s)) for i, c, s in zip(index, found.labels, found.similarity,
                                                           strict=True)]  # fmt: skip
        write_table(["train_row", "cluster", "similarity_to_centre"], table, fmt, output, console)
        return
    labels = run.cluster(count, rows=chosen, method=method)  # type: ignore[arg-type]
    write_table(["train_row", "cluster"], list(zip(index, labels.tolist(), strict=True)), fmt,
                output, console)  # fmt: skip


@app.command()
@one_line_errors
def report(
    store: StoreArg,
    spec: Annotated[Path, typer.Option(help="spec whose `render` draws the examples")],
    split: Annotated[str | None, typer.Option(help="query split to explain")] = None,
    rows: Annotated[
        str | None, typer.Option(help="query rows to explain (default: the first 4)")
    ] = None,
    k: Annotated[int, typer.Option(help="examples per row")] = 6,
    out: Annotated[
        Path | None, typer.Option(help="HTML file (default STORE/report/index.html)")
    ] = None,
) -> None:
    """Write the HTML report: self-influence gallery, explanations, clusters, with the examples.

    As the demo's: each query with the model's prediction and its label, explained for the
    prediction (default cosine relevance, the raw TracInCP score beside it for the first).
    """
    from tracin._spec import load_spec
    from tracin.report._from_spec import spec_report
    from tracin.report._html import write_report

    s = load_spec(spec)
    if s.render is None:
        raise ConfigError(
            f"spec {str(spec)!r} defines no `render(split, index)`; the report needs it"
        )
    run = open_run(store)
    chosen = _rows(rows) or []
    if split is not None:
        if rows is None:
            chosen = list(range(min(4, run.split_rows.get(split, 0))))
        _check_rows(run, split, chosen, "--rows")
    with console.status("composing the report"):
        page = spec_report(store, s, split, chosen, k)
    path = write_report(page, out or store / "report" / "index.html")
    console.print(f"report: {path.resolve()}")


@app.command()
@one_line_errors
def review(
    store: StoreArg,
    spec: Annotated[
        Path | None, typer.Option(help="spec: render, data and model (labels, predictions)")
    ] = None,
    port: Annotated[int, typer.Option(help="port to listen on (default: a free one)")] = 0,
    host: Annotated[
        str, typer.Option(help="address to bind; anything but 127.0.0.1 exposes your data")
    ] = "127.0.0.1",
    score: Annotated[
        str, typer.Option(help="auto (contrastive with embeddings), contrastive, self-influence")
    ] = "auto",
    export: Annotated[
        Path | None, typer.Option(help="write decisions as CSV to this file and exit (no server)")
    ] = None,
) -> None:
    """Review suspects in a local web app; decisions go to STORE/decisions.jsonl as made.

    Prints the app's URL, which carries a random token. With --export, writes
    row,given_label,decision,new_label for every decided row and exits.
    """
    from tracin import review as rv

    if export is not None:
        count = rv.export_decisions(store, export)
        console.print(f"exported {count} decisions from {store / rv.DECISIONS_FILE} to {export}")
        return
    if spec is None:
        raise ConfigError("tracin review needs --spec spec.py (its render draws the examples)")
    from tracin._spec import load_spec

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: give 1..65535, or 0 for a free one")
    with console.status("ranking suspects and computing predictions"):
        server = rv.open_review(store, load_spec(spec), score)
    sock = rv.bind(host, port)
    if host not in rv.LOOPBACK:
        err.print(f"tracin: warning: listening on {host}: anyone who can reach this machine and "
                  "has the URL can read your data and change decisions", markup=False)  # fmt: skip
    console.print(
        f"tracin review: {server.data.n_rows} training rows ranked by "
        f"{server.data.score_name}; {len(server.log.current)} decided",
        highlight=False,
    )
    console.print(f"open {rv.url(sock, server.token)}", markup=False, highlight=False,
                  soft_wrap=True)  # fmt: skip
    sys.stdout.flush()
    rv.serve(server, sock, allow_any_host=host not in rv.LOOPBACK)


app.add_typer(eval_app, name="eval")


def main() -> None:
    """Entry point of the ``tracin`` script."""
    sys.exit(app())
