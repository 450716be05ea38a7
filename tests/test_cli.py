"""The command line: the demo end to end on bundled digits, and one-line errors with status 2."""

from __future__ import annotations

import json

import pytest

from tracin._cli import main


def test_demo_finds_flipped_labels_and_writes_summary(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    recall = summary["recall"]["TracIn self-influence"]
    # 10% of labels flipped: random ranking finds 0.05 / 0.10 / 0.20 of them
    assert recall["0.2"] > 0.6 and recall["0.1"] > 0.4
    assert len(summary["proponents"]) == 4 and len(summary["proponents"][0]) == 3
    assert len(list((tmp_path / "checkpoints").glob("epoch_*.pt"))) == 8
    assert "flipped labels found" in capsys.readouterr().out


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, monkeypatch):
    import tracin._demo as demo

    def broken(out, seed):
        import tracin

        tracin.Checkpoints.from_paths([tmp_path / "missing.pt"], lr="lr")

    monkeypatch.setattr(demo, "run_demo", broken)
    assert main(["demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tracin: error: checkpoint") and "\n" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("tracin ")
