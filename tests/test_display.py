"""Notebook display: ``_repr_html_`` tables with the examples and ``to_frame()`` DataFrames."""

from __future__ import annotations

import base64
import io
import pickle
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import tracin
from tracin.display._examples import png_uri
from tracin.display._tables import MAX_GROUPS, MAX_ITEMS, MissingDependencyError, score_text

pd = pytest.importorskip("pandas")

URI = re.compile(r'src="(data:image/png;base64,[A-Za-z0-9+/=]+)"')


def _decode(uri: str) -> np.ndarray:
    data = base64.b64decode(uri.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)))


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A CNN run over 30 6x6 grey images with labels 0..2, and 4 labelled query images."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = TinyCNN().double()
    x = torch.rand(34, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (34,), generator=gen)
    states, opt = [], torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:30]), y[:30]).backward()
        opt.step()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=[0.2, 0.1])
    data = torch.utils.data.TensorDataset(x[:30], y[:30])
    run = tracin.featurize(model, tracin.ClassificationTask(), ckpts, data,
                           store=tmp_path_factory.mktemp("img"), dtype="float64")  # fmt: skip
    return run, x, y


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    """An MLP run on 40 rows with the final bias and embeddings stored (mislabel recipe)."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    y = torch.randint(0, 4, (40,), generator=gen)
    x = 3 * torch.randn(4, 6, generator=gen, dtype=torch.float64)[y]
    x = x + torch.randn(40, 6, generator=gen, dtype=torch.float64)
    states, opt = [], torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    ckpts = tracin.Checkpoints.from_state_dicts(states, lr=[0.5, 0.1, 0.02])
    data = torch.utils.data.TensorDataset(x, y)
    run = tracin.featurize(model, tracin.ClassificationTask(), ckpts, data,
                           store=tmp_path_factory.mktemp("tab"), layers=["2.bias"],
                           embedding_layer="1", dtype="float64")  # fmt: skip
    return run, x, y


def _cells(html: str) -> list[str]:
    return re.findall(r"<td[^>]*>(.*?)</td>", html, flags=re.S)


def test_proponents_show_each_query_with_its_rows_scores_labels_and_images(images):
    run, x, y = images
    query = (x[30:], y[30:])
    nb = run.proponents(query, k=3)
    html = nb._repr_html_()
    rows = re.findall(r"<tr>(.*?)</tr>", html, flags=re.S)[1:]  # after the header
    assert len(rows) == 4
    for q, line in enumerate(rows):
        cells = _cells(line)
        assert f"<b>query {q}</b> &middot; {int(y[30 + q])}" in cells[0]  # its own label
        for cell, row, score in zip(cells[1:], nb.indices[q], nb.scores[q], strict=True):
            assert f"<b>#{row}</b> &middot; {int(y[row])}<br>{score_text(score)}" in cell
            uri = URI.search(cell).group(1)
            pixels = _decode(uri)  # dark-on-light, min-max scaled, as the report draws grey
            img = x[row, 0].numpy()
            want = np.round((1 - (img - img.min()) / (img.max() - img.min())) * 255)
            np.testing.assert_array_equal(pixels, want.astype(np.uint8))
    assert len(URI.findall(html)) == 4 * (3 + 1)
    assert "cosine of gradients" in html and "proponents" in html
    assert "http" not in html and "<script" not in html


def test_to_frame_is_long_format_with_the_objects_values(images):
    run, x, y = images
    props, opps = run.neighbors((x[30:], y[30:]), k=5, relevance="tracin")
    for nb in (props, opps):
        frame = nb.to_frame()
        assert list(frame.columns) == ["query", "rank", "row", "score", "label"]
        assert len(frame) == 4 * 5
        np.testing.assert_array_equal(frame["query"], np.repeat(np.arange(4), 5))
        np.testing.assert_array_equal(frame["rank"], np.tile(np.arange(1, 6), 4))
        np.testing.assert_array_equal(frame["row"], nb.indices.reshape(-1))
        np.testing.assert_array_equal(frame["score"], nb.scores.reshape(-1))
        assert list(frame["label"]) == [int(y[r]) for r in nb.indices.reshape(-1)]
    assert "opponents" in opps._repr_html_() and "TracInCP score" in opps._repr_html_()


def test_results_keep_their_type_fields_and_pickle_plain(images):
    run, x, y = images
    nb = run.proponents((x[30:], y[30:]), k=2)
    indices, scores = nb  # still a two-field named tuple
    assert isinstance(nb, tracin.Neighbors) and nb._fields == ("indices", "scores")
    assert repr(nb).startswith("Neighbors(indices=")
    back = pickle.loads(pickle.dumps(nb))
    assert type(back) is tracin.Neighbors
    np.testing.assert_array_equal(back.indices, indices)
    np.testing.assert_array_equal(back.scores, scores)


def test_text_and_labels_from_data_are_escaped(images):
    run, _, _ = images
    evil = "<script>alert('x')</script>"
    run.show_with(render=lambda split, i: {"label": f"<b>{i}</b>", "text": f"{evil} row {i}"})
    try:
        nb = run.proponents("train", k=2)
        html = nb._repr_html_()
    finally:
        run.show_with()  # back to the featurized data
    assert "<script>" not in html and "<b>0</b>" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; row 0" in html  # the query
    assert f"&lt;b&gt;{nb.indices[0, 0]}&lt;/b&gt;" in html
    assert "data:image" not in html


def test_show_with_examples_labels_and_class_names(images):
    run, x, y = images
    texts = [f"example <{i}>" for i in range(30)]
    names = ["cat", "dog", "<eel>"]
    escaped = ["cat", "dog", "&lt;eel&gt;"]
    run.show_with(texts, labels=y[:30].tolist(), classes=names)
    try:
        nb = run.opponents("train", k=3)
        html, frame = nb._repr_html_(), nb.to_frame()
        live = run.opponents((x[30:], y[30:]), k=1)._repr_html_()
    finally:
        run.show_with()
    for row in nb.indices[0]:
        assert f"example &lt;{row}&gt;" in html
        assert f"<b>#{row}</b> &middot; {escaped[int(y[row])]}<br>" in html
    assert f"<b>query 0</b> &middot; {escaped[int(y[0])]}" in html  # query split "train"
    assert f"<b>query 1</b> &middot; {escaped[int(y[31])]}" in live  # a query batch's label
    assert list(frame["label"]) == [names[int(y[r])] for r in nb.indices.reshape(-1)]


def test_show_with_refuses_data_of_another_length(images):
    run, x, _ = images
    with pytest.raises(tracin.ConfigError, match="29 rows; the run has 30"):
        run.show_with(list(range(29)))
    with pytest.raises(tracin.ConfigError, match="labels has 31 rows"):
        run.show_with(labels=np.zeros(31))
    with pytest.raises(tracin.ConfigError, match="render"):
        run.show_with(render="not callable")

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(x)

    with pytest.raises(tracin.ConfigError, match="cannot be read by index"):
        run.show_with(Stream())


def test_scores_keep_the_digits_that_tell_them_apart():
    assert score_text(-0.123456) == "-0.1235" and score_text(1234.5) == "1234"
    assert score_text(0.9999943) == "0.999994" and score_text(-0.99999) == "-0.999990"
    assert score_text(1.0) == "1" and score_text(3.0e-7) == "3e-07"


def test_rows_per_query_and_queries_are_capped(images):
    run, x, y = images
    many = torch.cat([x] * 4)[: MAX_ITEMS + 3], torch.cat([y] * 4)[: MAX_ITEMS + 3]
    nb = run.proponents(many, k=MAX_ITEMS + 2)
    html = nb._repr_html_()
    assert html.count("&hellip; 2 more rows") == MAX_ITEMS
    assert "&hellip; 3 more queries" in html
    assert len(URI.findall(html)) == MAX_ITEMS * (MAX_ITEMS + 1)
    assert len(nb.to_frame()) == (MAX_ITEMS + 3) * (MAX_ITEMS + 2)


def test_a_result_without_data_shows_rows_and_scores():
    nb = tracin.Neighbors(np.array([[4, 1]]), np.array([[0.5, -0.25]]))
    html = nb._repr_html_()
    assert "<b>#4</b><br>0.5" in html and "<b>#1</b><br>-0.25" in html
    frame = nb.to_frame()
    assert list(frame["row"]) == [4, 1] and list(frame["label"]) == [None, None]


def test_mislabel_scores_table_and_frame(tabular):
    run, _, y = tabular
    found = run.mislabel_scores()
    html = found._repr_html_()
    order = found.order()
    for rank, row in enumerate(order[:MAX_ITEMS], start=1):
        want = [str(rank), f"#{row}", f"{found.scores[row]:.4g}", str(int(y[row]))]
        line = re.search(rf"<tr><td[^>]*>{rank}</td>(.*?)</tr>", html, flags=re.S).group(0)
        assert [re.sub(r"<.*?>", "", c) for c in _cells(line)[:4]] == want
    assert f"&hellip; {len(order) - MAX_ITEMS} more rows" in html
    assert found.description in html
    frame = found.to_frame()
    assert list(frame.columns) == ["rank", "row", "score", "label"]
    np.testing.assert_array_equal(frame["row"], order)
    np.testing.assert_array_equal(frame["score"], found.scores[order])
    assert list(frame["label"]) == [int(y[r]) for r in order]
    run.show_with(render=lambda split, i: {"label": i, "text": "t"})  # not picklable
    try:
        shown = run.mislabel_scores()
        back = pickle.loads(pickle.dumps(shown))
    finally:
        run.show_with()
    np.testing.assert_array_equal(back.scores, shown.scores)
    assert (back.recipe, back.description, back.notice) == (found.recipe, found.description,
                                                            found.notice)  # fmt: skip
    assert not hasattr(back, "_tracin_view") and hasattr(shown, "_tracin_view")


def test_clusters_of_a_subset_show_training_rows(tabular):
    run, _, y = tabular
    rows = np.arange(39, 3, -2)  # 18 rows, in a new order
    found = run.clusters(3, rows=rows)
    frame = found.to_frame()
    assert list(frame.columns) == ["cluster", "rank", "row", "similarity", "label"]
    assert sorted(frame["row"]) == sorted(rows)
    position = {int(r): i for i, r in enumerate(rows)}
    for _, line in frame.iterrows():
        i = position[int(line["row"])]
        assert line["cluster"] == found.labels[i]
        assert line["similarity"] == found.similarity[i]
        assert line["label"] == int(y[int(line["row"])])
    for c in range(3):  # ranks follow typical(): most similar to the centre first
        members = frame[frame["cluster"] == c]
        np.testing.assert_array_equal(members["rank"], np.arange(1, len(members) + 1))
        np.testing.assert_array_equal(members["row"], rows[found.typical(c, len(rows))])
    html = found._repr_html_()
    for c in range(3):
        top = found.typical(c, 1)[0]
        assert f"<b>#{rows[top]}</b> &middot; {int(y[rows[top]])}" in html


def test_png_uri_draws_grey_colour_and_channels_first_images():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    np.testing.assert_array_equal(_decode(png_uri(rgb)), rgb)
    np.testing.assert_array_equal(_decode(png_uri(np.moveaxis(rgb, -1, 0))), rgb)
    unit = rgb / 255.0
    np.testing.assert_array_equal(_decode(png_uri(unit)), rgb)
    grey = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(_decode(png_uri(grey)),
                                  np.round((1 - grey / 11) * 255).astype(np.uint8))  # fmt: skip
    big = np.arange(200 * 130, dtype=np.float64).reshape(200, 130)
    assert _decode(png_uri(big, side=64)).shape == (50, 33)  # every 4th pixel
    with pytest.raises(tracin.ConfigError, match="shape"):
        png_uri(np.zeros((2, 3, 5, 7)))


def test_to_frame_without_pandas_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    nb = tracin.Neighbors(np.array([[0]]), np.array([[1.0]]))
    with pytest.raises(MissingDependencyError, match="pip install pandas") as err:
        nb.to_frame()
    assert isinstance(err.value, tracin.TracInError) and isinstance(err.value, ImportError)


def test_a_reopened_store_shows_rows_until_given_the_examples(images):
    run, x, y = images
    reopened = tracin.open(run.store.root)
    bare = reopened.proponents("train", k=2)
    html = bare._repr_html_()
    assert "data:image" not in html and f"<b>#{bare.indices[0, 0]}</b><br>" in html
    reopened.show_with(torch.utils.data.TensorDataset(x[:30], y[:30]))
    nb = reopened.proponents("train", k=2)
    assert len(URI.findall(nb._repr_html_())) == MAX_GROUPS * (1 + 2)  # queries and rows
    assert list(nb.to_frame()["label"]) == [int(y[r]) for r in nb.indices.reshape(-1)]


def test_dict_examples_show_their_text_and_labels(images):
    run, _, _ = images
    rows = [{"text": f"review <{i}> & more", "labels": i % 3} for i in range(30)]
    run.show_with(rows)
    try:
        found = run.clusters(2)
        html, frame = found._repr_html_(), found.to_frame()
    finally:
        run.show_with()
    top = found.typical(0, 1)[0]
    assert f"review &lt;{top}&gt; &amp; more" in html
    assert f"<b>#{top}</b> &middot; {top % 3}<br>" in html
    assert list(frame["label"]) == [r % 3 for r in frame["row"]]
