"""Attribution: re-running eval mode with one layer's statistics made exact names the guilty layer."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import bncheck
from bncheck.attribution import recovered_share
from bncheck.report import ModeMetrics
from conftest import inject_drift, norm_modules, state_copy, assert_state_equal


def diagnose(model, data, **options):
    return bncheck.diagnose(model, data, device="cpu", **options)


def by_name(report):
    return {layer.name: layer for layer in report.layers}


@pytest.fixture
def drifted_convnet(healthy_convnet):
    inject_drift(healthy_convnet.bn2, 3.0)
    return healthy_convnet


def test_only_the_drifted_layer_recovers_the_gap(drifted_convnet, images):
    before = state_copy(drifted_convnet)
    report = diagnose(drifted_convnet, images, attribute=True)
    assert_state_equal(drifted_convnet, before)
    layers = by_name(report)
    assert report.layers[0].name == "bn2"
    assert layers["bn2"].attribution.recovered_share == pytest.approx(1.0, abs=0.05)
    for name in ("bn1", "bn3"):
        assert layers[name].attribution.recovered_share == pytest.approx(0.0, abs=0.05)
    summary = report.attribution
    assert summary is not None and summary.layers[0] == "bn2" and set(summary.layers) == {"bn1", "bn2", "bn3"}
    assert summary.top_fixed.recovered_share == pytest.approx(1.0, abs=0.05)
    assert summary.all_fixed.recovered_share == pytest.approx(1.0, abs=0.05)
    # every batch fits in the attribution budget here, so baseline and target are the report's metrics
    assert summary.num_batches == report.data.num_batches == 6
    assert summary.baseline.accuracy == report.metrics.eval.accuracy
    assert summary.target.accuracy == report.metrics.train.accuracy
    assert summary.baseline.loss == pytest.approx(report.metrics.eval.loss, rel=1e-9)
    assert summary.num_forwards == (3 + 4) * 6
    assert report.findings[0].code == "stats-mismatch"
    assert report.findings[0].evidence["gap_recovered_by_exact_stats"] == pytest.approx(1.0, abs=0.05)


def test_attribution_equals_an_independent_fix(drifted_convnet, images):
    report = diagnose(drifted_convnet, images, attribute=True)
    bn2 = by_name(report)["bn2"]
    fixed = copy.deepcopy(drifted_convnet).eval()
    with torch.no_grad():
        fixed.bn2.running_mean.copy_(torch.tensor(bn2.channels.true_mean))
        fixed.bn2.running_var.copy_(torch.tensor(bn2.channels.true_var_unbiased))
        out = fixed(images[0])
    assert bn2.attribution.accuracy == pytest.approx(float((out.argmax(1) == images[1]).float().mean()), abs=1e-12)
    assert bn2.attribution.loss == pytest.approx(float(F.cross_entropy(out, images[1])), rel=1e-5)


def test_top_and_batches_limit_the_work(drifted_convnet, images):
    report = diagnose(drifted_convnet, images, attribute=True, attribute_top=1, attribute_batches=2)
    summary = report.attribution
    assert summary.layers == ("bn2",)
    assert summary.num_batches == 2 and summary.num_forwards == (1 + 4) * 2
    layers = by_name(report)
    assert layers["bn2"].attribution is not None
    assert layers["bn1"].attribution is None and layers["bn3"].attribution is None


def test_without_attribute_there_is_no_attribution(drifted_convnet, images):
    report = diagnose(drifted_convnet, images)
    assert report.attribution is None
    assert all(layer.attribution is None for layer in report.layers)


def test_healthy_model_has_no_gap_to_attribute(healthy_mlp, blobs):
    report = diagnose(healthy_mlp, blobs, attribute=True)
    # train and eval agree within a fraction of a point: nothing to recover, or a share near 0
    assert report.attribution is not None
    assert report.verdict is bncheck.Verdict.PASS
    assert not [f for f in report.findings if f.code == "stats-mismatch"]
    assert len(norm_modules(healthy_mlp)) == len(report.attribution.layers)


# --------------------------------------------------------------------------- recovered_share


def m(loss, accuracy=None):
    return ModeMetrics(loss, accuracy)


def test_recovered_share_on_accuracy():
    assert recovered_share(m(2.0, 0.5), m(0.5, 0.9), m(1.0, 0.8)) == pytest.approx(0.75)
    assert recovered_share(m(2.0, 0.5), m(0.5, 0.9), m(0.5, 0.9)) == pytest.approx(1.0)
    assert recovered_share(m(2.0, 0.5), m(0.5, 0.9), m(2.0, 0.5)) == pytest.approx(0.0)
    assert recovered_share(m(2.0, 0.5), m(0.5, 0.9), m(3.0, 0.4)) == pytest.approx(-0.25)  # made it worse


def test_recovered_share_falls_back_to_loss():
    # no accuracy (regression): loss gap 2 -> 1, fixed at 1.5 closes half
    assert recovered_share(m(2.0), m(1.0), m(1.5)) == pytest.approx(0.5)
    # equal accuracy: the accuracy gap is below min_gap, so the loss decides
    assert recovered_share(m(2.0, 0.9), m(1.0, 0.9), m(1.25, 0.9)) == pytest.approx(0.75)


def test_recovered_share_is_none_without_a_gap():
    assert recovered_share(m(1.0, 0.9), m(1.0, 0.9), m(0.5, 0.95)) is None
    assert recovered_share(m(100.05), m(100.0), m(100.0)) is None  # gap under 0.1% of the loss
    assert recovered_share(m(None), m(None), m(None)) is None
    assert recovered_share(m(1.2), m(1.0), m(1.1)) == pytest.approx(0.5)  # 0.2 is a real gap at loss 1
