"""`tracin eval fix`: fixing the top of each ranking and retraining, checked end to end.

The quick test runs the CLI on a tiny configuration and checks the JSON holds every method at
every fraction, that the oracle ranking (the flipped rows first) fixes every flip once the
fraction inspected reaches the noise, and that fixing them raises the test accuracy over no
fix: a check that fails if relabelling, retraining or the bookkeeping is wrong.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tracin._errors import ConfigError
from tracin.cli._app import app
from tracin.experiments._fix import (
    CLEANLAB,
    DEFAULT,
    ORACLE,
    SELF_INFLUENCE,
    FixConfig,
    evaluate_fix,
    load_data,
)
from tracin.experiments._mislabel import FRACTIONS, PAPER

runner = CliRunner()
METHODS = {DEFAULT, PAPER, SELF_INFLUENCE, ORACLE, CLEANLAB, "final loss",
             "loss summed over the checkpoints", "random"}  # fmt: skip


def test_cli_fix_on_a_tiny_run(tmp_path):
    out = tmp_path / "fix"
    args = ["eval", "fix", "--data", "digits", "--rows", "200", "--noise", "0.2", "--seeds", "1",
            "--checkpoints", "4", "--cleanlab-folds", "2", "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "fix.json").read_text())
    assert (out / "fix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["fractions"] == list(FRACTIONS)
    methods = set(saved["accuracy"])
    assert methods == METHODS, methods
    assert len(saved["default_recipe"]) == 1 and saved["default_recipe"][0]  # its recipe's name
    for name in methods:
        assert np.shape(saved["accuracy"][name]) == (1, len(FRACTIONS)), name
        assert np.shape(saved["flips_fixed"][name]) == (1, len(FRACTIONS)), name
    # the oracle fixes every flip from 20% inspected (20% flipped): the same run as all fixed
    oracle = saved["accuracy"][ORACLE][0]
    assert saved["flips_fixed"][ORACLE][0] == [0.25, 0.5, 1.0, 1.0]
    assert oracle[2] == oracle[3] == saved["clean"][0]
    # and fixing the flips pays: measured 0.72 without a fix, 0.93 with every flip fixed
    assert oracle[2] > saved["no_fix"][0] + 0.05, saved
    assert oracle[1] > saved["no_fix"][0], saved


def test_load_data_flips_exactly_the_noise_to_other_classes():
    cfg = FixConfig(rows=500, noise=0.1, seeds=(3,))
    x, noisy, true, x_test, y_test = load_data(cfg, 3)
    assert x.shape == (500, 64) and x_test.shape == (1297, 64) and len(y_test) == 1297
    assert int((noisy != true).sum()) == 50
    again = load_data(cfg, 3)
    assert (again[1] == noisy).all() and (again[0] == x).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data": "cifar"}, "data='cifar'"),
        ({"rows": 1600}, "rows=1600"),
        ({"fractions": (0.1, 1.0)}, "fractions="),
        ({"noise": 0.6}, "noise=0.6"),
        ({"cleanlab_folds": 1}, "cleanlab_folds=1"),
    ],
)
def test_bad_configuration_is_one_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FixConfig(**kwargs)


def test_cli_refuses_bad_data_in_one_line(tmp_path):
    result = runner.invoke(app, ["eval", "fix", "--data", "cifar", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--data 'cifar'" in result.output


@pytest.mark.slow
def test_tracin_default_fix_beats_random_and_final_loss_on_digits():
    """The full digits experiment (~5 minutes): the default ranking's fixes pay most."""
    result = evaluate_fix(FixConfig(data="digits"))
    at10 = {name: float(a[:, 1].mean()) for name, a in result.accuracy.items()}
    assert at10[DEFAULT] > at10["random"] + 0.02, at10
    assert at10[DEFAULT] >= at10["final loss"], at10
    assert at10[DEFAULT] > float(np.mean(result.no_fix)) + 0.02, at10
