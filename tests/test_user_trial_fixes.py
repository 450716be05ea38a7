"""Fixes from a new-user trial: NumPy queries score as ``torch.as_tensor`` of them, ``order``
refuses ``top=0`` (``None`` is all rows), and CLI errors name the options as typed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from typer.testing import CliRunner

import tracin
from conftest import LRS, brute_force_influence, checkpoints, rows_of
from tracin.cli._app import app
from tracin.cli._common import CliOption, option_names

LR2 = LRS[:2]  # two checkpoints, distinct learning rates


def ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def two_checkpoint_run(mlp_setup, **kwargs):
    model, train, query, states = mlp_setup
    run = tracin.featurize(
        model,
        tracin.ClassificationTask(),
        checkpoints(states[:2], LR2),
        TensorDataset(*train),
        **kwargs,
    )
    return run, model, train, query, states[:2]


# --- 1. NumPy queries ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"proj_dim": 16}], ids=["streaming", "projected"])
def test_numpy_query_scores_as_the_tensor_query(mlp_setup, kwargs):
    run, model, train, (xq, yq), states = two_checkpoint_run(mlp_setup, **kwargs)
    as_numpy = (xq.numpy(), yq.numpy())
    got = run.influence(as_numpy)
    np.testing.assert_array_equal(got, run.influence((xq, yq)))
    want = run.influence((torch.as_tensor(as_numpy[0]), torch.as_tensor(as_numpy[1])))
    np.testing.assert_array_equal(got, want)
    if not kwargs:  # exact: the per-example backward() oracle
        oracle = brute_force_influence(
            model, states, LR2, ce, rows_of(train), ce, rows_of((xq, yq))
        )
        np.testing.assert_allclose(got, oracle, rtol=1e-8, atol=1e-12 * np.abs(oracle).max())
    for relevance in ("tracin", "cosine"):
        props, opps = run.neighbors(as_numpy, 4, relevance=relevance)
        t_props, t_opps = run.neighbors((xq, yq), 4, relevance=relevance)
        np.testing.assert_array_equal(props.indices, t_props.indices)
        np.testing.assert_array_equal(opps.scores, t_opps.scores)
    np.testing.assert_array_equal(run.folded_queries(as_numpy), run.folded_queries((xq, yq)))
    assert "query 0" in run.proponents(as_numpy, 3)._repr_html_()


class DictRows(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def test_numpy_query_split_and_dict_batch(mlp_setup):
    model, train, (xq, yq), states = mlp_setup
    task = tracin.ClassificationTask(inputs="x", labels="y")
    ckpts = checkpoints(states[:2], LR2)
    data = DictRows(*train)
    run = tracin.featurize(
        model, task, ckpts, data, queries={"q": {"x": xq.numpy(), "y": yq.numpy()}}, proj_dim=16
    )
    tensor = run.influence({"x": xq, "y": yq})
    np.testing.assert_array_equal(run.influence("q"), tensor)
    np.testing.assert_array_equal(run.influence({"x": xq.numpy(), "y": yq.numpy()}), tensor)


def test_read_only_and_reversed_numpy_queries_need_no_copy_by_the_user(mlp_setup):
    run, *_, (xq, yq), _ = two_checkpoint_run(mlp_setup)
    frozen = xq.numpy().copy()
    frozen.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a non-writable array it shares
        np.testing.assert_array_equal(run.influence((frozen, yq.numpy())), run.influence((xq, yq)))
        reversed_ = (xq.numpy()[::-1], yq.numpy()[::-1])  # negative strides
        np.testing.assert_array_equal(
            run.influence(reversed_), run.influence((xq.flip(0), yq.flip(0)))
        )
        swapped = (xq.numpy().astype(">f8"), yq.numpy())  # big-endian
        np.testing.assert_array_equal(run.influence(swapped), run.influence((xq, yq)))


def test_numpy_query_dtype_follows_torch_as_tensor(mlp_setup):
    """A float32 array on a float64 model fails exactly as ``torch.as_tensor`` of it would."""
    run, *_, (xq, yq), _ = two_checkpoint_run(mlp_setup)
    with pytest.raises(tracin.TaskError) as from_numpy:
        run.influence((xq.numpy().astype(np.float32), yq.numpy()))
    with pytest.raises(tracin.TaskError) as from_tensor:
        run.influence((xq.float(), yq))
    assert str(from_numpy.value) == str(from_tensor.value)


def test_numpy_query_torch_cannot_hold_is_one_clear_error(mlp_setup):
    run, *_, (xq, _), _ = two_checkpoint_run(mlp_setup)
    labels = np.array(["cat", "dog", "cat", "cow", "dog"], dtype=object)
    with pytest.raises(tracin.DataError, match=r"dtype object.*torch\.as_tensor\(array\)"):
        run.influence((xq.numpy(), labels))


# --- 2. order(): None is all rows, 0 is refused ----------------------------------------------
def test_order_none_is_all_rows_and_zero_is_refused():
    scores = np.array([0.1, 3.0, -1.0, 2.0, 3.0])
    ranked = tracin.MislabelScores(scores, "paper", "test")
    want = np.argsort(-scores, kind="stable")
    assert ranked.order().tolist() == want.tolist() == [1, 4, 3, 0, 2]
    assert ranked.order(None).tolist() == want.tolist()
    assert ranked.order(2).tolist() == [1, 4]
    assert ranked.order(np.int64(3)).tolist() == [1, 4, 3]
    assert ranked.order(99).tolist() == want.tolist()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(tracin.ConfigError, match=r"pass top=None for all rows"):
            ranked.order(bad)
    with pytest.raises(tracin.ConfigError, match=r"^top=0 must be a positive integer"):
        ranked.order(0)


# --- 3. CLI errors name the options ----------------------------------------------------------
SPEC = """
from pathlib import Path
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset
import tracin

here = Path(__file__).parent
x, y, xq, yq = torch.load(here / "data.pt", weights_only=True)
model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
task = tracin.ClassificationTask()
checkpoints = tracin.Checkpoints.from_paths(sorted(here.glob("ckpt_*.pt")), lr="lr")
train = TensorDataset(x, y)
queries = {"test": TensorDataset(xq, yq)}
"""


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory):
    """A spec and a projected store of 30 training rows, 4 queries, 2 checkpoints."""
    root = tmp_path_factory.mktemp("cli")
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    data = (torch.randn(30, 5, generator=gen), torch.randint(0, 3, (30,), generator=gen),
            torch.randn(4, 5, generator=gen), torch.randint(0, 3, (4,), generator=gen))  # fmt: skip
    torch.save(data, root / "data.pt")
    for i, lr in enumerate((0.3, 0.1)):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        torch.save({"state_dict": net.state_dict(), "lr": lr}, root / f"ckpt_{i}.pt")
    (root / "spec.py").write_text(textwrap.dedent(SPEC))
    res = CliRunner().invoke(
        app, ["featurize", str(root / "spec.py"), "--store", str(root / "run"), "--proj-dim", "8"]
    )
    assert res.exit_code == 0, res.output
    return root


def one_line_error(args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("tracin: error: "), res.stderr
    assert "Traceback" not in res.output and "tracin._errors" not in res.output
    return lines[0]


@pytest.mark.parametrize(
    ("args", "says", "not_says"),
    [
        (["explain", "{r}/run", "--split", "test", "--k", "0"], "--k 0 must be", "k=0"),
        (["explain", "{r}/run", "--split", "test", "--k", "31"], "--k 31 must be", "k=31"),
        (["suspects", "{r}/run", "--k", "0"], "--k 0 must be a positive integer, e.g. --k 10",
         "k="),
        (["suspects", "{r}/run", "--recipe", "nope"], "--recipe 'nope'", "recipe="),
        (["cluster", "{r}/run", "--n-clusters", "0"], "--n-clusters 0", "n_clusters="),
        (["explain", "{r}/run", "--split", "test", "--relevance", "x"], "--relevance 'x'", "="),
        (["featurize", "{r}/spec.py", "--store", "{r}/b", "--batch-size", "0"],
         "--batch-size 0 must be a positive integer, e.g. --batch-size 64", "batch_size"),
        (["featurize", "{r}/spec.py", "--store", "{r}/b", "--proj-dim", "0"], "--proj-dim 0",
         "proj_dim="),
        (["featurize", "{r}/spec.py", "--store", "{r}/b", "--dtype", "int8"], "--dtype 'int8'",
         "dtype="),
        (["featurize", "{r}/spec.py", "--store", "{r}/b", "--engine", "fast"], "--engine 'fast'",
         "engine="),
        (["featurize", "{r}/spec.py", "--store", "{r}/b", "--block-rows", "0"], "--block-rows 0",
         "block_rows="),
        (["featurize", "{r}/spec.py", "--store", "{r}/b", "--keep-features",
          "--max-store-gb", "1e-9"], "--max-store-gb 1e-09", "max_store_gb="),
        (["featurize", "{r}/spec.py", "--store", "{r}/run", "--proj-dim", "16"],
         "--overwrite", "overwrite="),
        (["eval", "fix", "--data", "cifar", "--out", "{r}/fix"], "--data 'cifar'", "data="),
    ],
)  # fmt: skip
def test_cli_errors_name_options_as_typed(cli_store, args, says, not_says):
    line = one_line_error([str(a).format(r=cli_store) for a in args])
    assert says in line and not_says not in line, line


def test_cli_suspects_top_zero_still_lists_every_row(cli_store):
    res = CliRunner().invoke(
        app, ["suspects", str(cli_store / "run"), "--recipe", "paper", "--top", "0", "-f", "csv"]
    )
    assert res.exit_code == 0, res.output
    rows = [int(line.split(",")[1]) for line in res.stdout.splitlines()[1:]]
    want = np.argsort(-tracin.open(cli_store / "run").self_influence(), kind="stable")
    assert rows == want.tolist() and len(rows) == 30


def test_cli_error_in_a_real_process_has_no_traceback(cli_store):
    args = ["explain", cli_store / "run", "--split", "test", "--k", "0"]
    proc = subprocess.run(
        [sys.executable, "-m", "tracin", *map(str, args)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "tracin: error: --k 0 must be an integer between 1 and the 30 training rows"
    ]


def test_option_names_rewrites_only_the_commands_options():
    options = {
        "k": CliOption("--k"),
        "fmt": CliOption("--format"),
        "overwrite": CliOption("--overwrite", flag=True, off="--no-overwrite"),
    }
    text = (
        "k=0 must be positive, e.g. k=10; fmt='x'; top_k=3, run.k=2 and query_task=... stay; "
        "featurize again with overwrite=True (--overwrite); overwrite=False"
    )
    assert option_names(text, options) == (
        "--k 0 must be positive, e.g. --k 10; --format 'x'; top_k=3, run.k=2 and query_task=... "
        "stay; featurize again with --overwrite; --no-overwrite"
    )
    assert option_names("k=0", {}) == "k=0"
    assert option_names("k=0") == "k=0"  # outside a command: unchanged


def test_a_float64_numpy_query_on_a_float32_model_names_the_cast_that_works():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    ckpts = tracin.Checkpoints.from_state_dicts([model.state_dict()], lr=[0.5])
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=gen), torch.randint(0, 2, (6,), generator=gen)
    run = tracin.featurize(model, tracin.ClassificationTask(), ckpts, (x, y))
    query = np.random.default_rng(0).standard_normal((2, 3))  # float64, as NumPy makes it
    with pytest.raises(tracin.TaskError, match=r"torch.as_tensor\(x, dtype=torch.float32\)"):
        run.influence((query, np.array([0, 1])))
    fixed = torch.as_tensor(query, dtype=torch.float32)  # the fix the message names
    np.testing.assert_allclose(
        run.influence((fixed, torch.tensor([0, 1]))),
        run.influence((fixed.numpy(), np.array([0, 1]))),
    )
