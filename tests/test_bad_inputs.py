"""Bad input is an input error (exit 2, one line), never a crash, a silent misreading or a pass."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import bncheck
from bncheck.render.format import bar, drift_style, num, pct, signed_points
from test_cli import assert_input_error, import_file, run, write_model


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(3, 4, generator=g)
    y = torch.arange(n) % 3
    return (centers[y] + torch.randn(n, 4, generator=g)) * 2 + 5, y


def mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, _ = data()
    with torch.no_grad():
        for _ in range(30):
            model(x)
    return model.eval()


# --- NaN, inf and negative running variances (item 2) ---------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0])
def test_number_formatters_take_nan_and_inf(value):
    for text in (num(value), pct(value), signed_points(value), bar(value, 1.0, 10), bar(0.5, value, 10)):
        assert isinstance(text, str)
    assert bar(math.inf, math.inf, 4) == "████" and bar(1.0, math.inf, 4) == "····"
    assert drift_style(math.nan) == "red" and drift_style(math.inf) == "red"


@pytest.fixture(params=["nan", "inf", "negative"])
def corrupt_checkpoint(request, tmp_path):
    model_py = write_model(tmp_path)
    state = import_file(model_py).build_model().state_dict()
    state["1.running_var"][:3] = {"nan": math.nan, "inf": math.inf, "negative": -1.0}[request.param]
    torch.save(state, tmp_path / "corrupt.pt")
    return model_py, tmp_path / "corrupt.pt", request.param


@pytest.mark.parametrize("fmt", ["terminal", "markdown", "json"])
def test_corrupt_running_variance_renders_and_nan_outputs_fail(corrupt_checkpoint, fmt):
    model_py, checkpoint, kind = corrupt_checkpoint
    result = run("diagnose", model_py, "--checkpoint", checkpoint, "--format", fmt)
    assert "stats-corrupt" in result.stdout, (result.stderr, result.exception)
    if kind == "inf":  # x / sqrt(inf) is 0: the outputs stay finite and the gap decides
        assert result.exit_code in (0, 1)
        return
    assert result.exit_code == 1  # sqrt of a negative variance or NaN: NaN outputs
    if fmt == "json":
        report = json.loads(result.stdout)
        assert report["verdict"] == "fail" and report["gate"]["metric"] == "nonfinite_eval_outputs"
    else:
        assert "NaN or inf" in result.stdout.splitlines()[0 if fmt == "terminal" else 2]


def test_nan_eval_outputs_fail_in_the_library():
    model = mlp()
    with torch.no_grad():
        model[1].running_var.fill_(math.nan)
    report = bncheck.diagnose(model, data(), device="cpu")
    assert not report.passed
    assert report.gate.metric == "nonfinite_eval_outputs" and report.gate.value == 1.0
    assert "stats-corrupt" in {f.code for f in report.findings}
