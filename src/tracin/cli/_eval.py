"""``tracin eval``: measure the quality of tracin's rankings (`tracin.experiments`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tracin._errors import ConfigError
from tracin.cli._common import Format, console, one_line_errors
from tracin.cli._output import write_table

__all__ = ["eval_app"]

eval_app = typer.Typer(help="Measure the quality of tracin's rankings.", no_args_is_help=True)


def _saved(result: Any, out: Path) -> None:
    paths = result.save(out)
    console.print(f"saved {paths['json']} and {paths['plot']}")


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
    from tracin.experiments._mislabel import FRACTIONS, MislabelConfig, evaluate_mislabel

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
    _saved(result, out)


@eval_app.command("fix")
@one_line_errors
def eval_fix(
    data: Annotated[str, typer.Option(help="digits or mnist1d")] = "digits",
    regime: Annotated[
        str, typer.Option(help="memorise (>= 99% train accuracy) or brief")
    ] = "memorise",
    noise: Annotated[float, typer.Option(help="fraction of training labels flipped")] = 0.1,
    seeds: Annotated[int, typer.Option(help="runs averaged (seeds 0, 1, ...)")] = 3,
    rows: Annotated[
        int, typer.Option(help="training rows, the rest are the test set (0 = 1200 / 2000)")
    ] = 0,
    checkpoints: Annotated[int, typer.Option(help="log-spaced checkpoints recorded")] = 30,
    cleanlab_folds: Annotated[int, typer.Option(help="K-fold for cleanlab (0 skips it)")] = 5,
    out: Annotated[Path, typer.Option(help="directory for fix.json and fix.png")] = Path(
        "runs/eval-fix"
    ),
    fmt: Format = "table",
) -> None:
    """Flip labels, rank, fix the top 5/10/20/30% of each ranking, retrain, and test.

    Rankings: the default TracIn ranking (as `tracin review`), `tracin self-influence`, the
    paper's recipe, final loss, loss summed over the checkpoints, cleanlab, random and the
    oracle. Test accuracy after retraining from the same initialisation and schedule, mean ±
    std over seeds, against no fix and all flips fixed, with a plot.
    """
    from tracin.experiments._fix import FixConfig, evaluate_fix

    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: give at least 1")
    if rows < 0:
        raise ConfigError(f"--rows {rows}: give a count of rows, or 0 for the default")
    cfg = FixConfig(data=data, noise=noise, seeds=tuple(range(seeds)), regime=regime,  # type: ignore[arg-type]
                    rows=rows or None, n_checkpoints=checkpoints,
                    cleanlab_folds=cleanlab_folds)  # fmt: skip
    with console.status("training, ranking and retraining") as status:
        result = evaluate_fix(cfg, progress=lambda stage: status.update(stage))
    header = ["method", *[f"test acc, {f:.0%} fixed" for f in cfg.fractions]]
    write_table(header, result.table(), fmt, None, console,
                f"{data}, {cfg.train_rows} rows, {noise:.0%} flipped, {regime} training, "
                f"{len(cfg.seeds)} seeds")  # fmt: skip
    _saved(result, out)


EvalData = Annotated[
    list[str] | None, typer.Option("--data", help="digits and/or mnist1d (repeat; default both)")
]
EvalSeeds = Annotated[int, typer.Option(help="runs per data set (seeds 0, 1, ...)")]
EvalRows = Annotated[int, typer.Option(help="training rows (0 = digits 1300, mnist1d 2000)")]
EvalEpochs = Annotated[int, typer.Option(help="training epochs (0 = digits 20, mnist1d 30)")]
EvalCkpts = Annotated[int, typer.Option(help="log-spaced checkpoints recorded")]
EvalProj = Annotated[int, typer.Option(help="Kronecker projection dim per checkpoint")]


def _setup(data: list[str] | None, seeds: int, rows: int, epochs: int, checkpoints: int,
           proj_dim: int, randomise: bool = True) -> Any:  # fmt: skip
    from tracin.experiments._setup import DATA_SETS, SetupConfig

    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: give at least 1")
    if rows < 0 or epochs < 0:
        raise ConfigError(f"--rows {rows} --epochs {epochs}: give counts, or 0 for the default")
    return SetupConfig(data=tuple(data or DATA_SETS), seeds=tuple(range(seeds)),
                       rows=rows or None, epochs=epochs or None, n_checkpoints=checkpoints,
                       proj_dim=proj_dim, randomise=randomise)  # fmt: skip


@eval_app.command("explain")
@one_line_errors
def eval_explain(
    data: EvalData = None,
    seeds: EvalSeeds = 2,
    rows: EvalRows = 0,
    epochs: EvalEpochs = 0,
    checkpoints: EvalCkpts = 10,
    proj_dim: EvalProj = 512,
    out: Annotated[Path, typer.Option(help="directory for explain.json and explain.png")] = Path(
        "runs/eval-explain"
    ),
    fmt: Format = "table",
) -> None:
    """Hanawa et al.'s tests of explanations on superclasses with hidden sub-classes.

    Classes merged in pairs, 10% of labels flipped, a small CNN: for each relevance (the
    default cosine, the raw TracInCP score, other weightings, the embedding-kNN baseline),
    identical class and sub-class of the top proponents, flipped rows among them, and model
    randomisation (Spearman and top-10 overlap against re-initialised weights), with a plot.
    """
    from tracin.experiments._explain import COLUMNS, evaluate_explain

    cfg = _setup(data, seeds, rows, epochs, checkpoints, proj_dim)
    with console.status("training and scoring") as status:
        result = evaluate_explain(cfg, progress=lambda stage: status.update(stage))
    for run in result.runs:
        write_table(["relevance", *COLUMNS], result.table(run), fmt, None, console,
                    result.title(run))  # fmt: skip
    _saved(result, out)


@eval_app.command("cluster")
@one_line_errors
def eval_cluster(
    data: EvalData = None,
    seeds: EvalSeeds = 2,
    rows: EvalRows = 0,
    epochs: EvalEpochs = 0,
    checkpoints: EvalCkpts = 10,
    proj_dim: EvalProj = 512,
    out: Annotated[Path, typer.Option(help="directory for cluster.json and cluster.png")] = Path(
        "runs/eval-cluster"
    ),
    fmt: Format = "table",
) -> None:
    """Sub-class recovery: split each superclass in two, ARI against the hidden classes.

    TracIn spherical k-means (all layers projected; the last layer), average linkage, and
    k-means on the penultimate embeddings (the baseline), per data set and seed, with a plot.
    """
    from tracin.experiments._cluster import evaluate_cluster

    cfg = _setup(data, seeds, rows, epochs, checkpoints, proj_dim, randomise=False)
    with console.status("training and clustering") as status:
        result = evaluate_cluster(cfg, progress=lambda stage: status.update(stage))
    title = "adjusted Rand index against hidden sub-classes, mean over superclasses"
    write_table(result.header(), result.table(), fmt, None, console, title)
    _saved(result, out)
