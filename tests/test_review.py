"""`tracin review`: the decisions file (append, fsync, last wins, resume), token and host
enforcement, escaping, filters, example pages, export and `apply_decisions`, on a small store
of scikit-learn's digits (a tiny MLP, 10% flipped labels)."""

from __future__ import annotations

import csv
import json
import re
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tracin
from tracin._errors import ConfigError, DataError
from tracin.cli._app import app

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient

from tracin import review as rv

SPEC = """
from pathlib import Path
import torch
from torch import nn
from torch.utils.data import TensorDataset
import tracin

here = Path(__file__).parent
x, y, xq, yq = torch.load(here / "data.pt", weights_only=True)

def model():
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

task = tracin.ClassificationTask()
checkpoints = tracin.Checkpoints.from_paths(sorted(here.glob("ckpt_*.pt")), lr="lr")
train = TensorDataset(x, y)
queries = {"test": TensorDataset(xq, yq)}
embedding_layer = "1"

def render(split, index):
    xs, ys = (x, y) if split == "train" else (xq, yq)
    return {"label": str(int(ys[index])), "image": xs[index].reshape(8, 8).numpy()}
"""


def build_review_store(folder: Path, n_train: int = 300, n_query: int = 20) -> tuple[Path, Path]:
    """A spec (digits, tiny MLP, 3 checkpoints, 10% flipped labels) and its featurized store."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[: n_train + n_query] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[: n_train + n_query], dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    flip = torch.randperm(n_train, generator=gen)[: n_train // 10]
    y_train = y[:n_train].clone()
    y_train[flip] = (y_train[flip] + 1 + torch.randint(0, 9, (len(flip),), generator=gen)) % 10
    folder.mkdir(parents=True, exist_ok=True)
    torch.save((x[:n_train], y_train, x[n_train:], y[n_train:]), folder / "data.pt")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for epoch in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[:n_train]), y_train).backward()
        opt.step()
        if epoch in (9, 29, 59):
            torch.save({"state_dict": net.state_dict(), "lr": 0.5}, folder / f"ckpt_{epoch:02d}.pt")
    spec = folder / "spec.py"
    spec.write_text(textwrap.dedent(SPEC))
    store = folder / "run"
    res = CliRunner().invoke(
        app, ["featurize", str(spec), "--store", str(store), "--proj-dim", "64"]
    )
    assert res.exit_code == 0, res.output
    return spec, store


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_review_store(tmp_path_factory.mktemp("review"))


@pytest.fixture
def store(built, tmp_path):
    """A fresh copy of the store per test (decisions start empty)."""
    import shutil

    shutil.copytree(built[1], tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture(scope="module")
def spec_obj(built):
    from tracin._spec import load_spec

    return load_spec(built[0])


def client_for(server: rv.ReviewServer) -> TestClient:
    c = TestClient(rv.make_app(server), base_url="http://127.0.0.1:8000")
    res = c.get(f"/?token={server.token}", follow_redirects=False)
    assert res.status_code == 303 and "token" not in res.headers["location"]
    return c


def post(c: TestClient, token: str | None, **body):
    headers = {} if token is None else {"X-Tracin-Token": token}
    return c.post("/api/decision", json=body, headers=headers)


# --- the decisions file ------------------------------------------------------------------------
def test_decisions_are_appended_fsynced_and_the_last_wins(tmp_path, monkeypatch):
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    log = rv.DecisionLog(tmp_path, n_rows=10)
    from tracin.review._decisions import make_decision

    log.record(make_decision(3, "keep", given=1))
    log.record(make_decision(5, "relabel", 7, given=2))
    log.record(make_decision(3, "remove", given=1))
    log.record(make_decision(8, "keep"))
    log.record(make_decision(8, "clear"))
    assert len(synced) == 5  # one fsync per decision, before it is acknowledged
    lines = (tmp_path / "decisions.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[1]) | {"time": ""} == {
        "row": 5, "decision": "relabel", "label": 7, "given": 2, "time": ""}  # fmt: skip
    assert all(json.loads(ln)["time"].endswith("+00:00") for ln in lines)
    current = rv.read_decisions(tmp_path)
    assert {r: d.decision for r, d in current.items()} == {3: "remove", 5: "relabel"}
    assert rv.DecisionLog(tmp_path, 10).current == current  # resumed from the file


def test_a_line_cut_short_is_dropped_and_appending_goes_on(tmp_path):
    path = tmp_path / "decisions.jsonl"
    path.write_text('{"row": 1, "decision": "keep", "label": null, "given": 0, "time": "t"}\n'
                    '{"row": 2, "decis')  # fmt: skip
    assert list(rv.read_decisions(tmp_path)) == [1]
    log = rv.DecisionLog(tmp_path, 5)
    from tracin.review._decisions import make_decision

    log.record(make_decision(2, "remove"))
    assert [json.loads(ln)["row"] for ln in path.read_text().splitlines()] == [1, 2]
    path.write_text('not json\n{"row": 1, "decision": "keep"}\n')
    with pytest.raises(DataError, match="line 1"):
        rv.read_decisions(path)
    path.write_text('{"row": 9, "decision": "keep"}\n')
    with pytest.raises(DataError, match="row 9"):
        rv.DecisionLog(tmp_path, 5)


@pytest.mark.parametrize(("args", "match"), [((-1, "keep"), "row=-1"), ((1, "maybe"), "decision"),
                                             ((1, "relabel", None), "relabel needs"),
                                             ((10, "keep"), "outside")])  # fmt: skip
def test_bad_decisions_are_refused(args, match):
    from tracin.review._decisions import make_decision

    with pytest.raises(ConfigError, match=match):
        make_decision(*args, n_rows=10)


def test_apply_and_export(tmp_path):
    from tracin.review._decisions import make_decision

    log = rv.DecisionLog(tmp_path, 6)
    for d in (make_decision(1, "relabel", 4, given=0), make_decision(2, "remove", given=2),
              make_decision(4, "keep", given=1)):  # fmt: skip
        log.record(d)
    labels = torch.tensor([0, 0, 2, 3, 1, 5])
    fixed = tracin.apply_decisions(tmp_path, labels)
    assert fixed.labels.tolist() == [0, 4, 2, 3, 1, 5] and fixed.kept.tolist() == [0, 1, 3, 4, 5]
    assert labels.tolist() == [0, 0, 2, 3, 1, 5]  # not changed in place
    with pytest.raises(DataError, match="row 4"):
        tracin.apply_decisions(tmp_path, [0, 1, 2])
    res = CliRunner().invoke(app, ["review", str(tmp_path), "--export", str(tmp_path / "f.csv")])
    assert res.exit_code == 0, res.output
    rows = list(csv.reader((tmp_path / "f.csv").open()))
    assert rows == [["row", "given_label", "decision", "new_label"], ["1", "0", "relabel", "4"],
                    ["2", "2", "remove", ""], ["4", "1", "keep", "1"]]  # fmt: skip


# --- the app -----------------------------------------------------------------------------------
def test_every_request_needs_the_token_and_state_changes_need_the_header(store, spec_obj):
    server = rv.open_review(store, spec_obj)
    anon = TestClient(rv.make_app(server), base_url="http://127.0.0.1:8000")
    assert anon.get("/").status_code == 403
    assert anon.get("/example/train/0").status_code == 403
    assert anon.get("/static/review.js").status_code == 200  # the app's own script, no data
    assert post(anon, None, row=0, decision="keep").status_code == 403
    assert post(anon, "wrong", row=0, decision="keep").status_code == 403
    c = client_for(server)  # has the cookie now
    assert c.get("/").status_code == 200
    assert post(c, None, row=0, decision="keep").status_code == 403  # a cookie never suffices
    assert not (store / "decisions.jsonl").exists()
    res = post(c, server.token, row=0, decision="keep")
    assert res.status_code == 200 and res.json()["badge"] == "kept"
    assert rv.read_decisions(store)[0].decision == "keep"
    assert post(c, server.token, row=10**6, decision="keep").status_code == 400
    assert post(c, server.token, row=1, decision="relabel", label=10).status_code == 400
    evil = TestClient(rv.make_app(server), base_url="http://attacker.example:8000")
    assert evil.get(f"/?token={server.token}").status_code == 400  # DNS rebinding
    page = c.get("/")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer"


def test_data_strings_are_escaped_and_paths_checked(store, spec_obj):
    spec = SimpleNamespace(**vars(spec_obj))
    spec.render = lambda split, i: {"label": "<script>alert(1)</script>", "text": "a <b>&</b>"}
    server = rv.open_review(store, spec)
    c = client_for(server)
    for url in ("/", "/example/train/3", "/queries/test", "/example/test/1"):
        html = c.get(url).text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
        assert "a &lt;b&gt;&amp;&lt;/b&gt;" in html
    assert c.get("/example/nope/0").status_code == 404
    assert c.get("/example/train/300").status_code == 404
    assert c.get("/example/train/-1").status_code == 404
    assert c.get("/queries/..%2Fmanifest.json").status_code == 404
    assert c.get("/static/../decisions.jsonl").status_code == 404
    assert c.get("/static/..%2F..%2F_cli.py").status_code == 404
    assert c.get("/?given=abc").status_code == 404 and "not an integer" in c.get("/?given=x").text


def test_suspects_ranked_filtered_and_resumed(store, spec_obj):
    server = rv.open_review(store, spec_obj)
    data = server.data
    run = tracin.open(store)
    assert data.score_name == "contrastive self-influence"  # embeddings stored
    np.testing.assert_allclose(data.scores, run.contrastive_self_influence(10, lr_weighted=False))
    assert rv.open_review(store, spec_obj, "self-influence").data.score_name == "self-influence"
    assert data.preds.given is not None and data.preds.predicted is not None
    assert data.preds.n_classes == 10 and (data.preds.confidence <= 1).all()
    c = client_for(server)
    html = c.get("/").text
    listed = [int(r) for r in re.findall(r'<tr class="item[^"]*" data-row="(\d+)"', html)]
    assert listed == data.order[:24].tolist() and 'data-selected="0"' in html
    for r in listed[:5]:
        assert post(c, server.token, row=r, decision="remove").status_code == 200
    html = c.get("/").text  # resumes at the first undecided suspect
    assert 'data-selected="5"' in html and html.count(">removed</td>") == 5
    second = client_for(server)  # another tab: sees the same decisions
    assert post(second, server.token, row=listed[5], decision="relabel", label=3).status_code == 200
    state = c.get(f"/api/decisions?rows={listed[4]},{listed[5]},{listed[6]}").json()
    assert [s["badge"] for s in state["rows"]] == ["removed", "relabel \u2192 3", ""]
    assert state["decided"] == 6
    html = c.get("/?given=3").text
    rows = [int(r) for r in re.findall(r'data-row="(\d+)"', html)]
    assert rows and all(data.preds.given[r] == 3 for r in rows)
    html = c.get("/?predicted=2&status=undecided").text
    rows = [int(r) for r in re.findall(r'<tr class="item[^"]*" data-row="(\d+)"', html)]
    assert rows and all(data.preds.predicted[r] == 2 and r not in listed[:6] for r in rows)
    page2 = c.get("/?page=1").text
    assert [int(r) for r in re.findall(r'<tr class="item[^"]*" data-row="(\d+)"', page2)] == \
        data.order[24:48].tolist()  # fmt: skip


def test_example_pages_for_train_and_query_rows(store, spec_obj):
    server = rv.open_review(store, spec_obj)
    c = client_for(server)
    run = tracin.open(store)
    row = int(server.data.order[0])
    html = c.get(f"/example/train/{row}").text
    assert "Proponents (cosine)" in html and "Nearest by embedding" in html and "cluster" in html
    assert 'href="?relevance=tracin"' in html
    raw = c.get(f"/example/train/{row}?relevance=tracin").text
    assert "Proponents (tracin)" in raw
    # the example's opponents by the raw score: the same as Run.neighbors on that row's features
    scores = run.influence("train")[row]
    expected = [int(i) for i in np.argsort(scores, kind="stable") if i != row][:8]
    section = raw.split("Opponents (tracin)")[1].split("</section>")[0]
    shown = [int(r) for r in re.findall(r'href="/example/train/(\d+)"', section)]
    assert shown == expected
    props, _ = run.neighbors("test", 8)
    q = c.get("/example/test/2").text
    section = q.split("Proponents (cosine)")[1].split("</section>")[0]
    assert [int(r) for r in re.findall(r'href="/example/train/(\d+)"', section)] == \
        props.indices[2].tolist()  # fmt: skip
    assert "decision:" not in q  # query rows are not training data to decide on


def test_a_hundred_thousand_rows_page_in_under_a_second(tmp_path):
    n = 100_000
    rng = np.random.default_rng(0)
    given = rng.integers(0, 10, n)
    preds = rv.Predictions(given, rng.integers(0, 10, n), rng.random(n), 10, "synthetic")
    run = SimpleNamespace(n_train=n, split_rows={"train": n})
    image = rng.random((8, 8))
    render = lambda split, i: {"label": str(given[i]), "image": image}  # noqa: E731
    t0 = time.perf_counter()
    data = rv.ReviewData(run, render, "self-influence", rng.random(n), preds)  # type: ignore[arg-type]
    server = rv.ReviewServer(data, rv.DecisionLog(tmp_path, n), rv.new_token())
    setup = time.perf_counter() - t0
    c = client_for(server)
    for url in ("/", "/?given=3&predicted=5", "/?page=2000", "/?status=undecided"):
        t0 = time.perf_counter()
        res = c.get(url)
        took = time.perf_counter() - t0
        assert res.status_code == 200 and took < 1.0, (url, took)
    assert setup < 1.0


def test_cli_review_needs_a_spec_and_a_valid_port(store):
    res = CliRunner().invoke(app, ["review", str(store)])
    assert res.exit_code == 2 and "--spec" in res.stderr
    res = CliRunner().invoke(app, ["review", str(store), "--spec", "x.py", "--port", "70000"])
    assert res.exit_code == 2 and "--port 70000" in res.stderr
    res = CliRunner().invoke(app, ["review", str(store), "--export", str(store)])
    assert res.exit_code == 2 and "is a folder" in res.stderr
    res = CliRunner().invoke(app, ["review", "--help"], env={"COLUMNS": "200"})
    assert all(o in res.output for o in ("--spec", "--port", "--host", "--score", "--export"))


def test_bind_url_and_a_port_in_use():
    sock = rv.bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        token = rv.new_token()
        assert rv.url(sock, token) == f"http://127.0.0.1:{port}/?token={token}"
        assert len(token) >= 22 and token != rv.new_token()
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            rv.bind("127.0.0.1", port)
    finally:
        sock.close()
