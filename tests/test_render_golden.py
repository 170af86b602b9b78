"""Renderers against golden files, on a report built by hand (no volatile fields).

Regenerate after an intended change with ``python -m pytest tests/test_render_golden.py --overwrite-goldens``
and review the diff.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
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
    layers = (layer("layer1.bn1", 1.84, 2.48, 14.1), layer("stem.bn", 1.11, 0.92, 0.1),
              layer("layer2.bn1", 0.25, 0.3, 1.2), layer("head.bn", 0.03, 0.05, 1.01, type="BatchNorm1d"))
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
def forward_ordered_report() -> Report:
    """The failing report as the engine fills it: a forward order unlike the drift order, gap intervals,
    and a layer that keeps its running statistics under model.train()."""
    report = failing_report()
    order = {"stem.bn": 0, "layer1.bn1": 1, "layer2.bn1": 2, "head.bn": 3}
    layers = tuple(dataclasses.replace(l, order=order[l.name], batch_stats_in_train=l.name != "layer2.bn1")
                   for l in report.layers)
    gap = dataclasses.replace(report.gap, accuracy_ci=(0.6, 0.72), relative_loss_ci=(500.0, 900.0))
    data = dataclasses.replace(report.data, stopped_early=True, num_samples_available=50, world_size=2)
    return dataclasses.replace(report, layers=layers, gap=gap, data=data)


SUFFIX = {OutputFormat.TERMINAL: "txt", OutputFormat.MARKDOWN: "md", OutputFormat.JSON: "json",
          OutputFormat.HTML: "html"}
HTML_CASES = {"diagnosis_forward": lambda r: r.diagnosis(forward_ordered_report())}


def scrubbed(fmt: OutputFormat, text: str) -> str:
    """Without the fields that change from release to release."""
    if fmt is OutputFormat.JSON:
        return json.dumps({k: v for k, v in json.loads(text).items() if k != "bncheck_version"}, indent=2) + "\n"
    if fmt is OutputFormat.HTML:
        return re.sub(r'<span class="version">[^<]*</span>', '<span class="version">VERSION</span>', text)
    return text


def check_golden(fmt: OutputFormat, case: str, text: str, overwrite: bool) -> None:
    path = GOLDEN / f"{case}.{SUFFIX[fmt]}"
    text = scrubbed(fmt, text)
    if overwrite:
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"missing golden file {path}; run with --overwrite-goldens"
    assert text == path.read_text(encoding="utf-8")


@pytest.mark.parametrize("fmt", list(OutputFormat))
@pytest.mark.parametrize("case", sorted(CASES))
def test_renderer_matches_golden(fmt, case, overwrite_goldens):
    renderer = renderer_for(fmt)(RenderOptions(top=3, width=100, color=False))
    check_golden(fmt, case, CASES[case](renderer), overwrite_goldens)


@pytest.mark.parametrize("case", sorted(HTML_CASES))
def test_html_in_forward_order_matches_golden(case, overwrite_goldens):
    renderer = renderer_for(OutputFormat.HTML)(RenderOptions(top=3, width=100, color=False))
    check_golden(OutputFormat.HTML, case, HTML_CASES[case](renderer), overwrite_goldens)


def test_golden_html_is_scrubbed_of_the_version():
    from bncheck import __version__

    text = renderer_for(OutputFormat.HTML)().diagnosis(failing_report())
    assert f'<span class="version">{__version__}</span>' in text
    assert "VERSION" in scrubbed(OutputFormat.HTML, text) and __version__ not in scrubbed(OutputFormat.HTML, text)


def test_terminal_report_shows_top_layers_and_says_how_to_see_all():
    text = renderer_for(OutputFormat.TERMINAL)(RenderOptions(top=3, width=100)).diagnosis(failing_report())
    assert "3 of 4; --all-layers for all" in text
    assert "head.bn" not in text
    everything = renderer_for(OutputFormat.TERMINAL)(RenderOptions(all_layers=True, width=100))
    assert "head.bn" in everything.diagnosis(failing_report())


def _markdown_bars(report) -> dict[str, str]:
    text = renderer_for(OutputFormat.MARKDOWN)(RenderOptions(top=4)).diagnosis(report)
    return {line.split("|")[1].strip(" `"): line.split("|")[4].strip(" `")
            for line in text.splitlines() if line.startswith("| `") and "BatchNorm" in line}


def test_drift_bars_use_a_fixed_scale_with_a_threshold_mark():
    bars = _markdown_bars(failing_report())
    # 12 cells for 0 to 1 standard deviation, the mark after cell 6 (drift 0.5), "+" past the scale.
    assert bars["layer1.bn1"] == "██████¦██████+"  # 1.84
    assert bars["stem.bn"] == "██████¦██████+"     # 1.11: full as well; the number tells them apart
    assert bars["layer2.bn1"] == "███···¦······"    # 0.25 fills a quarter
    assert bars["head.bn"] == "▍·····¦······"      # 0.03: short, not full, not empty


def test_a_healthy_model_draws_short_bars():
    report = failing_report()
    healthy = tuple(dataclasses.replace(l, drift=d) for l, d in zip(report.layers, (0.05, 0.04, 0.02, 0.01)))
    bars = _markdown_bars(dataclasses.replace(report, layers=healthy))
    assert bars[report.layers[0].name] == "▋·····¦······"  # the worst layer, 0.05, is 1/20 of the bar
    assert all("█" not in bar for bar in bars.values())


@pytest.mark.parametrize("fmt", [OutputFormat.TERMINAL, OutputFormat.MARKDOWN])
def test_bars_survive_missing_and_non_finite_drift(fmt):
    report = failing_report()
    odd = tuple(dataclasses.replace(l, drift=d, drift_max=d)
                for l, d in zip(report.layers, (math.nan, math.inf, None, -0.0)))
    renderer = renderer_for(fmt)(RenderOptions(all_layers=True, width=120))
    text = renderer.diagnosis(dataclasses.replace(report, layers=odd))
    rows: dict[str, str] = {}
    for line in text.splitlines():  # the first line naming a layer is its table row; findings come later
        for name in ("layer1.bn1", "stem.bn", "layer2.bn1", "head.bn"):
            if name in line and "BatchNorm" in line:
                rows.setdefault(name, line)
    assert "░░░░" in rows["layer1.bn1"] and "NaN" in rows["layer1.bn1"]
    assert "+" in rows["stem.bn"] and "inf" in rows["stem.bn"]
    assert "¦" not in rows["layer2.bn1"]          # no drift measured: no bar at all
    assert "·····¦" in rows["head.bn"] and "█" not in rows["head.bn"]


def test_the_scale_is_explained_next_to_the_bars():
    for fmt in (OutputFormat.TERMINAL, OutputFormat.MARKDOWN):
        text = renderer_for(fmt)(RenderOptions(top=3, width=120)).diagnosis(failing_report())
        assert "drift bar: 0 to 1 std (+ beyond); ¦ at 0.5, where findings start" in text.replace("`", "")
