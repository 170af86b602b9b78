"""The diagnosis engine: no mutation, layer coverage, exact statistics, metrics, tasks, batching."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bncheck
from bncheck.errors import BncheckError, DataError, ForwardError, InputError, NoNormLayersError, NonFiniteError, \
    ShapeMismatchError
from conftest import (
    as_batches,
    assert_state_equal,
    assert_stats_close,
    blob_data,
    channel_moments,
    collect_norm_inputs,
    inject_drift,
    layer_named,
    make_mlp,
    norm_modules,
    set_norm_train,
    state_copy,
    train_briefly,
)


def diagnose(model, data, **options):
    return bncheck.diagnose(model, data, device="cpu", **options)


# --------------------------------------------------------------------------- no mutation


def model_state(model: nn.Module):
    return {
        "state": state_copy(model),
        "training": [m.training for m in model.modules()],
        "momenta": [m.momentum for _, m in norm_modules(model)],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_untouched(model: nn.Module, before) -> None:
    assert_state_equal(model, before["state"])
    assert [m.training for m in model.modules()] == before["training"]
    momenta = [m.momentum for _, m in norm_modules(model)]
    assert momenta == before["momenta"]
    assert [type(m) for m in momenta] == [type(m) for m in before["momenta"]]  # None stays None, not 0.0
    assert [p.requires_grad for p in model.parameters()] == before["requires_grad"]
    assert all(not m._forward_pre_hooks for m in model.modules()), "a hook was left behind"


def mixed_model(blobs) -> nn.Sequential:
    """momentum=None, a layer without running stats, Dropout before a BN, a custom momentum."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16, momentum=None), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(16, 16), nn.BatchNorm1d(16, track_running_stats=False), nn.ReLU(),
        nn.Linear(16, 16), nn.BatchNorm1d(16, momentum=0.03), nn.ReLU(), nn.Linear(16, 3))
    x, y = blobs
    return train_briefly(model, x, y, steps=30, settle=5)


@pytest.fixture(params=["convnet", "mixed"])
def any_model(request, healthy_convnet, blobs, images):
    if request.param == "convnet":
        return healthy_convnet, images
    return mixed_model(blobs), blobs


@pytest.mark.parametrize("hand_over", ["train", "eval", "eval_but_one_bn_train"])
@pytest.mark.parametrize("attribute", [False, True])
def test_diagnose_leaves_the_model_bit_identical(any_model, hand_over, attribute):
    model, data = any_model
    model.train(hand_over == "train")
    if hand_over == "eval_but_one_bn_train":
        norm_modules(model)[0][1].train()
    inject_drift(norm_modules(model)[0][1], 1.0)  # some gap, so attribution has work to do
    before = model_state(model)
    report = diagnose(model, data, batch_size=32, attribute=attribute)
    assert report.data.num_batches > 1
    assert_untouched(model, before)


class FailsMidway(nn.Module):
    """Raises (or returns NaN) on its ``fail_at``-th forward call, after ``bn1`` has run."""

    def __init__(self, fail_at: int, how: str = "raise"):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(8, 16), nn.BatchNorm1d(16, momentum=None)
        self.fc2, self.bn2 = nn.Linear(16, 3), nn.BatchNorm1d(3)
        self.drop = nn.Dropout(0.1)
        self.fail_at, self.how, self.calls = fail_at, how, 0

    def forward(self, x):
        self.calls += 1
        h = F.relu(self.bn1(self.fc1(x)))
        if self.calls == self.fail_at:
            if self.how == "raise":
                raise RuntimeError("boom in the user's forward")
            if self.how == "shape":
                raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x5 and 16x3)")
            if self.how == "keyerror":
                raise KeyError("missing")
            return torch.full((x.shape[0], 3), float("nan"))
        return self.bn2(self.fc2(self.drop(h)))


@pytest.mark.parametrize("hand_over", ["train", "eval"])
@pytest.mark.parametrize(
    "fail_at, how, error",
    [
        (4, "raise", ForwardError),         # 2nd batch, eval-mode forward (3 forwards per dropout batch)
        (5, "raise", ForwardError),         # 2nd batch, train-mode forward, after bn1 ran in train mode
        (6, "shape", ShapeMismatchError),   # 2nd batch, full train mode
        (5, "nan", NonFiniteError),
        (5, "keyerror", (KeyError, BncheckError)),  # not translated today; state must still come back
    ],
)
def test_state_is_restored_when_the_forward_fails_midway(blobs, hand_over, fail_at, how, error):
    x, y = blobs
    model = FailsMidway(fail_at=10**9)
    train_briefly(model, x, y, steps=10, settle=3)
    model.fail_at, model.how, model.calls = fail_at, how, 0
    model.train(hand_over == "train")
    before = model_state(model)
    with pytest.raises(error) as info:
        diagnose(model, as_batches(x, y, 16), dropout_batches=2)
    if isinstance(info.value, BncheckError) and how != "nan":
        assert "batch 1" in str(info.value)
    assert model.calls == fail_at  # it really failed on the 2nd batch, not before
    assert_untouched(model, before)


def test_diagnose_does_not_move_the_model_or_change_requires_grad(healthy_mlp, blobs):
    for p in healthy_mlp[1].parameters():
        p.requires_grad_(False)
    before = model_state(healthy_mlp)
    diagnose(healthy_mlp, blobs)
    assert_untouched(healthy_mlp, before)
    assert all(p.device.type == "cpu" for p in healthy_mlp.parameters())


# --------------------------------------------------------------------------- layer coverage


class MeanHead(nn.Module):
    """Averages every non-channel position, then a linear classifier."""

    def __init__(self, channels: int = 4, classes: int = 3):
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(x.flatten(2).mean(2) if x.dim() > 2 else x)


class BNAct2d(nn.BatchNorm2d):
    """A subclass in the style of timm's BatchNormAct2d."""

    def forward(self, x):
        return F.relu(super().forward(x))


LAYER_CASES = {
    "BatchNorm1d-2d": (lambda: nn.BatchNorm1d(4), (4,), "BatchNorm1d"),
    "BatchNorm1d-3d": (lambda: nn.BatchNorm1d(4), (4, 6), "BatchNorm1d"),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(4), (4, 5, 5), "BatchNorm2d"),
    "BatchNorm3d": (lambda: nn.BatchNorm3d(4), (4, 3, 3, 3), "BatchNorm3d"),
    "SyncBatchNorm": (lambda: nn.SyncBatchNorm(4), (4, 5, 5), "SyncBatchNorm"),
    "LazyBatchNorm2d": (lambda: nn.LazyBatchNorm2d(), (4, 5, 5), "BatchNorm2d"),  # becomes BatchNorm2d
    "momentum-None": (lambda: nn.BatchNorm2d(4, momentum=None), (4, 5, 5), "BatchNorm2d"),
    "subclass": (lambda: BNAct2d(4), (4, 5, 5), "BNAct2d"),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_each_layer_type_is_measured_exactly(case):
    make_norm, shape, type_name = LAYER_CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, *shape, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(4, *[1] * (len(shape) - 1)) + 2
    y = torch.randint(0, 3, (48,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(make_norm(), MeanHead())
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x[:16])  # a few real updates (also initialises the lazy layer)
    norm = model[0]
    mean, var, var_unbiased = channel_moments(x)
    # Known running statistics: shifted by (0, .5, 1, 2) true std, variance scaled by (1, 2, .5, 1).
    with torch.no_grad():
        norm.running_mean.copy_(mean + torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64) * var_unbiased.sqrt())
        norm.running_var.copy_(var_unbiased * torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64))
    before = model_state(model)

    report = diagnose(model, (x, y), batch_size=16)

    assert_untouched(model, before)
    layer = report.layers[0]
    assert (layer.name, layer.type, layer.num_features, layer.tracks_running_stats) == ("0", type_name, 4, True)
    assert layer.momentum == norm.momentum
    assert layer.num_batches_tracked == 3
    assert layer.calls_per_forward == 1.0
    assert layer.batch_samples == 16 * math.prod(shape[1:])
    ch = layer.channels
    assert_stats_close(ch.true_mean, mean, var.sqrt())
    assert_stats_close(ch.true_var, var)
    assert_stats_close(ch.true_var_unbiased, var_unbiased)
    assert torch.equal(torch.tensor(ch.running_mean, dtype=torch.float64), norm.running_mean.double())
    assert torch.equal(torch.tensor(ch.running_var, dtype=torch.float64), norm.running_var.double())
    # Independent drift against what exact statistics would store (PyTorch: the unbiased variance):
    # shift in true std units, variance ratio, and their W2 combination.
    rm, rv = norm.running_mean.double(), norm.running_var.double()
    shift = (rm - mean).abs() / (var_unbiased + norm.eps).sqrt()
    ratio = (rv + norm.eps) / (var_unbiased + norm.eps)
    drift = (shift**2 + (ratio.sqrt() - 1) ** 2).sqrt()
    assert layer.mean_shift_max == pytest.approx(float(shift.max()), rel=1e-6)
    assert layer.mean_shift_max == pytest.approx(2.0, rel=1e-3)
    assert layer.mean_shift_mean == pytest.approx(float(shift.mean()), rel=1e-6)
    assert layer.var_ratio_max == pytest.approx(float(ratio.max()), rel=1e-6)
    assert layer.var_ratio_min == pytest.approx(float(ratio.min()), rel=1e-6)
    assert layer.drift == pytest.approx(float(drift.mean()), rel=1e-6)
    assert layer.drift_max == pytest.approx(float(drift.max()), rel=1e-6)


def test_momentum_none_layer_reports_cumulative_average(blobs):
    x, y = blobs
    model = make_mlp()
    model[1].momentum = None
    train_briefly(model, x, y, steps=20, settle=0)
    report = diagnose(model, blobs)
    layer = layer_named(report, "1")
    assert layer.momentum is None and layer.update_weight is None
    assert layer.num_batches_tracked == 20
    assert layer.initial_weight == 0.0
    assert model[1].momentum is None


def test_lazy_layer_before_its_first_forward_is_an_input_error(blobs):
    model = nn.Sequential(nn.LazyBatchNorm1d(), nn.Linear(8, 3))
    with pytest.raises(InputError, match="lazy norm layer 0 is not initialised"):
        diagnose(model, blobs)


def test_instancenorm_with_running_stats_is_compared_with_per_instance_statistics():
    g = torch.Generator().manual_seed(0)
    # each instance has its own offset: pooled variance >> per-instance variance
    x = torch.randn(48, 4, 5, 5, generator=g) + 4 * torch.randn(48, 4, 1, 1, generator=g) + 1.0
    y = torch.randint(0, 3, (48,), generator=g)
    model = nn.Sequential(nn.InstanceNorm2d(4, affine=True, track_running_stats=True, momentum=1.0), MeanHead())
    model.train()
    with torch.no_grad():
        model(x)  # momentum 1: running stats become this batch's per-instance averages
    norm = model[0]
    xd = x.double()
    inst_var = xd.var(dim=(2, 3), unbiased=False).mean(0)
    inst_var_unbiased = xd.var(dim=(2, 3), unbiased=True).mean(0)
    torch.testing.assert_close(norm.running_var.double(), inst_var_unbiased, rtol=1e-5, atol=1e-6)

    report = diagnose(model, (x, y), batch_size=16)
    layer = report.layers[0]
    ch = layer.channels
    assert layer.type == "InstanceNorm2d"
    torch.testing.assert_close(torch.tensor(ch.true_mean, dtype=torch.float64), xd.mean(dim=(0, 2, 3)),
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.tensor(ch.true_var, dtype=torch.float64), inst_var, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.tensor(ch.true_var_unbiased, dtype=torch.float64), inst_var_unbiased,
                               rtol=1e-9, atol=1e-9)
    assert channel_moments(x)[1].min() > 3 * max(ch.true_var)  # not the pooled variance
    # Running stats hold exactly the per-instance averages (unbiased variances, as PyTorch
    # stores them), and drift compares like with like: no drift floor.
    assert layer.mean_shift_max < 1e-5
    assert layer.drift < 1e-6
    assert layer.batch_mean_spread is None
    # PyTorch's InstanceNorm never counts its updates: not a never-updated layer.
    assert layer.num_batches_tracked is None
    assert "stats-never-updated" not in {f.code for f in report.findings}
    assert "stats-never-updated" not in {f.code for f in bncheck.inspect(model).findings}


def test_layer_without_running_stats_is_reported_without_drift(images):
    x, y = images
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4, track_running_stats=False), MeanHead())
    train_briefly(model, x, y, steps=20)
    before = model_state(model)
    report = diagnose(model, images)
    assert_untouched(model, before)
    assert [l.name for l in report.layers] == ["1", "4"]  # no drift sorts last
    tracked, untracked = report.layers
    assert tracked.drift is not None and tracked.tracks_running_stats
    assert untracked.drift is None and untracked.channels is None and not untracked.tracks_running_stats
    assert untracked.calls_per_forward == 1.0  # its input was still measured
    finding = next(f for f in report.findings if f.code == "batch-dependent-eval")
    assert finding.layers == ("4",)


# --------------------------------------------------------------------------- injected drift


def test_injected_mean_shift_is_reported_exactly_on_that_layer(healthy_convnet, images):
    x, y = images
    batches = as_batches(x, y, 32)
    healthy = diagnose(healthy_convnet, batches)
    inject_drift(healthy_convnet.bn2, 3.0)

    report = diagnose(healthy_convnet, batches)

    assert report.layers[0].name == "bn2"
    assert report.verdict is bncheck.Verdict.FAIL
    bn2 = report.layers[0]
    inputs = collect_norm_inputs(healthy_convnet, batches)["bn2"]
    mean, var, var_unbiased = channel_moments(inputs)
    eps = healthy_convnet.bn2.eps
    shift = (healthy_convnet.bn2.running_mean.double() - mean).abs() / (var_unbiased + eps).sqrt()
    assert_stats_close(bn2.channels.true_mean, mean, var.sqrt())
    assert_stats_close(bn2.channels.true_var, var)
    assert bn2.mean_shift_max == pytest.approx(float(shift.max()), rel=1e-6)
    assert bn2.mean_shift_mean == pytest.approx(float(shift.mean()), rel=1e-6)
    # ... which is 3 / sqrt(var + eps) per channel, up to the healthy model's own small drift.
    torch.testing.assert_close(shift, 3.0 / (var_unbiased + eps).sqrt(), rtol=0, atol=0.02)
    # Train mode ignores running statistics: every layer's true statistics are unchanged,
    # and the untouched layers' drift is exactly what it was.
    for name in ("bn1", "bn3"):
        assert layer_named(report, name) == layer_named(healthy, name)
    assert layer_named(report, "bn2").channels.true_mean == layer_named(healthy, "bn2").channels.true_mean
    assert report.metrics.train == healthy.metrics.train


# --------------------------------------------------------------------------- metrics


def manual_metrics(model, batches, mode):
    clone = copy.deepcopy(model)
    if mode == "train":
        set_norm_train(clone)
    else:
        clone.eval()
    loss = correct = count = 0.0
    with torch.no_grad():
        for xb, yb in batches:
            out = clone(xb)
            loss += float(F.cross_entropy(out, yb, reduction="sum"))
            correct += float((out.argmax(1) == yb).sum())
            count += len(yb)
    return loss / count, correct / count


def test_train_and_eval_metrics_equal_manual_computation(healthy_convnet, images):
    inject_drift(healthy_convnet.bn2, 2.0)
    x, y = images
    batches = as_batches(x, y, 32)
    report = diagnose(healthy_convnet, batches)
    train_loss, train_acc = manual_metrics(healthy_convnet, batches, "train")
    eval_loss, eval_acc = manual_metrics(healthy_convnet, batches, "eval")
    assert report.metrics.train.loss == pytest.approx(train_loss, rel=1e-6)
    assert report.metrics.train.accuracy == pytest.approx(train_acc, abs=1e-12)
    assert report.metrics.eval.loss == pytest.approx(eval_loss, rel=1e-6)
    assert report.metrics.eval.accuracy == pytest.approx(eval_acc, abs=1e-12)
    assert eval_acc < train_acc  # the injected fault makes the comparison non-trivial
    assert report.gap.accuracy == pytest.approx(train_acc - eval_acc, abs=1e-12)
    assert report.gap.loss == pytest.approx(eval_loss - train_loss, rel=1e-6)
    assert report.gap.relative_loss == pytest.approx((eval_loss - train_loss) / train_loss, rel=1e-5)
    assert report.gate.metric == "accuracy" and report.gate.value == report.gap.accuracy
    assert report.data.num_samples == len(x) and report.data.num_batches == len(batches)
    assert report.data.reshuffled is False


def test_dropout_model_reports_full_train_mode_separately(healthy_dropout_mlp, blobs):
    x, y = blobs
    batches = as_batches(x, y, 32)
    report = diagnose(healthy_dropout_mlp, batches)
    twd = report.metrics.train_with_dropout
    assert twd is not None and twd.loss is not None
    assert twd.loss != pytest.approx(report.metrics.train.loss, rel=1e-3)
    # train (norm layers only) really ran with dropout off
    train_loss, train_acc = manual_metrics(healthy_dropout_mlp, batches, "train")
    assert report.metrics.train.loss == pytest.approx(train_loss, rel=1e-6)
    assert report.metrics.train.accuracy == pytest.approx(train_acc, abs=1e-12)


def test_model_without_dropout_has_no_train_with_dropout_metrics(healthy_mlp, blobs):
    report = diagnose(healthy_mlp, blobs)
    assert report.metrics.train_with_dropout is None
    assert all(l.dropout_var_ratio is None for l in report.layers)


def test_dropout_with_p_zero_does_not_count(healthy_mlp, blobs):
    model = nn.Sequential(*healthy_mlp[:3], nn.Dropout(0.0), *healthy_mlp[3:])
    assert diagnose(model, blobs).metrics.train_with_dropout is None


# --------------------------------------------------------------------------- tasks


@pytest.fixture(scope="module")
def regression_setup():
    x, _ = blob_data(seed=3)
    target = (x[:, :3].sum(1, keepdim=True) * 0.5 + 1.0)
    model = make_mlp(classes=1, seed=3)
    train_briefly(model, x, target, steps=150, loss_fn=F.mse_loss)
    return model, x, target


def test_regression_has_no_accuracy_and_a_relative_loss_gate(regression_setup):
    model, x, target = regression_setup
    model = copy.deepcopy(model)
    batches = as_batches(x, target, 32)
    report = diagnose(model, batches)
    assert report.task == "regression"
    assert report.metrics.eval.accuracy is None and report.metrics.train.accuracy is None
    assert report.gap.accuracy is None
    assert report.gate.metric == "relative_loss" and report.gate.threshold == pytest.approx(0.10)
    clone = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = sum(float(F.mse_loss(clone(xb), tb, reduction="sum")) for xb, tb in batches) / target.numel()
    assert report.metrics.eval.loss == pytest.approx(expected, rel=1e-6)
    assert report.gate.value == pytest.approx(report.gap.relative_loss)
    assert report.verdict is bncheck.Verdict.PASS

    # (N,) float targets with an (N, 1) output are the same regression.
    flat = diagnose(model, as_batches(x, target[:, 0], 32))
    assert flat.task == "regression" and flat.metrics == report.metrics

    inject_drift(model[4], 3.0)
    broken = diagnose(model, batches)
    assert broken.gate.value > 0.10 and broken.verdict is bncheck.Verdict.FAIL
    assert broken.gate.value > 1  # eval loss over twice the train-mode loss
    assert diagnose(model, batches, max_gap=1.0).verdict is bncheck.Verdict.FAIL  # the loosest threshold


def test_one_hot_targets_score_like_class_indices(healthy_mlp, blobs):
    x, y = blobs
    inject_drift(healthy_mlp[4], 1.5)
    by_index = diagnose(healthy_mlp, (x, y))
    by_one_hot = diagnose(healthy_mlp, (x, F.one_hot(y, 3).float()))
    assert by_one_hot.task == by_index.task == "classification"
    assert by_one_hot.metrics.eval.accuracy == by_index.metrics.eval.accuracy
    assert by_one_hot.metrics.train.accuracy == by_index.metrics.train.accuracy
    assert by_one_hot.metrics.eval.loss == pytest.approx(by_index.metrics.eval.loss, rel=1e-6)
    assert by_one_hot.gate == by_index.gate


def test_label_free_data_reports_agreement_and_gates_on_disagreement(healthy_convnet, images):
    x, _ = images
    inject_drift(healthy_convnet.bn2, 3.0)
    report = diagnose(healthy_convnet, as_batches(x, None, 32))
    assert report.task == "label-free"
    assert report.metrics.eval.loss is None and report.metrics.eval.accuracy is None
    # the share of samples whose predicted class agrees, computed independently
    agree = 0.0
    clone_train = set_norm_train(copy.deepcopy(healthy_convnet))
    clone_eval = copy.deepcopy(healthy_convnet).eval()
    with torch.no_grad():
        for xb in x.split(32):
            agree += float((clone_train(xb).argmax(1) == clone_eval(xb).argmax(1)).sum())
    assert report.agreement == pytest.approx(agree / len(x), abs=1e-12)
    assert report.gate.metric == "disagreement"
    assert report.gate.value == pytest.approx(1 - report.agreement, abs=1e-12)
    assert 0.0 < report.agreement < 0.95 and report.verdict is bncheck.Verdict.FAIL


def test_label_free_healthy_model_passes(healthy_convnet, images):
    report = diagnose(healthy_convnet, images[0])  # a bare tensor is an unlabelled dataset
    assert report.task == "label-free" and report.gate.metric == "disagreement"
    assert report.agreement > 0.95 and report.verdict is bncheck.Verdict.PASS


def test_custom_loss_fn_is_used(healthy_mlp, blobs):
    inject_drift(healthy_mlp[1], 1.0)
    plain = diagnose(healthy_mlp, blobs)
    custom = diagnose(healthy_mlp, blobs, loss_fn=lambda out, target: 2.0 * F.cross_entropy(out, target))
    assert plain.task == "classification" and custom.task == "custom"
    assert custom.metrics.eval.loss == pytest.approx(2 * plain.metrics.eval.loss, rel=1e-6)
    assert custom.metrics.train.loss == pytest.approx(2 * plain.metrics.train.loss, rel=1e-6)
    assert custom.metrics.eval.accuracy == plain.metrics.eval.accuracy


# --------------------------------------------------------------------------- batching


def test_dataset_and_dataloader_over_it_give_identical_reports(healthy_convnet, images):
    dataset = TensorDataset(*images)
    from_dataset = diagnose(healthy_convnet, dataset, batch_size=24)
    from_loader = diagnose(healthy_convnet, DataLoader(dataset, batch_size=24, shuffle=True))
    from_pair = diagnose(healthy_convnet, images, batch_size=24)
    assert from_loader == from_dataset == from_pair
    assert from_loader.data.batch_size == 24 and from_loader.data.reshuffled


def _first_inputs(model, data, **options):
    seen = []
    handle = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0].clone()))
    try:
        report = diagnose(model, data, **options)
    finally:
        handle.remove()
    return report, seen


def test_seeds_change_batch_composition_but_not_population_statistics(healthy_convnet, images):
    a, seen_a = _first_inputs(healthy_convnet, images, batch_size=16, seed=0)
    b, seen_b = _first_inputs(healthy_convnet, images, batch_size=16, seed=1)
    assert not torch.equal(seen_a[0], seen_b[0])  # different batches
    assert a.data.num_samples == b.data.num_samples == len(images[0])
    # bn1 sees the data itself (through a fixed conv): population moments do not depend on batching
    bn1_a, bn1_b = layer_named(a, "bn1").channels, layer_named(b, "bn1").channels
    spread = torch.tensor(bn1_a.true_var).sqrt()
    for field in ("true_mean", "true_var", "true_var_unbiased"):
        assert_stats_close(getattr(bn1_a, field), torch.tensor(getattr(bn1_b, field)), spread)
    # eval mode is batch-independent; train mode is not
    assert a.metrics.eval.loss == pytest.approx(b.metrics.eval.loss, rel=1e-5)
    assert a.metrics.train.loss != b.metrics.train.loss
    # the same seed again is the same report
    assert diagnose(healthy_convnet, images, batch_size=16, seed=1) == b


def test_max_batches_and_max_samples_limit_the_work(healthy_mlp, blobs):
    x, y = blobs  # 240 samples
    report = diagnose(healthy_mlp, blobs, batch_size=16, max_batches=3)
    assert (report.data.num_batches, report.data.num_samples) == (3, 48)
    report = diagnose(healthy_mlp, blobs, batch_size=16, max_samples=40)
    assert (report.data.num_batches, report.data.num_samples) == (3, 40)
    assert layer_named(report, "1").batch_samples == 16
    report = diagnose(healthy_mlp, as_batches(x, y, 10), max_batches=5)
    assert (report.data.num_batches, report.data.num_samples) == (5, 50)
    assert report.data.batch_size is None and not report.data.reshuffled


def test_a_lone_trailing_sample_is_dropped(healthy_mlp, blobs):
    x, y = blobs
    report = diagnose(healthy_mlp, (x[:33], y[:33]), batch_size=16)
    assert (report.data.num_batches, report.data.num_samples) == (2, 32)
    report = diagnose(healthy_mlp, as_batches(x[:33], y[:33], 16))  # given batches: skipped too
    assert (report.data.num_batches, report.data.num_samples) == (2, 32)


def test_data_errors(healthy_mlp, blobs):
    x, y = blobs
    before = model_state(healthy_mlp)
    with pytest.raises(DataError, match="at least 2"):
        diagnose(healthy_mlp, blobs, batch_size=1)
    with pytest.raises(DataError, match="batch size is 1"):
        diagnose(healthy_mlp, DataLoader(TensorDataset(x, y), batch_size=1))
    with pytest.raises(DataError, match="empty"):
        diagnose(healthy_mlp, TensorDataset(x[:0], y[:0]))
    with pytest.raises(DataError, match="2 or more samples"):
        diagnose(healthy_mlp, as_batches(x[:4], y[:4], 1))
    with pytest.raises(DataError, match="single sample"):
        diagnose(healthy_mlp, (x[:1], y[:1]))
    with pytest.raises(DataError, match="inputs hold 10 samples but targets hold 9"):
        diagnose(healthy_mlp, (x[:10], y[:9]))
    bad = x.clone()
    bad[100, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        diagnose(healthy_mlp, (bad, y))
    with pytest.raises(ShapeMismatchError):
        diagnose(healthy_mlp, (x, torch.full_like(y, 7)))  # class 7 of a 3-class model
    with pytest.raises(InputError, match="max_gap"):
        diagnose(healthy_mlp, blobs, max_gap=-0.1)
    assert_untouched(healthy_mlp, before)


def test_models_without_usable_norm_layers_are_refused(blobs):
    with pytest.raises(NoNormLayersError, match="no BatchNorm"):
        diagnose(nn.Sequential(nn.Linear(8, 3)), blobs)
    with pytest.raises(NoNormLayersError, match="track_running_stats=False"):
        diagnose(nn.Sequential(nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 3)), blobs)
    with pytest.raises(InputError, match="torch.nn.Module"):
        diagnose(object(), blobs)
