"""Compose the report from a run: the self-influence gallery, explanations, recall plot, clusters.

Works from the store alone: the caller supplies a renderer ``render(split, index) -> dict`` with
``label`` and one of ``image`` (an array), ``text`` or ``row`` (a mapping), so the report shows
the examples themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from tracin._errors import ConfigError, StoreError
from tracin._run import Run
from tracin.analysis._metrics import recall_curve
from tracin.report._html import Example, Explanation, Plot, Report, figure_uri, image_uri
from tracin.scoring._maths import Neighbors

__all__ = ["Renderer", "compose_report"]

Renderer = Callable[[str, int], Mapping[str, Any]]


def example(render: Renderer, split: str, index: int, score: float | None = None,
            flag: str = "") -> Example:  # fmt: skip
    """An `Example` from the user's renderer output."""
    view = render(split, int(index))
    if not isinstance(view, Mapping) or "label" not in view:
        raise ConfigError(
            f"render({split!r}, {index}) returned {type(view).__name__}; it must return a dict "
            "with 'label' and one of 'image' (array), 'text' (str) or 'row' (dict)"
        )
    image = view.get("image")
    return Example(
        index=int(index), label=str(view["label"]), score=score, flag=flag,
        image=None if image is None else image_uri(np.asarray(image)),
        text=None if view.get("text") is None else str(view["text"]),
        row=None if view.get("row") is None else {str(k): str(v) for k, v in view["row"].items()},
    )  # fmt: skip


def _recall_plot(rankings: Mapping[str, np.ndarray], is_flagged: np.ndarray) -> Plot:
    def draw(ax: Any) -> None:
        for name, scores in rankings.items():
            x, y = recall_curve(scores, is_flagged)
            ax.plot(x, y, label=name)
        ax.plot([0, 1], [0, 1], ":", color="grey", label="random")
        ax.set_xlim(0, 0.5)
        ax.set_xlabel("fraction of training data inspected")
        ax.set_ylabel("fraction of flipped labels found")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")

    return Plot(figure_uri(draw), "Flipped labels found when inspecting examples in rank order")


def _row(render: Renderer, nb: Neighbors, q: int, flags: Callable[[int], str]) -> list[Example]:
    return [example(render, "train", i, float(s), flags(int(i)))
            for i, s in zip(nb.indices[q], nb.scores[q], strict=True)]  # fmt: skip


def compose_report(
    run: Run,
    render: Renderer,
    *,
    title: str,
    subtitle: str = "",
    query_split: str | None = None,
    query_rows: Sequence[int] = (),
    query_captions: Sequence[str] = (),
    k: int = 6,
    gallery: int = 24,
    flipped: np.ndarray | None = None,
    flag: Callable[[int], str] | None = None,
    baselines: Mapping[str, np.ndarray] | None = None,
    cluster_rows: Sequence[int] | None = None,
    n_clusters: int | Literal["auto"] = 4,
    cluster_title: str = "Clusters",
    summary: Sequence[Sequence[Any]] = (),
    ranking: tuple[str, np.ndarray] | None = None,
    query_data: Any = None,
    query_task: Any = None,
) -> Report:
    """Build the report for ``run``.

    Args:
        run: a featurized run (query splits and embeddings stored for the explanations).
        render: ``render(split, index) -> {"label", "image" | "text" | "row"}``.
        title: page title.
        subtitle: a line under the title.
        query_split: stored split whose rows ``query_rows`` are explained.
        query_rows: rows of ``query_split`` to explain.
        query_captions: a caption per query (e.g. "predicted 3, true 5").
        k: examples per row of proponents, opponents and embedding neighbors.
        gallery: how many top self-influence examples to show.
        flipped: ground truth of mislabelled training rows, if known (plots a recall curve).
        flag: ``flag(train_index) -> str`` warning shown on an example ('' for none).
        baselines: other rankings to plot beside self-influence (e.g. final loss).
        cluster_rows: training rows to cluster by TracIn similarity (spherical k-means,
            `Run.clusters`); each cluster shows its most typical members (closest to the
            centre) first.
        n_clusters: number of clusters, or ``"auto"`` (best silhouette).
        cluster_title: heading of the clusters section.
        summary: table rows ``(name, value, ...)`` shown first.
        ranking: ``(name, scores)`` ranking the gallery and drawn first in the recall plot
            (default ``("TracIn self-influence", run.self_influence())``), e.g. the
            contrastive self-influence of a run on the final layer.
        query_data: the rows ``query_rows`` of ``query_split`` as data, to explain them with
            ``query_task`` instead of their stored features (a run with its model), e.g.
            `tracin._predicted.PredictedClassTask` to explain what the model predicted.
        query_task: the task whose query score ``query_data`` is explained by.

    Raises:
        ConfigError: the run has no stored split that the report asks for, or bad arguments (k,
            queries).
    """
    flags = flag or (lambda i: "")
    report = Report(title=title, subtitle=subtitle, summary=[list(r) for r in summary],
                    clusters_title=cluster_title)  # fmt: skip
    name, self_inf = ranking or ("TracIn self-influence", run.self_influence())
    self_inf = np.asarray(self_inf, dtype=np.float64)
    if self_inf.shape != (run.n_train,):
        raise ConfigError(f"ranking {name!r} has shape {self_inf.shape}; expected ({run.n_train},)")
    report.gallery_title = f"Highest {name}"
    if flag is not None:
        report.gallery_note += " Red border: a known flipped label."
    top = np.argsort(-self_inf, kind="stable")[:gallery]
    report.gallery = [example(render, "train", i, float(self_inf[i]), flags(int(i))) for i in top]
    if flipped is not None:
        rankings = {name: self_inf, **(baselines or {})}
        report.plots.append(_recall_plot(rankings, np.asarray(flipped, dtype=bool)))
    if query_split is not None and len(query_rows):
        report.explanations = _explanations(run, render, query_split, query_rows,
                                            query_captions, k, flags,
                                            (query_data, query_task))  # fmt: skip
    if cluster_rows is not None and len(cluster_rows) >= (
        2 if n_clusters == "auto" else n_clusters
    ):
        rows = np.asarray(cluster_rows, dtype=np.int64)
        found = run.clusters(n_clusters, rows=rows)
        for c in range(len(found.centres)):
            typical = found.typical(c, 16)
            count = int((found.labels == c).sum())
            report.clusters.append((f"cluster {c + 1} ({count} rows, most typical first; score: "
                                    "cosine to the centre)",
                                    [example(render, "train", int(rows[i]),
                                             float(found.similarity[i]), flags(int(rows[i])))
                                     for i in typical]))  # fmt: skip
    return report


def _explanations(
    run: Run,
    render: Renderer,
    split: str,
    rows: Sequence[int],
    captions: Sequence[str],
    k: int,
    flags: Callable[[int], str],
    live: tuple[Any, Any] = (None, None),
) -> list[Explanation]:
    data, task = live
    if data is None:  # stored features, indexed by row
        props, opps = run.neighbors(split, k)  # the cosine relevance
        raw, raw_opps = run.neighbors(split, k, relevance="tracin")
        at = list(rows)
    else:  # computed now with ``task``, indexed by position
        props, opps = run.neighbors(data, k, query_task=task)
        raw, raw_opps = run.neighbors(data, k, query_task=task, relevance="tracin")
        at = list(range(len(rows)))
    has_embeddings = True
    try:
        near, far = run.embedding_neighbors(split, k)
    except StoreError:  # no embeddings stored: the baseline rows are left out
        has_embeddings = False
    out = []
    for j, q in enumerate(rows):
        p = at[j]
        lines = [("TracIn proponents (default: cosine of gradients)",
                  _row(render, props, p, flags)),
                 ("TracIn opponents (default: cosine of gradients)",
                  _row(render, opps, p, flags))]  # fmt: skip
        if j == 0:  # once, the raw score beside it: large-gradient rows crowd it
            lines.append(("raw TracInCP score: proponents", _row(render, raw, p, flags)))
            lines.append(("raw TracInCP score: opponents", _row(render, raw_opps, p, flags)))
        if has_embeddings:
            lines += [("embedding: nearest", _row(render, near, q, flags)),
                      ("embedding: farthest", _row(render, far, q, flags))]  # fmt: skip
        caption = captions[j] if j < len(captions) else ""
        out.append(Explanation(example(render, split, q), caption, lines))
    return out
