"""Results in a notebook: small HTML tables with the examples (``_repr_html_``) and DataFrames.

`Neighbors` (proponents, opponents), `MislabelScores` (suspects) and `Clusters` know row numbers
and scores, not the data. A `Run` gives each result it returns a `View`: what the result is
(``"proponents"``, the score's name, the training rows behind a clustering of a subset, the query)
and an `ExampleSource` saying where the examples are. By default the source is the data the run
was featurized on (``tracin.featurize(..., train_data)``, or ``tracin.open(..., train_data=...)``)
read through the run's task (which item is the input, which the label); `Run.show_with` replaces
it once for every later result: a Dataset, a ``render(split, index)`` as the report's spec has,
given labels and class names. A result without a view (made by hand, or from a run without
data) still shows rows, scores and ranks.

Pages stay small: at most `MAX_ITEMS` examples per query, cluster or suspect list and
`MAX_GROUPS` queries or clusters, then a "... N more" line; how an example becomes a cell (a
PNG thumbnail as a data URI, clipped text, a table row) is `tracin.display._examples`. Every
string from data is escaped here with `html.escape`; nothing is loaded from the network.
``to_frame()`` gives every row, in long format, as a pandas DataFrame (pandas is imported only
then).
"""

from __future__ import annotations

import html
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from tracin._errors import ConfigError, MissingDependencyError
from tracin.display._examples import (
    TEXT_CHARS,
    ExampleSource,
    Renderer,
    Shown,
    as_array,
    clip,
    example_at,
    readable,
    row_count,
    shown_item,
)

if TYPE_CHECKING:
    from tracin._task import Task
    from tracin.analysis._cluster import Clusters
    from tracin.analysis._suspects import MislabelScores
    from tracin.scoring._maths import Neighbors

__all__ = [
    "MAX_GROUPS",
    "MAX_ITEMS",
    "MissingDependencyError",
    "RunDisplay",
    "View",
    "attach",
    "clusters_frame",
    "clusters_html",
    "neighbors_frame",
    "neighbors_html",
    "score_text",
    "suspects_frame",
    "suspects_html",
    "view_of",
]

MAX_ITEMS = 10  # examples shown per query, cluster or suspect table
MAX_GROUPS = 10  # queries or clusters shown
SHOWN = 56  # largest side of a thumbnail on the page, CSS pixels
_ATTR = "_tracin_view"

R = TypeVar("R")


# --- views: what a result is, attached by the run ----------------------------------------------
@dataclass(frozen=True)
class View:
    """What a result shows beside its numbers.

    Attributes:
        source: where the examples are, or ``None`` (rows and scores only).
        title: what the result is, e.g. ``"proponents"``.
        score: the scores' name, e.g. ``"cosine of gradients"``.
        rows: ``(n,)`` training row of each position (a clustering of ``rows=...``), or ``None``.
        query: the query: a stored split's name, the query data, or ``None``.
    """

    source: ExampleSource | None = None
    title: str = ""
    score: str = "score"
    rows: np.ndarray | None = None
    query: Any = None


def attach(result: R, view: View) -> R:
    """``result`` carrying ``view``; the same type's fields, values and equality.

    A named tuple (`Neighbors`, `Clusters`) becomes an instance of a subclass of the same
    name that holds the view and pickles as the plain tuple; other results (`MislabelScores`)
    hold it as an attribute their ``__getstate__`` leaves out.
    """
    if isinstance(result, tuple):
        base = getattr(type(result), "_tracin_base", type(result))
        shown = _with_view(base)(*result)
        setattr(shown, _ATTR, view)
        return shown  # type: ignore[no-any-return]
    object.__setattr__(result, _ATTR, view)
    return result


def view_of(result: object) -> View:
    """The view attached to ``result``, or an empty one."""
    view = getattr(result, _ATTR, None)
    return view if isinstance(view, View) else View()


_SUBCLASSES: dict[type, type] = {}


def _with_view(cls: type) -> type:
    if cls not in _SUBCLASSES:

        def reduce(self: tuple[Any, ...]) -> tuple[type, tuple[Any, ...]]:
            return cls, tuple(self)

        names = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "_tracin_base": cls,
        }
        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"__reduce__": reduce, **names})
    return _SUBCLASSES[cls]


class RunDisplay:
    """The `Run` side: which examples results show (`show_with`) and attaching views."""

    _display_source: ExampleSource | None = None
    if TYPE_CHECKING:  # provided by Run
        n_train: int
        task: Task | None
        _train_data: Any

    def show_with(
        self: R,
        examples: Any = None,
        *,
        render: Renderer | None = None,
        labels: Any = None,
        classes: Sequence[str] | Mapping[Any, str] | None = None,
        queries: Mapping[str, Any] | None = None,
    ) -> R:
        """Choose what results of this run show in a notebook; returns the run.

        Results returned afterwards (`proponents`, `opponents`, `neighbors`,
        `mislabel_scores`, `clusters`) render as HTML tables with these examples and convert
        with ``to_frame()``. Without a call, the data the run was featurized on is shown.

        Args:
            examples: the training rows (a Dataset, DataLoader, list or in-memory batch, in the
                featurized order); ``None`` keeps the featurized data.
            render: ``render(split, index) -> {"label", "image" | "text" | "row"}`` (the spec's
                contract), for any split; it wins over ``examples``.
            labels: ``(N,)`` given labels of the training rows (winning over the data's).
            classes: class names, indexed by label.
            queries: ``{split: data}`` for stored query splits, so a query split's rows show.

        Raises:
            ConfigError: ``render`` is not callable, or ``examples``/``labels`` do not have
                one entry per training row.
        """
        run: Any = self
        if render is not None and not callable(render):
            raise ConfigError(f"render is {type(render).__name__}; pass render(split, index)")
        given = None if labels is None else as_array(labels)
        if labels is not None and given is None:
            given = np.asarray(labels)
        if examples is not None and not readable(examples):
            raise ConfigError(
                f"examples is {type(examples).__name__}, whose rows cannot be read by index; "
                "pass a map-style Dataset, a list or an in-memory batch (or render=...)"
            )
        for name, value in (("examples", examples), ("labels", given)):
            count = row_count(value)
            if count is not None and count != run.n_train:
                raise ConfigError(
                    f"{name} has {count} rows; the run has {run.n_train} training rows: pass "
                    "the featurized training data, in the same order"
                )
        run._display_source = ExampleSource(
            train=examples if examples is not None else run._train_data, render=render,
            labels=given, classes=classes, queries=dict(queries or {}), task=run.task,
        )  # fmt: skip
        return self

    def _shown_pair(
        self, best: Neighbors, worst: Neighbors, query: Any, relevance: str
    ) -> tuple[Neighbors, Neighbors]:
        """Proponents and opponents of ``query`` (a split name or the data), shown."""
        name = SCORE_NAMES.get(relevance, relevance)
        return (self._shown(best, "proponents", name, query=query),
                self._shown(worst, "opponents", name, query=query))  # fmt: skip

    def _shown(self, result: R, title: str = "", score: str = "score", *, rows: Any = None,
               query: Any = None) -> R:  # fmt: skip
        """``result`` carrying this run's examples and what it is (see `attach`)."""
        source = self._display_source
        if source is None:
            source = ExampleSource(train=getattr(self, "_train_data", None), task=self.task)
        index = None if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        return attach(result, View(source, title, score, index, query))


SCORE_NAMES = {"cosine": "cosine of gradients", "relatif": "RelatIF", "tracin": "TracInCP score"}


# --- HTML ---------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


_CELL = "padding:4px 6px;vertical-align:top;text-align:center;border:1px solid #ddd"
_HEAD = "padding:4px 6px;text-align:left;border:1px solid #ddd;background:#f4f4f4"


def _example_html(shown: Shown) -> str:
    if shown.image is not None:
        return (f'<img src="{_e(shown.image)}" alt="" style="width:{SHOWN}px;'
                'image-rendering:pixelated;display:block;margin:auto">')  # fmt: skip
    if shown.text is not None:
        return (f'<div style="max-width:14em;text-align:left;white-space:pre-wrap;font-size:90%">'
                f"{_e(clip(shown.text, TEXT_CHARS))}</div>")  # fmt: skip
    if shown.row is not None:
        lines = "<br>".join(f"{_e(k)}: {_e(v)}" for k, v in shown.row.items())
        return f'<div style="text-align:left;font-size:85%">{lines}</div>'
    return ""


def _card(shown: Shown, caption: Sequence[str]) -> str:
    """An example cell: the example, then caption lines (already escaped)."""
    lines = "<br>".join(caption)
    return (
        f'<td style="{_CELL}">{_example_html(shown)}<div style="font-size:85%">{lines}</div></td>'
    )


def score_text(score: float) -> str:
    """A score to 4 significant digits; more where that would round it to +-1 (a cosine)."""
    text = f"{score:.4g}"
    return f"{score:.6f}" if abs(float(text)) == 1 and abs(score) != 1 else text


def _caption(row: int, score: float | None, label: Any) -> list[str]:
    lines = [f"<b>#{row}</b>" + ("" if label is None else f" &middot; {_e(label)}")]
    if score is not None:
        lines.append(_e(score_text(score)))
    return lines


def _more(count: int, what: str, span: int = 1) -> str:
    return (f'<td style="{_CELL};color:#666" colspan="{span}">&hellip; {count} more {what}</td>'
            if count > 0 else "")  # fmt: skip


def _frame(title: str, body: str, note: str = "") -> str:
    extra = f'<div style="color:#666">{note}</div>' if note else ""
    table = f'<table style="border-collapse:collapse;margin-top:4px">{body}</table>'
    return f'<div class="tracin-result"><div>{title}</div>{extra}{table}</div>'


def _train_example(view: View, row: int) -> Shown:
    return Shown() if view.source is None else view.source.example("train", row)


def _query_example(view: View, q: int) -> Shown:
    """Query ``q`` as a cell: a stored split's row, or row ``q`` of the query data."""
    source, query = view.source, view.query
    if source is None or query is None:
        return Shown()
    if isinstance(query, str):
        return source.example(query, q)
    if not readable(query):
        return Shown()
    shown = shown_item(example_at(query, q), source.task)
    return shown._replace(label=source.name(shown.label))


def neighbors_html(nb: Neighbors) -> str:
    """Proponents or opponents as a table: a line per query, its top rows as cells."""
    view = view_of(nb)
    n_queries, k = nb.indices.shape
    title = (f"<b>{_e(view.title or 'neighbors')}</b>: {n_queries} "
             f"quer{'y' if n_queries == 1 else 'ies'} &times; {k} training rows, best first; "
             f"score: {_e(view.score)}")  # fmt: skip
    head = (f'<tr><th style="{_HEAD}">query</th>'
            + "".join(f'<th style="{_HEAD}">{r + 1}</th>' for r in range(min(k, MAX_ITEMS)))
            + (f'<th style="{_HEAD}"></th>' if k > MAX_ITEMS else "") + "</tr>")  # fmt: skip
    lines = [head]
    for q in range(min(n_queries, MAX_GROUPS)):
        query = _query_example(view, q)
        label = "" if query.label is None else f" &middot; {_e(query.label)}"
        cells = [_card(query, [f"<b>query {q}</b>{label}"])]
        for row, score in zip(nb.indices[q, :MAX_ITEMS], nb.scores[q, :MAX_ITEMS], strict=True):
            shown = _train_example(view, int(row))
            cells.append(_card(shown, _caption(int(row), float(score), shown.label)))
        lines.append("<tr>" + "".join(cells) + _more(k - MAX_ITEMS, "rows") + "</tr>")
    more = n_queries - MAX_GROUPS
    if more > 0:
        lines.append(f"<tr>{_more(more, 'queries', min(k, MAX_ITEMS) + 1)}</tr>")
    return _frame(title, "".join(lines), "to_frame() has every row")


def suspects_html(scores: MislabelScores) -> str:
    """The most suspect training rows as a table: rank, row, score, label and the example."""
    view = view_of(scores)
    n = len(scores.scores)
    order = scores.order(MAX_ITEMS)
    title = f"<b>mislabel suspects</b>: {_e(scores.description)}; {n} training rows"
    head = "".join(f'<th style="{_HEAD}">{h}</th>'
                   for h in ("rank", "row", "score", "label", "example"))  # fmt: skip
    lines = [f"<tr>{head}</tr>"]
    for rank, row in enumerate(order, start=1):
        shown = _train_example(view, int(row))
        values = [str(rank), f"#{int(row)}", score_text(float(scores.scores[row])),
                  "" if shown.label is None else str(shown.label)]  # fmt: skip
        cells = "".join(f'<td style="{_CELL}">{_e(v)}</td>' for v in values)
        lines.append(f'<tr>{cells}<td style="{_CELL}">{_example_html(shown)}</td></tr>')
    if n > len(order):
        lines.append(f"<tr>{_more(n - len(order), 'rows', 5)}</tr>")
    note = "" if scores.notice is None else _e(scores.notice)
    return _frame(title, "".join(lines), note)


def clusters_html(found: Clusters) -> str:
    """Clusters as a table: a line per cluster, its most typical members as cells."""
    view = view_of(found)
    k = len(found.centres)
    title = (f"<b>clusters</b>: {k} clusters of {len(found.labels)} training rows; members "
             "most typical first (score: cosine to the centre)")  # fmt: skip
    lines = []
    for c in range(min(k, MAX_GROUPS)):
        members = found.typical(c, MAX_ITEMS)
        size = int((found.labels == c).sum())
        cells = [f'<td style="{_CELL}"><b>cluster {c}</b><br>{size} rows</td>']
        for pos in members:
            row = _row_of(view, int(pos))
            shown = _train_example(view, row)
            cells.append(_card(shown, _caption(row, float(found.similarity[pos]), shown.label)))
        lines.append("<tr>" + "".join(cells) + _more(size - len(members), "rows") + "</tr>")
    if k > MAX_GROUPS:
        lines.append(f"<tr>{_more(k - MAX_GROUPS, 'clusters', MAX_ITEMS + 1)}</tr>")
    return _frame(title, "".join(lines), "to_frame() has every row")


def _row_of(view: View, position: int) -> int:
    return position if view.rows is None else int(view.rows[position])


# --- DataFrames -------------------------------------------------------------------------------
def _pandas() -> Any:
    """The pandas module.

    Raises:
        MissingDependencyError: pandas is not installed (naming ``pip install pandas``).
    """
    try:
        return importlib.import_module("pandas")
    except ImportError:
        raise MissingDependencyError(
            "to_frame() needs pandas, which is not installed: pip install pandas"
        ) from None


def _labels(view: View, rows: np.ndarray) -> list[Any]:
    return [None] * len(rows) if view.source is None else view.source.labels_of(rows)


def neighbors_frame(nb: Neighbors) -> Any:
    """Long format, one line per (query, rank): ``query, rank, row, score, label``.

    ``rank`` counts from 1 (best); ``label`` is the training row's given label (``None`` if
    unknown).

    Raises:
        MissingDependencyError: pandas is not installed.
    """
    pd = _pandas()
    n_queries, k = nb.indices.shape
    rows = np.asarray(nb.indices, dtype=np.int64).reshape(-1)
    return pd.DataFrame({
        "query": np.repeat(np.arange(n_queries, dtype=np.int64), k),
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int64), n_queries),
        "row": rows,
        "score": np.asarray(nb.scores, dtype=np.float64).reshape(-1),
        "label": _labels(view_of(nb), rows),
    })  # fmt: skip


def suspects_frame(scores: MislabelScores) -> Any:
    """Every training row, most suspect first: ``rank, row, score, label``.

    Raises:
        MissingDependencyError: pandas is not installed.
    """
    pd = _pandas()
    order = scores.order()
    return pd.DataFrame({
        "rank": np.arange(1, len(order) + 1, dtype=np.int64),
        "row": order.astype(np.int64),
        "score": np.asarray(scores.scores, dtype=np.float64)[order],
        "label": _labels(view_of(scores), order),
    })  # fmt: skip


def clusters_frame(found: Clusters) -> Any:
    """Every clustered row, by cluster: ``cluster, rank, row, similarity, label``.

    ``row`` is the training row (through ``rows=`` of `Run.clusters`); ``rank`` counts from 1
    within the cluster.

    Raises:
        MissingDependencyError: pandas is not installed.
    """
    pd = _pandas()
    view = view_of(found)
    positions = np.lexsort((np.arange(len(found.labels)), -found.similarity, found.labels))
    clusters = np.asarray(found.labels, dtype=np.int64)[positions]
    starts = np.searchsorted(clusters, clusters, side="left")
    rows = positions if view.rows is None else view.rows[positions]
    return pd.DataFrame({
        "cluster": clusters,
        "rank": np.arange(len(positions), dtype=np.int64) - starts + 1,
        "row": np.asarray(rows, dtype=np.int64),
        "similarity": np.asarray(found.similarity, dtype=np.float64)[positions],
        "label": _labels(view, np.asarray(rows, dtype=np.int64)),
    })  # fmt: skip
