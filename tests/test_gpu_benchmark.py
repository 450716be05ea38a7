"""benchmarks/gpu_engines.py on the CPU (and on CUDA where there is one): every path it times
runs, rates are positive, and tracin's exact self-influence matches the float64 loop."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_engines as ge  # type: ignore[import-not-found]

HAS_CAPTUM = importlib.util.find_spec("captum") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None  # cnn47k's digits


def run(tmp_path: Path, *args: str) -> dict[str, Any]:
    assert ge.main(["--quick", "--out", str(tmp_path), *args]) == 0
    report: dict[str, Any] = json.loads((tmp_path / "gpu_engines.json").read_text())
    assert (tmp_path / "gpu_engines.md").read_text().startswith("# GPU engines")
    return report


def check_model(model: dict[str, Any], dtype: torch.dtype) -> None:
    """Every path ran with a positive rate; the loop check and Captum's best agree with tracin."""
    by = {r["key"]: r for r in model["results"]}
    keys = [*ge.TIMED, *(f"captum_{k}" for k in ge.CAPTUM_KINDS if HAS_CAPTUM)]
    for key in keys:
        assert "error" not in by[key], (key, by[key])
        assert by[key]["rate"] > 0 and by[key]["rows"] > 0, (key, by[key])
        assert by[key]["mem_mb"] >= 0, key
    check = model["loop_check"]
    assert check["rows"] == ge.CHECK_ROWS
    assert check["relerr"] < ge.LOOP_TOL[dtype] and check["ok"], check
    if HAS_CAPTUM:
        best = model["captum_fastest_correct"]
        assert best is not None and by[best]["relerr"] < ge.CAPTUM_TOL[dtype]
        assert model["exact_over_captum"] > 0


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_quick_run_float32(tmp_path: Path, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    report = run(tmp_path, "--device", device, "--models", "mlp", "cnn47k")
    assert report["meta"]["device_type"] == device
    assert set(report["models"]) == {"mlp", "cnn47k"}
    if not HAS_SKLEARN:  # skipped cleanly, and said so
        assert report["models"].pop("cnn47k")["skipped"] == "needs sklearn, which is not installed"
    for model in report["models"].values():
        assert model["dtype"] == "float32"
        check_model(model, torch.float32)
    assert ge.LOOP_TOL[torch.float32] == 1e-4
    if device == "cuda":  # memory from the CUDA allocator, the host's kept apart
        assert all("host_peak_mb" in r for r in report["models"]["mlp"]["results"])


def test_bfloat16_where_allowed_and_budget(tmp_path: Path) -> None:
    report = run(tmp_path, "--device", "cpu", "--dtype", "bfloat16", "--models", "mlp")
    model = report["models"]["mlp"]
    assert model["dtype"] == "bfloat16" and "bfloat16" in model["dtype_why"]
    check_model(model, torch.bfloat16)
    assert ge.model_dtype("lstm", torch.bfloat16)[0] == torch.float32  # not in the bf16 list
    assert ge.model_dtype("gpt2", torch.float32)[0] == torch.float32
    skipped = run(tmp_path / "b", "--device", "cpu", "--models", "mlp", "lstm", "--budget-s", "0")
    for name in ("mlp", "lstm"):
        assert "time budget --budget-s 0 exceeded" in skipped["models"][name]["skipped"]
    assert "Not measured" in (tmp_path / "b" / "gpu_engines.md").read_text()


class Affine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)
        return out


def test_loop_oracle_matches_closed_form(tmp_path: Path) -> None:
    """The loop the benchmark trusts: squared loss on a linear model has gradient 2 r [x, 1]."""
    gen = torch.Generator().manual_seed(0)
    model = Affine()
    x, y = torch.randn(5, 3, generator=gen), torch.randn(5, 1, generator=gen)
    paths, lrs, want = [], (0.5, 0.2), np.zeros(5)
    for i, lr in enumerate(lrs):
        state = {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
        torch.save({"model_state_dict": state, "lr": lr}, tmp_path / f"c{i}.pt")
        paths.append(str(tmp_path / f"c{i}.pt"))
        r = (x.double() @ state["fc.weight"].double().T + state["fc.bias"].double() - y).squeeze(1)
        want += lr * (4 * r**2 * (x.double().pow(2).sum(1) + 1)).numpy()

    def loss(net: Any, batch: Any) -> torch.Tensor:
        out: torch.Tensor = (net(batch[0]) - batch[1]).pow(2).sum(1)
        return out

    got = ge.loop_self_influence(model, loss, paths, (x, y))
    np.testing.assert_allclose(got, want, rtol=1e-12)
