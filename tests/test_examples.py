"""Every example in examples/ through the CLI: the verdict, the finding that names
its cause, and that ``bncheck recalibrate`` closes the gap it reports.

Each CLI run re-imports the example's model.py, which trains its model, so the
diagnosis of each example is cached for the module and every example is run
through the CLI about three times in all.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bncheck.cli import EXIT_FAIL, EXIT_PASS, main

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"

# example -> (verdict, finding codes that must be reported with error severity)
EXPECTED = {
    "resnet_three_images": ("fail", {"stats-not-converged"}),
    "frozen_backbone_finetune": ("fail", {"frozen-bn-in-train-mode"}),
    "stats_not_saved": ("fail", {"stats-never-updated"}),
    "sorted_last_batches": ("fail", {"stats-dominated-by-recent-batches"}),
    "healthy": ("pass", set()),
    "eval_kept_backbone": ("pass", set()),
}
FAILING = sorted(name for name, (verdict, _) in EXPECTED.items() if verdict == "fail")

# Recalibrate's default recomputes the layers that normalise with batch statistics under
# model.train(): the frozen-but-training backbone of frozen_backbone_finetune among them.
RECALIBRATE_ARGS: dict[str, list[str]] = {}


def model_file(name: str) -> str:
    return str(EXAMPLES_DIR / name / "model.py")


def cli_json(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, [*args, "--format", "json"])
    assert result.exit_code in (EXIT_PASS, EXIT_FAIL), (args, result.exit_code, result.stderr, result.exception)
    return result.exit_code, json.loads(result.stdout)


def error_codes(report: dict) -> set[str]:
    return {f["code"] for f in report["findings"] if f["severity"] == "error"}


@pytest.fixture(scope="module")
def diagnoses():
    """``diagnoses(name)``: the (exit code, JSON report) of ``bncheck diagnose``, run once per example."""
    cache: dict[str, tuple[int, dict]] = {}

    def get(name: str) -> tuple[int, dict]:
        if name not in cache:
            cache[name] = cli_json("diagnose", model_file(name))
        return cache[name]

    return get


def is_keras_example(folder: Path) -> bool:
    return "import keras" in (folder / "model.py").read_text()


def test_every_example_is_checked():
    """Every PyTorch example is in EXPECTED. The Keras examples train Keras models for about a
    minute each, too long for this module's budget, so they are left to the Keras tests."""
    folders = [p.parent for p in EXAMPLES_DIR.glob("*/model.py")]
    assert {f.name for f in folders if not is_keras_example(f)} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_verdict_and_findings(diagnoses, name):
    verdict, codes = EXPECTED[name]
    code, report = diagnoses(name)
    assert report["verdict"] == verdict, (report["gap"], report["findings"])
    assert code == (EXIT_PASS if verdict == "pass" else EXIT_FAIL)
    assert error_codes(report) == codes, report["findings"]
    for finding in report["findings"]:
        if finding["code"] in codes:
            assert finding["layers"], finding
            assert "bncheck recalibrate" in finding["fix"]
    metrics = report["metrics"]
    if verdict == "fail":
        assert metrics["train"]["accuracy"] > metrics["eval"]["accuracy"] + 0.1
    else:
        assert abs(report["gap"]["accuracy"]) <= 0.05


def test_healthy_example_reports_dropout_separately(diagnoses):
    _, report = diagnoses("healthy")
    assert report["metrics"]["train_with_dropout"] is not None
    assert all(f["severity"] != "error" for f in report["findings"])


@pytest.mark.parametrize("name", FAILING)
def test_recalibration_closes_the_gap(diagnoses, tmp_path, name):
    _, before = diagnoses(name)
    fixed = tmp_path / "fixed.pt"
    code, summary = cli_json("recalibrate", model_file(name), "-o", str(fixed), *RECALIBRATE_ARGS.get(name, []))
    assert code == EXIT_PASS
    assert summary["layers_updated"] == len(before["layers"]) and not summary["kept_layers"]
    data_row = summary["evaluations"][0]
    assert data_row["after"]["accuracy"] > data_row["before"]["accuracy"]

    code, after = cli_json("diagnose", model_file(name), "--checkpoint", str(fixed))
    assert after["verdict"] == "pass", (after["gap"], after["findings"])
    assert code == EXIT_PASS
    assert not error_codes(after), after["findings"]
    assert abs(after["gap"]["accuracy"]) <= 0.05
    assert after["metrics"]["eval"]["accuracy"] > before["metrics"]["eval"]["accuracy"]


def test_recalibration_keeps_layers_that_stay_in_eval_in_training(tmp_path):
    """eval_kept_backbone: train() keeps the frozen backbone's BatchNorm in eval, so the default
    recomputes only the head's and eval accuracy stays as good as it was."""
    code, report = cli_json("diagnose", model_file("eval_kept_backbone"))
    assert report["verdict"] == "pass" and code == EXIT_PASS
    kept_in_train = [l["name"] for l in report["layers"] if not l["batch_stats_in_train"]]
    assert sorted(kept_in_train) == ["backbone.1", "backbone.4"]
    # domain B is not the backbone's domain: said, as information, with a fix that does not break the model
    shift = next(f for f in report["findings"] if f["code"] == "preprocessing-shift")
    assert shift["severity"] == "info" and shift["layers"] == ["backbone.1"]
    assert "--include-frozen" in shift["fix"] and "fine-tune again" in shift["fix"]
    fixed = tmp_path / "fixed.pt"
    code, summary = cli_json("recalibrate", model_file("eval_kept_backbone"), "-o", str(fixed))
    assert code == EXIT_PASS and summary["updated_layers"] == ["head.1"]
    assert sorted(k["name"] for k in summary["kept_layers"]) == ["backbone.1", "backbone.4"]
    row = summary["evaluations"][0]
    assert row["after"]["accuracy"] >= row["before"]["accuracy"] - 0.01
