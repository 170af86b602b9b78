"""Renderers against golden files, on a report built by hand (no volatile fields).

Regenerate after an intended change with ``python -m pytest tests/test_render_golden.py --overwrite-goldens``
and review the diff.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bncheck.inspection import InspectionReport
from bncheck.recalibration import EvalComparison, KeptLayer, RecalibrationResult
from bncheck.render import OutputFormat, RenderOptions, renderer_for
from bncheck.report import (
    DataSummary, Finding, Gap, Gate, LayerReport, MetricsSet, ModeMetrics, Report, Severity, Verdict,
)

GOLDEN = Path(__file__).parent / "golden"


def layer(name: str, drift: float, shift: float, ratio: float, **changes) -> LayerReport:
    values = dict(
        name=name, type="BatchNorm2d", framework="torch", per_instance=False, num_features=16, momentum=0.01,
        update_weight=0.01, eps=1e-5, tracks_running_stats=True, num_batches_tracked=10,
        initial_weight=0.99 ** 10, params_frozen=False, training=True, calls_per_forward=1.0,
        batch_samples=768.0, mean_shift_max=shift, mean_shift_mean=shift / 2, var_ratio_max=ratio,
        var_ratio_min=0.5, drift=drift, drift_max=drift * 2, running_stats_at_init=False, running_stats_corrupt=False,
        batch_mean_spread=0.1, dropout_var_ratio=None)
    values.update(changes)
    return LayerReport(**values)


def failing_report() -> Report:
    layers = (layer("layer1.bn1", 1.84, 2.48, 14.1, order=1), layer("stem.bn", 1.11, 0.92, 0.1, order=0),
              layer("layer2.bn1", 0.25, 0.3, 1.2, order=2),
              layer("head.bn", 0.03, 0.05, 1.01, type="BatchNorm1d", order=3, batch_stats_in_train=False))
    finding = Finding("stats-not-converged", Severity.ERROR, ("layer1.bn1", "stem.bn"),
                      {"num_batches_tracked": 10, "momentum": 0.01, "initial_weight": 0.9044},
                      "The moving averages saw only 10 updates with momentum 0.01.",
                      "Use the default momentum: nn.BatchNorm2d(C, momentum=0.1).")
    return Report(
        verdict=Verdict.FAIL, task="classification", framework="torch", device="cpu",
        metrics=MetricsSet(ModeMetrics(10.75, 1 / 3), ModeMetrics(0.0156, 1.0), ModeMetrics(0.02, 1.0)),
        gap=Gap(2 / 3, 10.7344, 688.1, (0.0712, 0.9385), None),
        gate=Gate("accuracy", 2 / 3, 0.05, False, (0.0712, 0.9385)), agreement=1 / 3,
        output_divergence=46.8, layers=layers, findings=(finding,),
        data=DataSummary(3, 1, 3, True, 0, 1 / 3, 3), notes=("checkpoint keys had prefix 'module.', stripped",))


def recalibration() -> RecalibrationResult:
    kept = (KeptLayer("frozen.bn", "normalises with its running statistics under model.train(), so training used "
                                   "them"),)
    return RecalibrationResult(2, ("layer1.bn1", "stem.bn"), kept, 3, 1,
                               (EvalComparison("data", ModeMetrics(10.75, 1 / 3), ModeMetrics(0.016, 1.0)),),
                               output_path="fixed.pt")


def inspection() -> InspectionReport:
    report = failing_report()
    never = Finding("stats-never-updated", Severity.ERROR, ("head.bn",), {"layers_at_init": 1},
                    "1 of 4 norm layers hold running statistics that were never updated.",
                    "torch.save(model.state_dict(), path)")
    return InspectionReport(Verdict.FAIL, "torch", report.layers, (never,), ("built with random weights",))


CASES = {
    "diagnosis": lambda r: r.diagnosis(failing_report()),
    "inspection": lambda r: r.inspection(inspection()),
    "recalibration": lambda r: r.recalibration(recalibration()),
}
SUFFIX = {OutputFormat.TERMINAL: "txt", OutputFormat.MARKDOWN: "md", OutputFormat.JSON: "json"}


@pytest.mark.parametrize("fmt", list(OutputFormat))
@pytest.mark.parametrize("case", sorted(CASES))
def test_renderer_matches_golden(fmt, case, overwrite_goldens):
    renderer = renderer_for(fmt)(RenderOptions(top=3, width=100, color=False))
    text = CASES[case](renderer)
    if fmt is OutputFormat.JSON:
        text = json.dumps({k: v for k, v in json.loads(text).items() if k != "bncheck_version"}, indent=2) + "\n"
    path = GOLDEN / f"{case}.{SUFFIX[fmt]}"
    if overwrite_goldens:
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"missing golden file {path}; run with --overwrite-goldens"
    assert text == path.read_text(encoding="utf-8")


def test_terminal_report_shows_top_layers_and_says_how_to_see_all():
    text = renderer_for(OutputFormat.TERMINAL)(RenderOptions(top=3, width=100)).diagnosis(failing_report())
    assert "3 of 4; --all-layers for all" in text
    assert "head.bn" not in text
    everything = renderer_for(OutputFormat.TERMINAL)(RenderOptions(all_layers=True, width=100))
    assert "head.bn" in everything.diagnosis(failing_report())


def test_drift_bars_are_proportional_to_drift():
    text = renderer_for(OutputFormat.MARKDOWN)(RenderOptions(top=4)).diagnosis(failing_report())
    bars = {line.split("|")[1].strip(" `"): line.split("|")[4].strip(" `").count("█")
            for line in text.splitlines() if line.startswith("| `") and "BatchNorm" in line}
    assert bars["layer1.bn1"] == 12
    assert bars["stem.bn"] == round(12 * 1.11 / 1.84)
    assert bars["head.bn"] == 0
