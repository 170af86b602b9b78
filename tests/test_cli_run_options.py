"""The CLI's run options: --quick, --amp, --channels-last, --dropout-batches, recalibrate's --no-eval
and --layers, and assert_bn_consistent(quick=True)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bncheck.cli import EXIT_FAIL, EXIT_PASS, main
from bncheck.testing import assert_bn_consistent
from conftest import image_data, inject_drift, make_convnet, train_briefly

MODEL = '''
import torch
import sys
sys.path.insert(0, {tests!r})
from conftest import image_data, inject_drift, make_convnet, train_briefly
from torch.utils.data import TensorDataset

_X, _Y = image_data(n=1536, sample_seed=4)


def build_model():
    model = train_briefly(make_convnet(), *image_data(n=384), steps=120)
    if {broken!r}:
        inject_drift(model.bn2, 4.0)
    return model


dataset = TensorDataset(_X, _Y)
'''


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    from pathlib import Path

    folder = tmp_path_factory.mktemp("run_options")
    tests = str(Path(__file__).parent)
    files = {}
    for broken in (False, True):
        path = folder / f"{'broken' if broken else 'healthy'}.py"
        path.write_text(MODEL.format(tests=tests, broken=broken))
        files[broken] = str(path)
    return files


def run_json(*args) -> tuple[int, dict]:
    result = CliRunner().invoke(main, [*args, "--format", "json", "--device", "cpu"])
    assert result.exit_code in (EXIT_PASS, EXIT_FAIL), (result.exit_code, result.stderr, result.exception)
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.parametrize("broken", [False, True])
def test_quick_settles_the_verdict_early(model_files, broken):
    code, full = run_json("diagnose", model_files[broken])
    quick_code, quick = run_json("diagnose", model_files[broken], "--quick")
    assert quick_code == code == (EXIT_FAIL if broken else EXIT_PASS)
    assert quick["data"]["stopped_early"] and quick["data"]["num_samples"] < full["data"]["num_samples"] == 1536
    low, high = quick["gap"]["accuracy_ci"]
    assert low <= full["gap"]["accuracy"] <= high
    text = CliRunner().invoke(main, ["diagnose", model_files[broken], "--quick", "--device", "cpu"]).stdout
    assert f"stopped after {quick['data']['num_samples']} of 1536 samples: verdict settled" in text


def test_quick_has_an_environment_variable(model_files):
    result = CliRunner().invoke(main, ["diagnose", model_files[True], "--format", "json", "--device", "cpu"],
                                env={"BNCHECK_QUICK": "1"})
    assert json.loads(result.stdout)["data"]["stopped_early"]


def test_amp_and_channels_last_give_the_same_verdict(model_files):
    _, plain = run_json("diagnose", model_files[True])
    _, amp = run_json("diagnose", model_files[True], "--amp", "bf16", "--channels-last")
    assert amp["verdict"] == plain["verdict"] == "fail"
    assert [l["name"] for l in amp["layers"]][0] == [l["name"] for l in plain["layers"]][0] == "bn2"


def test_dropout_batches_zero_skips_the_dropout_pass(tmp_path):
    path = tmp_path / "dropout.py"
    path.write_text('''
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.BatchNorm1d(8), nn.Linear(8, 3))
dataset = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
''')
    _, default = run_json("diagnose", str(path))
    _, skipped = run_json("diagnose", str(path), "--dropout-batches", "0")
    assert default["metrics"]["train_with_dropout"]["num_samples"] == 32  # the first batch
    assert skipped["metrics"]["train_with_dropout"] is None


def test_recalibrate_no_eval_and_layer_patterns(model_files, tmp_path):
    out = tmp_path / "fixed.pt"
    result = CliRunner().invoke(main, ["recalibrate", model_files[True], "-o", str(out), "--no-eval", "--layers",
                                       "bn2", "--format", "json", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["evaluations"] == [] and summary["updated_layers"] == ["bn2"]
    assert {k["name"] for k in summary["kept_layers"]} == {"bn1", "bn3"}
    code, after = run_json("diagnose", model_files[True], "--checkpoint", str(out))
    assert code == EXIT_PASS and after["layers"][0]["drift"] < 0.5


def test_the_test_suite_gate_takes_quick():
    model = train_briefly(make_convnet(), *image_data(n=384), steps=120)
    data = image_data(n=1536, sample_seed=4)
    report = assert_bn_consistent(model, data, quick=True)
    assert report.data.stopped_early
    inject_drift(model.bn2, 4.0)
    with pytest.raises(AssertionError, match="accuracy gap"):
        assert_bn_consistent(model, data, quick=True)


def test_recalibrate_no_eval_says_so_instead_of_an_empty_table(model_files, tmp_path):
    result = CliRunner().invoke(main, ["recalibrate", model_files[True], "-o", str(tmp_path / "fixed.pt"),
                                       "--no-eval", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert "not evaluated (--no-eval)" in result.stdout and "before and after" not in result.stdout


@pytest.mark.parametrize("value", ["5", "1.5"])
def test_max_gap_above_one_is_refused_as_points_typed_for_a_fraction(model_files, value):
    result = CliRunner().invoke(main, ["diagnose", model_files[True], "--max-gap", value, "--device", "cpu"])
    assert result.exit_code == 2 and "--max-gap" in result.stderr and "1" in result.stderr


def test_a_pipe_takes_its_width_from_columns(model_files, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    wide = CliRunner().invoke(main, ["diagnose", model_files[True], "--device", "cpu"]).stdout
    monkeypatch.setenv("COLUMNS", "100")
    narrow = CliRunner().invoke(main, ["diagnose", model_files[True], "--device", "cpu"]).stdout
    assert max(map(len, narrow.splitlines())) <= 100 < max(map(len, wide.splitlines()))
    assert "batch │" in narrow  # the short columns stay whole: the train column reads "batch", never "batc"
