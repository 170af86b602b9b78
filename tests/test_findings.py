"""Root-cause rules: each finding code is triggered by a case built for it, and a near miss is not.

The pure rules are driven with hand-built ``LayerReport`` records; each code is also
checked end-to-end through ``diagnose()`` on a tiny model with the fault built in.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bncheck
from bncheck import findings as rules
from bncheck.findings import Evidence, find_causes
from bncheck.report import (
    Attribution,
    AttributionSummary,
    ChannelStats,
    Gap,
    Gate,
    LayerReport,
    MetricsSet,
    ModeMetrics,
    Severity,
)
from conftest import KeepsInEval, as_batches, inject_drift, make_mlp, norm_modules, train_briefly

ALL_CODES = {
    "stats-never-updated", "stats-not-converged", "stats-mismatch", "frozen-bn-in-train-mode",
    "stats-dominated-by-recent-batches", "small-normalization-batch", "label-sorted-batches",
    "dropout-variance-shift", "batch-dependent-eval", "norm-layer-reused", "stats-corrupt", "rank-stats-differ",
    "update-counter-lost", "preprocessing-shift", "averaged-weights-stale-stats", "gap-from-train-mode",
    "unexplained-gap",
}


def layer(name: str = "bn", **changes) -> LayerReport:
    """A healthy, converged BatchNorm2d layer record; ``changes`` break one thing."""
    base = LayerReport(
        name=name, type="BatchNorm2d", framework="torch", per_instance=False, num_features=4, momentum=0.1, update_weight=0.1,
        eps=1e-5, tracks_running_stats=True, num_batches_tracked=1000, initial_weight=0.9**1000,
        params_frozen=False, training=False, calls_per_forward=1.0, batch_samples=512.0,
        mean_shift_max=0.02, mean_shift_mean=0.01, var_ratio_max=1.02, var_ratio_min=0.98, drift=0.02,
        drift_max=0.03, running_stats_at_init=False, running_stats_corrupt=False, batch_mean_spread=0.05,
        dropout_var_ratio=None)
    return dataclasses.replace(base, **changes)


def channel_stats(mean: float, var: float, run_mean: float, run_var: float, channels: int = 4) -> ChannelStats:
    """Every channel alike: the data's (mean, var) and the running (mean, var)."""
    return ChannelStats((mean,) * channels, (var,) * channels, (var,) * channels, (run_mean,) * channels,
                        (run_var,) * channels)


def blended(weight: float, mean: float = 2.0, var: float = 4.0) -> ChannelStats:
    """What a moving average from 0/1 holds after updates that leave ``weight`` on the initial values."""
    return channel_stats(mean, var, (1 - weight) * mean, weight + (1 - weight) * var)


def evidence(*layers: LayerReport, data: bool = True, failed: bool = False, **changes) -> Evidence:
    if not data:
        return Evidence(layers=layers, **changes)
    eval_acc = 0.5 if failed else 0.95
    metrics = MetricsSet(ModeMetrics(1.2 if failed else 0.2, eval_acc), ModeMetrics(0.2, 0.96), None)
    gap = Gap(0.96 - eval_acc, metrics.eval.loss - 0.2, (metrics.eval.loss - 0.2) / 0.2)
    gate = Gate("accuracy", gap.accuracy, 0.05, gap.accuracy <= 0.05)
    return Evidence(layers=layers, metrics=metrics, gate=gate, **changes)


def attribution(all_fixed_share: float) -> AttributionSummary:
    fixed = Attribution(0.3, 0.9, all_fixed_share)
    return AttributionSummary(("bn",), fixed, fixed, ModeMetrics(1.2, 0.5), ModeMetrics(0.2, 0.96), 4, 28)


def codes(ev: Evidence) -> dict[str, rules.Finding]:
    found = find_causes(ev)
    assert len({f.code for f in found}) == len(found), "a code was reported twice"
    return {f.code: f for f in found}


def test_healthy_evidence_has_no_findings():
    assert codes(evidence(layer("a"), layer("b"))) == {}
    assert codes(evidence(layer("a"), data=False)) == {}


# --------------------------------------------------------------------------- stats-never-updated


def test_never_updated_rule():
    at_init = dict(running_stats_at_init=True, num_batches_tracked=0, initial_weight=1.0, drift=1.4)
    found = codes(evidence(layer("a", **at_init), layer("b"), failed=True))
    f = found["stats-never-updated"]
    assert f.severity is Severity.ERROR and f.layers == ("a",)
    assert f.evidence["worst_layer"] == "a" and f.evidence["layers_with_running_stats"] == 2
    # the same layer is not blamed again as unconverged or mismatched
    assert set(found) == {"stats-never-updated"}


def test_never_updated_near_miss_init_stats_that_happen_to_fit_the_data():
    # running stats at 0/1 but the layer's input really is N(0, 1): nothing wrong in eval mode
    ev = evidence(layer("a", running_stats_at_init=True, num_batches_tracked=0, initial_weight=1.0, drift=0.05))
    assert "stats-never-updated" not in codes(ev)


def test_never_updated_without_data_and_from_a_checkpoint():
    at_init = dict(running_stats_at_init=True, num_batches_tracked=0, initial_weight=1.0, drift=None)
    every = codes(evidence(layer("a", **at_init), layer("b", **at_init), data=False))
    assert every["stats-never-updated"].severity is Severity.ERROR
    some = codes(evidence(layer("a", **at_init), layer("b"), data=False))
    assert some["stats-never-updated"].severity is Severity.WARNING and some["stats-never-updated"].layers == ("a",)
    missing = codes(evidence(layer("a"), layer("b"), missing_running_stats=("b",)))
    f = missing["stats-never-updated"]
    assert f.layers == ("b",) and f.evidence["missing_in_checkpoint"] == ["b"]


# --------------------------------------------------------------------------- stats-not-converged


def test_not_converged_rule_and_near_misses():
    few = dict(num_batches_tracked=3, initial_weight=0.9**3, drift=0.9, channels=blended(0.9**3))
    f = codes(evidence(layer("a", **few), failed=True))["stats-not-converged"]
    assert f.severity is Severity.ERROR and f.layers == ("a",)
    assert f.evidence["num_batches_tracked"] == 3 and f.evidence["judged_by"] == "values"
    # measured from the values: the blend leaves 73% of the way from 0/1 to the data uncovered
    assert f.evidence["initial_weight"] == pytest.approx(0.729, abs=0.03)
    assert f.evidence["counter_initial_weight"] == pytest.approx(0.729)
    assert "measured against the data's statistics" in f.message
    # converged (1000 updates) but drifted: a mismatch, not a convergence problem
    found = codes(evidence(layer("a", drift=0.9, channels=channel_stats(2.0, 4.0, -1.0, 9.0)), failed=True))
    assert "stats-not-converged" not in found and found["stats-mismatch"].layers == ("a",)
    # few updates but accurate statistics: fine
    assert "stats-not-converged" not in codes(evidence(layer("a", num_batches_tracked=3, initial_weight=0.729,
                                                             channels=channel_stats(2.0, 4.0, 2.0, 4.0))))
    # momentum 0 freezes statistics on purpose
    frozen = dict(few, momentum=0.0, update_weight=0.0, initial_weight=1.0)
    assert "stats-not-converged" not in codes(evidence(layer("a", **frozen), failed=True))


def test_not_converged_needs_values_that_fit_the_counter():
    # A small counter beside statistics of other data (exact statistics recomputed by update_bn, then a
    # diagnosis on shifted data) is a mismatch: the counter's 0/1 blend does not explain the drift.
    other_data = dict(num_batches_tracked=8, initial_weight=0.9**8, drift=0.9,
                      channels=channel_stats(2.0, 4.0, -0.5, 1.5))
    found = codes(evidence(layer("a", **other_data), failed=True))
    assert "stats-not-converged" not in found and found["stats-mismatch"].layers == ("a",)
    # data scaled by 255: statistics of the old scale sit near 0/1 in the data's units, but not on the blend
    scaled = dict(other_data, channels=channel_stats(255.0 * 2, 255.0 ** 2 * 4, 2.0, 4.0))
    assert "stats-not-converged" not in codes(evidence(layer("a", **scaled), failed=True))
    # without channel statistics (a layer that never ran) there is nothing to judge with data
    assert "stats-not-converged" not in codes(evidence(layer("a", **dict(other_data, channels=None)), failed=True))


def test_not_converged_cumulative_average():
    cumulative = dict(momentum=None, update_weight=None, initial_weight=0.0, drift=0.9)
    noisy = dict(cumulative, batch_mean_spread=0.9)  # 4 batches miss the mean by ~0.45 sigma
    assert "stats-not-converged" in codes(evidence(layer("a", num_batches_tracked=4, **noisy), failed=True))
    assert "stats-not-converged" not in codes(evidence(layer("a", num_batches_tracked=40, **noisy),
                                                       failed=True))
    # few batches, but batch means agree: the drift is not the average's noise
    assert "stats-not-converged" not in codes(evidence(layer("a", num_batches_tracked=4, **cumulative),
                                                       failed=True))
    # without data the counter alone speaks, as information
    f = codes(evidence(layer("a", num_batches_tracked=4, **cumulative), data=False))["stats-not-converged"]
    assert f.severity is Severity.INFO and "averaged only 4 batches" in f.message


def test_not_converged_without_data_is_the_counter_alone_unless_the_variance_contradicts_it():
    few = dict(num_batches_tracked=3, initial_weight=0.9**3, drift=None, running_var_min=0.9)
    f = codes(evidence(layer("a", **few), data=False))["stats-not-converged"]
    assert f.severity is Severity.INFO and f.evidence["judged_by"] == "counter"
    assert f.message.startswith("By the update counter alone")
    # 3 updates from 1 leave running_var >= 0.729: a variance of 0.2 was recomputed, not averaged from 0/1
    assert "stats-not-converged" not in codes(evidence(layer("a", **dict(few, running_var_min=0.2)), data=False))


def test_counter_lost_is_not_never_updated():
    lost = dict(num_batches_tracked=0, initial_weight=1.0, running_var_min=0.3)
    found = codes(evidence(layer("a", **lost), layer("b"), data=False))
    assert set(found) == {"update-counter-lost"}
    f = found["update-counter-lost"]
    assert f.severity is Severity.INFO and f.layers == ("a",) and "counter was lost" in f.message
    cumulative = codes(evidence(layer("a", **lost, momentum=None, update_weight=None), data=False))
    assert "restarts" in cumulative["update-counter-lost"].message
    # near miss: a counter of 0 beside 0/1 statistics is a layer that never trained
    at_init = dict(lost, running_stats_at_init=True, drift=1.2)
    found = codes(evidence(layer("a", **at_init), failed=True))
    assert "stats-never-updated" in found and "update-counter-lost" not in found


def test_momentum_zero_where_none_was_meant():
    stuck = dict(momentum=0.0, update_weight=0.0, num_batches_tracked=500, initial_weight=1.0,
                 running_stats_at_init=True, drift=1.3)
    f = codes(evidence(layer("a", **stuck), failed=True))["stats-never-updated"]
    assert "momentum=0" in f.message and "momentum=None" in f.message and "500 batches" in f.message
    assert f.evidence["momentum_zero_layers"] == 1 and "momentum=None" in f.fix
    # near miss: statistics frozen with momentum=0 after they were trained are no finding
    frozen = dict(stuck, running_stats_at_init=False, drift=0.05)
    assert codes(evidence(layer("a", **frozen), failed=False)) == {}
    # near miss: never updated with the default momentum reads as a plain never-updated
    plain = codes(evidence(layer("a", **dict(stuck, momentum=0.1, update_weight=0.1, num_batches_tracked=0)),
                           failed=True))["stats-never-updated"]
    assert "momentum=0" not in plain.message


# --------------------------------------------------------------------------- stats-mismatch


def test_mismatch_rule():
    drifted = layer("a", drift=0.8, mean_shift_max=2.5, var_ratio_max=1.3)
    f = codes(evidence(drifted, layer("b"), failed=True))["stats-mismatch"]
    assert f.severity is Severity.ERROR and f.layers == ("a",)
    assert f.evidence == {"worst_layer": "a", "worst_drift": 0.8, "mean_shift_max": 2.5, "var_ratio_max": 1.3}
    # near miss: drifted, but the gap passes and nothing shows the drift costs accuracy
    assert "stats-mismatch" not in codes(evidence(drifted, layer("b")))
    # drift just under the threshold is not drift
    assert "stats-mismatch" not in codes(evidence(layer("a", drift=rules.DRIFT_HIGH), failed=True))
    # gate passes, but exact statistics recover most of the (sub-threshold) gap: a warning
    f = codes(evidence(drifted, attribution=attribution(0.8)))["stats-mismatch"]
    assert f.severity is Severity.WARNING and f.evidence["gap_recovered_by_exact_stats"] == 0.8
    assert "stats-mismatch" not in codes(evidence(drifted, attribution=attribution(0.2)))


# --------------------------------------------------------------------------- frozen-bn-in-train-mode


def test_frozen_in_train_mode_rule():
    frozen = dict(params_frozen=True, batch_stats_in_train=True, drift=1.0)
    found = codes(evidence(layer("a", **frozen), failed=True))
    assert found["frozen-bn-in-train-mode"].layers == ("a",)
    assert found["frozen-bn-in-train-mode"].severity is Severity.ERROR
    assert "stats-mismatch" not in found  # explained already
    # near misses: kept in eval by model.train(); trainable; or frozen and training but with fitting statistics
    assert "frozen-bn-in-train-mode" not in codes(evidence(layer("a", **dict(frozen, batch_stats_in_train=False)),
                                                           failed=True))
    assert "frozen-bn-in-train-mode" not in codes(evidence(layer("a", **dict(frozen, params_frozen=False)),
                                                           failed=True))
    assert "frozen-bn-in-train-mode" not in codes(evidence(layer("a", **dict(frozen, drift=0.1))))
    assert codes(evidence(layer("a", params_frozen=True, batch_stats_in_train=True), data=False))[
        "frozen-bn-in-train-mode"].severity is Severity.WARNING


# --------------------------------------------------------------------------- stats-dominated-by-recent-batches


def test_dominated_by_recent_batches_rule():
    ported = layer("a", momentum=0.9, update_weight=0.9, initial_weight=0.0)
    f = codes(evidence(ported))["stats-dominated-by-recent-batches"]
    assert f.severity is Severity.INFO  # not drifted on this data: a note
    assert f.evidence["effective_batches"] == pytest.approx(1.11, abs=0.01)
    f = codes(evidence(dataclasses.replace(ported, drift=1.0), failed=True))["stats-dominated-by-recent-batches"]
    assert f.severity is Severity.ERROR
    assert codes(evidence(ported, data=False))["stats-dominated-by-recent-batches"].severity is Severity.WARNING
    noisy = layer("a", momentum=0.3, update_weight=0.3, drift=0.8, batch_mean_spread=0.9)
    assert "stats-dominated-by-recent-batches" in codes(evidence(noisy, failed=True))
    # near misses: default momentum; or a high momentum whose batches agree with each other
    assert "stats-dominated-by-recent-batches" not in codes(evidence(layer("a", drift=0.8), failed=True))
    calm = dataclasses.replace(noisy, batch_mean_spread=0.2)
    assert "stats-dominated-by-recent-batches" not in codes(evidence(calm, failed=True))


# --------------------------------------------------------------------------- small-normalization-batch


def test_small_batch_rule():
    f = codes(evidence(layer("a", batch_samples=8.0, batch_mean_spread=0.4)))["small-normalization-batch"]
    assert f.severity is Severity.INFO and f.evidence["samples_per_batch"] == 8.0
    assert "small-normalization-batch" not in codes(evidence(layer("a", batch_samples=16.0)))
    assert "small-normalization-batch" not in codes(evidence(layer("a", batch_samples=8.0, type="InstanceNorm2d", per_instance=True)))
    assert "small-normalization-batch" not in codes(evidence(layer("a", batch_samples=8.0), data=False))
    # the gap fails and exact statistics would not close it: the small batch is the problem
    persists = codes(evidence(layer("a", batch_samples=8.0), failed=True, attribution=attribution(0.1)))
    assert persists["small-normalization-batch"].severity is Severity.ERROR


# --------------------------------------------------------------------------- label-sorted-batches


def test_label_sorted_rule():
    f = codes(evidence(layer(), reshuffled=False, mean_majority_share=0.97, num_classes_seen=3))
    assert f["label-sorted-batches"].severity is Severity.WARNING
    assert f["label-sorted-batches"].evidence == {"mean_majority_share": 0.97, "num_classes": 3}
    for near_miss in (dict(reshuffled=True, mean_majority_share=1.0, num_classes_seen=3),
                      dict(reshuffled=False, mean_majority_share=0.6, num_classes_seen=3),
                      dict(reshuffled=False, mean_majority_share=1.0, num_classes_seen=1),
                      dict(reshuffled=False, mean_majority_share=None, num_classes_seen=None)):
        assert "label-sorted-batches" not in codes(evidence(layer(), **near_miss))


# --------------------------------------------------------------------------- dropout / batch-dependent / reused


def test_dropout_shift_rule():
    f = codes(evidence(layer("a", dropout_var_ratio=1.4), layer("b", dropout_var_ratio=1.0)))
    assert f["dropout-variance-shift"].layers == ("a",)
    assert f["dropout-variance-shift"].severity is Severity.INFO
    assert codes(evidence(layer("a", dropout_var_ratio=1.4), failed=True))[
        "dropout-variance-shift"].severity is Severity.WARNING
    assert "dropout-variance-shift" not in codes(evidence(layer("a", dropout_var_ratio=1.05)))


def test_batch_dependent_and_reused_rules():
    untracked = layer("a", tracks_running_stats=False, drift=None, mean_shift_max=None)
    f = codes(evidence(untracked, layer("b")))["batch-dependent-eval"]
    assert f.layers == ("a",) and f.severity is Severity.WARNING
    assert "batch-dependent-eval" not in codes(evidence(layer("b")))
    f = codes(evidence(layer("a", calls_per_forward=2.0), layer("b")))["norm-layer-reused"]
    assert f.layers == ("a",) and f.evidence == {"calls_per_forward": 2.0}
    assert "norm-layer-reused" not in codes(evidence(layer("a", calls_per_forward=1.0)))


def test_errors_come_first():
    ev = evidence(layer("a", calls_per_forward=2.0), layer("b", drift=2.0), layer("c", batch_samples=4.0),
                  failed=True)
    severities = [f.severity for f in find_causes(ev)]
    assert severities == sorted(severities, key=[Severity.ERROR, Severity.WARNING, Severity.INFO].index)
    assert severities[0] is Severity.ERROR


# =========================================================================== end to end


def diagnose(model, data, **options):
    return bncheck.diagnose(model, data, device="cpu", **options)


def found(report) -> dict:
    return {f.code: f for f in report.findings}


def test_healthy_trained_models_pass_without_error_findings(healthy_convnet, images, healthy_mlp,
                                                            healthy_dropout_mlp, blobs):
    for model, data in ((healthy_convnet, images), (healthy_mlp, blobs), (healthy_dropout_mlp, blobs)):
        report = diagnose(model, data)
        assert report.verdict is bncheck.Verdict.PASS
        assert report.gate.passed and report.gate.value <= 0.05
        assert not [f for f in report.findings if f.severity is Severity.ERROR]
        assert all(l.drift < rules.DRIFT_HIGH for l in report.layers)


def test_e2e_never_updated(healthy_convnet, images):
    for _, bn in norm_modules(healthy_convnet):
        bn.reset_running_stats()  # like a checkpoint saved from named_parameters()
    report = diagnose(healthy_convnet, images)
    f = found(report)["stats-never-updated"]
    # The gate failed, so every init-valued layer with noticeable drift is named.
    drifted = {l.name for l in report.layers if l.drift > rules.DRIFT_NOTICEABLE}
    assert f.severity is Severity.ERROR and set(f.layers) == drifted and {"bn2", "bn3"} <= drifted
    assert report.verdict is bncheck.Verdict.FAIL
    # near miss: a fresh BN layer reading data that already is N(0, 1)
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(0))
    fresh = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 3))
    assert "stats-never-updated" not in found(diagnose(fresh, (x, torch.zeros(128, dtype=torch.long))))


def test_e2e_not_converged(healthy_convnet, images):
    x, _ = images
    for _, bn in norm_modules(healthy_convnet):
        bn.reset_running_stats()
    healthy_convnet.train()
    with torch.no_grad():
        for xb in x[:96].split(32):  # only three updates with momentum 0.1
            healthy_convnet(xb)
    report = diagnose(healthy_convnet, images)
    f = found(report)["stats-not-converged"]
    assert f.severity is Severity.ERROR and f.evidence["num_batches_tracked"] == 3
    assert "stats-never-updated" not in found(report)


def test_e2e_mismatch(healthy_convnet, images):
    inject_drift(healthy_convnet.bn2, 3.0)
    report = diagnose(healthy_convnet, images)
    assert found(report)["stats-mismatch"].layers == ("bn2",)
    assert set(found(report)) == {"stats-mismatch"}


def test_e2e_frozen_bn_in_train_mode(healthy_convnet, images):
    for p in healthy_convnet.bn2.parameters():
        p.requires_grad_(False)
    inject_drift(healthy_convnet.bn2, 2.0)  # statistics of the pre-training data
    healthy_convnet.eval()  # the mode it is handed over in does not matter: model.train() decides
    f = found(diagnose(healthy_convnet, images))
    assert f["frozen-bn-in-train-mode"].layers == ("bn2",)
    assert "stats-mismatch" not in f
    # near miss: model.train() keeps the frozen layer in eval, so training used those statistics too,
    # and the layers after it settled on what it gives them
    model = KeepsInEval(healthy_convnet, "bn2").train()
    with torch.no_grad():
        for _ in range(12):
            for xb in images[0].split(32):
                model(xb)
    report = diagnose(model, images)
    bn2 = next(l for l in report.layers if l.name == "net.bn2")
    assert not bn2.batch_stats_in_train and bn2.drift > 1.0  # the drift is still reported ...
    assert report.passed and not report.findings  # ... but training saw the same statistics: no finding


def test_e2e_momentum_ported_from_keras(blobs, healthy_mlp):
    x, y = blobs
    model = make_mlp()
    for _, bn in norm_modules(model):
        bn.momentum = 0.9
    train_briefly(model, x, y, steps=60, settle=5)
    f = found(diagnose(model, blobs))["stats-dominated-by-recent-batches"]
    assert set(f.layers) == {"1", "4"} and f.evidence["update_weight"] == 0.9
    assert "stats-dominated-by-recent-batches" not in found(diagnose(healthy_mlp, blobs))


def test_e2e_small_batches(healthy_mlp, blobs):
    f = found(diagnose(healthy_mlp, blobs, batch_size=8))["small-normalization-batch"]
    assert set(f.layers) == {"1", "4"} and f.evidence["samples_per_batch"] == 8
    assert "small-normalization-batch" not in found(diagnose(healthy_mlp, blobs, batch_size=16))


def test_e2e_label_sorted_batches(healthy_mlp, blobs):
    x, y = blobs
    single_class = [(x[y == c][i:i + 16], y[y == c][i:i + 16]) for c in range(3)
                    for i in range(0, int((y == c).sum()) - 1, 16)]
    report = diagnose(healthy_mlp, single_class)
    assert report.data.mean_majority_share == 1.0 and report.data.num_classes_seen == 3
    assert found(report)["label-sorted-batches"].severity is Severity.WARNING
    shuffled = as_batches(x, y, 16)  # the same data, mixed batches, also as given
    report = diagnose(healthy_mlp, shuffled)
    assert report.data.mean_majority_share < 0.7
    assert "label-sorted-batches" not in found(report)
    # a Dataset is reshuffled by bncheck: never label-sorted, even when stored sorted
    order = y.argsort()
    assert "label-sorted-batches" not in found(diagnose(healthy_mlp, (x[order], y[order]), batch_size=16))


def test_e2e_dropout_before_bn_shifts_its_variance(healthy_dropout_mlp, blobs):
    report = diagnose(healthy_dropout_mlp, blobs)
    f = found(report)["dropout-variance-shift"]
    assert f.layers == ("5",)  # the BatchNorm1d after Dropout; not the first one
    bn = next(l for l in report.layers if l.name == "5")
    assert bn.dropout_var_ratio > 1 + rules.DROPOUT_VAR_SHIFT
    assert next(l for l in report.layers if l.name == "1").dropout_var_ratio == pytest.approx(1.0, abs=1e-12)


def test_e2e_dropout_after_the_last_bn_does_not_trigger(blobs):
    x, y = blobs
    model = train_briefly(make_mlp("after_last_bn", p=0.5), x, y, steps=60)
    report = diagnose(model, blobs)
    assert report.metrics.train_with_dropout is not None
    assert "dropout-variance-shift" not in found(report)
    assert all(l.dropout_var_ratio == pytest.approx(1.0, abs=1e-12) for l in report.layers)


def test_e2e_batch_dependent_eval(healthy_mlp, blobs):
    healthy_mlp[4] = nn.BatchNorm1d(16, track_running_stats=False)
    f = found(diagnose(healthy_mlp, blobs))["batch-dependent-eval"]
    assert f.layers == ("4",) and f.evidence == {"layers": 1}


class SharedBN(nn.Module):
    def __init__(self, shared: bool):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.bn = nn.BatchNorm1d(8)
        self.bn_b = self.bn if shared else nn.BatchNorm1d(8)

    def forward(self, x):
        h = F.relu(self.bn(self.fc1(x)))
        return self.head(F.relu(self.bn_b(self.fc2(h))))


def test_e2e_norm_layer_reused(blobs):
    x, y = blobs
    shared = train_briefly(SharedBN(shared=True), x, y, steps=40)
    report = diagnose(shared, blobs)
    assert [l.name for l in report.layers] == ["bn"]  # one module, listed once
    assert report.layers[0].calls_per_forward == 2.0
    assert found(report)["norm-layer-reused"].layers == ("bn",)
    separate = train_briefly(SharedBN(shared=False), x, y, steps=40)
    report = diagnose(separate, blobs)
    assert {l.calls_per_forward for l in report.layers} == {1.0}
    assert "norm-layer-reused" not in found(report)


def test_rank_stats_differ_rule():
    spread = {"bn2": 0.8, "bn1": 0.02}
    f = codes(evidence(layer("bn1"), layer("bn2"), rank_spread=spread))["rank-stats-differ"]
    assert f.layers == ("bn2", "bn1") and f.evidence["worst_layer"] == "bn2" and f.severity is Severity.WARNING
    assert "broadcast_buffers=True" in f.fix
    assert "rank-stats-differ" not in codes(evidence(layer("bn1"), rank_spread={}))


def test_every_code_is_covered_here():
    import inspect
    import re

    source = inspect.getsource(rules)
    assert set(re.findall(r'Finding\("([a-z-]+)"', source)) == ALL_CODES


@pytest.mark.parametrize("damage", ["nan_mean", "negative_var"])
def test_e2e_corrupt_stats_are_diagnosed_and_recalibrated(healthy_convnet, images, damage):
    bn = dict(norm_modules(healthy_convnet))["bn2"]
    with torch.no_grad():
        if damage == "nan_mean":
            bn.running_mean[0] = float("nan")
        else:
            bn.running_var[:2] = -1.0
    report = diagnose(healthy_convnet, images)
    f = found(report)["stats-corrupt"]
    assert f.severity is Severity.ERROR and f.layers == ("bn2",)
    assert report.layers[0].name == "bn2" and report.layers[0].running_stats_corrupt
    assert "stats-corrupt" in {x.code for x in bncheck.inspect(healthy_convnet).findings}
    result, fixed = bncheck.recalibrate(healthy_convnet, images, device="cpu", return_model=True)
    assert "bn2" in result.updated_layers
    after = diagnose(fixed, images)
    assert "stats-corrupt" not in found(after) and after.verdict is bncheck.Verdict.PASS
    # near miss: a healthy model has none
    assert "stats-corrupt" not in found(diagnose(fixed, images))
