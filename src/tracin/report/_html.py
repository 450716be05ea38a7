"""The HTML report: a self-contained page (images inline, no network) of examples and scores.

Every string that comes from data is escaped by Jinja2's autoescape; the page's Content
Security Policy forbids scripts and any load but inline data images.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tracin._errors import ConfigError, MissingDependencyError
from tracin._io import atomic_write, not_writable
from tracin.display._examples import image_array

__all__ = ["Example", "Explanation", "Plot", "Report", "image_uri", "write_report"]


@dataclass
class Example:
    """One example as the report shows it.

    Attributes:
        index: row in its split.
        label: label text.
        score: the score shown under it (TracIn, self-influence or cosine), if any.
        image: a ``data:image/png`` URI, if the example is an image.
        text: text of the example, if it is text.
        row: column -> value, if it is a table row.
        flag: a warning shown in red (e.g. "flipped label: true 3").
    """

    index: int
    label: str
    score: float | None = None
    image: str | None = None
    text: str | None = None
    row: Mapping[str, Any] | None = None
    flag: str = ""


@dataclass
class Explanation:
    """A query and its rows of examples (proponents, opponents, embedding neighbors)."""

    query: Example
    caption: str
    rows: list[tuple[str, list[Example]]]


@dataclass
class Plot:
    """A figure, as a PNG data URI, with a caption."""

    image: str
    caption: str


@dataclass
class Report:
    """Everything the page shows; each part is optional."""

    title: str
    subtitle: str = ""
    summary: list[Sequence[Any]] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    gallery: list[Example] = field(default_factory=list)
    gallery_title: str = "Highest self-influence"
    gallery_note: str = "Training examples the model had to memorise: mislabelled or rare."
    explanations: list[Explanation] = field(default_factory=list)
    clusters: list[tuple[str, list[Example]]] = field(default_factory=list)
    clusters_title: str = "Clusters"


def image_uri(pixels: np.ndarray, cmap: str = "gray_r") -> str:
    """A 2-D (grey) or 3-D (RGB) array as a ``data:image/png;base64`` URI.

    Raises:
        ConfigError: ``pixels`` is not an image (see `tracin.display.image_array`).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    buf = io.BytesIO()
    arr = image_array(pixels)
    if arr.ndim == 3 and (arr.min() < 0 or arr.max() > 1):  # imsave wants colours in [0, 1]
        low, high = (0.0, 255.0) if arr.min() >= 0 and arr.max() <= 255 else (arr.min(), arr.max())
        arr = (arr - low) / ((high - low) or 1.0)
    plt.imsave(buf, arr, cmap=cmap if arr.ndim == 2 else None, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def figure_uri(draw: Callable[[Any], None], size: tuple[float, float] = (5.5, 3.6)) -> str:
    """Draw on a fresh Matplotlib axes and return the figure as a PNG data URI."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=110)
    try:
        draw(ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_report(report: Report, path: str | Path) -> Path:
    """Render ``report`` to a self-contained HTML file (written atomically); returns its path.

    Raises:
        ConfigError: an example's render output cannot be drawn (e.g. an image of the wrong shape).
        MissingDependencyError: jinja2 or matplotlib is missing: pip install 'tracin[demo]'.
    """
    try:
        import jinja2
    except ImportError:
        raise MissingDependencyError(
            "the HTML report needs jinja2: pip install 'tracin[demo]'"
        ) from None
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tracin", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    html = env.get_template("report.html.j2").render(report=report)
    out = Path(path)
    if out.is_dir():
        example = str(out / "index.html")
        raise ConfigError(f"report path {str(out)!r} is a directory; pass a file, e.g. {example!r}")
    try:
        atomic_write(out, html.encode("utf-8"))
    except OSError as exc:
        raise ConfigError(not_writable(out.parent, exc)) from exc
    return out
