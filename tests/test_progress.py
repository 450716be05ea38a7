"""Progress that tells the truth: one call per batch with the right totals (also after a resume),
scoring and clustering passes reported, and log lines with an ETA when the output is no terminal."""

from __future__ import annotations

import io
import re
from collections import defaultdict

import numpy as np
import pytest
from rich.console import Console
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

import tracin
from conftest import checkpoints
from tracin._progress import ProgressReporter
from tracin.cli._app import app


class Recorder:
    """A fake progress callback: every call, by stage."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[int, int]]] = defaultdict(list)

    def __call__(self, stage: str, advance: int, total: int) -> None:
        self.calls[stage].append((advance, total))

    def advances(self, stage: str) -> list[int]:
        return [a for a, _ in self.calls[stage]]

    def totals(self, stage: str) -> set[int]:
        return {t for _, t in self.calls[stage]}


def _featurize(setup, store, progress, **kwargs):
    model, train, query, states = setup
    return tracin.featurize(model, tracin.ClassificationTask(), checkpoints(states),
                            TensorDataset(*train), store=store, batch_size=4, block_rows=7,
                            dtype="float64", queries={"test": TensorDataset(*query)},
                            progress=progress, **kwargs)  # fmt: skip


def test_featurize_advances_per_batch_with_right_totals(mlp_setup, tmp_path):
    rec = Recorder()
    run = _featurize(mlp_setup, tmp_path / "r", rec, embedding_layer="1")
    # 30 rows in blocks of 7 read in batches of 4: 4+3 per block, then the last 2 rows
    per_batch = [4, 3] * 4 + [2]
    for ckpt in run.ckpt_ids:
        assert rec.advances(f"train {ckpt}") == per_batch
        assert rec.totals(f"train {ckpt}") == {30}
        assert rec.advances(f"test {ckpt}") == [4, 1] and rec.totals(f"test {ckpt}") == {5}
    assert rec.advances("train embeddings") == per_batch
    assert sum(rec.advances("test embeddings")) == 5


def test_streaming_and_norms_only_runs_advance_per_batch(mlp_setup, tmp_path):
    rec = Recorder()
    run = _featurize(mlp_setup, None, rec)
    assert all(rec.advances(f"train {c}") == [4] * 7 + [2] for c in run.ckpt_ids)
    rec = Recorder()
    run = _featurize(mlp_setup, tmp_path / "n", rec, keep_features=False)
    assert all(sum(rec.advances(f"train {c}")) == 30 for c in run.ckpt_ids)
    assert max(max(rec.advances(f"train {c}")) for c in run.ckpt_ids) == 4


def test_resumed_store_reports_stored_rows_once(mlp_setup, tmp_path):
    run = _featurize(mlp_setup, tmp_path / "r", None)
    ckpt = run.ckpt_ids[1]
    (tmp_path / f"r/features/train/ckpt_{ckpt}/block_2.json").unlink()  # rows 14..20 lost
    rec = Recorder()
    _featurize(mlp_setup, tmp_path / "r", rec)
    assert rec.advances(f"train {ckpt}") == [23, 4, 3]  # what is there, then the batches redone
    assert rec.totals(f"train {ckpt}") == {30}
    assert rec.advances(f"train {run.ckpt_ids[0]}") == [30]  # complete: one call, no batch


def test_scoring_and_clustering_passes_report(mlp_setup, tmp_path):
    run = _featurize(mlp_setup, tmp_path / "r", None)
    rec = Recorder()
    run.progress = rec
    run.neighbors("test", k=3)
    assert rec.advances("score") == [7, 7, 7, 7, 2] and rec.totals("score") == {30}
    run.clusters(2)
    assert sum(rec.advances("pass over train")) >= 2 * 30  # k-means: a pass per iteration
    assert rec.totals("pass over train") == {30}
    streamed = _featurize(mlp_setup, None, None)
    streamed.progress = rec
    streamed.influence(mlp_setup[2])
    for c in streamed.ckpt_ids:
        assert rec.advances(f"score {c}") == [4] * 7 + [2]


def test_log_lines_when_not_a_terminal():
    out = io.StringIO()
    console = Console(file=out, width=200)
    assert not console.is_terminal
    now = [0.0]
    with ProgressReporter(console, interval=10.0, clock=lambda: now[0]) as progress:
        for _ in range(10):
            now[0] += 4.0
            progress("train 1", 100, 1000)
        now[0] += 1.0
        progress("score", 30, 30)
        progress("score", 30, 30)  # a second pass right after the first: no line
    lines = out.getvalue().splitlines()
    # the clock starts at the first report (t = 4 s): a line every 10 s, then one at the end;
    # the quick scoring passes print nothing
    assert lines == [
        "tracin: train 1: 400/1,000 rows (40%), 12.0 s, ETA 18 s",
        "tracin: train 1: 700/1,000 rows (70%), 24.0 s, ETA 10 s",
        "tracin: train 1: 1,000 rows done in 36.0 s",
    ]


def test_bars_on_a_terminal_show_eta_and_passes():
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    with ProgressReporter(console) as progress:
        progress("score", 30, 30)
        progress("score", 10, 30)
        assert progress._bars is not None
        task = progress._bars.tasks[0]
        assert task.description == "score (pass 2)" and task.completed == 10 and task.total == 30
        columns = [type(c).__name__ for c in progress._bars.columns]
        assert "TimeRemainingColumn" in columns and "MofNCompleteColumn" in columns


SPEC = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
import tracin

gen = torch.Generator().manual_seed(0)
x, y = torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
task = tracin.ClassificationTask()
checkpoints = tracin.Checkpoints.from_state_dicts([model.state_dict()] * 2, lr=0.1)
train = TensorDataset(x, y)
queries = {"test": TensorDataset(x[:4], y[:4])}
"""


def test_cli_writes_log_lines_and_the_plan_when_not_a_terminal(tmp_path):
    spec = tmp_path / "spec.py"
    spec.write_text(SPEC)
    runner = CliRunner()
    store = tmp_path / "run"
    env = {"TRACIN_PROGRESS_INTERVAL": "0"}  # a line per batch (the default: every 10 s)
    res = runner.invoke(app, ["featurize", str(spec), "--store", str(store), "--batch-size", "8"],
                        env=env)  # fmt: skip
    assert res.exit_code == 0, res.output
    text = res.stderr
    assert re.search(r"tracin: store: train 40 rows x 2 checkpoints x 75 dims x 4 B", text)
    for stage in ("train ckpt_0", "train ckpt_1", "test ckpt_0", "test ckpt_1"):
        assert re.search(rf"tracin: {stage}: \d+ rows done in [\d.]+ s", text), text
    assert "tracin: train ckpt_1: 16/40 rows (40%), " in text and ", ETA " in text
    res = runner.invoke(app, ["explain", str(store), "--split", "test", "--k", "2"], env=env)
    assert res.exit_code == 0 and "tracin: score: 40 rows done" in res.stderr
    quiet = runner.invoke(app, ["explain", str(store), "--split", "test", "--k", "2", "-f", "csv"])
    assert quiet.stderr == ""  # a short job under the default interval prints no progress
    res = runner.invoke(app, ["featurize", str(spec), "--store", str(tmp_path / "big"),
                              "--keep-features", "--max-store-gb", "1e-9"])  # fmt: skip
    assert res.exit_code == 2 and "--max-store-gb 1e-09" in res.stderr


@pytest.mark.parametrize("keep", [True, False])
def test_progress_does_not_change_results(mlp_setup, tmp_path, keep):
    quiet = _featurize(mlp_setup, tmp_path / "a", None, keep_features=keep)
    loud = _featurize(mlp_setup, tmp_path / "b", Recorder(), keep_features=keep)
    np.testing.assert_array_equal(quiet.self_influence(), loud.self_influence())
    np.testing.assert_array_equal(quiet.influence("test"), loud.influence("test"))
