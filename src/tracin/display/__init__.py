"""Showing results to a person: notebook tables (``_repr_html_``), DataFrames, example thumbnails.

Contract: `RunDisplay` gives a run ``show_with(examples, render=, labels=, classes=, queries=)``;
results it returns (`tracin.Neighbors`, `tracin.MislabelScores`, `tracin.Clusters`) render as small
HTML tables with the examples in a notebook and convert with ``to_frame()``. Every string from data
is escaped; images are inline PNG data URIs (`image_array` checks their shape); nothing loads from
the network. This package depends only on the shared vocabulary, so every role may use it.
"""

from tracin.display._examples import image_array
from tracin.display._tables import RunDisplay

__all__ = ["RunDisplay", "image_array"]
