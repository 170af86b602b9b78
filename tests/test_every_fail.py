"""Every FAIL names a cause.

When the running statistics are exact and the gap persists, the gap comes from train mode
(``gap-from-train-mode``); any other failing diagnosis no rule explains gets ``unexplained-gap``.
Driven through the pure rules (hand-built and generated evidence) and end to end.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bncheck
from bncheck.findings import find_causes
from bncheck.report import Severity
from conftest import inject_drift, norm_modules
from test_findings import evidence, layer

CAUSE = (Severity.ERROR, Severity.WARNING)


def named_causes(findings) -> set[str]:
    return {f.code for f in findings if f.severity in CAUSE}


# --------------------------------------------------------------------------- the rules


def test_exact_statistics_and_a_failed_gate_blame_train_mode():
    deep = layer("deep", batch_samples=16.0, drift=0.014)
    mid = layer("mid", batch_samples=64.0, drift=0.01)
    stem = layer("stem", batch_samples=4096.0, drift=0.002)
    f = {x.code: x for x in find_causes(evidence(stem, mid, deep, failed=True))}["gap-from-train-mode"]
    assert f.severity is Severity.WARNING and f.layers == ("deep", "mid", "stem")  # fewest samples first
    assert f.evidence["fewest_samples_per_channel"] == {"deep": 16, "mid": 64, "stem": 4096}
    assert f.evidence["drift_max"] == 0.014
    assert "comes from train mode" in f.message and "deep: 16" in f.message
    assert "realistic batch size and input size" in f.fix and "judge the model by eval mode" in f.fix
    # near misses: the gate passes; or the statistics are wrong (then the statistics are the cause)
    assert find_causes(evidence(stem, mid, deep)) == ()
    wrong = {x.code for x in find_causes(evidence(stem, mid, dataclasses.replace(deep, drift=1.2), failed=True))}
    assert "gap-from-train-mode" not in wrong and "stats-mismatch" in wrong


def test_layers_kept_in_eval_do_not_count_as_samples_or_drift():
    kept = layer("kept", batch_stats_in_train=False, batch_samples=2.0, drift=0.9)
    trains = layer("trains", batch_samples=32.0, drift=0.01)
    found = {x.code: x for x in find_causes(evidence(kept, trains, failed=True))}
    # the kept layer's drift is no finding by itself, and it sees no batch statistics
    assert set(found) == {"gap-from-train-mode"} and found["gap-from-train-mode"].layers == ("trains",)


def test_moderate_drift_everywhere_is_an_unexplained_gap():
    layers = [layer(name, drift=0.35) for name in ("a", "b", "c")]
    f = {x.code: x for x in find_causes(evidence(*layers, failed=True))}["unexplained-gap"]
    assert f.severity is Severity.WARNING and set(f.layers) == {"a", "b", "c"}
    assert "recalibrate" in f.fix and "--attribute" in f.fix


def test_a_named_cause_needs_no_catch_all():
    found = named_causes(find_causes(evidence(layer("a", drift=2.0), failed=True)))
    assert found == {"stats-mismatch"}
    # an info-level finding alone does not explain a failure
    only_info = find_causes(evidence(layer("a", batch_samples=8.0, drift=0.01), failed=True))
    assert {f.code for f in only_info} == {"small-normalization-batch", "gap-from-train-mode"}


layer_records = st.builds(
    lambda drift, samples, at_init, frozen, kept, momentum, nbt, spread, tracked: layer(
        drift=drift, drift_max=drift, batch_samples=samples, running_stats_at_init=at_init, params_frozen=frozen,
        training=frozen, batch_stats_in_train=not kept, momentum=momentum, update_weight=momentum,
        num_batches_tracked=nbt, initial_weight=None if momentum is None else (1 - momentum) ** nbt,
        batch_mean_spread=spread, tracks_running_stats=tracked),
    drift=st.one_of(st.none(), st.floats(0, 5)), samples=st.one_of(st.none(), st.floats(1, 1e5)),
    at_init=st.booleans(), frozen=st.booleans(), kept=st.booleans(),
    momentum=st.one_of(st.none(), st.sampled_from([0.0, 0.01, 0.1, 0.3, 0.9])), nbt=st.integers(0, 2000),
    spread=st.one_of(st.none(), st.floats(0, 2)), tracked=st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(layer_records, min_size=1, max_size=5), st.sampled_from([None, 0.0, 0.2]))
def test_no_failing_diagnosis_ends_without_a_cause(layers, batch_dependence):
    named = tuple(dataclasses.replace(l, name=f"l{i}") for i, l in enumerate(layers))
    findings = find_causes(evidence(*named, failed=True, eval_batch_dependence=batch_dependence,
                                    registration_order=tuple(l.name for l in named)))
    assert named_causes(findings), findings


# --------------------------------------------------------------------------- end to end


def failing_cases(healthy_convnet, healthy_mlp, images, blobs):
    """Failing diagnoses of several kinds, each with data that makes it fail."""
    x, y = images
    bx, by = blobs
    cases = {}
    never = copy.deepcopy(healthy_convnet)
    for _, bn in norm_modules(never):
        bn.reset_running_stats()
    cases["never-updated"] = (never, (x, y), {})
    mismatched = copy.deepcopy(healthy_convnet)
    inject_drift(mismatched.bn2, 3.0)
    cases["mismatch"] = (mismatched, (x, y), {})
    cases["pixels-0-255"] = (healthy_convnet, (x * 255, y), {})

    class Centered(nn.Sequential):
        def forward(self, inputs):
            return super().forward(inputs - inputs.mean(0, keepdim=True))

    centered = Centered(*copy.deepcopy(healthy_mlp))
    cases["batch-dependent"] = (centered, (bx + 3.0, by), {})
    # exact statistics, but tiny batches make train mode disagree with eval mode
    exact = bncheck.recalibrate(healthy_mlp, blobs, device="cpu", return_model=True)[1]
    cases["noisy-train-mode"] = (exact, bx, {"batch_size": 4})  # label-free: the gate is disagreement
    cases["noisier-train-mode"] = (exact, bx, {"batch_size": 2})  # deeper inputs move too: moderate drift
    return cases


EXPECTED_CAUSE = {"never-updated": "stats-never-updated", "mismatch": "stats-mismatch",
                  "pixels-0-255": "preprocessing-shift", "batch-dependent": "batch-dependent-eval",
                  "noisy-train-mode": "gap-from-train-mode", "noisier-train-mode": "unexplained-gap"}


def test_every_failing_diagnosis_carries_a_finding(healthy_convnet, healthy_mlp, images, blobs):
    for name, (model, data, options) in failing_cases(healthy_convnet, healthy_mlp, images, blobs).items():
        report = bncheck.diagnose(model, data, device="cpu", **options)
        assert not report.passed, name
        assert EXPECTED_CAUSE[name] in named_causes(report.findings), (name, report.findings)


def test_e2e_exact_statistics_with_tiny_batches_blame_train_mode(healthy_mlp, blobs):
    bx, _ = blobs
    exact = bncheck.recalibrate(healthy_mlp, blobs, device="cpu", return_model=True)[1]
    report = bncheck.diagnose(exact, bx, device="cpu", batch_size=4)
    assert not report.passed and report.gate.metric == "disagreement"
    f = {x.code: x for x in report.findings}["gap-from-train-mode"]
    assert max(l.drift for l in report.layers) < 0.25
    assert f.evidence["fewest_samples_per_channel"] == {"1": 4, "4": 4}
    # near miss: the same model at a realistic batch size passes
    assert bncheck.diagnose(exact, bx, device="cpu", batch_size=64).passed


def test_cli_gap_from_train_mode(tmp_path, healthy_mlp, blobs):
    import json

    from click.testing import CliRunner

    from bncheck.cli import EXIT_FAIL, main

    bx, _ = blobs
    exact = bncheck.recalibrate(healthy_mlp, blobs, device="cpu", return_model=True)[1]
    torch.save(exact, tmp_path / "model.pt")
    torch.save(bx, tmp_path / "inputs.pt")
    result = CliRunner().invoke(main, ["diagnose", str(tmp_path / "model.pt"), "--unsafe-pickle", "--data",
                                       str(tmp_path / "inputs.pt"), "--batch-size", "4", "--format", "json"])
    assert result.exit_code == EXIT_FAIL, result.output
    codes = {f["code"] for f in json.loads(result.stdout)["findings"]}
    assert "gap-from-train-mode" in codes


def test_dropout_before_a_norm_layer_does_not_explain_a_gap_with_exact_statistics():
    exact = layer("bn", drift=0.01, dropout_var_ratio=1.4, batch_samples=8.0)
    found = {x.code: x for x in find_causes(evidence(exact, failed=True))}
    assert found["dropout-variance-shift"].severity is Severity.WARNING
    assert "gap-from-train-mode" in found
