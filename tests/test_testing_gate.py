"""``assert_bn_consistent``: a pytest gate that passes quietly and fails with a structured message."""
from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bncheck.report import Report, Verdict
from bncheck.testing import assert_bn_consistent
from conftest import inject_drift, state_copy, assert_state_equal


def test_healthy_model_passes_and_returns_the_report(healthy_convnet, images):
    before = state_copy(healthy_convnet)
    report = assert_bn_consistent(healthy_convnet, images)
    assert isinstance(report, Report) and report.verdict is Verdict.PASS
    assert report.device == "cpu"  # the gate defaults to the CPU
    assert_state_equal(healthy_convnet, before)


def test_broken_model_fails_naming_gap_worst_layer_and_findings(healthy_convnet, images):
    inject_drift(healthy_convnet.bn2, 3.0)
    with pytest.raises(AssertionError) as info:
        assert_bn_consistent(healthy_convnet, images)
    message = str(info.value)
    first = message.splitlines()[0]
    assert first.startswith("BatchNorm train/eval check failed: accuracy gap ")
    assert "allowed 5.0 pts" in first
    assert "worst: bn2 (drift " in message
    assert "1 / 3 layers over drift 0.5" in message
    assert "allowed 0.5" not in message  # drift is reported, not gated, unless max_drift is given
    with pytest.raises(AssertionError, match=r"worst: bn2 \(drift [0-9.]+, allowed 0.5\)"):
        assert_bn_consistent(healthy_convnet, images, max_drift=0.5)
    assert "error stats-mismatch:" in message and "Fix:" in message


def test_gap_in_message_is_the_measured_gap(healthy_convnet, images):
    inject_drift(healthy_convnet.bn2, 3.0)
    with pytest.raises(AssertionError) as info:
        assert_bn_consistent(healthy_convnet, images)
    from bncheck import diagnose

    report = diagnose(healthy_convnet, images, device="cpu")
    expected = (f"accuracy gap {report.gate.value * 100:.1f} pts (train-mode {report.metrics.train.accuracy:.1%}, "
                f"eval {report.metrics.eval.accuracy:.1%}; allowed 5.0 pts)")
    assert expected in str(info.value)


def test_max_gap_loosens_the_gate(healthy_convnet, images):
    inject_drift(healthy_convnet.bn2, 3.0)
    report = assert_bn_consistent(healthy_convnet, images, max_gap=1.0)
    assert report.gate.threshold == 1.0 and report.gate.passed
    # the drift is still measured, and max_drift turns it into a failure
    assert report.layers[0].name == "bn2" and report.layers[0].drift > 0.5
    with pytest.raises(AssertionError, match=r"check failed: 1 / 3 layers over drift threshold\n"):
        assert_bn_consistent(healthy_convnet, images, max_gap=1.0, max_drift=0.5)


def test_max_drift_fails_even_when_the_gap_passes(healthy_convnet, images):
    report = assert_bn_consistent(healthy_convnet, images)
    worst = max(l.drift for l in report.layers)
    assert 0 < worst < 0.1
    with pytest.raises(AssertionError) as info:
        assert_bn_consistent(healthy_convnet, images, max_drift=worst / 2)
    message = str(info.value)
    over = [l for l in report.layers if l.drift > worst / 2]
    assert f"{len(over)} / 3 layers over drift threshold" in message.splitlines()[0]
    assert f"worst: {report.layers[0].name} (drift {report.layers[0].drift:.3g}" in message
    assert_bn_consistent(healthy_convnet, images, max_drift=worst * 2)


def test_fail_on_error_findings(healthy_convnet, images):
    x, _ = images
    for bn in (healthy_convnet.bn1, healthy_convnet.bn2, healthy_convnet.bn3):
        bn.reset_running_stats()
    healthy_convnet.train()
    with torch.no_grad():
        for xb in x[:96].split(32):
            healthy_convnet(xb)  # three updates: not converged, but maybe not over the gap
    with pytest.raises(AssertionError) as info:
        assert_bn_consistent(healthy_convnet, images, max_gap=1.0, fail_on_error_findings=True)
    assert "error finding(s)" in str(info.value).splitlines()[0]
    assert "error stats-not-converged:" in str(info.value)


def test_options_are_keyword_only_and_passed_to_diagnose(healthy_mlp, blobs):
    params = inspect.signature(assert_bn_consistent).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for name, p in params.items()
               if name not in ("model", "data", "options"))
    report = assert_bn_consistent(healthy_mlp, blobs, batch_size=16, max_batches=2)
    assert (report.data.num_batches, report.data.batch_size) == (2, 16)


def test_tracebackhide_is_set():
    code = assert_bn_consistent.__code__
    assert "__tracebackhide__" in code.co_varnames
    source = inspect.getsource(assert_bn_consistent)
    assert source.index("__tracebackhide__ = True") < source.index("diagnose(")


def test_pytest_traceback_hides_the_gate_frame(tmp_path):
    test_file = tmp_path / "test_user_model.py"
    test_file.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from bncheck.testing import assert_bn_consistent

        def test_model():
            torch.manual_seed(0)
            model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))
            x = torch.randn(64, 4) * 3 + 5   # running stats left at 0/1: eval mode is wrong
            y = (x[:, 0] > 5).long()
            model[1].weight.data = torch.tensor([[-1.0, 0, 0, 0], [1.0, 0, 0, 0]])
            model[1].bias.data.zero_()
            assert_bn_consistent(model, (x, y))
    """))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider", "--tb=long",
         "--rootdir", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BatchNorm train/eval check failed" in result.stdout
    assert "test_user_model.py" in result.stdout
    bncheck_dir = str(Path(__import__("bncheck").__file__).parent)
    assert "report = diagnose(model, data" not in result.stdout  # the gate's own frame is hidden
    assert f"{bncheck_dir}/testing.py" not in result.stdout
